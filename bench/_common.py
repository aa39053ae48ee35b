"""Shared benchmark plumbing: environment record, timing, peak memory, result files.

Every benchmark writes rows {op, shape, impl, ms, peak_mib, ...} plus ratios computed in the same run.
Results go to bench/results/<family>-<device>-<date>.json with device, versions and git sha.
"""
from __future__ import annotations

import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from typing import Any, Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: str | torch.device = "cpu", *, warmup: int = 1, rep: int = 5) -> float:
    """Median wall time of fn() in ms: triton.testing.do_bench on GPU, perf_counter on CPU."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_child(fn, queue):  # runs in a forked child
    with open("/proc/self/statm") as f:
        start_kib = int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    fn()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((peak_kib - start_kib) / 1024.0)


def peak_mib(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Extra peak memory of one fn() call in MiB: CUDA allocator peak over the live set on GPU; on CPU the
    peak-RSS growth of a forked child running fn() once (includes allocator slack; compare in one run)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(fn, queue))
    proc.start()
    proc.join()
    return queue.get(timeout=5) if proc.exitcode == 0 else float("nan")


def write_results(family: str, rows: list[dict[str, Any]], device: str | torch.device = "cpu",
                  extra: dict[str, Any] | None = None) -> str:
    """Write rows (with the environment) to bench/results/<family>-<device>-<date>.json; return the path."""
    env = environment(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()[:40]
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{family}-{slug}-{env['date'][:10]}.json")
    with open(path, "w") as f:
        json.dump({"family": family, "environment": env, "rows": rows, **(extra or {})}, f, indent=2)
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns} if rows else {}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
