"""Run every benchmark family, write bench/results/<device>-<date>.json and render bench/REPORT.md + PNG charts.

    python bench/run_all.py                 # full sizes (meant for the GPU machine)
    python bench/run_all.py --quick         # small shapes, minutes on a CPU
    python bench/run_all.py --only spherical,msam
    python bench/run_all.py --report-only bench/results/<file>.json   # re-render REPORT.md from a result file
    python bench/run_all.py --merge a.json b.json --out all.json      # one result (and report) from several files

Each family is a module bench/<family>.py exposing ``run(quick: bool, device: str) -> list[dict]``; rows carry
at least ``op``, ``shape`` and ``impl`` and usually ``ms`` / ``peak_mib`` / ratio columns computed in the same run.
A family that fails is recorded with its error and does not stop the others; an interrupt (Ctrl-C, or the
SIGINT of a time box such as tools/gpu_check.sh's) records the family it cut short and stops, keeping what finished.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402
from _common import RESULTS_DIR, environment  # noqa: E402

FIRST_COLUMNS = ["op", "shape", "impl", "dtype", "ms", "peak_mib"]


FAMILIES = ("banks", "collapse", "msam", "spherical")  # bench/<family>.py, one per etfkern family


def families() -> dict[str, str]:
    return {name: os.path.join(HERE, f"{name}.py") for name in FAMILIES}


def _load(name: str, path: str):
    # Registered under its file's own name (bench/ is on sys.path, here and in a spawned child), so functions it
    # hands to spawned processes pickle by reference and the child can import them.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
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
        _common.PARTIAL_ROWS.clear()
        try:
            rows = _load(name, path).run(quick=quick, device=device)
            out["families"][name] = {"rows": rows, "seconds": time.perf_counter() - t0}
        except KeyboardInterrupt:  # a time box ran out: keep what finished, say what was cut short
            seconds = time.perf_counter() - t0
            kept = list(_common.PARTIAL_ROWS)  # what the family measured before the cut (bench/_common.py emit_row)
            out["families"][name] = {"rows": kept, "seconds": seconds,
                                     "error": f"interrupted after {seconds:.0f} s (time limit or Ctrl-C); "
                                              f"{len(kept)} rows measured before"}
            out["interrupted"] = name
            if save_to:
                _save(out, save_to)
            break
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


# Ratio columns the family scripts write, and what they mean (the report's legend lists those it shows).
# "row" is the table row the value sits on; every ratio comes from timings taken in the same run.
RATIO_COLUMNS = {
    "ratio_to_etfkern": "this row's ms / etfkern's ms for the same op and shape (> 1: etfkern is faster)",
    "vs_etfkern": "this row's ms / etfkern's ms for the same shape (> 1: etfkern is faster)",
    "vs_two_pass": "two_pass ms / this row's ms (> 1: this row is faster)",
    "one_pass_vs_two_pass": "(two_pass update + NC1) / (etfkern update + NC1) (> 1: etfkern is faster)",
    "one_pass_vs_two_pass_f64": "(two_pass_f64 update + NC1) / (etfkern update + NC1) (> 1: etfkern is faster)",
    "one_pass_gram_metrics_vs_two_pass_nc1":
        "(two_pass update + NC1) / (etfkern update + every Gram metric) (> 1: etfkern is faster)",
    "one_pass_all_metrics_vs_two_pass_nc1":
        "(two_pass update + NC1) / (etfkern update + every metric) (> 1: etfkern is faster)",
    "onehot_over_etfkern": "onehot ms / etfkern ms (> 1: etfkern is faster)",
    "etfkern_over_gemm_floor": "etfkern ms / the GEMM floor's ms (1 = at the floor)",
    "mm_product_over_gemm_floor": "etfkern_mm_product ms / the GEMM floor's ms (1 = at the floor)",
    "speed_vs_dense": "dense ms / this row's ms (> 1: this row is faster)",
    "memory_vs_dense": "this row's peak MiB / dense peak MiB (< 1: this row uses less)",
    "peak_over_logits": "this row's peak MiB / the size of the fp32 N x C logits",
    "x_floor": "this row's ms / the time its method's minimal bytes take at the measured copy rate (1 = at the floor)",
    "copy_frac": "achieved bandwidth of the method's minimal traffic / the measured copy rate (1 = at the floor)",
    "ratio_welch": "max |cos| / the Welch bound (1 is optimal)",
    "random_ratio_welch": "max |cos| of random unit vectors / the Welch bound",
    "vs_official": "max |cos| / the official EBV bank's (< 1: etfkern's bank is better)",
}


def ratio_meaning(column: str) -> str | None:
    """What a ratio column means, or None for a column that is not a known ratio."""
    if column in RATIO_COLUMNS:
        return RATIO_COLUMNS[column]
    if column.startswith("x_"):  # msam: x_<impl>
        return f"this row's ms / {column[2:]}'s ms for the same shape (> 1: this row is slower than {column[2:]})"
    return None


def render_report(result: dict[str, Any], report_path: str, chart_dir: str) -> list[str]:
    """Write the markdown report (tables per family) and one PNG chart per family with timings; return the PNGs."""
    env = result["environment"]
    lines = ["# etfkern benchmark report", "",
             f"Device: **{env['device']}** ({env['device_type']}), torch {env['torch']}, triton {env.get('triton')}, "
             f"etfkern {env['etfkern']} at `{env['git_sha']}`, {env['date']}" + (" — quick shapes" if result.get("quick") else ""),
             "", "Every ratio is computed from timings taken in the same run. What each ratio column is:", ""]
    shown = [c for fam in result["families"].values() for c in _columns(fam.get("rows", []))]
    lines += [f"- `{c}`: {ratio_meaning(c)}" for c in dict.fromkeys(shown) if ratio_meaning(c)]
    lines.append("")
    if result.get("interrupted"):
        lines += [f"The run was interrupted during `{result['interrupted']}`; the families after it did not run.", ""]
    charts = []
    for name, fam in result["families"].items():
        lines += [f"## {name}", ""]
        if fam.get("error"):
            lines += [f"Failed: `{fam['error']}`", ""]
        rows = fam.get("rows", [])
        if fam.get("error") and not rows:
            continue
        if not rows:
            lines += ["(no rows)", ""]
            continue
        cols = _columns(rows)
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
        lines.append("")
        png = _chart(name, rows, chart_dir, env)
        if png:
            charts.append(png)
            lines += [f"![{name}]({os.path.relpath(png, os.path.dirname(report_path))})", ""]
    with open(report_path, "w") as f:
        f.write("\n".join(lines))
    return charts


def print_tables(result: dict[str, Any], file=None) -> None:
    """The result as plain-text tables: the leading columns and the ratio columns of each family."""
    file = file or sys.stdout
    for name, fam in result["families"].items():
        print(f"\n== {name}" + (f" ({fam['seconds']:.0f} s)" if isinstance(fam.get("seconds"), (int, float)) else ""),
              file=file)
        if fam.get("error"):
            print(f"failed: {fam['error']}", file=file)
        rows = fam.get("rows", [])
        if not rows:
            if not fam.get("error"):
                print("(no rows)", file=file)
            continue
        cols = [c for c in _columns(rows) if c in FIRST_COLUMNS or c == "skipped" or ratio_meaning(c)]
        cells = [[_cell(r.get(c)) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(), file=file)
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=file)


# The ops each family's chart shows (all timed ops when none of these is present); the rest are in the tables.
CHART_OPS = {"spherical": ("ce_fwd_bwd", "nearest"), "spherical_ce": ("ce_fwd_bwd", "nearest"),
             "collapse": ("update", "compute"), "msam": ("optimizer_step",), "banks": ("bank_stats",)}
MAX_PANELS = 8


def _is_ours(impl: str) -> bool:
    return impl.startswith(("etfkern", "msam", "adamw_msam", "bank_stats", "auto")) or impl.startswith("structured")


def _finite(v: Any) -> bool:
    """A real measurement: a number, not NaN/inf (a row that measured no memory writes NaN)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: float) -> str:
    """3 significant digits without exponents: 0.0577, 9.67, 459, 1,530."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _chart(name: str, rows: list[dict[str, Any]], chart_dir: str, env: dict[str, Any] | None = None) -> str | None:
    """One panel per (op, shape, dtype): a horizontal bar per implementation, ms on a linear axis from 0 (bar
    lengths compare honestly), each bar labelled with its time (and peak memory when measured); peers that did not
    run are listed with the reason. etfkern's bars are blue, peers grey. Returns the PNG path, or None."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "impl" in r and (_finite(r.get("ms")) or r.get("skipped")):
            groups.setdefault((r.get("op", ""), _cell(r.get("shape")), r.get("dtype") or ""), []).append(r)
    groups = {k: v for k, v in groups.items() if any(_finite(r.get("ms")) for r in v)}
    ops = CHART_OPS.get(name, ())
    wanted = sorted((k for k in groups if k[0] in ops), key=lambda k: ops.index(k[0]))  # one op per row: even panels
    keys = (wanted or list(groups))[:MAX_PANELS]
    if not keys:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ncols = 1 if len(keys) == 1 else 2
    nrows = (len(keys) + ncols - 1) // ncols
    row_bars = [max(len(groups[k]) for k in keys[r * ncols:(r + 1) * ncols]) for r in range(nrows)]
    heights = [0.75 + 0.32 * b for b in row_bars]
    fig = Figure(figsize=(6.0 * ncols, 0.6 + sum(heights)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={"height_ratios": heights})
    for i, key in enumerate(keys):
        ax = axes[i // ncols, i % ncols]
        bars = row_bars[i // ncols]
        group = groups[key]
        labels, values, colors, notes = [], [], [], []
        for r in group:
            labels.append(str(r["impl"]))
            ms = r.get("ms") if _finite(r.get("ms")) else None
            values.append(ms or 0.0)
            colors.append("#1f77b4" if _is_ours(str(r["impl"])) else "#9a9a9a")
            if ms is None:
                notes.append(f"not run: {r.get('skipped') or r.get('error') or 'no time'}")
            else:
                peak = r.get("peak_mib")
                notes.append(f"{_short(ms)} ms" + (f", {_short(peak)} MiB" if _finite(peak) else ""))
        y = list(range(len(group)))[::-1]
        ax.barh(y, values, color=colors, height=0.7)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(len(group) - bars - 0.5, len(group) - 0.5)  # the same bar thickness in every panel
        top = max(values) or 1.0
        ax.set_xlim(0, top * 1.55)
        for yy, v, note in zip(y, values, notes):
            ax.text(v + top * 0.02, yy, note, va="center", fontsize=7)
        op, shape, dtype = key
        ax.set_title(" ".join(str(p) for p in (op, shape, dtype) if p), fontsize=9)
        ax.set_xlabel("ms per call (lower is better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for j in range(len(keys), nrows * ncols):  # no empty panels
        fig.delaxes(axes[j // ncols, j % ncols])
    device = (env or {}).get("device", "")
    fig.suptitle(f"{name}" + (f" on {device}" if device else "") + ": etfkern (blue) and peers (grey), same run",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(chart_dir, exist_ok=True)
    path = os.path.join(chart_dir, f"{name}.png")
    fig.savefig(path, dpi=110)
    return path


def merge_results(paths: list[str]) -> dict[str, Any]:
    """One result from several files (run_all's or a family's): the first file's environment, the families of all
    (a family in two files: the later file wins). ValueError for an unreadable file."""
    merged: dict[str, Any] = {"families": {}}
    for path in paths:
        result = load_result(path)
        merged.setdefault("environment", result["environment"])
        merged.setdefault("quick", result.get("quick"))
        merged["families"].update(result["families"])
        if result.get("interrupted"):
            merged["interrupted"] = result["interrupted"]
    if "environment" not in merged:
        raise ValueError("--merge needs at least one result file")
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU minutes)")
    p.add_argument("--only", default="", help=f"comma-separated families of: {', '.join(families())}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="result JSON path (default bench/results/<device>-<date>.json)")
    p.add_argument("--report", default=os.path.join(HERE, "REPORT.md"), help="markdown report path")
    p.add_argument("--report-only", default=None, metavar="JSON", help="only re-render the report from a result file")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge result files into one (--out, if given) and render its report")
    p.add_argument("--no-tables", action="store_true", help="do not print the result tables")
    args = p.parse_args(argv)

    if os.path.isdir(args.report):
        print(f"run_all: --report {args.report!r} is a directory; give the markdown file's path", file=sys.stderr)
        return 2
    try:  # the report's folder (and charts/ next to it) is created, like the results JSON's
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    except OSError as exc:
        print(f"run_all: --report {args.report!r}: cannot create its folder: {exc}", file=sys.stderr)
        return 2
    if args.report_only or args.merge:
        try:
            result = load_result(args.report_only) if args.report_only else merge_results(args.merge)
        except ValueError as exc:
            print(f"run_all: {'--report-only' if args.report_only else '--merge'}: {exc}", file=sys.stderr)
            return 2
        if args.merge and args.out:
            _save(result, args.out)
            print(f"results: {args.out}")
    else:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except RuntimeError:
            print(f"run_all: --device {device!r} is not a torch device (cpu, cuda, ...)", file=sys.stderr)
            return 2
        if dev.type not in ("cpu", "cuda"):
            print(f"run_all: --device {device}: etfkern runs on cpu and cuda tensors only", file=sys.stderr)
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
    if not args.no_tables:
        print_tables(result)
        print()
    print(f"report: {args.report}" + (f" (+{len(charts)} charts)" if charts else ""))
    failed = [n for n, fam in result["families"].items() if fam.get("error")]
    if result.get("interrupted"):
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
