"""Collapse statistics benchmark: update throughput (tokens/s) and compute() time.

Peers, measured in the same run on the same batches:
  etfkern        CollapseMeter.update per batch (one exact pass), then compute() (every metric).
  two_pass       plain torch: pass 1 class sums (index_add_, float64), pass 2 centred (X - M[Y])^T (X - M[Y]) with
                 the products in etfkern's CPU precision (float32 for 16/32-bit features, float64 for float64; on
                 GPU etfkern's are bf16 tensor-core products, so there this baseline does more work), summed in
                 float64; then NC1 only, through pinv(Sigma_B) (d x d).
  two_pass_f64   the same with float64 products (the most accurate plain baseline; also the NC1 reference the
                 etfkern result is compared with: nc1_rel_diff_vs_two_pass_f64).
  onehot         the public neural-collapse code's accumulators: class sums by a dense one-hot (K x B) @ X per
                 batch (float64), the same second pass.
  gemm_floor     X^T X per batch in the input dtype: the matmul work one update cannot avoid (on GPU the
                 bf16 tensor-core floor the issue's 70% target refers to).
etfkern update, compute without pair metrics, two_pass and its NC1 are timed in interleaved rounds (median of 5,
or 7 without --quick). Ratios (> 1: etfkern faster): one_pass_vs_two_pass = (two_pass update + NC1) / (etfkern update +
compute(metrics=["nc1"])): the same statistics and the same metric; one_pass_vs_two_pass_f64 the same against
two_pass_f64; one_pass_gram_metrics_vs_two_pass_nc1 with etfkern computing every Gram metric (nc1, nc1_quotient,
nc2_equinorm/equiangular/etf_error: one more (C' x d) Gram); one_pass_all_metrics_vs_two_pass_nc1 with every
metric (the O(C'^2 d) pair kernel included); onehot_over_etfkern = onehot update / etfkern update.

On CUDA without --quick the run is the candidate sweep (:func:`sweep`, meant to fit ~75 s on an H200; never run
yet): every scatter product of the Triton update (ETFKERN_COLLAPSE_PRODUCT: triton, mm, split, split_tri) against
the plain two-pass torch (index_add + fp32 GEMM) at (C, d) = (32000, 4096) and (8192, 256) in bf16 and fp32, with
Sigma_W's error against the float64 two-pass; the pair kernel's precisions (ETFKERN_COLLAPSE_PAIR_PRECISION:
tf32x3, bf16x3) against the float64 pair path at C=32768, and compute() (all metrics, nc1 alone) at C=131072
d=4096 (the issue-18 targets: < 3 s, < 0.5 s) when the C=32768 timing projects it under 12 s. Targets first; each
row is also printed as a JSON line ("ROW {...}") when measured, so a run cut short keeps what it measured.

    python bench/collapse.py [--quick] [--device cpu|cuda] [--threads N] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit_row, env_var, print_table, seconds_left, sync, time_ms, write_results  # noqa: E402

import etfkern  # noqa: E402
from etfkern.collapse.cpu import _product_dtype  # noqa: E402


def _zipf_labels(n: int, c: int, gen: torch.Generator, device: str) -> torch.Tensor:
    p = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** 1.0
    return torch.multinomial(p, n, replacement=True, generator=gen).to(device)


def _batches(c: int, d: int, tokens: int, batch: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    centres = (3.0 * torch.randn(c, d, generator=gen)).to(device)
    out = []
    for _ in range(max(1, tokens // batch)):
        y = _zipf_labels(batch, c, gen, device)
        x = (centres[y] + torch.randn(batch, d, generator=gen).to(device) + 10.0).to(dtype)
        out.append((x, y))
    return out


def _two_pass_stats(batches, c, d, device, onehot: bool, products: torch.dtype = torch.float64):
    """Pass 1 class sums (float64), pass 2 the centred scatter with its products in ``products`` (summed in
    float64 across batches)."""
    f64 = dict(dtype=torch.float64, device=device)
    sums = torch.zeros(c, d, **f64)
    counts = torch.zeros(c, **f64)
    for x, y in batches:
        x64 = x.to(torch.float64)
        if onehot:  # dense one-hot (K x B) @ X, in class chunks so the one-hot stays under ~1 GiB
            step = max(1, (1 << 27) // y.shape[0])
            for c0 in range(0, c, step):
                c1 = min(c, c0 + step)
                oh = (y[None, :] == torch.arange(c0, c1, device=device)[:, None]).to(torch.float64)
                sums[c0:c1] += oh @ x64
                counts[c0:c1] += oh.sum(1)
        else:
            sums.index_add_(0, y, x64)
            counts.index_add_(0, y, torch.ones(y.shape[0], **f64))
    means = sums / counts.clamp_min(1)[:, None]
    sw = torch.zeros(d, d, **f64)
    n = 0
    for x, y in batches:
        cen = (x.to(torch.float64) - means[y]).to(products)
        sw += (cen.T @ cen).to(torch.float64)
        n += y.shape[0]
    return counts, means, sw / n


def _two_pass_nc1(counts, means, sigma_w):
    seen = counts > 0
    mu = means[seen]
    mt = mu - mu.mean(0)
    sigma_b = mt.T @ mt / mu.shape[0]
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / mu.shape[0])


def _workload(c: int, d: int, tokens: int, batch: int, dtype: torch.dtype, device: str):
    """(shape label, batches, tokens, meter, one_pass): the batches of one shape and a timed one-pass over them."""
    shape = f"C={c},d={d},N={tokens},B={batch},{str(dtype).replace('torch.', '')}"
    batches = _batches(c, d, tokens, batch, dtype, device)
    meter = etfkern.CollapseMeter(c, d, device=device)

    def one_pass():
        meter.reset()
        for x, y in batches:
            meter.update(x, y)
        sync(device)

    return shape, batches, sum(y.shape[0] for _, y in batches), meter, one_pass


def _median_ms(fn, device: str, rep: int) -> float:
    return sorted(time_ms(fn, device, warmup=0, rep=1) for _ in range(rep))[rep // 2]


def _sweep_update(rows: list[dict], c: int, d: int, dtype: torch.dtype, tokens: int, batch: int, device: str) -> None:
    """Every ETFKERN_COLLAPSE_PRODUCT variant's one-pass update vs the plain two-pass torch (fp32 GEMM), with
    Sigma_W's relative Frobenius error against the float64 two-pass."""
    shape, batches, ntok, meter, one_pass = _workload(c, d, tokens, batch, dtype, device)
    _, _, sigma_f64 = _two_pass_stats(batches, c, d, device, False)
    two_pass_ms = _median_ms(lambda: _two_pass_stats(batches, c, d, device, False, torch.float32), device, 3)
    _, _, sigma_plain = _two_pass_stats(batches, c, d, device, False, torch.float32)
    rows.append({"op": "update_sweep", "shape": shape, "impl": "two_pass(fp32 GEMM)", "ms": two_pass_ms,
                 "vs_two_pass": 1.0, "sw_rel_err_vs_f64": float((sigma_plain - sigma_f64).norm() / sigma_f64.norm())})
    for product in ("triton", "mm", "split", "split_tri"):
        t0 = time.time()
        row = {"op": "update_sweep", "shape": shape, "impl": product}
        try:
            with env_var("ETFKERN_COLLAPSE_PRODUCT", product), etfkern.use_backend("triton"):
                one_pass()  # warm-up (Triton compile)
                ms = _median_ms(one_pass, device, 3)
            sigma = 0.5 * (meter._sw + meter._sw.T) / ntok
            row.update(ms=ms, vs_two_pass=two_pass_ms / ms, tokens_per_s=ntok / (ms / 1e3),
                       sw_rel_err_vs_f64=float((sigma - sigma_f64).norm() / sigma_f64.norm()))
        except Exception as e:  # noqa: BLE001 - one failing candidate must not end the sweep
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(f"  update {shape} {product}: {row.get('ms', float('nan')):.2f} ms ({time.time() - t0:.1f} s)",
              flush=True)


def _synthetic_meter(c: int, d: int, device: str) -> "etfkern.CollapseMeter":
    """A meter holding C classes' statistics directly (no C * tokens data pass): random class centres, counts,
    per-class deviations and a positive definite scatter."""
    gen = torch.Generator(device=device).manual_seed(0)
    f64 = dict(dtype=torch.float64, device=device)
    meter = etfkern.CollapseMeter(c, d, device=device)
    counts = torch.randint(1, 200, (c,), generator=gen, device=device)
    a = torch.randn(d, d, generator=gen, **f64)
    sw = a @ a.T * (float(counts.sum()) / d)
    state = meter.state_dict()
    state.update(counts=counts, means=3.0 * torch.randn(c, d, generator=gen, **f64),
                 m2=counts.to(torch.float64) * (1.0 + torch.rand(c, generator=gen, **f64)), sw=0.5 * (sw + sw.T))
    meter.load_state_dict(state)
    return meter


def _sweep_pairs(rows: list[dict], device: str, d: int = 4096, sizes: tuple[int, int] = (32768, 131072)) -> None:
    """The pair kernel's Gram precisions vs the float64 pair path at C=sizes[0], then compute() at C=sizes[1]
    (all metrics, nc1 alone) when the first timing projects the pair kernel there under 12 s."""
    from etfkern.collapse import cpu as collapse_cpu

    for c in sizes:
        meter = _synthetic_meter(c, d, device)
        mt = meter._means - meter._means.mean(0)
        s = meter._m2 / meter._counts.to(torch.float64)
        shift = -0.5 * torch.log(torch.tensor(2.0 * c / (c - 1))).item()
        shape = f"C={c},d={d}"
        want = collapse_cpu._pair_stats_cpu(mt, s, shift) if c == sizes[0] else None
        best = None
        for precision in ("tf32x3", "bf16x3"):
            row = {"op": "pair_sweep", "shape": shape, "impl": precision}
            try:
                with env_var("ETFKERN_COLLAPSE_PAIR_PRECISION", precision), etfkern.use_backend("triton"):
                    got = torch.ops.etfkern.collapse_pair_stats(mt, s, shift)  # warm-up (Triton compile)
                    ms = _median_ms(lambda: torch.ops.etfkern.collapse_pair_stats(mt, s, shift), device, 3)
                row["ms"] = ms
                if want is not None:
                    row["rel_err_vs_f64"] = [float(v) for v in ((got - want).abs() / want.abs().clamp_min(1e-300))[:4]]
                best = ms if best is None else min(best, ms)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(f"  pairs {shape} {precision}: {row.get('ms', float('nan')):.1f} ms", flush=True)
        if c == sizes[0] and (best is None or best * (sizes[1] / sizes[0]) ** 2 > 12e3):
            rows.append({"op": "compute_sweep", "shape": f"C={sizes[1]},d={d}", "impl": "skipped",
                         "error": f"pair kernel at C={c} took {best} ms: C={sizes[1]} projects past 12 s"})
            return
        if c == sizes[1]:
            with etfkern.use_backend("triton"):
                for name, kw in (("nc1 only", {"metrics": ["nc1"]}), ("all metrics", {})):
                    meter.compute(**kw)
                    rows.append({"op": "compute_sweep", "shape": shape, "impl": name,
                                 "ms": _median_ms(lambda: meter.compute(**kw), device, 3)})
                    print(f"  compute {shape} {name}: {rows[-1]['ms']:.1f} ms", flush=True)


class _EchoRows(list):
    """A row list that keeps each row the moment it is added (emit_row: printed as a JSON line and kept by run_all
    when a time box cuts the sweep short)."""

    def append(self, row: dict) -> None:
        super().append(emit_row(row))


def sweep(device: str) -> list[dict]:
    """The GPU candidate sweep (see the module docstring), the issue-18 targets first: update at d=4096 (bf16),
    the pair kernels and compute() at C=131072, update at d=256 (bf16), then float32 features."""
    rows: list[dict] = _EchoRows()
    steps = [lambda: _sweep_update(rows, 32000, 4096, torch.bfloat16, 65536, 16384, device),
             lambda: _sweep_pairs(rows, device),
             lambda: _sweep_update(rows, 8192, 256, torch.bfloat16, 65536, 16384, device),
             lambda: _sweep_update(rows, 32000, 4096, torch.float32, 65536, 16384, device),
             lambda: _sweep_update(rows, 8192, 256, torch.float32, 65536, 16384, device)]
    for i, step in enumerate(steps):
        left = seconds_left()  # tools/gpu_check.sh's time box (ETFKERN_BENCH_DEADLINE)
        if left is not None and left < 10.0:
            rows.append({"op": "sweep_stopped", "shape": "-", "impl": "-",
                         "error": f"{left:.0f} s left in the time box: {len(steps) - i} sweep steps not run"})
            break
        step()
    return list(rows)


def run(quick: bool, device: str) -> list[dict]:
    """Rows {op, shape, impl, ms, tokens_per_s, ...} with ratios against the peers of the same run (on CUDA without
    ``quick``: the candidate sweep)."""
    if device == "cuda" and not quick:
        return sweep(device)
    if device == "cuda":
        bf16 = torch.bfloat16
        shapes = [(8192, 256, bf16)] if quick else [(50257, 768, bf16), (131072, 4096, bf16)]
        batch, tokens = 16384, (65536 if quick else 262144)
    else:
        # the one-hot peer is O(C B d) per batch: (50257, 768) takes hours on a small CPU, so CPU stays small;
        # float64 features (float64 products in etfkern) against the float64 two-pass in the full run
        f32 = torch.float32
        shapes = [(8192, 256, f32)] if quick else [(8192, 256, f32), (16384, 512, f32), (8192, 256, torch.float64)]
        batch, tokens = 2048, (16384 if quick else 65536)
    rows: list[dict] = []
    for c, d, dtype in shapes:
        products = _product_dtype(dtype)  # the same-precision plain baseline: etfkern's CPU product rule
        shape, batches, ntok, meter, one_pass = _workload(c, d, tokens, batch, dtype, device)

        def gemm_floor():
            for x, _ in batches:
                torch.mm(x.T, x)
            sync(device)

        results = {}
        rep = 3
        stats = _two_pass_stats(batches, c, d, device, False, products)
        stats_f64 = _two_pass_stats(batches, c, d, device, False)
        # the timings the one-pass/two-pass ratios are built from: interleaved rounds, medians (a shared
        # machine's load then hits every pipeline alike)
        paired = {"etfkern": one_pass, "compute_nc1": lambda: (meter.compute(metrics=["nc1"]), sync(device)),
                  "two_pass": lambda: _two_pass_stats(batches, c, d, device, False, products),
                  "two_pass_f64": lambda: _two_pass_stats(batches, c, d, device, False),
                  "two_pass_nc1": lambda: _two_pass_nc1(*stats)}
        for fn in paired.values():
            fn()  # warm-up
        rounds = 5 if quick else 7
        samples: dict[str, list[float]] = {key: [] for key in paired}
        for _ in range(rounds):
            for key, fn in paired.items():
                samples[key].append(time_ms(fn, device, warmup=0, rep=1))
        for key, vals in samples.items():
            results[key] = sorted(vals)[len(vals) // 2]
        results["compute"] = time_ms(lambda: (meter.compute(), sync(device)), device, warmup=1, rep=rep)
        results["compute_gram"] = time_ms(lambda: (meter.compute(pair_metrics=False), sync(device)), device,
                                          warmup=1, rep=rep)
        results["onehot"] = time_ms(lambda: _two_pass_stats(batches, c, d, device, True), device, warmup=0,
                                    rep=1 if device == "cpu" else rep)
        results["gemm_floor"] = time_ms(gemm_floor, device, warmup=1, rep=rep)
        nc1_two = _two_pass_nc1(*stats_f64)
        # the two pipelines agree (guards the benchmark against measuring something wrong)
        nc1_meter = meter.compute()["nc1"]
        mm_rel_diff = None
        if device == "cuda":  # the alternative product (centre in bf16, then cuBLAS GEMMs), unmeasured until here
            def one_pass_mm():
                with env_var("ETFKERN_COLLAPSE_PRODUCT", "mm"):
                    one_pass()

            results["etfkern_mm_product"] = time_ms(one_pass_mm, device, warmup=1, rep=rep)
            mm_rel_diff = abs(meter.compute(metrics=["nc1"])["nc1"] - nc1_two) / abs(nc1_two)
        agree = abs(nc1_meter - nc1_two) / abs(nc1_two)
        agree_same = abs(_two_pass_nc1(*stats) - nc1_two) / abs(nc1_two)
        for impl in ("etfkern", "etfkern_mm_product", "two_pass", "two_pass_f64", "onehot", "gemm_floor"):
            if impl not in results:
                continue
            ms = results[impl]
            rows.append({"op": "update", "shape": shape, "impl": impl, "ms": ms,
                         "tokens_per_s": ntok / (ms / 1e3), "vs_etfkern": ms / results["etfkern"]})
        rows.append({"op": "compute", "shape": shape, "impl": "etfkern(all metrics)", "ms": results["compute"]})
        rows.append({"op": "compute", "shape": shape, "impl": "etfkern(no pair metrics)",
                     "ms": results["compute_gram"]})
        rows.append({"op": "compute", "shape": shape, "impl": "etfkern(nc1 only)", "ms": results["compute_nc1"]})
        rows.append({"op": "compute", "shape": shape, "impl": "two_pass(nc1 only)", "ms": results["two_pass_nc1"]})
        total_two = results["two_pass"] + results["two_pass_nc1"]
        total_f64 = results["two_pass_f64"] + results["two_pass_nc1"]
        rows.append({"op": "summary", "shape": shape, "impl": "ratios",
                     "one_pass_vs_two_pass": total_two / (results["etfkern"] + results["compute_nc1"]),
                     "one_pass_vs_two_pass_f64": total_f64 / (results["etfkern"] + results["compute_nc1"]),
                     "one_pass_gram_metrics_vs_two_pass_nc1":
                         total_two / (results["etfkern"] + results["compute_gram"]),
                     "one_pass_all_metrics_vs_two_pass_nc1": total_two / (results["etfkern"] + results["compute"]),
                     "onehot_over_etfkern": results["onehot"] / results["etfkern"],
                     "etfkern_over_gemm_floor": results["etfkern"] / results["gemm_floor"],
                     "nc1_rel_diff_vs_two_pass_f64": agree, "two_pass_nc1_rel_diff_vs_f64": agree_same,
                     **({} if mm_rel_diff is None else {
                         "mm_product_over_gemm_floor": results["etfkern_mm_product"] / results["gemm_floor"],
                         "mm_product_nc1_rel_diff_vs_two_pass_f64": mm_rel_diff})})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = run(args.quick, args.device)
    if any(r["op"].startswith("sweep") or r["op"].endswith("sweep") for r in rows):
        print_table(rows, ["op", "shape", "impl", "ms", "vs_two_pass", "sw_rel_err_vs_f64", "rel_err_vs_f64", "error"])
        if not args.no_write:
            print("wrote", write_results("collapse", rows, args.device, {"quick": args.quick, "sweep": True}))
        print(f"total {time.time() - t0:.1f} s")
        return
    print_table([r for r in rows if r["op"] != "summary"], ["op", "shape", "impl", "ms", "tokens_per_s", "vs_etfkern"])
    print_table([r for r in rows if r["op"] == "summary"],
                ["shape", "one_pass_vs_two_pass", "one_pass_vs_two_pass_f64", "one_pass_gram_metrics_vs_two_pass_nc1",
                 "one_pass_all_metrics_vs_two_pass_nc1",
                 "onehot_over_etfkern", "etfkern_over_gemm_floor", "nc1_rel_diff_vs_two_pass_f64",
                 "two_pass_nc1_rel_diff_vs_f64"])
    if not args.no_write:
        print("wrote", write_results("collapse", rows, args.device, {"quick": args.quick}))
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
