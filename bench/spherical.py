"""Benchmark: fused spherical cross-entropy (and nearest) vs eager torch, torch.compile, Liger, cut-cross-entropy.

    python bench/spherical.py [--quick] [--device cpu|cuda] [--no-write]

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
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_var, peak_mib, print_table, time_ms, write_results  # noqa: E402

import etfkern  # noqa: E402
from etfkern._core.measure import reset_peak_rss, proc_status_kib  # noqa: E402

TAU = 0.07
GPU_SHAPES = [(8192, 512, 32768), (16384, 1024, 131072), (8192, 4096, 262144),  # LLM-vocabulary scale
              (8192, 100, 1000), (8192, 256, 10000), (8192, 512, 100000),  # EBV-style small d
              (512, 512, 131072), (1024, 1024, 131072)]  # small batches: Triton split-C vs etfkern_unsplit
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


def run(quick: bool, device: str) -> list[dict[str, Any]]:
    """All rows for ``device`` ("cpu" or "cuda"); quick = fewer/smaller shapes and repetitions."""
    if device == "cuda":
        shapes = GPU_SHAPES[:1] + GPU_SHAPES[3:4] if quick else GPU_SHAPES
        dtype = torch.bfloat16
    else:
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
    args = p.parse_args(argv)
    rows = run(args.quick, args.device)
    print_table(rows, ["op", "shape", "impl", "ms", "ratio_to_etfkern", "peak_mib", "peak_over_logits",
                       "achieved_tflops", "skipped"])
    if not args.no_write:
        print("wrote", write_results("spherical_ce", rows, args.device, extra={"quick": args.quick}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
