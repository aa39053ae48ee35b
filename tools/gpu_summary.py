"""The end of a tools/gpu_check.sh run: what passed, what failed, the headline ratios against peers.

    python tools/gpu_summary.py WORK_DIR     # prints the summary and writes WORK_DIR/summary.txt

WORK_DIR holds stages.tsv (stage, exit code, seconds, note), junit_gpu.xml (pytest) and bench/<family>.json
(run_all's result per family); any of them may be missing (a stage that never ran or was cut short).
"""
from __future__ import annotations

import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any

MAX_FAILED_NAMES = 25
BUILD_ERROR_LINES = 15  # of a failed build's output, in the summary

# family -> [(op, etfkern's impl, peers (None: every impl of the group not named etfkern*))]: the ratios the summary quotes.
HEADLINES: dict[str, list[tuple[str, str, tuple[str, ...] | None]]] = {
    "spherical": [("ce_fwd_bwd", "etfkern", None), ("ce_fwd_bwd", "etfkern_mm", None), ("nearest", "etfkern", None)],
    "collapse": [("update", "etfkern", ("two_pass", "two_pass_f64", "onehot", "gemm_floor"))],
    "msam": [("optimizer_step", "msam_exact", ("sgd_fused", "sgd_foreach")),
             ("optimizer_step", "adamw_msam", ("adamw_fused",))],
    "banks": [("bank_stats", "bank_stats (tiled)", None)],
}
HEADLINES["spherical_ce"] = HEADLINES["spherical"]


def junit_counts(path: str) -> dict[str, Any]:
    """{tests, passed, failed, errors, skipped, failed_names} from a pytest junit file (all zero if absent)."""
    out: dict[str, Any] = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_names": []}
    if not os.path.exists(path):
        out["missing"] = True
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        out["missing"] = f"unreadable: {exc}"
        return out
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            out["failed"] += 1
            out["failed_names"].append(name)
        elif "error" in kinds:
            out["errors"] += 1
            out["failed_names"].append(name + " (error)")
        elif "skipped" in kinds:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def _shape(v: Any) -> str:
    return "x".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def headline_ratios(family: str, rows: list[dict[str, Any]], limit: int = 8) -> list[str]:
    """Lines 'op shape dtype: etfkern 3.91 ms = 2.14x torch.compile, 0.76x liger, ...' (x = etfkern / peer)."""
    lines = []
    for op, ours, peers in HEADLINES.get(family, []):
        groups: dict[tuple, dict[str, float]] = {}
        for r in rows:
            ms = r.get("ms")
            if r.get("op") == op and isinstance(ms, (int, float)) and math.isfinite(ms) and r.get("impl"):
                key = (_shape(r.get("shape")), r.get("dtype") or "")
                groups.setdefault(key, {})[r["impl"]] = float(r["ms"])
        for (shape, dtype), times in groups.items():
            if ours not in times or times[ours] <= 0:
                continue
            candidates = peers or [p for p in times if not p.startswith("etfkern")]  # peers, not our variants
            others = [p for p in candidates if p in times and p != ours and times[p] > 0]
            if not others:
                continue
            ratios = ", ".join(f"{times[ours] / times[p]:.2f}x {p}" for p in others)
            lines.append(f"{op} {shape} {dtype}".rstrip() + f": {ours} {times[ours]:.3g} ms = {ratios}")
    return lines[:limit]


def summarize(work: str) -> str:
    lines = ["", "=" * 100, "GPU CHECK SUMMARY", "=" * 100]
    stages_path = os.path.join(work, "stages.tsv")
    if os.path.exists(stages_path):
        lines.append("stages (exit code, seconds):")
        with open(stages_path) as f:
            for line in f:
                name, rc, seconds, note = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
                verdict = {"0": "ok", "skipped": "skipped", "124": "TIMED OUT", "137": "KILLED"}.get(rc, "FAILED")
                lines.append(f"  {name:<22} {verdict:<9} rc={rc:<4} {seconds:>5} s  {note}".rstrip())
                stage_log = os.path.join(work, f"stage-{name}.log")
                if verdict == "FAILED" and name.startswith("build") and os.path.exists(stage_log):
                    with open(stage_log, errors="replace") as g:
                        tail = g.read().splitlines()[-BUILD_ERROR_LINES:]
                    lines += [f"    | {t}" for t in tail]
    tests = junit_counts(os.path.join(work, "junit_gpu.xml"))
    if tests.get("missing"):
        lines.append(f"GPU tests: no junit file ({tests['missing'] if tests['missing'] is not True else 'not run'})")
    else:
        lines.append(f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped (of {tests['tests']})")
        for name in tests["failed_names"][:MAX_FAILED_NAMES]:
            lines.append(f"  FAILED {name}")
        if len(tests["failed_names"]) > MAX_FAILED_NAMES:
            lines.append(f"  ... and {len(tests['failed_names']) - MAX_FAILED_NAMES} more (junit_gpu.xml)")
    bench_dir = os.path.join(work, "bench")
    files = sorted(f for f in os.listdir(bench_dir) if f.endswith(".json")) if os.path.isdir(bench_dir) else []
    lines.append("benchmarks (x = etfkern time / peer time: below 1 etfkern is faster):" if files
                 else "benchmarks: no result files")
    for name in files:
        try:
            with open(os.path.join(bench_dir, name)) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            lines.append(f"  {name}: unreadable ({exc})")
            continue
        for family, fam in data.get("families", {}).items():
            seconds = fam.get("seconds")
            head = f"  {family}: " + (f"{len(fam.get('rows', []))} rows in {seconds:.0f} s" if seconds else "")
            lines.append(head + (f" -- {fam['error']}" if fam.get("error") else ""))
            lines += [f"    {line}" for line in headline_ratios(family, fam.get("rows", []))]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python tools/gpu_summary.py WORK_DIR", file=sys.stderr)
        return 2
    text = summarize(argv[0])
    with open(os.path.join(argv[0], "summary.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
