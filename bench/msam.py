"""Optimizer step time: fused Momentum-SAM vs torch's SGD/AdamW and the public per-tensor MSAM loop.

    python bench/msam.py [--quick] [--device cpu|cuda] [--no-write] [--sizes 10e6,100e6] [--only msam_exact,...]

GPU sweep (about a minute on an H200): 10M and 100M parameters, fp32 and bf16 parameters with fp32 state; exact,
lagged and AdamW MSAM with the default step (``msam_*``, ``adamw_msam``), with ``step_impl="plan"`` (``*_plan``) and
that step replayed from a CUDA graph (``*_graph``: the capturable step, no Python per step); peers torch
SGD(fused=True) / foreach, AdamW(fused=True) / foreach; the device copy rate measured in the same run gives
``copy_frac`` (achieved bandwidth of the method's traffic floor over the copy rate) and ``x_floor`` (time
over the time the floor's bytes take at the copy rate).

Parameters are split like a network (32 weight matrices + 32 bias vectors). Rows: ms per step (median),
effective bandwidth from the bytes each method must move per element, and ratios against the peers
measured in the same run:
    msam_exact / sgd_foreach, msam_lagged / sgd_foreach, msam_exact / sgd_fused, loop / msam_exact,
    adamw_msam / adamw_fused.
Traffic floors per fp32 element (param 4 B, grad 4 B, state 4 B each): fused SGD-momentum reads p, g, v and
writes p, v = 20 B; exact MSAM = 20 B + pass 1 reading g, v (+ p with weight decay) = 28-32 B; lagged MSAM
= 20 B; AdamW 28 B; AdamW-MSAM 36 B. For bf16 parameters with fp32 state p and g count 2 B.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit_row, print_table, seconds_left, time_ms, write_results  # noqa: E402

import etfkern  # noqa: E402
from etfkern.optim import MSAM, AdamWMSAM  # noqa: E402


class PerTensorMSAM(torch.optim.Optimizer):
    """The public MSAM code's structure (MarlonBecker/MSAM): Python loop over tensors, per-tensor ops,
    global norm through a stack of per-tensor norms, a second loop to perturb. Weight decay off here."""

    def __init__(self, params, lr, momentum=0.9, rho=0.3):
        super().__init__(params, dict(lr=lr, momentum=momentum, rho=rho))
        self.inv_norm = 0.0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                p.add_(buf, alpha=group["rho"] * self.inv_norm)  # undo
                buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])
        bufs = [self.state[p]["momentum_buffer"] for g in self.param_groups for p in g["params"]
                if p in self.state]
        norm = torch.stack([b.norm(p=2) for b in bufs]).norm(p=2)
        inv = 1.0 / (norm + 1e-12)
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    p.sub_(self.state[p]["momentum_buffer"] * (group["rho"] * inv))
        self.inv_norm = inv  # a 0-dim tensor: the next undo multiplies by it
        return None


def _params(numel: int, dtype: torch.dtype, device: str) -> list[torch.nn.Parameter]:
    n_w, bias = 32, 512
    w_size = max(1, numel // n_w - bias)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ps = []
    for _ in range(n_w):
        for size in (w_size, bias):
            p = torch.nn.Parameter(torch.randn(size, generator=gen).to(device=device, dtype=dtype))
            p.grad = torch.randn(size, generator=gen).to(device=device, dtype=dtype) * 1e-3
            ps.append(p)
    return ps


def _bytes_per_elem(impl: str, pbytes: int, sbytes: int = 4) -> int:
    """The traffic floor per element: what the method must read and write (exact MSAM: the norm pass reads g
    and v; no p without weight decay)."""
    pg = 2 * pbytes + pbytes  # read p and g, write p
    impl = impl.removesuffix("_graph").removesuffix("_plan")
    return {"sgd_foreach": pg + 2 * sbytes, "sgd_fused": pg + 2 * sbytes, "msam_exact": pg + 2 * sbytes
            + pbytes + sbytes, "msam_lagged": pg + 2 * sbytes, "adamw_fused": pg + 4 * sbytes,
            "adamw_foreach": pg + 4 * sbytes, "adamw_msam": pg + 4 * sbytes + pbytes + sbytes,
            "per_tensor_loop": 72 * pbytes // 4}[impl]


def _optimizers(ps, device: str) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    lr = 1e-3
    makers = {
        "sgd_foreach": lambda: torch.optim.SGD(ps, lr=lr, momentum=0.9, foreach=True),
        "sgd_fused": lambda: torch.optim.SGD(ps, lr=lr, momentum=0.9, fused=True),
        "msam_exact": lambda: MSAM(ps, lr=lr, momentum=0.9, rho=0.3),
        "msam_lagged": lambda: MSAM(ps, lr=lr, momentum=0.9, rho=0.3, norm="lagged"),
        "per_tensor_loop": lambda: PerTensorMSAM(ps, lr=lr),
        "adamw_fused": lambda: torch.optim.AdamW(ps, lr=lr, fused=True),
        "adamw_foreach": lambda: torch.optim.AdamW(ps, lr=lr, foreach=True),
        "adamw_msam": lambda: AdamWMSAM(ps, lr=lr, rho=0.5),
    }
    if torch.device(device).type == "cuda":  # the StepPlan steps, eager and replayed from a CUDA graph
        makers["msam_exact_plan"] = lambda: MSAM(ps, lr=lr, momentum=0.9, rho=0.3, step_impl="plan")
        makers["msam_lagged_plan"] = lambda: MSAM(ps, lr=lr, momentum=0.9, rho=0.3, norm="lagged", step_impl="plan")
        makers["adamw_msam_plan"] = lambda: AdamWMSAM(ps, lr=lr, rho=0.5, step_impl="plan")
        for name in ("msam_exact", "msam_lagged", "adamw_msam"):
            makers[name + "_graph"] = functools.partial(_Graphed, makers[name + "_plan"])
    return makers


class _Graphed:
    """An optimizer whose step() replays one captured step (after three eager warm-up steps on a side stream)."""

    def __init__(self, make: Callable[[], torch.optim.Optimizer]) -> None:
        self.opt = make()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.opt.step()

    def step(self) -> None:
        self.graph.replay()


def _time_interleaved(opts: dict[str, torch.optim.Optimizer], device: str, rounds: int) -> dict[str, float]:
    """Median ms per step. On CPU (a shared machine) the optimizers take turns, one step each per round, so
    load changes hit every method alike; on GPU each gets triton's do_bench."""
    if torch.device(device).type == "cuda":
        return {k: time_ms(o.step, device) for k, o in opts.items()}
    samples: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(rounds):
        for k, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def copy_rate_gbs(device: str, numel: int) -> float:
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * 4 * numel / (ms * 1e-3) / 1e9


def run(quick: bool, device: str, sizes: list[int] | None = None, only: set[str] | None = None) -> list[dict]:
    if sizes is None:
        # the sizes (10M, 100M) on a GPU: 1B more fits no time box of tools/gpu_check.sh (--sizes 1e9 asks)
        sizes = [1_000_000, 10_000_000] if device == "cpu" else [10_000_000, 100_000_000]
    rows: list[dict] = []
    copy_gbs = copy_rate_gbs(device, min(max(sizes), 100_000_000))
    for numel in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            left = seconds_left()
            if left is not None and left < 20:  # gpu_check's box is nearly spent: keep what was measured
                print(f"time box: skipping {numel / 1e6:.0f}M {dtype} and later ({left:.0f} s left)")
                return rows
            ps = _params(numel, dtype, device)
            total = sum(p.numel() for p in ps)
            shape = f"{total / 1e6:.0f}M {str(dtype).replace('torch.', '')}"
            opts: dict[str, torch.optim.Optimizer] = {}
            for impl, make in _optimizers(ps, device).items():
                if only and impl not in only:
                    continue
                try:
                    opts[impl] = make()
                    opts[impl].step()
                except (RuntimeError, ValueError, NotImplementedError) as exc:
                    print(f"skip {impl} ({shape}): {type(exc).__name__}: {str(exc)[:100]}")
            times = _time_interleaved(opts, device, rounds=5 if quick else 9)
            del opts
            pbytes = torch.finfo(dtype).bits // 8
            for impl, ms in times.items():
                gbs = _bytes_per_elem(impl, pbytes) * total / (ms * 1e-3) / 1e9
                floor_ms = _bytes_per_elem(impl, pbytes) * total / (copy_gbs * 1e9) * 1e3
                rows.append({"op": "optimizer_step", "shape": shape, "impl": impl, "ms": ms,
                             "GB/s": gbs, "copy_frac": gbs / copy_gbs, "x_floor": ms / floor_ms,
                             "threads": torch.get_num_threads()})
            base = times.get("sgd_foreach")
            for r in rows:
                if r["shape"] == shape:
                    r["x_sgd_foreach"] = r["ms"] / base if base else None
                    r["x_sgd_fused"] = r["ms"] / times["sgd_fused"] if "sgd_fused" in times else None
                    r["x_msam_exact"] = r["ms"] / times["msam_exact"] if "msam_exact" in times else None
                    r["x_adamw_fused"] = r["ms"] / times["adamw_fused"] if "adamw_fused" in times else None
                    emit_row(r)  # kept if a time box cuts the run after this shape
            del ps
    print(f"copy rate on {device}: {copy_gbs:.1f} GB/s (read+write)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-write", action="store_true", help="print only, write no results file")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--sizes", default=None, help="comma-separated parameter counts, e.g. 25e6 (default: per device)")
    ap.add_argument("--only", default=None, help="comma-separated impls to run (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(float(x)) for x in args.sizes.split(",")] if args.sizes else None
    only = set(args.only.split(",")) if args.only else None
    rows = run(args.quick, args.device, sizes, only)
    print_table(rows, ["shape", "impl", "ms", "GB/s", "copy_frac", "x_floor", "x_sgd_foreach", "x_sgd_fused",
                       "x_msam_exact", "x_adamw_fused"])
    if not args.no_write:
        print("wrote", write_results("msam", rows, args.device, extra={"build": etfkern.build_info(),
                                                                          "quick": args.quick}))


if __name__ == "__main__":
    main()
