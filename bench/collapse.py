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

    python bench/collapse.py [--quick] [--device cpu|cuda] [--threads N] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_var, print_table, sync, time_ms, write_results  # noqa: E402

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


def run(quick: bool, device: str) -> list[dict]:
    """Rows {op, shape, impl, ms, tokens_per_s, ...} with ratios against the peers of the same run."""
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
        shape = f"C={c},d={d},N={tokens},B={batch},{str(dtype).replace('torch.', '')}"
        batches = _batches(c, d, tokens, batch, dtype, device)
        ntok = sum(y.shape[0] for _, y in batches)
        meter = etfkern.CollapseMeter(c, d, device=device)

        def one_pass():
            meter.reset()
            for x, y in batches:
                meter.update(x, y)
            sync(device)

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
