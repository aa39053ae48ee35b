"""Bank quality and speed: max |cos| / Welch ratios of ebv_bank at the issue's targets, against random Gaussian
banks measured in the same run and the official EBV generator's shipped banks (C=1000: 0.1350 at d=100, 0.0800
at d=200, 0.0350 at d=500; published figures, not re-run here); bank_stats speed and memory against a dense C x C computation.

    python bench/banks.py [--quick] [--device cpu|cuda] [--sweep]

--quick: the (C=100k, d=1024) bank's statistics are measured on its first 10,000 rows only (the full pass is
~10^13 flops: minutes on a small CPU); the row says so in "measured_on".
--sweep (cuda): only the GPU kernel sweep (about 1-2 minutes on an H200, Triton compiles included; it skips what
the ETFKERN_BENCH_DEADLINE time box of tools/gpu_check.sh leaves no time for) -- every bank_pair_stats kernel
(ETFKERN_BANK_STATS_KERNEL: rows, tiles-ieee, tiles-tf32x3) in bank_stats at C=4000/32768/131072 (d=128/1024/1024)
against dense torch (fp32 C x C GEMM, exact order statistic) where it fits, with each candidate's deviation
from the dense values; every ebv_dir variant (ETFKERN_EBV_DIR_PRECISION: ieee, tf32x3, tf32, tf32-wide): its error
against float64 at (4096, 256) and its step time at (20000, 1000) and (100000, 1000). Without --sweep on cuda,
the sweep runs before the quality rows.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import emit_row, env_var, peak_mib, print_table, seconds_left, time_ms, write_results  # noqa: E402

import etfkern  # noqa: E402
from etfkern import banks  # noqa: E402

# aassxun/Equiangular-Basis-Vectors shipped banks at C=1000, max |cos| by d (published figures, BACKGROUND.md)
OFFICIAL_EBV_C1000 = {100: 0.1350, 200: 0.0800, 500: 0.0350}


def _vs_official(row: dict, d: int) -> dict:
    """``row`` (a C=1000 bank at dim d) with the official shipped bank's max |cos| and our ratio to it."""
    row["official_ebv_max_abs_cos"] = OFFICIAL_EBV_C1000[d]
    row["vs_official"] = row["max_abs_cos"] / OFFICIAL_EBV_C1000[d]
    return row


def _random_max(c: int, d: int, device: str) -> float:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(c, d, generator=g).to(device)
    return banks.bank_max_abs_cos(w)


def _target_row(name: str, c: int, d: int, device: str, quick: bool, target: str, *, random_peer: bool = True,
                subset: int | None = None, **bank_kwargs) -> dict:
    t0 = time.perf_counter()
    bank = etfkern.ebv_bank(c, d, seed=0, device=device, **bank_kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    measured = bank if subset is None or subset >= c else bank[:subset]
    t1 = time.perf_counter()
    stats = etfkern.bank_stats(measured)
    stats_s = time.perf_counter() - t1
    welch = banks.welch_bound(c, d)
    row = {"op": "ebv_bank", "shape": f"C={c} d={d}", "impl": name, "device": device, "seconds": seconds,
           "max_abs_cos": stats["max_abs_cos"], "mean_abs_cos": stats["mean_abs_cos"],
           "p999_abs_cos": stats["p999_abs_cos"], "welch": welch, "ratio_welch": stats["max_abs_cos"] / welch,
           "target": target, "stats_seconds": stats_s,
           "measured_on": f"rows 0..{len(measured)} of {c}" if len(measured) < c else "all rows"}
    if random_peer:
        rmax = _random_max(len(measured), d, device)
        row["random_max_abs_cos"] = rmax
        row["random_ratio_welch"] = rmax / banks.welch_bound(len(measured), d)
    return row


def _optimizer_from_random_row(device: str, steps: int) -> dict:
    """What the optimiser alone does at (C=1000, d=100): from a Gaussian start (no structured start)."""
    c, d = 1000, 100
    w = torch.nn.functional.normalize(torch.randn(c, d, generator=torch.Generator().manual_seed(0)), dim=1)
    w = w.to(device)
    start = banks.bank_max_abs_cos(w)
    t0 = time.perf_counter()
    best, _ = banks._optimize(w, steps, 3e-2, False, start)
    seconds = time.perf_counter() - t0
    mx = banks.bank_max_abs_cos(best)
    welch = banks.welch_bound(c, d)
    return {"op": "ebv_bank", "shape": f"C={c} d={d}", "impl": f"optimize from random, {steps} steps",
            "device": device, "seconds": seconds, "max_abs_cos": mx, "welch": welch, "ratio_welch": mx / welch,
            "random_max_abs_cos": start, "random_ratio_welch": start / welch, "target": "(optimiser alone)",
            "measured_on": "all rows"}


def _stats_speed_rows(device: str, quick: bool) -> list[dict]:
    c, d = (4000, 128) if quick else (8000, 128)
    w = torch.nn.functional.normalize(torch.randn(c, d, generator=torch.Generator().manual_seed(1)), dim=1)
    w = w.to(device)

    def dense():
        g = (w @ w.T).abs()
        iu = torch.triu_indices(c, c, offset=1, device=w.device)
        a = g[iu[0], iu[1]]
        return a.max(), a.mean(), torch.quantile(a[: 2**24 - 1], 0.999)  # torch.quantile caps the input size

    rows = []
    for impl, fn in (("bank_stats (tiled)", lambda: etfkern.bank_stats(w)), ("dense torch C x C", dense)):
        ms = time_ms(fn, device, warmup=1, rep=3)
        rows.append({"op": "bank_stats", "shape": f"C={c} d={d}", "impl": impl, "device": device, "ms": ms,
                     "peak_mib": peak_mib(fn, device)})
    rows[0]["speed_vs_dense"] = rows[1]["ms"] / rows[0]["ms"]
    rows[0]["memory_vs_dense"] = rows[0]["peak_mib"] / max(rows[1]["peak_mib"], 1e-9)
    return rows


def _dense_stats(w: torch.Tensor) -> dict:
    """bank_stats' three |cos| statistics from the full C x C float32 Gram matrix (exact order statistic: every
    off-diagonal value appears twice, so the triangle's r-th smallest is the full matrix's 2r-th)."""
    c = w.shape[0]
    g = (w @ w.T).abs_()
    g.fill_diagonal_(-1.0)
    pairs = c * (c - 1) // 2
    r = math.ceil(0.999 * pairs)
    mx = float(g.max())
    mean = float((g.sum(dtype=torch.float64) + c) / 2 / pairs)
    p999 = float(torch.kthvalue(g.flatten(), c + 2 * r).values)  # c diagonal entries of -1 sort first
    del g
    return {"max_abs_cos": mx, "mean_abs_cos": mean, "p999_abs_cos": p999}


def _time_for(need_s: float, rows: list[dict], op: str, shape: str, impl: str) -> bool:
    """False (and a row with "skipped" saying why) when the time box of tools/gpu_check.sh leaves less than
    ``need_s`` seconds."""
    left = seconds_left()
    if left is None or left >= need_s:
        return True
    rows.append({"op": op, "shape": shape, "impl": impl,
                 "skipped": f"{left:.0f} s left of the time box, about {need_s:.0f} s needed"})
    print(f"  skipped {op} {impl} {shape}: {left:.0f} s left", flush=True)
    return False


def _sweep_stats(shapes: list[tuple[int, int]], device: str,
                 kernels: tuple[str, ...] = banks.PAIR_STATS_KERNELS) -> list[dict]:
    rows = []
    for c, d in shapes:
        if not _time_for(5.0 if c < 50_000 else 12.0, rows, "bank_stats", f"C={c} d={d}", "(every kernel)"):
            continue
        w = torch.nn.functional.normalize(torch.randn(c, d, generator=torch.Generator().manual_seed(1)), dim=1)
        w = w.to(device)
        big = c >= 100_000
        dense_ms, want = None, None
        if big:  # the fp32 Gram matrix alone is 4 C^2 bytes (69 GB at 131072), kthvalue copies it
            rows.append({"op": "bank_stats", "shape": f"C={c} d={d}", "impl": "dense torch C x C", "device": device,
                         "ms": None, "note": "does not fit (C x C float32 plus kthvalue's copy)"})
        else:
            try:
                want = _dense_stats(w)
                dense_ms = time_ms(lambda: _dense_stats(w), device, warmup=0, rep=3)
                rows.append({"op": "bank_stats", "shape": f"C={c} d={d}", "impl": "dense torch C x C",
                             "device": device, "ms": dense_ms, **want})
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                rows.append({"op": "bank_stats", "shape": f"C={c} d={d}", "impl": "dense torch C x C",
                             "device": device, "ms": None, "note": f"failed: {type(exc).__name__}"})
            if device == "cuda":
                torch.cuda.empty_cache()
        for kernel in kernels:
            if not _time_for(5.0 if c < 50_000 else (25.0 if kernel == "rows" else 12.0), rows, "bank_stats",
                             f"C={c} d={d}", f"bank_stats {kernel}"):
                continue
            with env_var(banks.STATS_KERNEL_ENV, kernel):
                got = etfkern.bank_stats(w)  # also the warm-up (compiles)
                ms = time_ms(lambda: etfkern.bank_stats(w), device, warmup=0, rep=1 if big else 3)
            row = {"op": "bank_stats", "shape": f"C={c} d={d}", "impl": f"bank_stats {kernel}", "device": device,
                   "ms": ms, "max_abs_cos": got["max_abs_cos"], "mean_abs_cos": got["mean_abs_cos"],
                   "p999_abs_cos": got["p999_abs_cos"]}
            if want is not None:
                row["speed_vs_dense"] = dense_ms / ms
                for key in ("max_abs_cos", "mean_abs_cos", "p999_abs_cos"):
                    row[f"err_{key}"] = abs(got[key] - want[key])
            rows.append(row)
            print(f"  bank_stats {kernel} C={c} d={d}: {ms:.1f} ms", flush=True)
    return rows


def _sweep_dir(device: str, check: tuple[int, int], timed: list[tuple[int, int]]) -> list[dict]:
    from etfkern.banks import reference as ref

    rows = []
    small = torch.nn.functional.normalize(torch.randn(*check, generator=torch.Generator().manual_seed(2)), dim=1)
    small = small.to(device)
    beta = 3.0 / banks.welch_bound(*check)
    want_dir, want_max = ref.ebv_dir(small.double(), beta)
    for variant in banks.DIR_VARIANTS:
        with env_var(banks.DIR_PRECISION_ENV, variant):
            got_dir, got_max = banks._ops.ebv_dir(small, beta)
            row = {"op": "ebv_dir", "shape": f"C={check[0]} d={check[1]}", "impl": variant, "device": device,
                   "err_rowmax": float((got_max.double() - want_max).abs().max()),
                   "rel_err_dir": float((got_dir.double() - want_dir).norm() / want_dir.norm())}
            for i, (c, d) in enumerate(timed):
                if i > 0 and variant == "ieee":
                    continue  # float32 FFMA: several seconds a step at (100000, 1000)
                if not _time_for(5.0 if i == 0 else 20.0, rows, "ebv_dir", f"C={c} d={d}", variant):
                    continue
                w = torch.nn.functional.normalize(torch.randn(c, d, device=device), dim=1)
                b = 3.0 / banks.welch_bound(c, d)
                # the first shape compiled the kernel (C is not specialised beyond divisibility by 16)
                row[f"ms_C{c}"] = time_ms(lambda: banks._ops.ebv_dir(w, b), device, warmup=0 if i else 1,
                                          rep=1 if i else 3)
                print(f"  ebv_dir {variant} C={c} d={d}: {row[f'ms_C{c}']:.1f} ms", flush=True)
        rows.append(row)
    return rows


def sweep(device: str = "cuda", tiny: bool = False) -> list[dict]:
    """The GPU kernel sweep (see the module docstring): candidates vs dense torch, same run. ``tiny``: toy shapes
    (a smoke test of this code on the Triton interpreter)."""
    if tiny:
        return _sweep_stats([(40, 8)], device) + _sweep_dir(device, (33, 8), [(48, 8), (64, 8)])
    # most telling first, so that a time box cut short still answers the targets: vs dense at C=4000; the
    # C=131072 target (tensor cores first); the optimiser step; then the mid shape
    return (_sweep_stats([(4000, 128)], device)
            + _sweep_stats([(131_072, 1024)], device, ("tiles-tf32x3", "tiles-ieee", "rows"))
            + _sweep_dir(device, (4096, 256), [(20_000, 1000), (100_000, 1000)])
            + _sweep_stats([(32768, 1024)], device))


def run(quick: bool, device: str) -> list[dict]:
    """Every row for ``device``. Each row is kept the moment it is measured (emit_row) and starts only when the
    time box of tools/gpu_check.sh (seconds_left) leaves it the seconds it may need, so a box that runs out keeps
    what was measured instead of losing the family's rows."""
    rows: list[dict] = []

    def take(new_rows: list[dict]) -> None:
        for r in new_rows:
            rows.append(emit_row(r))

    # on a GPU the kernel sweep goes first: it is what a time-boxed run (tools/gpu_check.sh) must not miss
    if device == "cuda" and not quick:
        take(sweep(device))
    optimiser_s = 130.0  # rows whose optimiser runs its 120 s time budget
    steps: list[tuple[float, str, Callable[[], list[dict]]]] = [
        (10.0, "auto C=2000 d=64", lambda: [_target_row("auto", 2000, 64, device, quick, "<= 1.05 x Welch")]),
        (10.0, "auto C=1000 d=100", lambda: [_vs_official(_target_row(
            "auto", 1000, 100, device, quick, f"< {OFFICIAL_EBV_C1000[100]} (official EBV) in 120 s"), 100)]),
        (45.0, "auto C=100000 d=1024", lambda: [_target_row(
            "auto", 100_000, 1024, device, quick, "<= 1.01 x Welch in seconds", random_peer=quick,
            subset=10_000 if quick else None)]),
    ]
    if not quick:
        for d_official in (200, 500):  # the other shipped banks, same 120 s budget
            steps.append((optimiser_s, f"auto C=1000 d={d_official}", lambda d_official=d_official: [_vs_official(
                _target_row("auto", 1000, d_official, device, quick,
                            f"< {OFFICIAL_EBV_C1000[d_official]} (official EBV)", random_peer=False), d_official)]))
        steps.append((60.0, "optimiser from random", lambda: [_optimizer_from_random_row(device, 300)]))
        # no structured start below 2x Welch exists at (10k, 64): the optimiser (120 s time budget) does all the
        # work; at (5000, 128) the chirp bank of p = 61 starts at 1.47 x Welch
        steps.append((optimiser_s, "auto C=10000 d=64", lambda: [_target_row(
            "auto", 10_000, 64, device, quick, "(optimiser, 120 s budget)")]))
        steps.append((optimiser_s, "auto C=5000 d=128", lambda: [_target_row(
            "auto", 5000, 128, device, quick, "(chirp start + optimiser, 120 s budget)")]))
    # the GPU target's shape: the structured start alone (chirp bank of p = 499, 1/sqrt(499)); its statistics on
    # the first 20,000 rows (the value is a theorem; the subset shows it is attained)
    steps.append((30.0, "structured start C=100000 d=1000", lambda: [_target_row(
        "structured start (steps=0)", 100_000, 1000, device, quick, "<= 1.5 x Welch (start alone, any device)",
        random_peer=False, subset=20_000, method="optimize", steps=0)]))
    if device == "cuda":
        steps.append((optimiser_s, "auto C=100000 d=1000 (GPU)", lambda: [_target_row(
            "auto", 100_000, 1000, device, quick, "<= 1.5 x Welch in 120 s (GPU)", random_peer=False)]))
    steps.append((30.0, "bank_stats speed", lambda: _stats_speed_rows(device, quick)))
    for i, (need_s, label, make) in enumerate(steps):
        left = seconds_left()
        if left is not None and left < need_s:
            print(f"  time box: skipping {label} and {len(steps) - i - 1} later rows ({left:.0f} s left, about "
                  f"{need_s:.0f} s needed)", flush=True)
            break
        take(make())
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    p.add_argument("--sweep", action="store_true", help="cuda: only the GPU kernel sweep (~60 s on an H200)")
    p.add_argument("--out", default=None, metavar="JSON", help="also write the result JSON here (e.g. under $OUT)")
    args = p.parse_args()
    if args.sweep and args.device != "cuda":
        p.error("--sweep needs --device cuda")
    rows = sweep() if args.sweep else run(args.quick, args.device)
    for op, columns in (("ebv_bank", ["shape", "impl", "seconds", "max_abs_cos", "welch", "ratio_welch",
                                      "random_ratio_welch", "target", "measured_on"]),
                        ("bank_stats", ["shape", "impl", "ms", "peak_mib", "speed_vs_dense", "memory_vs_dense",
                                        "err_max_abs_cos", "err_mean_abs_cos", "err_p999_abs_cos"]),
                        ("ebv_dir", ["shape", "impl", "err_rowmax", "rel_err_dir", "ms_C20000", "ms_C100000"])):
        if any(r["op"] == op for r in rows):
            print_table([r for r in rows if r["op"] == op], columns)
    if not args.no_write:
        extra = {"quick": args.quick, "sweep": args.sweep}
        path = write_results('banks-sweep' if args.sweep else 'banks', rows, args.device, extra=extra)
        print(f"wrote {path}")
        if args.out:
            import shutil

            shutil.copyfile(path, args.out)
            print(f"wrote {args.out}")
    for r in rows:
        if r["op"] == "ebv_bank" and not math.isfinite(r["ratio_welch"]):
            raise SystemExit("non-finite ratio")


if __name__ == "__main__":
    main()
