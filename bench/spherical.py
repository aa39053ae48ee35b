"""Benchmark: fused spherical cross-entropy (and nearest) vs eager torch, torch.compile, Liger, cut-cross-entropy.

    python bench/spherical.py --device cuda [--budget-s 170]    the GPU sweep (issue 21), ~170 s on an H200
    python bench/spherical.py [--quick] [--device cpu] [--no-write] [--sweep]

GPU sweep (``--device cuda``, or ``--sweep``): bf16, every class-loop variant (ETFKERN_SPHERICAL_CLASS_LOOP = fused,
mm, chunked; nearest: ETFKERN_SPHERICAL_NEAREST = fused, chunked) and the peers (eager, torch.compile, Liger FLCE,
cut-cross-entropy when importable) in one run over SWEEP_SHAPES: fwd+bwd with a frozen bank, eval forward, nearest
k=5, and the trainable bank at 8192x512x32768; ms, TFLOP/s of 4NCd (6NCd with dW, 2NCd forward-only), extra MiB
(peak allocated minus inputs and x.grad), x_vs_<peer> (peer ms / ours). Writes bench/results/spherical-<device>-
<date>.json and, on a GPU without --quick, bench/results/spherical-dispatch.json (the fastest variant per measured
problem; etfkern/_core/dispatch.py loads it). A failed row is recorded and the sweep goes on; rows past the time
budget are recorded as skipped. --quick: tiny shapes (a plumbing check; with TRITON_INTERPRET=1 on CPU the Triton
variants run in the interpreter); its dispatch data goes to a -quick file that nothing loads.

CPU benchmark (default on CPU):

Rows: op (ce_fwd | ce_bwd | ce_fwd_bwd | nearest; on the first shape also ce_fwd_bwd_arc (metric "arc") and
ce_fwd_bwd_bank_grad (trainable bank), etfkern vs eager), shape N x d x C, impl, ms, peak_mib (extra peak over the live
set, fwd+bwd / nearest call), plus in the same run: ratio_to_etfkern (impl ms / etfkern ms), floor_gflop
(4 N C d for fwd+bwd with a frozen bank, 2 N C d for fwd / nearest), achieved_tflops, and
peak_over_logits (peak_mib / size of the fp32 N x C logits). Peers that cannot run here are listed with a reason.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (emit_row, env_var, gpu_run_rows, peak_mib, print_table, repo_relative,  # noqa: E402
                     seconds_left, time_ms, write_dispatch_file, write_results)

import etfkern  # noqa: E402
from etfkern._core.measure import reset_peak_rss, proc_status_kib  # noqa: E402

TAU = 0.07
CPU_SHAPES = [(4096, 128, 16384), (4096, 100, 10000), (2048, 512, 32768)]
CPU_QUICK = [(4096, 128, 16384), (4096, 100, 10000)]


def _eager(x, bank, target):
    return F.cross_entropy(F.normalize(x, dim=1) @ bank.T / TAU, target, label_smoothing=0.1)


def _etfkern(x, bank, target):
    return etfkern.spherical_cross_entropy(x, bank, target, tau=TAU, label_smoothing=0.1)


def _with_env(var: str, value: str, fn: Callable) -> Callable:
    """``fn`` with env ``var`` = ``value`` during the call, forward and backward (a kernel variant switch)."""
    def call(x, bank, target):
        with env_var(var, value):
            loss = fn(x, bank, target)
        return _AfterBackward(loss, var, value) if loss.requires_grad else loss
    return call


class _AfterBackward:
    """A loss whose backward() runs with env ``var`` = ``value`` as well (the bank gradient launches there)."""

    def __init__(self, loss: torch.Tensor, var: str, value: str):
        self.loss, self.var, self.value = loss, var, value

    def backward(self) -> None:
        with env_var(self.var, self.value):
            self.loss.backward()


def _unsplit(var: str, fn: Callable) -> Callable:
    """``fn`` with one Triton grid split forced off (env ``var`` = 1)."""
    return _with_env(var, "1", fn)


_etfkern_unsplit = _unsplit("ETFKERN_TRITON_SPLIT_C", _etfkern)  # one program per row block, whole class range
# the class loop as tiled cuBLAS GEMMs ("cos", fixed shift): the alternative for d >= 1024
_etfkern_mm = _with_env("ETFKERN_SPHERICAL_CLASS_LOOP", "mm", _etfkern)


def _peers(device: str, quick: bool) -> dict[str, Callable | str]:
    """impl name -> loss fn(x, bank, target), or a string saying why it is skipped."""
    peers: dict[str, Callable | str] = {"etfkern": _etfkern, "eager": _eager}
    if device == "cpu" and quick:
        peers["torch.compile"] = "skipped in --quick on CPU (inductor compile time)"
    else:
        peers["torch.compile"] = torch.compile(_eager)
    if device != "cuda":
        peers["liger"] = peers["cut_cross_entropy"] = "GPU only"
        return peers
    peers["etfkern_unsplit"] = _etfkern_unsplit
    peers["etfkern_mm"] = _etfkern_mm
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1)
        peers["liger"] = lambda x, bank, target: liger(bank / TAU, F.normalize(x, dim=1), target)
    except Exception as exc:  # noqa: BLE001 - optional peer
        peers["liger"] = f"liger-kernel not importable ({type(exc).__name__})"
    try:
        from cut_cross_entropy import linear_cross_entropy

        # no label smoothing in CCE: it runs plain hard-label CE on the same shapes
        peers["cut_cross_entropy"] = lambda x, bank, target: linear_cross_entropy(F.normalize(x, dim=1),
                                                                                  bank / TAU, target)
    except Exception as exc:  # noqa: BLE001
        peers["cut_cross_entropy"] = f"cut-cross-entropy not importable ({type(exc).__name__})"
    return peers


def _inputs(n: int, d: int, c: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(n, d, generator=gen).to(device, dtype)
    bank = F.normalize(torch.randn(c, d, generator=gen), dim=1).to(device, dtype)
    target = torch.randint(0, c, (n,), generator=gen).to(device)
    return x0, bank, target


def _call(name: str, what: str, x0, bank, target, peers) -> Callable[[], Any]:
    if what == "nearest":
        if name == "etfkern":
            return lambda: etfkern.nearest(x0, bank, k=5)
        return lambda: torch.topk(F.normalize(x0, dim=1) @ bank.T, 5, dim=1)
    fn = peers[name]
    x = x0.clone().requires_grad_()

    def fwd_bwd():
        x.grad = None
        fn(x, bank, target).backward()

    return fwd_bwd


def _peak_child(name, what, n, d, c, dtype, quick, threads, queue):  # runs in a spawned process
    torch.set_num_threads(threads)
    x0, bank, target = _inputs(n, d, c, "cpu", dtype)
    fn = _call(name, what, x0, bank, target, _peers("cpu", quick))
    fn()  # warm-up: one-time allocations (thread pools, lazy inits) are not the op's memory
    if not reset_peak_rss():  # VmHWM := the current RSS
        raise RuntimeError("peak memory needs Linux /proc/self/clear_refs")
    start = proc_status_kib("VmRSS")
    fn()
    queue.put((proc_status_kib("VmHWM") - start) / 1024.0)


def _peak(name, what, n, d, c, device, dtype, quick, fn) -> float:
    """Extra peak memory (MiB) of one call. CPU: in a freshly SPAWNED process (a forked child of a process
    that already ran OpenMP GEMMs can deadlock in libgomp), as the peak-RSS growth of a second call, with
    glibc told to mmap every allocation >= 64 KiB so freed temporaries leave the RSS."""
    if device != "cpu":
        return peak_mib(fn, device)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc = ctx.Process(target=_peak_child, args=(name, what, n, d, c, dtype, quick, torch.get_num_threads(),
                                                     queue))
        proc.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    proc.join(timeout=600)
    return queue.get(timeout=5) if proc.exitcode == 0 else float("nan")


def _eager_arc(x, bank, target):
    cos = (F.normalize(x, dim=1) @ bank.T).clamp(-1 + 1e-6, 1 - 1e-6)  # arccos' slope is infinite at +-1
    return F.cross_entropy(-torch.arccos(cos) / TAU, target, label_smoothing=0.1)


def _variant_rows(x0, bank, target, device: str, rep: int) -> list[dict[str, Any]]:
    """fwd+bwd of the other code paths against eager torch: metric "arc", and a trainable bank (bank gradient)."""
    n, d = x0.shape
    shape = f"{n}x{d}x{bank.shape[0]}"
    variants = {
        "ce_fwd_bwd_arc": (False, {"etfkern": lambda x, b, t: etfkern.spherical_cross_entropy(
            x, b, t, tau=TAU, metric="arc", label_smoothing=0.1), "eager": _eager_arc}),
        "ce_fwd_bwd_bank_grad": (True, {"etfkern": _etfkern, "eager": _eager}),
    }
    if device == "cuda":  # the bank gradient's row split (few classes) against one program per class tile
        variants["ce_fwd_bwd_bank_grad"][1]["etfkern_unsplit"] = _unsplit("ETFKERN_TRITON_SPLIT_N", _etfkern)
    rows = []
    for op, (bank_grad, impls) in variants.items():
        for name, fn in impls.items():
            x = x0.clone().requires_grad_()
            b = bank.clone().requires_grad_(bank_grad)

            def fwd_bwd(fn=fn, x=x, b=b):
                x.grad = b.grad = None
                fn(x, b, target).backward()

            rows.append(dict(shape=shape, impl=name, dtype=str(x0.dtype).replace("torch.", ""), op=op,
                             ms=time_ms(fwd_bwd, device, rep=rep)))
    return rows


def _bench_shape(n: int, d: int, c: int, device: str, dtype: torch.dtype, quick: bool,
                 peers: dict[str, Callable | str], first_shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    x0, bank, target = _inputs(n, d, c, device, dtype)
    shape = f"{n}x{d}x{c}"
    logits_mib = n * c * 4 / 2**20
    rep = 3 if quick else 10
    rows: list[dict[str, Any]] = []
    for name, fn in peers.items():
        base = dict(shape=shape, impl=name, dtype=str(dtype).replace("torch.", ""))
        if isinstance(fn, str):
            rows.append(dict(base, op="ce_fwd_bwd", skipped=fn))
            continue

        def fwd():
            with torch.no_grad():
                return fn(x0, bank, target)

        fwd_bwd = _call(name, "ce", x0, bank, target, peers)
        try:
            t_f = time_ms(fwd, device, rep=rep)
            t_fb = time_ms(fwd_bwd, device, rep=rep)
            mem = _peak(name, "ce", n, d, c, device, dtype, quick, fwd_bwd)
        except Exception as exc:  # noqa: BLE001 - e.g. OOM of a materialising peer: record, keep going
            rows.append(dict(base, op="ce_fwd_bwd", skipped=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        for op, ms, flop in (("ce_fwd", t_f, 2 * n * c * d), ("ce_bwd", t_fb - t_f, None),
                             ("ce_fwd_bwd", t_fb, 4 * n * c * d)):
            row = dict(base, op=op, ms=ms)
            if flop is not None:
                row.update(floor_gflop=flop / 1e9, achieved_tflops=flop / (ms * 1e-3) / 1e12)
            if op == "ce_fwd_bwd":
                row.update(peak_mib=mem, peak_over_logits=mem / logits_mib)
            rows.append(row)
    # nearest: fused top-k vs eager matmul + topk
    for name in ("etfkern", "eager"):
        fn = _call(name, "nearest", x0, bank, target, peers)
        ms = time_ms(fn, device, rep=rep)
        rows.append(dict(shape=shape, impl=name, dtype=str(dtype).replace("torch.", ""), op="nearest", ms=ms,
                         peak_mib=_peak(name, "nearest", n, d, c, device, dtype, quick, fn),
                         floor_gflop=2 * n * c * d / 1e9, achieved_tflops=2 * n * c * d / (ms * 1e-3) / 1e12))
    if (n, d, c) == first_shape or (device == "cuda" and c <= 1000):  # GPU: also few classes (row splits)
        rows += _variant_rows(x0, bank, target, device, rep)
    ref = {r["op"]: r["ms"] for r in rows if r["impl"] == "etfkern" and "ms" in r}
    for r in rows:
        if "ms" in r and r["op"] in ref and ref[r["op"]] > 0:
            r["ratio_to_etfkern"] = r["ms"] / ref[r["op"]]
    return rows


def run(quick: bool, device: str, budget_s: float = 170.0) -> list[dict[str, Any]]:
    """All rows for ``device`` ("cpu" or "cuda"); quick = fewer/smaller shapes and repetitions. CUDA: the sweep."""
    if device == "cuda":
        return sweep(device, quick, budget_s)
    shapes = CPU_QUICK if quick else CPU_SHAPES
    dtype = torch.float32
    peers = _peers(device, quick)
    rows = []
    for n, d, c in shapes:
        rows += _bench_shape(n, d, c, device, dtype, quick, peers, shapes[0])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--sweep", action="store_true", help="the variant sweep on this device (default on cuda)")
    p.add_argument("--budget-s", type=float, default=170.0, help="wall-clock budget of the sweep in seconds")
    p.add_argument("--dispatch-from", metavar="RESULTS_JSON",
                   help="write bench/results/spherical-dispatch.json from a GPU sweep's results file (this script's, "
                        "or bench/run_all.py's, e.g. from tools/gpu_check.sh) and exit")
    args = p.parse_args(argv)
    if args.dispatch_from:
        return _write_dispatch_from(args.dispatch_from)
    if args.sweep or args.device == "cuda":
        return _main_sweep(args)
    rows = run(args.quick, args.device)
    print_table(rows, ["op", "shape", "impl", "ms", "ratio_to_etfkern", "peak_mib", "peak_over_logits",
                       "achieved_tflops", "skipped"])
    if not args.no_write:
        print("wrote", write_results("spherical_ce", rows, args.device, extra={"quick": args.quick}))
    return 0



# ----------------------------------------------------------------------------------------------------------
# GPU sweep (issue 21): every class-loop variant against the peers, one run, and the dispatch table's data
# ----------------------------------------------------------------------------------------------------------
SWEEP_SHAPES = [(8192, 1024, 131072), (16384, 4096, 32000), (4096, 4096, 262144), (65536, 256, 10000),
                (8192, 512, 32768), (32768, 2048, 65536)]  # N, d, C
SWEEP_SMALL = (8192, 512, 32768)  # also: trainable bank (fwd+bwd with dW)
SWEEP_QUICK = [(20, 16, 70), (12, 8, 37)]  # --quick: a plumbing check (CPU: the Triton interpreter if enabled)
CLASS_LOOP_VARIANTS = ("chunked", "mm", "fused")
NEAREST_VARIANTS = ("chunked", "fused")
NEAREST_K = 5
# seconds a row may take at most (first-call JIT / autotune / compile included): a row starts only with this much left
ROW_SECONDS = {"torch.compile": 60.0, "liger": 20.0, "cut_cross_entropy": 20.0}
DISPATCH_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spherical-dispatch.json")


class _Budget:
    """Wall-clock budget of the sweep: rows past it are recorded as skipped, never run."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str, min_total_s: float = 0.15, max_reps: int = 5
           ) -> tuple[float, float | None]:
    """(median ms, extra peak MiB | None) of fn(): one warm-up call (JIT, autotune, compile), one sizing call, then
    reps calls (enough for ~min_total_s, 1..max_reps). The peak is the CUDA allocator's maximum during the timed
    calls above what was live before them (inputs, and x.grad / bank.grad of the previous call, which fn frees
    before it makes new ones): the op's extra memory."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - t0
    reps = max(1, min(max_reps, int(min_total_s / max(once, 1e-6))))
    base = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if base is not None else None
    return statistics.median(times), extra


def _sweep_impls(device: str, quick: bool) -> dict[str, Callable | str]:
    """impl -> loss fn(x, bank, target) for the sweep (or why it is skipped): the etfkern variants, then peers."""
    impls: dict[str, Callable | str] = {}
    for v in CLASS_LOOP_VARIANTS:
        impls[f"etfkern_{v}"] = _with_env("ETFKERN_SPHERICAL_CLASS_LOOP", v, _etfkern)
    impls["eager"] = _eager
    peers = _peers("cuda" if device == "cuda" else "cpu", quick)
    for name in ("liger", "cut_cross_entropy", "torch.compile"):
        impls[name] = peers[name]
    return impls


def _sweep_backend(device: str) -> str:
    """The etfkern backend the sweep runs: triton on a GPU (and on CPU tensors under TRITON_INTERPRET=1), else the
    CPU path (then the variants are one and the same code)."""
    from etfkern._core import backend

    return "triton" if backend.why_unavailable("triton", device, "spherical_ce_forward") is None else "auto"


def _row_case(op: str, impl: str, fn: Callable, x0, bank, target, trainable: bool) -> Callable[[], Any]:
    if op == "nearest":
        if impl == "eager":
            return lambda: torch.topk(F.normalize(x0, dim=1) @ bank.T, NEAREST_K, dim=1)
        variant = impl.removeprefix("etfkern_")

        def near():
            with env_var("ETFKERN_SPHERICAL_NEAREST", variant):
                return etfkern.nearest(x0, bank, k=NEAREST_K)
        return near
    if op == "ce_fwd":
        def fwd():
            with torch.no_grad():
                return fn(x0, bank, target)
        return fwd
    x = x0.clone().requires_grad_()
    b = bank.clone().requires_grad_() if trainable else bank

    def fwd_bwd():
        x.grad = None
        if trainable:
            b.grad = None
        fn(x, b, target).backward()
    return fwd_bwd


def sweep(device: str, quick: bool, budget_s: float) -> list[dict[str, Any]]:
    """Rows {op, shape, N, d, C, dtype, impl, ms, tflops, extra_mib, x_vs_<peer>} (or skipped / error) for every
    shape x op x implementation. ops: ce_fwd_bwd (frozen bank, 4NCd), ce_fwd (eval, no gradient, 2NCd),
    nearest (k = 5, 2NCd), ce_fwd_bwd_bank_grad (trainable bank, 6NCd; SWEEP_SMALL only). Order: etfkern variants
    and eager over every shape first, then Liger / cut-cross-entropy, torch.compile last (its compile time is the
    largest cost), so a budget that runs out costs peers, not the variants."""
    left = seconds_left()  # tools/gpu_check.sh's box (ETFKERN_BENCH_DEADLINE) bounds the budget too
    budget = _Budget(min(budget_s, left - 5.0) if left is not None else budget_s)
    shapes = SWEEP_QUICK if quick else SWEEP_SHAPES
    small = shapes[-1] if quick else SWEEP_SMALL
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = _sweep_impls(device, quick)
    ours = [f"etfkern_{v}" for v in CLASS_LOOP_VARIANTS]
    plan = []  # (phase, shape, op, impl)
    for shape in shapes:
        for impl in ours + ["eager"]:
            plan.append((shape, "ce_fwd_bwd", impl))
            plan.append((shape, "ce_fwd", impl))
        for impl in [f"etfkern_{v}" for v in NEAREST_VARIANTS] + ["eager"]:
            plan.append((shape, "nearest", impl))
        if shape == small:
            for impl in ours + ["eager"]:
                plan.append((shape, "ce_fwd_bwd_bank_grad", impl))
    for peer in ("liger", "cut_cross_entropy", "torch.compile"):
        for shape in shapes:
            plan.append((shape, "ce_fwd_bwd", peer))
            if shape == small:
                plan.append((shape, "ce_fwd_bwd_bank_grad", peer))
    rows: list[dict[str, Any]] = []
    inputs: dict[tuple, Any] = {}
    backend = _sweep_backend(device)
    for shape, op, impl in plan:
        n, d, c = shape
        row = dict(op=op, shape=f"{n}x{d}x{c}", N=n, d=d, C=c, dtype=str(dtype).removeprefix("torch."), impl=impl)
        rows.append(row)
        fn = impls.get(impl, _etfkern)
        if isinstance(fn, str):
            row["skipped"] = fn
            emit_row(row)
            continue
        need = ROW_SECONDS.get(impl, 10.0)  # a row never starts unless it can end inside the budget
        if budget.left() < need:
            row["skipped"] = f"sweep time budget: {max(0.0, budget.left()):.0f} s left, the row needs ~{need:.0f} s"
            emit_row(row)
            continue
        if shape not in inputs:  # one shape's tensors live at a time
            inputs.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
            inputs[shape] = _inputs(n, d, c, device, dtype)
        x0, bank, target = inputs[shape]
        flop = {"ce_fwd_bwd": 4, "ce_fwd_bwd_bank_grad": 6}.get(op, 2) * n * c * d
        try:
            with etfkern.use_backend(backend):
                ms, extra = _timed(_row_case(op, impl, fn, x0, bank, target, op == "ce_fwd_bwd_bank_grad"), device)
        except Exception as exc:  # noqa: BLE001 - OOM of a materialising peer, an unsupported case: record it
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            emit_row(row)
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        row.update(ms=ms, tflops=flop / (ms * 1e-3) / 1e12, flop_model=f"{flop // (n * c * d)}NCd", extra_mib=extra,
                   budget_mib=max(256.0, n * c * 4 / 16 / 2**20))
        emit_row(row)  # kept even if a time box cuts the sweep later (the ratios are added to the same dict)
    inputs.clear()
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """x_vs_<impl> on every etfkern row: that implementation's ms / ours (> 1: we are faster), same op and shape."""
    by_case: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if "ms" in r:
            by_case.setdefault((r["op"], r["shape"]), {})[r["impl"]] = r["ms"]
    for r in rows:
        if "ms" in r and r["impl"].startswith("etfkern"):
            for other, ms in by_case[(r["op"], r["shape"])].items():
                if not other.startswith("etfkern"):
                    r[f"x_vs_{other}"] = ms / r["ms"]


def _around(v: int) -> list[int]:
    """[lo, hi): the values within a factor sqrt(2) of the measured one (the dispatch entry's reach)."""
    return [int(v / 2**0.5), int(v * 2**0.5) + 1]


def dispatch_entries(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The dispatch table's data: per (op, shape) the fastest etfkern variant that ran, as a row of
    etfkern/_core/dispatch.py ("spherical_class_loop" / "spherical_nearest"), citing ``source``."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if "ms" in r and r["impl"].startswith("etfkern_"):
            key = (r["op"], r["shape"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    entries = []
    for (op, _), r in best.items():
        others = "; ".join(f"{o['impl'].removeprefix('etfkern_')} {o['ms']:.2f}" for o in rows
                           if o["op"] == op and o["shape"] == r["shape"] and "ms" in o and o is not r)
        evidence = f"{r['dtype']} {op} {r['shape']}: {r['impl'].removeprefix('etfkern_')} {r['ms']:.2f} ms; {others}"
        when: dict[str, Any] = {"dtype": r["dtype"], "d": _around(r["d"]), "C": _around(r["C"]), "N": _around(r["N"])}
        if op == "nearest":
            entries.append(dict(op="spherical_nearest", variant=r["impl"].removeprefix("etfkern_"), evidence=evidence,
                                source=source, when={**when, "k": [1, 17]}))
        else:
            when.update(metric="cos", need_grad=op != "ce_fwd", bank_grad=op == "ce_fwd_bwd_bank_grad")
            entries.append(dict(op="spherical_class_loop", variant=r["impl"].removeprefix("etfkern_"),
                                evidence=evidence, source=source, when=when))
    return entries


def _write_dispatch_from(path: str) -> int:
    """The dispatch JSON from a saved sweep (rows of this script's file, or of run_all's "spherical" family)."""
    rows = gpu_run_rows(path, "spherical")
    if rows is None:
        return 1
    source = repo_relative(path)
    write_dispatch_file(DISPATCH_JSON, "bench/spherical.py --dispatch-from", source, dispatch_entries(rows, source))
    print("wrote", DISPATCH_JSON, "from", source)
    return 0


def _main_sweep(args) -> int:
    t0 = time.monotonic()
    rows = sweep(args.device, args.quick, args.budget_s)
    print_table(rows, ["op", "shape", "impl", "ms", "tflops", "extra_mib", "x_vs_eager", "x_vs_torch.compile",
                       "x_vs_liger", "x_vs_cut_cross_entropy", "skipped", "error"])
    print(f"sweep: {time.monotonic() - t0:.1f} s")
    if args.no_write:
        return 0
    path = write_results("spherical", rows, args.device, extra={"quick": args.quick, "budget_s": args.budget_s})
    print("wrote", path)
    gpu_evidence = args.device == "cuda" and not args.quick
    target = DISPATCH_JSON if gpu_evidence else DISPATCH_JSON.replace(".json", f"-{args.device}-quick.json")
    source = repo_relative(path)
    write_dispatch_file(target, "bench/spherical.py", source, dispatch_entries(rows, source))
    print("wrote", target, "" if gpu_evidence else "(not GPU evidence: etfkern/_core/dispatch.py does not load it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
