"""The spherical family's Triton backend (issues 3, 15, 21): the fused class-loop kernels, the "mm" and "chunked"
variants, their dispatch, and the sm_90 build check of every launch config. Under TRITON_INTERPRET=1 (no GPU) at
tiny shapes, against the float64 reference; the @gpu tests run the same checks at GPU-sized shapes on a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import backends_for, compile_triton_for_sm90
from test_spherical import _bank, _explicit_loss, _inputs, _tol

import etfkern
from etfkern.spherical import ops as _ops
from etfkern.spherical import reference as R

sph_ops = _ops  # the op layer: variant choice, the cached fixed shift, the launches


def test_triton_slab_mode_for_large_d(monkeypatch):
    if "triton" not in backends_for("spherical_ce_forward", "cpu"):
        pytest.skip("triton unavailable")
    import etfkern.triton_kernels.spherical as tk

    monkeypatch.setattr(tk, "MAX_REG_D", 8)  # d = 20 > 8: the global-slab accumulation path, 2 d-chunks of 16
    n, d, c = 18, 20, 35
    x, bank, target = _inputs(n, d, c, strided=True)
    lam = torch.rand(n)
    tb = torch.randint(0, c, (n,))
    g = torch.randn(n)
    for metric in ("cos", "arc"):
        ref = R.spherical_ce_forward(x, bank, target, tb, lam, 0.07, metric, 0.1, -100, True)
        ref_dw = R.spherical_ce_bank_grad(x, bank, target, tb, lam, g, ref[1], 0.07, metric, 0.1, -100)
        with etfkern.use_backend("triton"):
            out = _ops.spherical_ce_forward(x, bank, target, tb, lam, 0.07, metric, 0.1, -100, True)
            dw = _ops.spherical_ce_bank_grad(x, bank, target, tb, lam, g, ref[1], 0.07, metric, 0.1, -100)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5)
        torch.testing.assert_close(dw, ref_dw, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("slab_mode", [False, True])
def test_triton_bank_grad_row_splits_match_reference(monkeypatch, slab_mode):
    """Forced row splits of the bank gradient (few classes on a big GPU): 70 rows in 3 splits of 32/32/6 (16-row
    blocks under the interpreter), register and slab accumulation, against the reference and the unsplit run."""
    tk = _triton_module()
    n, d, c = 70, 20, 21
    x, bank, target = _inputs(n, d, c, strided=True)
    target[5] = -100
    lam, tb, g = torch.rand(n), torch.randint(0, c, (n,)), torch.randn(n)
    if slab_mode:
        monkeypatch.setattr(tk, "MAX_REG_D", 8)
    assert tk._row_splits(n, c, 16, 16, c * d * 4, x.device) == (1, 80)  # no GPU to fill: unsplit by default
    ref = R.spherical_ce_forward(x, bank, target, tb, lam, 0.07, "arc", 0.1, -100, False)
    want = R.spherical_ce_bank_grad(x, bank, target, tb, lam, g, ref[1], 0.07, "arc", 0.1, -100)
    with etfkern.use_backend("triton"):
        whole = _ops.spherical_ce_bank_grad(x, bank, target, tb, lam, g, ref[1], 0.07, "arc", 0.1, -100)
        monkeypatch.setenv("ETFKERN_TRITON_SPLIT_N", "3")
        assert tk._row_splits(n, c, 16, 16, c * d * 4, x.device) == (3, 32)
        split = _ops.spherical_ce_bank_grad(x, bank, target, tb, lam, g, ref[1], 0.07, "arc", 0.1, -100)
    torch.testing.assert_close(whole, want, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(split, want, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Triton: fixed shift vs online max, split-C (issue 3, GPU half; run here under TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------------------
def _triton_module():
    if "triton" not in backends_for("spherical_ce_forward", "cpu"):
        pytest.skip("triton unavailable")
    import etfkern.triton_kernels.spherical as tk
    return tk


def _triton_ce(x, bank, target, tb, lam, tau, metric, eps):
    with etfkern.use_backend("triton"):
        fwd = _ops.spherical_ce_forward(x, bank, target, tb, lam, tau, metric, eps, -100, True)
        part = _ops.spherical_ce_partials(x, bank, tau, metric, True, True, True)
    return fwd + part


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_fixed_shift_and_online_max_agree(monkeypatch, dtype):
    """Both class-loop paths (constexpr FIXED) equal the float64 reference; the host picks the one that
    etfkern.spherical.fixed_shift() proves safe, cached per bank object and version."""
    tk = _triton_module()
    n, d, c = 18, 12, 37
    x, bank, target = _inputs(n, d, c, dtype=dtype, strided=True)
    tb = torch.randint(0, c, (n,))
    lam = torch.rand(n, dtype=R.acc_dtype(dtype))
    picked = []
    real_shift = sph_ops.cached_shift
    monkeypatch.setattr(sph_ops, "cached_shift", lambda *a: picked.append(real_shift(*a)) or picked[-1])
    for metric, tau in (("cos", 0.07), ("arc", 0.1)):  # both fixed-shift safe: 14.4 and pi / 0.1 <= 80
        ref = R.spherical_ce_forward(x, bank, target, tb, lam, tau, metric, 0.1, -100, True)
        ref += R.spherical_ce_partials(x, bank, tau, metric, True, True, True)
        fixed = _triton_ce(x, bank, target, tb, lam, tau, metric, 0.1)
        assert picked[-1] == 0.0
        # fp64 "arc": the in-kernel arccos polynomial is fp32-grade (|err| <= 2e-8 before the 1/tau)
        tol = dict(atol=3e-5, rtol=3e-5) if dtype == torch.float32 else _tol(dtype) if metric == "cos" \
            else dict(atol=1e-6, rtol=1e-6)
        with monkeypatch.context() as m:
            m.setattr(sph_ops, "cached_shift", lambda *a: None)  # force the online-max path
            online = _triton_ce(x, bank, target, tb, lam, tau, metric, 0.1)
        for a, b, r in zip(fixed, online, ref):
            torch.testing.assert_close(a, r, **tol)
            torch.testing.assert_close(b, r, **tol)
    # a small tau makes "cos" unsafe for a fixed shift (1 / tau = 50 > 40); "arc" at tau = 0.03 (pi / tau = 104.7 > 80) too
    assert real_shift(bank, 0.02, "cos") is None and real_shift(bank, 0.03, "arc") is None
    assert real_shift(bank, 0.07, "arc") == 0.0
    assert real_shift(bank, 0.07, "cos") == 0.0
    with torch.no_grad():
        bank.mul_(4.0)  # in-place update bumps the version: the cached decision is recomputed
    assert real_shift(bank, 0.07, "cos") is None


@pytest.mark.parametrize("metric", ["cos", "arc"])
def test_triton_split_c_matches_unsplit_and_reference(monkeypatch, metric):
    """Forced S = 2 (C = 37 not a multiple of S or of the tile) and S = 4 (the last slab holds no class) equal the
    unsplit kernel and the reference; also in slab mode (d > MAX_REG_D) and for the fused top-k merge."""
    tk = _triton_module()
    n, d, c = 18, 12, 37
    x, bank, target = _inputs(n, d, c, strided=True)
    bank[35] = bank[3]  # exact tie across slabs (same lane of their tiles): the lower index must win
    x[:4] = bank[3] * 2.0
    tb = torch.randint(0, c, (n,))
    lam = torch.rand(n)
    tau = 0.07 if metric == "cos" else 0.03  # "cos": fixed shift; "arc": online max (pi / tau > 80)
    ref = R.spherical_ce_forward(x, bank, target, tb, lam, tau, metric, 0.1, -100, True)
    ref += R.spherical_ce_partials(x, bank, tau, metric, True, True, True)
    assert tk._splits(n, c, 16, 16, 64, x.device) == (1, 48)  # no GPU to fill: unsplit by default
    whole = _triton_ce(x, bank, target, tb, lam, tau, metric, 0.1)
    with etfkern.use_backend("triton"):
        near = etfkern.nearest(x, bank, k=3)
    for s, slab_mode in ((2, False), (4, False), (4, True)):
        monkeypatch.setenv("ETFKERN_TRITON_SPLIT_C", str(s))
        if slab_mode:
            monkeypatch.setattr(tk, "MAX_REG_D", 8)
        assert tk._splits(n, c, 16, 16, 64, x.device) == (s, 32 if s == 2 else 16)
        split = _triton_ce(x, bank, target, tb, lam, tau, metric, 0.1)
        for a, b, r in zip(split, whole, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, r, atol=3e-5, rtol=3e-5)
        if not slab_mode:
            with etfkern.use_backend("triton"):
                v, i = etfkern.nearest(x, bank, k=3)
            assert torch.equal(i, near[1]) and torch.equal(v, near[0])
    assert torch.equal(near[0][:4, 0], near[0][:4, 1]) and (near[1][:4, :2] == torch.tensor([3, 35])).all()


# ------------------------------------------------------------------------------------------------------------
# the Triton kernels at their real tile configs (GPU-sized shapes; the same check runs small in the interpreter)
# ------------------------------------------------------------------------------------------------------------
def _triton_vs_float64(device, n, d, c, dtype, metric, k=5, backend="triton"):
    """Loss, x and bank gradients (bank trainable) and nearest(k) of the Triton backend against float64 autograd
    through the materialised logits on the same device. float32: close; 16-bit: no worse than 2x plain torch in
    that dtype (normalize + matmul + soft-target cross-entropy, autograd)."""
    gen = torch.Generator().manual_seed(n + d + c)
    x = torch.randn(n, d, generator=gen).to(device)
    bank = F.normalize(torch.randn(c, d, generator=gen, dtype=torch.float64), dim=1).to(device)
    target = torch.randint(0, c, (n,), generator=gen).to(device)
    target[::11] = -100
    tb = torch.randint(0, c, (n,), generator=gen).to(device)
    up = torch.rand(n, generator=gen).to(device)
    tau = 0.07
    kw = dict(tau=tau, metric=metric, label_smoothing=0.1, target_b=tb, lam=0.7, reduction="none")
    xr, br = x.double().requires_grad_(), bank.clone().requires_grad_()
    ref = _explicit_loss(xr, br, target, tau, metric, 0.1, -100, "none", tb, 0.7)
    ref.backward(up.double())
    with etfkern.use_backend(backend):
        xe, be = x.to(dtype).requires_grad_(), bank.to(dtype).requires_grad_()
        ours = etfkern.spherical_cross_entropy(xe, be, target, **kw)
        ours.float().backward(up)
        vals, idx = etfkern.nearest(x.to(dtype), bank.to(dtype), k=k)
    err = {"loss": (ours.double() - ref.detach()).abs().max().item(),
           "x": (xe.grad.double() - xr.grad).abs().max().item(),
           "bank": (be.grad.double() - br.grad).abs().max().item()}
    cos = F.normalize(x.double(), dim=1) @ bank.T
    ref_v, ref_i = cos.topk(k, dim=1)
    if dtype == torch.float32:
        scale = {"loss": ref.abs().max().item(), "x": xr.grad.abs().max().item(), "bank": br.grad.abs().max().item()}
        for key, e in err.items():
            assert e <= 1e-4 * (1.0 + scale[key]), (key, e, scale[key])
        torch.testing.assert_close(vals.double(), ref_v, atol=2e-5, rtol=2e-5)
        assert float((idx == ref_i).double().mean()) > 0.999
        return
    xp, bp = x.to(dtype).requires_grad_(), bank.to(dtype).requires_grad_()
    if metric == "cos":
        logits = F.normalize(xp, dim=1) @ bp.T / tau
    else:
        logits = -torch.arccos((F.normalize(xp, dim=1) @ bp.T).clamp(-1 + 1e-3, 1 - 1e-3)) / tau
    valid = (target != -100).unsqueeze(1)
    soft = 0.7 * F.one_hot(target.clamp_min(0), c) + 0.3 * F.one_hot(tb, c)
    plain = F.cross_entropy(logits, (soft * valid).to(dtype), label_smoothing=0.1, reduction="none") * valid.squeeze(1)
    plain.float().backward(up)
    plain_err = {"loss": (plain.double() - ref.detach()).abs().max().item(),
                 "x": (xp.grad.double() - xr.grad).abs().max().item(),
                 "bank": (bp.grad.double() - br.grad).abs().max().item()}
    for key, e in err.items():
        assert e <= 2 * plain_err[key] + 1e-6, (key, e, plain_err[key])
    plain_v = (F.normalize(x.to(dtype), dim=1) @ bank.to(dtype).T).topk(k, dim=1).values
    assert (vals.double() - ref_v).abs().max() <= 2 * (plain_v.double() - ref_v).abs().max() + 1e-6


@pytest.mark.parametrize("split", [None, "2", "mm"])
def test_triton_vs_float64_check_small(monkeypatch, split):
    """The GPU-sized check below, at an interpreter-sized shape (forced class and row splits when split; "mm":
    the class loop as tiled torch GEMMs, ETFKERN_SPHERICAL_CLASS_LOOP=mm, bank gradient and top-k still Triton)."""
    _triton_module()
    if split == "mm":
        monkeypatch.setenv("ETFKERN_SPHERICAL_CLASS_LOOP", "mm")
    elif split:
        monkeypatch.setenv("ETFKERN_TRITON_SPLIT_C", split)
        monkeypatch.setenv("ETFKERN_TRITON_SPLIT_N", split)
    _triton_vs_float64("cpu", 40, 24, 50, torch.float32, "cos" if split else "arc", k=3)


def test_triton_mm_class_loop_is_taken_and_validated(monkeypatch):
    tk = _triton_module()
    calls = []
    real = sph_ops.cos_tiles
    monkeypatch.setattr(sph_ops, "cos_tiles", lambda *a: calls.append(a[4:]) or real(*a))
    monkeypatch.setenv("ETFKERN_SPHERICAL_CLASS_LOOP", "mm")
    x, bank = torch.randn(9, 8), F.normalize(torch.randn(30, 8), dim=1)
    target = torch.randint(0, 30, (9,))
    with etfkern.use_backend("triton"):
        etfkern.spherical_cross_entropy(x, bank, target)
        assert len(calls) == 1
        etfkern.spherical_cross_entropy(x, bank, target, metric="arc")  # "arc" keeps the fused kernel
        assert len(calls) == 1
        monkeypatch.setenv("ETFKERN_SPHERICAL_CLASS_LOOP", "cublas")
        with pytest.raises(ValueError, match="ETFKERN_SPHERICAL_CLASS_LOOP"):
            etfkern.spherical_cross_entropy(x, bank, target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,c,metric,loop", [
    (4100, 128, 20000, "cos", "fused"),  # many row programs, ragged C, register accumulators
    (300, 520, 9000, "arc", "fused"),  # few row programs: split-C; d > MAX_REG_D: slab accumulation
    (5000, 256, 300, "arc", "fused"),  # few classes: row-split bank gradient
    (4100, 1040, 20000, "cos", "mm"),  # the tiled-GEMM class loop (16-bit GEMMs with float32 outputs)
])
def test_gpu_spherical_tiles(n, d, c, metric, loop, dtype, monkeypatch):
    monkeypatch.setenv("ETFKERN_SPHERICAL_CLASS_LOOP", loop)
    _triton_vs_float64("cuda", n, d, c, dtype, metric)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,c,metric,chunk_mib", [
    (4100, 1040, 20000, "cos", None),  # one-read pass (fixed shift), one chunk at the default budget
    (4100, 1040, 20000, "cos", "16"),  # several chunks (16 MiB of logits each)
    (300, 520, 9000, "arc", "4"),  # two-pass (online max), several chunks
])
def test_gpu_spherical_chunked(n, d, c, metric, chunk_mib, dtype, monkeypatch):
    """The "chunked" variant (cuBLAS GEMM per chunk + the Triton chunk pass) and the chunked nearest on a GPU,
    against float64, as test_gpu_spherical_tiles checks the other variants."""
    monkeypatch.setenv("ETFKERN_SPHERICAL_CLASS_LOOP", "chunked")
    monkeypatch.setenv("ETFKERN_SPHERICAL_NEAREST", "chunked")
    if chunk_mib:
        monkeypatch.setenv("ETFKERN_SPHERICAL_CHUNK_MIB", chunk_mib)
    _triton_vs_float64("cuda", n, d, c, dtype, metric)


# ------------------------------------------------------------------------------------------------------------
# GPU build check without a GPU: representative launch configs (bf16 tensor-core dots the interpreter cannot run,
# fixed shift / online max, split-C, slab mode, bank gradient, fused top-k) lower to PTX and assemble for sm_90.
# ------------------------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import etfkern.triton_kernels.spherical as tk

PT = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}

def prec(dtype):
    return "tf32" if dtype == torch.float32 else "ieee"

def fwd(d, dtype, arc, fixed, split):
    cfg = tk.config(d, dtype); nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    p = PT[dtype]
    sig = dict(X=p, W=p, LSE="*fp32", L="*fp32", SUMZ="*fp32", A="*fp32", B="*fp32", N="i32", C="i32", D="i32",
               sxn="i32", sxd="i32", swc="i32", swd="i32", inv_tau="fp32", arc_eps="fp32", shift="fp32", c_split="i32")
    const = dict(ARC=arc, NEED_SUMZ=arc, NEED_GRAD=True, NEED_B=arc, FIXED=fixed, SPLIT=split,
                 TAU_FREE=tk.tau_free("arc" if arc else "cos", dtype), ACC=tk.tl_acc(dtype), PREC=prec(dtype), **cfg)
    return build(tk._ce_fwd_kernel, sig, const, num_warps=nw, num_stages=ns)

def dw(d, dtype, arc):
    cfg = tk.config(d, dtype); nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    cfg.update(BLOCK_N=cfg["BLOCK_C"], BLOCK_C=cfg["BLOCK_N"])
    p = PT[dtype]
    sig = dict(X=p, W=p, LSE="*fp32", G="*fp32", TA="*i64", TB="*i64", WA="*fp32", WB="*fp32", DW="*fp32", N="i32",
               C="i32", D="i32", sxn="i32", sxd="i32", swc="i32", swd="i32", inv_tau="fp32", arc_eps="fp32",
               eps_over_c="fp32", n_split="i32")
    const = dict(ARC=arc, TAU_FREE=tk.tau_free("arc" if arc else "cos", dtype), ACC=tk.tl_acc(dtype),
                 PREC=prec(dtype), **cfg)
    return build(tk._ce_dw_kernel, sig, const, num_warps=nw, num_stages=ns)

def nearest(d, dtype, k):
    cfg = tk.config(d, dtype)
    p = PT[dtype]
    sig = dict(X=p, W=p, VALS="*fp32", IDX="*i64", N="i32", C="i32", D="i32", sxn="i32", sxd="i32", swc="i32",
               swd="i32", c_split="i32")
    const = dict(K=k, KP=max(2, triton.next_power_of_2(k)), ACC=tk.tl_acc(dtype), PREC=prec(dtype), BLOCK_N=64,
                 BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"])
    return build(tk._nearest_kernel, sig, const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

out = {
    "fwd_bf16_d256_cos_fixed": fwd(256, torch.bfloat16, False, True, False),
    "fwd_bf16_d1024_arc_online_split_slab": fwd(1024, torch.bfloat16, True, False, True),
    "fwd_bf16_d1024_cos_fixed_slab": fwd(1024, torch.bfloat16, False, True, False),
    "fwd_fp32_d512_arc_online_split": fwd(512, torch.float32, True, False, True),
    "dw_bf16_d512_arc": dw(512, torch.bfloat16, True),
    "nearest_bf16_d128_k5": nearest(128, torch.bfloat16, 5),
}
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    assert set(compile_triton_for_sm90(_AOT_SCRIPT, tmp_path)) == {"fwd_bf16_d256_cos_fixed", "fwd_bf16_d1024_arc_online_split_slab",
                                                                  "fwd_bf16_d1024_cos_fixed_slab",
                                                                  "fwd_fp32_d512_arc_online_split", "dw_bf16_d512_arc",
                                                                  "nearest_bf16_d128_k5"}


def test_triton_float16_arc_vs_float64():
    """float16 "arc" on the Triton backend within 2x plain torch's float16 error. Were: (1) the fixed shift 0 kept
    for float16 "arc" (p = exp(z), z down to -pi/tau, underflows float16 once cast for P @ W: x-gradient error ~10x
    plain torch's), (2) the target terms taken at the float32 x̂ while the kernel's cosines used the rounded one."""
    _triton_module()
    _triton_vs_float64("cpu", 20, 12, 30, torch.float16, "arc", k=3)


@pytest.mark.parametrize("split", [None, "2"])
def test_triton_float16_arc_small_tau_at_pole_is_finite(monkeypatch, split):
    """float16 "arc" with tau = 0.01 and x on bank rows (|cos| = 1): the clamped slope 1 / (tau sqrt(1e-6)) = 1e5
    exceeds float16's 65504; it used to be cast to float16 as a dot operand (forward P @ W and sum_c s_c w_c, bank
    gradient coef^T x̂): inf/NaN gradients. The CPU backend (float32 GEMMs) is the yardstick."""
    _triton_module()
    if split:
        monkeypatch.setenv("ETFKERN_TRITON_SPLIT_C", split)
        monkeypatch.setenv("ETFKERN_TRITON_SPLIT_N", split)
    c, d = 20, 64  # d = 64: the bank gradient (~1e5 x̂ per aligned row) still fits float16, its coefficients did not
    bank = _bank(c, d).half()
    x = bank[:6].clone()
    target = torch.arange(1, 7)  # the row's own (|cos| = 1) class is not its target: p ~ 1 there, coef ~ p s
    kw = dict(tau=0.01, metric="arc", label_smoothing=0.1, reduction="sum")
    res = {}
    for backend in ("cpu", "triton"):
        xe, be = x.clone().requires_grad_(), bank.clone().requires_grad_()
        with etfkern.use_backend(backend):
            loss = etfkern.spherical_cross_entropy(xe, be, target, **kw)
            loss.backward()
        assert torch.isfinite(be.grad).all(), (backend, "bank gradient")
        assert torch.isfinite(loss) and torch.isfinite(xe.grad).all(), (backend, "x gradient")
        res[backend] = (loss.double(), be.grad.double())
    # rounding x̂ to float16 moves cos = 1 by ~1e-3, where acos is steep: loose agreement only
    torch.testing.assert_close(res["triton"][0], res["cpu"][0], rtol=2e-2, atol=0.0)


# ------------------------------------------------------------------------------------------------------------
# The "chunked" variant (issue 21): cuBLAS-style GEMM per row chunk + one Triton pass over the chunk's logits
# ------------------------------------------------------------------------------------------------------------
def _force_chunks(monkeypatch, rows, c, d, itemsize=4):
    """ETFKERN_SPHERICAL_CLASS_LOOP=chunked with a chunk budget that holds exactly ``rows`` rows."""
    monkeypatch.setenv("ETFKERN_SPHERICAL_CLASS_LOOP", "chunked")
    monkeypatch.setenv("ETFKERN_SPHERICAL_CHUNK_MIB", repr((rows * (c * itemsize + d * 4) + 1) / 2**20))
    assert sph_ops.chunk_rows_gpu(10**6, c, d, itemsize) == rows


@pytest.mark.parametrize("metric,tau", [("cos", 0.07), ("cos", 0.02), ("arc", 0.05)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_chunked_ops_float32_within_issue_bounds_of_float64(monkeypatch, metric, tau, eps):
    """float32, 4 chunks of 7 rows (N = 23, odd C = 41, d = 12; strided x and bank), ignored rows, mixup pairs
    with per-row lam: loss and lse within 2e-5 and the x̂- and bank gradients within 2e-4 of the float64 reference;
    eval (no gradient) gives the same loss and lse; deterministic (two runs are bitwise equal). "cos" at tau = 0.07
    takes the one-read pass (fixed shift), at 0.02 (1/tau = 50 > 40) the two-pass online max."""
    tk = _triton_module()
    n, d, c = 23, 12, 41
    x, bank, target = _inputs(n, d, c, strided=True)
    target[7] = target[19] = -100
    tb, lam, g = torch.randint(0, c, (n,)), torch.rand(n), torch.randn(n)
    _force_chunks(monkeypatch, 7, c, d)
    one_pass = []
    real_launch = tk.chunk_ce_rows
    monkeypatch.setattr(tk, "chunk_ce_rows", lambda *a: one_pass.append(len(a) > 12 and a[12]) or real_launch(*a))
    args = (target, tb, lam, tau, metric, eps, -100)
    ref = R.spherical_ce_forward(x.double(), bank.double(), *args[:2], lam.double(), *args[3:], True)
    ref_dw = R.spherical_ce_bank_grad(x.double(), bank.double(), target, tb, lam.double(), g.double(), ref[1], tau,
                                      metric, eps, -100)
    with etfkern.use_backend("triton"):
        loss, lse, grad = _ops.spherical_ce_forward(x, bank, *args, True)
        again = _ops.spherical_ce_forward(x, bank, *args, True)
        ev = _ops.spherical_ce_forward(x, bank, *args, False)
        dw = _ops.spherical_ce_bank_grad(x, bank, target, tb, lam, g, lse, tau, metric, eps, -100)
    torch.testing.assert_close(loss.double(), ref[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref[1], atol=2e-5, rtol=0)
    torch.testing.assert_close(grad.double(), ref[2], atol=2e-4, rtol=0)
    torch.testing.assert_close(dw.double(), ref_dw, atol=2e-4 * max(1.0, float(ref_dw.abs().max())), rtol=0)
    assert (loss[[7, 19]] == 0).all() and (grad[[7, 19]] == 0).all()
    assert all(torch.equal(a, b) for a, b in zip(again, (loss, lse, grad)))
    assert torch.equal(ev[0], loss) and torch.equal(ev[1], lse) and ev[2].shape == (0, d)
    assert one_pass == [metric == "cos" and tau == 0.07] * 12 + [False] * 4  # 3 forwards, then the bank gradient


@pytest.mark.parametrize("metric", ["cos", "arc"])
def test_chunked_public_loss_gradients_and_nearest_vs_float64(monkeypatch, metric):
    """The public loss with a trainable bank (x and bank gradients through autograd) and nearest(k=3) on the
    chunked variant, 3 chunks, against float64 autograd through the materialised logits (the GPU check's helper)."""
    _triton_module()
    _force_chunks(monkeypatch, 16, 50, 24)
    monkeypatch.setenv("ETFKERN_SPHERICAL_NEAREST", "chunked")
    _triton_vs_float64("cpu", 40, 24, 50, torch.float32, metric, k=3)


@pytest.mark.parametrize("metric", ["cos", "arc"])
def test_chunked_float16_no_worse_than_twice_plain_torch(monkeypatch, metric):
    """float16 x and bank (16-bit logits chunk, dlogits in place): loss, x and bank gradients and top-k values
    within 2x plain torch's float16 error against float64 (the interpreter has no bf16 dot; bf16 runs on a GPU)."""
    _triton_module()
    _force_chunks(monkeypatch, 8, 30, 12, itemsize=2)
    monkeypatch.setenv("ETFKERN_SPHERICAL_NEAREST", "chunked")
    _triton_vs_float64("cpu", 20, 12, 30, torch.float16, metric, k=3)


def test_chunked_float16_arc_small_tau_at_pole_is_finite(monkeypatch):
    """float16 "arc", tau = 0.01, x on bank rows (|cos| = 1): the chunk's dlogits carry tau * slope (<= 1000), never
    the slope itself (1e5 > 65504): finite loss and gradients, loss close to the CPU backend's."""
    _triton_module()
    _force_chunks(monkeypatch, 4, 20, 64, itemsize=2)
    bank = _bank(20, 64).half()
    x = bank[:6].clone()
    target = torch.arange(1, 7)
    res = {}
    for backend in ("cpu", "triton"):
        xe, be = x.clone().requires_grad_(), bank.clone().requires_grad_()
        with etfkern.use_backend(backend):
            loss = etfkern.spherical_cross_entropy(xe, be, target, tau=0.01, metric="arc", label_smoothing=0.1,
                                                   reduction="sum")
            loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xe.grad).all() and torch.isfinite(be.grad).all(), backend
        res[backend] = loss.double()
    torch.testing.assert_close(res["triton"], res["cpu"], rtol=2e-2, atol=0.0)


def test_chunk_rows_keep_the_memory_budget():
    """Every shape of the issue's grid: logits chunk + x̂ copies + the chunk's GEMM result <= max(256 MiB, 1/16 of
    the N x C float32 logits), except where the op's own (N, d) float32 x̂-gradient passes it alone (then the chunk
    gets CHUNK_MIN_MIB); rows are whole 128-row GEMM tiles when more than 128 fit."""
    for n, d, c in ((8192, 1024, 131072), (16384, 4096, 32000), (4096, 4096, 262144), (65536, 256, 10000),
                    (8192, 512, 32768), (32768, 2048, 65536)):
        for itemsize in (2, 4):
            rows = sph_ops.chunk_rows_gpu(n, c, d, itemsize)
            budget = max(256 << 20, n * c * 4 // 16)
            fixed = n * d * (itemsize + 4)
            chunk = rows * (c * itemsize + d * 4)
            assert rows >= 64 and (rows % 128 == 0 or rows < 128), (n, d, c, rows)
            if budget - fixed >= sph_ops.CHUNK_MIN_MIB << 20:
                assert chunk + fixed <= budget, (n, d, c, itemsize, rows)
            else:
                assert chunk <= sph_ops.CHUNK_MIN_MIB << 20, (n, d, c, itemsize, rows)
    assert sph_ops.chunk_rows_gpu(5, 10, 4, 4) == 5  # small problems: one chunk of every row


# ------------------------------------------------------------------------------------------------------------
# Variant choice: env override, then the dispatch table on a GPU (issue 15: "auto" picks the measured faster path)
# ------------------------------------------------------------------------------------------------------------
def test_class_loop_variant_from_dispatch_table_and_env_override(monkeypatch):
    from etfkern._core import dispatch

    monkeypatch.delenv("ETFKERN_SPHERICAL_CLASS_LOOP", raising=False)
    x = lambda n, d, dt=torch.bfloat16: torch.empty(n, d, dtype=dt)  # noqa: E731
    bank = lambda c, d, dt=torch.bfloat16: torch.empty(c, d, dtype=dt)  # noqa: E731
    pick = lambda n, d, c, metric="cos", grad=True: sph_ops.class_loop_variant(x(n, d), bank(c, d), metric, grad)  # noqa
    assert pick(64, 1024, 100) == "fused"  # CPU tensors (the interpreter): always the fused kernel
    monkeypatch.setattr(sph_ops, "_on_gpu", lambda t: True)  # as on a GPU: the table decides
    assert pick(8192, 1024, 131072) == "mm" and pick(8192, 512, 32768) == "mm"  # H200 row: "cos" at d >= 512
    assert pick(65536, 256, 10000) == "fused" and pick(8192, 1024, 131072, "arc") == "fused"
    variant, row = dispatch.choose_variant("spherical_class_loop", dtype="bfloat16", d=1024, C=131072, N=8192,
                                           metric="cos", need_grad=True, bank_grad=False)
    assert variant == "mm" and row.source.startswith("bench/results/")
    for forced in ("fused", "mm", "chunked"):  # the env var wins over the table, on every device
        monkeypatch.setenv("ETFKERN_SPHERICAL_CLASS_LOOP", forced)
        assert pick(8192, 1024, 131072) == forced and pick(64, 8, 10, "arc") == forced
    monkeypatch.setenv("ETFKERN_SPHERICAL_CLASS_LOOP", "cublas")
    with pytest.raises(ValueError, match="ETFKERN_SPHERICAL_CLASS_LOOP"):
        pick(64, 8, 10)
    monkeypatch.delenv("ETFKERN_SPHERICAL_CLASS_LOOP")
    assert sph_ops.nearest_variant(x(64, 8), bank(10, 8), 3) == "fused"
    assert sph_ops.nearest_variant(x(64, 8), bank(100, 8), 65) == "chunked"  # past the fused kernel's k
    monkeypatch.setenv("ETFKERN_SPHERICAL_NEAREST", "chunked")
    assert sph_ops.nearest_variant(x(64, 8), bank(10, 8), 3) == "chunked"


def test_measured_dispatch_json_rows_load_and_match(tmp_path):
    """The sweep's dispatch JSON (bench/spherical.py writes it) loads as table rows: [lo, hi) ranges and values."""
    import json

    from etfkern._core import dispatch

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"entries": [{
        "op": "spherical_class_loop", "variant": "chunked", "evidence": "x ms vs y ms", "source": "bench/results/f.json",
        "when": {"dtype": "bfloat16", "metric": "cos", "need_grad": True, "bank_grad": False,
                 "d": [724, 1448], "C": [92682, 185364], "N": [5793, 11585]}}]}))
    rows = dispatch.load_measured(str(path))["spherical_class_loop"]
    feats = dict(dtype="bfloat16", metric="cos", need_grad=True, bank_grad=False, d=1024, C=131072, N=8192)
    assert rows[0].variant == "chunked" and rows[0].matches(feats)
    assert not rows[0].matches({**feats, "d": 4096}) and not rows[0].matches({**feats, "metric": "arc"})
    assert dispatch.load_measured(str(tmp_path / "missing.json")) == {}


def test_float64_reference_helper_keeps_every_input_on_x_device(monkeypatch):
    """Issue 15: the GPU check's float64 reference built lam on the CPU next to CUDA tensors. Every tensor handed to
    the soft targets must be on x's device (a spy, and x on the meta device: this machine has one real device)."""
    seen = []
    real = R.soft_targets

    def spy(target, target_b, lam, *rest):
        seen.append({t.device for t in (target, target_b, lam)})
        return real(target, target_b, lam, *rest)

    monkeypatch.setattr(R, "soft_targets", spy)
    x, bank, target = _inputs(6, 4, 5)
    x = x.double()
    for lam in (None, 0.7):
        dev = torch.device("meta")
        target_meta = target.to(dev)
        out = _explicit_loss(x.to(dev), bank.double().to(dev), target_meta, 0.07, "cos", 0.0, -100, "none", None, lam)
        assert out.device == dev
        assert seen and seen[-1] == {dev}, seen


# ------------------------------------------------------------------------------------------------------------
# sm_90 build check of the launch configs added for issues 15 and 21: the chunk pass in every input dtype and
# mode, and the float64 configs of every spherical kernel (Triton 3.6 rejected the float64 dot accumulator)
# ------------------------------------------------------------------------------------------------------------
_AOT_SCRIPT_CHUNK_F64 = r"""
import etfkern.triton_kernels.spherical as tk

PT = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}
ACCP = lambda dtype: "*fp64" if dtype == torch.float64 else "*fp32"

def chunk(dtype, arc, write_grad, lse_given, one_pass=False, n_cls=131072):
    cfg = tk.chunk_config(n_cls); nw = cfg.pop("num_warps")
    a = ACCP(dtype)
    sig = dict(Z=PT[dtype], TA="*i64", TB="*i64", LAM=a, LSE=a, LOSS=a, C="i32", szn="i32", inv_tau="fp32",
               arc_eps="fp32", eps="fp32", eps_over_c="fp32")
    const = dict(ARC=arc, NEED_SUMZ=not lse_given, WRITE_GRAD=write_grad, LSE_GIVEN=lse_given, ONE_PASS=one_pass,
                 ACC=tk.tl_acc(torch.float64 if dtype == torch.float64 else torch.float32), **cfg)
    return build(tk._chunk_ce_kernel, sig, const, num_warps=nw)

def fwd64(d, arc, fixed, split):
    dtype = torch.float64
    cfg = tk.config(d, dtype); nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    p, a = PT[dtype], ACCP(dtype)
    sig = dict(X=p, W=p, LSE=a, L=a, SUMZ=a, A=a, B=a, N="i32", C="i32", D="i32", sxn="i32", sxd="i32", swc="i32",
               swd="i32", inv_tau="fp32", arc_eps="fp32", shift="fp32", c_split="i32")
    const = dict(ARC=arc, NEED_SUMZ=arc, NEED_GRAD=True, NEED_B=arc, FIXED=fixed, SPLIT=split, TAU_FREE=False,
                 ACC=tk.tl_acc(dtype), PREC="ieee", **cfg)
    return build(tk._ce_fwd_kernel, sig, const, num_warps=nw, num_stages=ns)

def dw64(d, arc):
    dtype = torch.float64
    cfg = tk.config(d, dtype); nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    cfg.update(BLOCK_N=cfg["BLOCK_C"], BLOCK_C=cfg["BLOCK_N"])
    p, a = PT[dtype], ACCP(dtype)
    sig = dict(X=p, W=p, LSE=a, G=a, TA="*i64", TB="*i64", WA=a, WB=a, DW=a, N="i32", C="i32", D="i32", sxn="i32",
               sxd="i32", swc="i32", swd="i32", inv_tau="fp32", arc_eps="fp32", eps_over_c="fp32", n_split="i32")
    const = dict(ARC=arc, TAU_FREE=False, ACC=tk.tl_acc(dtype), PREC="ieee", **cfg)
    return build(tk._ce_dw_kernel, sig, const, num_warps=nw, num_stages=ns)

def nearest64(d, k):
    dtype = torch.float64
    cfg = tk.config(d, dtype)
    sig = dict(X=PT[dtype], W=PT[dtype], VALS="*fp64", IDX="*i64", N="i32", C="i32", D="i32", sxn="i32", sxd="i32",
               swc="i32", swd="i32", c_split="i32")
    const = dict(K=k, KP=max(2, triton.next_power_of_2(k)), ACC=tk.tl_acc(dtype), PREC="ieee", BLOCK_N=64,
                 BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"])
    return build(tk._nearest_kernel, sig, const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

MODES = {"cos_fwd_grad": (False, True, False), "arc_fwd_grad": (True, True, False), "cos_eval": (False, False, False),
         "arc_bank_grad": (True, True, True), "cos_bank_grad": (False, True, True),
         "cos_one_pass": (False, True, False, True)}
out = {}
for dtype, name, modes in ((torch.bfloat16, "bf16", ("cos_fwd_grad", "arc_fwd_grad", "cos_eval", "arc_bank_grad",
                                                    "cos_one_pass")),
                           (torch.float16, "fp16", ("arc_fwd_grad", "arc_bank_grad")),
                           (torch.float32, "fp32", ("cos_fwd_grad", "arc_bank_grad", "cos_one_pass")),
                           (torch.float64, "fp64", ("arc_fwd_grad", "cos_bank_grad"))):
    for mode in modes:
        out[f"chunk_{name}_{mode}"] = chunk(dtype, *MODES[mode])
out["chunk_bf16_cos_fwd_grad_C100"] = chunk(torch.bfloat16, False, True, False, n_cls=100)
out["fwd_fp64_d64_cos_fixed"] = fwd64(64, False, True, False)
out["fwd_fp64_d520_arc_online_split_slab"] = fwd64(520, True, False, True)
out["dw_fp64_d64_cos"] = dw64(64, False)
out["dw_fp64_d520_arc_slab"] = dw64(520, True)
out["nearest_fp64_d64_k5"] = nearest64(64, 5)
print(json.dumps(out))
"""


def test_chunk_and_float64_kernels_compile_for_sm90(tmp_path):
    report = compile_triton_for_sm90(_AOT_SCRIPT_CHUNK_F64, tmp_path)
    chunks = {"chunk_bf16_cos_fwd_grad", "chunk_bf16_arc_fwd_grad", "chunk_bf16_cos_eval", "chunk_bf16_arc_bank_grad",
              "chunk_fp16_arc_fwd_grad", "chunk_fp16_arc_bank_grad", "chunk_fp32_cos_fwd_grad",
              "chunk_fp32_arc_bank_grad", "chunk_fp64_arc_fwd_grad", "chunk_fp64_cos_bank_grad",
              "chunk_bf16_cos_one_pass", "chunk_fp32_cos_one_pass"}
    assert set(report) == chunks | {"chunk_bf16_cos_fwd_grad_C100", "fwd_fp64_d64_cos_fixed",
                                    "fwd_fp64_d520_arc_online_split_slab", "dw_fp64_d64_cos", "dw_fp64_d520_arc_slab",
                                    "nearest_fp64_d64_k5"}


def test_normalized_row_blocks_give_the_same_bits(monkeypatch):
    """normalized() in row blocks (bounded float32 temporaries for a large 16-bit x) equals the one-block result
    bitwise, for bf16 and strided float32 inputs, with a ragged last block."""
    from etfkern.spherical import cpu

    for x in (torch.randn(100, 37).bfloat16(), torch.randn(100, 74)[:, ::2]):
        whole = cpu.normalized(x, x.dtype)
        monkeypatch.setattr(cpu, "_NORM_BLOCK", 37 * 7)
        blocks = cpu.normalized(x, x.dtype)
        monkeypatch.undo()
        assert blocks.is_contiguous() and torch.equal(blocks, whole)
