"""Run every benchmark family, write bench/results/<device>-<date>.json and render bench/REPORT.md + PNG charts.

    python bench/run_all.py                 # full sizes (meant for the GPU machine)
    python bench/run_all.py --quick         # small shapes, minutes on a CPU
    python bench/run_all.py --only spherical,msam
    python bench/run_all.py --report-only bench/results/<file>.json   # re-render REPORT.md from a result file

Each family is a module bench/<family>.py exposing ``run(quick: bool, device: str) -> list[dict]``; rows carry
at least ``op``, ``shape`` and ``impl`` and usually ``ms`` / ``peak_mib`` / ratio columns computed in the same run.
A family that fails is recorded with its error and does not stop the others.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import RESULTS_DIR, environment  # noqa: E402

FIRST_COLUMNS = ["op", "shape", "impl", "dtype", "ms", "peak_mib"]


FAMILIES = ("banks", "collapse", "msam", "spherical")  # bench/<family>.py, one per etfkern family


def families() -> dict[str, str]:
    return {name: os.path.join(HERE, f"{name}.py") for name in FAMILIES}


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    # Registered under its file name so that functions it hands to spawned processes pickle by reference.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _save(result: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)


def run(only: list[str] | None, quick: bool, device: str, save_to: str | None = None) -> dict[str, Any]:
    """Run the families in name order; with ``save_to``, rewrite that JSON after each family (a run cut short
    by a time limit keeps what finished)."""
    out: dict[str, Any] = {"environment": environment(device), "quick": quick, "families": {}}
    for name, path in families().items():
        if only and name not in only:
            continue
        print(f"== {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            rows = _load(name, path).run(quick=quick, device=device)
            out["families"][name] = {"rows": rows, "seconds": time.perf_counter() - t0}
        except Exception as exc:  # noqa: BLE001 - one broken family must not hide the others
            traceback.print_exc()
            out["families"][name] = {"rows": [], "error": f"{type(exc).__name__}: {exc}",
                                     "seconds": time.perf_counter() - t0}
        if save_to:
            _save(out, save_to)
    return out


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = [c for c in FIRST_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        seen += [k for k in r if k not in seen]
    return seen


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return "" if v is None else str(v).replace("|", "/")


def load_result(path: str) -> dict[str, Any]:
    """A result file as run_all's shape: run_all's own JSON, or one family's file written by bench/<family>.py
    (``{"family", "environment", "rows"}``), wrapped as a one-family result. ValueError when it is neither."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("families"), dict) and isinstance(data.get("environment"), dict):
        return data
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("environment"), dict):
        name = data.get("family") or os.path.basename(path).split("-")[0]
        return {"environment": data["environment"], "quick": data.get("quick"),
                "families": {name: {"rows": data["rows"]}}}
    raise ValueError(f"{path} is not a benchmark result: expected run_all's {{environment, families}} "
                     f"or a family's {{family, environment, rows}}")


def render_report(result: dict[str, Any], report_path: str, chart_dir: str) -> list[str]:
    """Write the markdown report (tables per family) and one PNG chart per family with timings; return the PNGs."""
    env = result["environment"]
    lines = ["# etfkern benchmark report", "",
             f"Device: **{env['device']}** ({env['device_type']}), torch {env['torch']}, triton {env.get('triton')}, "
             f"etfkern {env['etfkern']} at `{env['git_sha']}`, {env['date']}" + (" — quick shapes" if result.get("quick") else ""),
             "", "Ratios are measured in the same run (peer time / etfkern time unless the column says otherwise).", ""]
    charts = []
    for name, fam in result["families"].items():
        lines += [f"## {name}", ""]
        if fam.get("error"):
            lines += [f"Failed: `{fam['error']}`", ""]
            continue
        rows = fam["rows"]
        if not rows:
            lines += ["(no rows)", ""]
            continue
        cols = _columns(rows)
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
        lines.append("")
        png = _chart(name, rows, chart_dir)
        if png:
            charts.append(png)
            lines += [f"![{name}]({os.path.relpath(png, os.path.dirname(report_path))})", ""]
    with open(report_path, "w") as f:
        f.write("\n".join(lines))
    return charts


def _chart(name: str, rows: list[dict[str, Any]], chart_dir: str) -> str | None:
    timed = [r for r in rows if isinstance(r.get("ms"), (int, float)) and "impl" in r]
    if not timed:
        return None
    groups = list(dict.fromkeys(f"{r.get('op', '')} {_cell(r.get('shape'))}".strip() for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    try:
        from etfkern._core.plot import agg_figure

        fig, axes = agg_figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(impls)) / 2), 4))
    except ImportError:
        return None
    ax = axes[0, 0]
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g_idx, g in enumerate(groups):
            for r in timed:
                if r["impl"] == impl and f"{r.get('op', '')} {_cell(r.get('shape'))}".strip() == g:
                    xs.append(g_idx + k * width)
                    ys.append(r["ms"])
        ax.bar(xs, ys, width=width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("ms (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"etfkern bench: {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(chart_dir, exist_ok=True)
    path = os.path.join(chart_dir, f"{name}.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU minutes)")
    p.add_argument("--only", default="", help=f"comma-separated families of: {', '.join(families())}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="result JSON path (default bench/results/<device>-<date>.json)")
    p.add_argument("--report", default=os.path.join(HERE, "REPORT.md"), help="markdown report path")
    p.add_argument("--report-only", default=None, metavar="JSON", help="only re-render the report from a result file")
    args = p.parse_args(argv)

    if os.path.isdir(args.report):
        print(f"run_all: --report {args.report!r} is a directory; give the markdown file's path", file=sys.stderr)
        return 2
    try:  # the report's folder (and charts/ next to it) is created, like the results JSON's
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    except OSError as exc:
        print(f"run_all: --report {args.report!r}: cannot create its folder: {exc}", file=sys.stderr)
        return 2
    if args.report_only:
        try:
            result = load_result(args.report_only)
        except ValueError as exc:
            print(f"run_all: --report-only: {exc}", file=sys.stderr)
            return 2
    else:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except RuntimeError:
            print(f"run_all: --device {device!r} is not a torch device (cpu, cuda, ...)", file=sys.stderr)
            return 2
        if dev.type == "cuda" and not torch.cuda.is_available():
            print(f"run_all: --device {device}: no CUDA device is available here", file=sys.stderr)
            return 2
        only = [s.strip() for s in args.only.split(",") if s.strip()] or None
        unknown = set(only or []) - set(families())
        if unknown:
            print(f"run_all: unknown families {sorted(unknown)}; have {sorted(families())}", file=sys.stderr)
            return 2
        env = environment(device)
        slug = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()[:40]
        out = args.out or os.path.join(RESULTS_DIR, f"{slug}-{env['date'][:10]}{'-quick' if args.quick else ''}.json")
        result = run(only, args.quick, device, save_to=out)
        _save(result, out)
        print(f"results: {out}")
    charts = render_report(result, args.report, os.path.join(os.path.dirname(args.report), "charts"))
    print(f"report: {args.report}" + (f" (+{len(charts)} charts)" if charts else ""))
    failed = [n for n, fam in result["families"].items() if fam.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
