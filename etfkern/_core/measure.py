"""Timing and peak-memory measurement shared by the benchmarks and `etfkern demo`."""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
from typing import Any, Callable

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: str | torch.device = "cpu", *, warmup: int = 1, rep: int = 5) -> float:
    """Median wall time of ``fn()`` in ms: ``triton.testing.do_bench`` on GPU, ``perf_counter`` on CPU."""
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


def proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field (e.g. VmHWM) in KiB; None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """glibc malloc_trim(0): return freed heap pages to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: clear_refs "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_child(fn: Callable[[], Any], queue: Any) -> None:  # runs in a forked child
    # The parent's OpenMP thread pool does not survive fork(): a parallel region in the child would hang.
    # One thread runs parallel regions inline; peak memory is what we measure here, not time.
    torch.set_num_threads(1)
    # A first call pays one-time costs (library initialisation, first-use code pages, buffers an op keeps for
    # later calls: ~20 MiB even for tiny shapes); then the peak mark is reset and the second call is measured,
    # as the CUDA measurement counts what is already allocated as the base.
    fn()
    _release_free_heap()  # memory the first call freed but malloc kept must count again when the second call reuses it
    reset = reset_peak_rss()
    with open("/proc/self/statm") as f:
        start_kib = int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    fn()
    hwm = proc_status_kib("VmHWM") if reset else None
    # without the reset: the process's lifetime peak (an upper bound that may include the first call's peak)
    peak_kib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((peak_kib - start_kib) / 1024.0)


def peak_mib(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Extra peak memory of one ``fn()`` call in MiB.

    GPU: the CUDA allocator's peak above what was live before the call. CPU: in a forked child, ``fn()`` once to
    pay one-time costs, then the peak-RSS growth of a second call (Linux clear_refs resets the peak mark; includes
    allocator slack, so compare numbers taken in the same run).
    """
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
    proc.join(timeout=600)
    if proc.is_alive():
        proc.kill()
        return float("nan")
    return float(queue.get(timeout=5)) if proc.exitcode == 0 else float("nan")
