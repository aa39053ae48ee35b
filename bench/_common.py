"""Shared benchmark plumbing: environment record, timing, peak memory, result files.

Every benchmark writes rows {op, shape, impl, ms, peak_mib, ...} plus ratios computed in the same run.
Results go to bench/results/<family>-<device>-<date>[-quick].json with device, versions and git sha.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from typing import Any, Iterator

import torch

from etfkern._core.measure import peak_mib, sync, time_ms  # noqa: F401  (re-exported for the bench scripts)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@contextlib.contextmanager
def env_var(var: str, value: str) -> Iterator[None]:
    """Set environment variable ``var`` to ``value`` for the block (the kernels' test/variant switches)."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var)
        else:
            os.environ[var] = old


# Rows the running family has measured so far (emit_row); bench/run_all.py clears it before each family and keeps
# these rows when a time box interrupts the family.
PARTIAL_ROWS: list[dict[str, Any]] = []


def emit_row(row: dict[str, Any]) -> dict[str, Any]:
    """Record ``row`` the moment it is measured: kept in PARTIAL_ROWS and printed as a ``ROW {json}`` line, so a run
    cut short by a time box (run_all, tools/gpu_check.sh) still has it. Returns ``row``."""
    PARTIAL_ROWS.append(row)
    print("ROW " + json.dumps(row, default=str), flush=True)
    return row


def seconds_left() -> float | None:
    """Seconds until ``ETFKERN_BENCH_DEADLINE`` (a Unix time that tools/gpu_check.sh sets to the end of each family's
    time box, less a margin), or None when unset. A sweep that checks it before each new shape, and stops when too
    little is left, returns the rows it has instead of being cut off with none."""
    deadline = os.environ.get("ETFKERN_BENCH_DEADLINE")
    if not deadline:
        return None
    try:
        return float(deadline) - time.time()
    except ValueError:
        return None


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} x{os.cpu_count()}"


def git_sha() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=root) != 0
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    import etfkern

    env = {"device": device_name(device), "device_type": torch.device(device).type, "torch": torch.__version__,
           "etfkern": etfkern.__version__, "git_sha": git_sha(), "python": platform.python_version(),
           "threads": torch.get_num_threads(), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    return env


def write_results(family: str, rows: list[dict[str, Any]], device: str | torch.device = "cpu",
                  extra: dict[str, Any] | None = None) -> str:
    """Write rows (with the environment) to bench/results/<family>-<device>-<date>[-quick].json; return the path
    (``-quick`` when ``extra["quick"]`` is true)."""
    env = environment(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()[:40]
    os.makedirs(RESULTS_DIR, exist_ok=True)
    # quick runs get their own file: a quick run must not overwrite the same day's full-size results
    quick = "-quick" if (extra or {}).get("quick") else ""
    path = os.path.join(RESULTS_DIR, f"{family}-{slug}-{env['date'][:10]}{quick}.json")
    with open(path, "w") as f:
        json.dump({"family": family, "environment": env, "rows": rows, **(extra or {})}, f, indent=2)
    return path


def repo_relative(path: str) -> str:
    """``path`` relative to the repository root (how dispatch entries cite their result file)."""
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_dispatch_file(path: str, written_by: str, source: str, entries: list[dict[str, Any]]) -> str:
    """Write a dispatch JSON (the format etfkern/_core/dispatch.py ``load_measured`` reads) to ``path``; return it."""
    with open(path, "w") as f:
        json.dump({"written_by": written_by, "source": source, "entries": entries}, f, indent=2)
    return path


def gpu_run_rows(path: str, family: str) -> list[dict[str, Any]] | None:
    """The rows of ``family`` in a saved full GPU run (the family's own result file, or run_all's merged one);
    None, with a message saying why, when the file is not a full (non --quick) CUDA run."""
    with open(path) as f:
        data = json.load(f)
    device = data.get("environment", {}).get("device_type", "")
    if device != "cuda" or data.get("quick"):
        print(f"{path}: not a full GPU run (device_type {device!r}, quick {data.get('quick')}): no dispatch data")
        return None
    return data.get("rows") or data.get("families", {}).get(family, {}).get("rows") or []


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns} if rows else {}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
