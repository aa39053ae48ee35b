"""Kernel-level tests of the collapse ops (issue 4, 18, 19): every backend of collapse_update / collapse_pair_stats /
collapse_ncc against the float64 reference (interpreter-mode Triton at tiny shapes, the compiled CPU kernel, the
chunked-torch CPU path), the product variants, 64-bit offsets, and the sm_90 compile of every Triton launch
config. The meter and its metrics are tested in test_collapse.py."""
from __future__ import annotations

import math

import pytest
import torch

import etfkern
from etfkern.collapse import cpu as collapse_cpu
from etfkern.collapse import reference as ref
from conftest import backends_for, compile_triton_for_sm90, tolerance
from test_collapse import _close, _clustered  # the meter tests' helpers (one copy)


def _tol(backend: str, dtype: torch.dtype, output: str = "sw_delta") -> float:
    """The relative tolerance of collapse_update's ``output`` (conftest.OP_TOL)."""
    if backend == "triton":
        return tolerance(dtype, "collapse_update/triton")[1]
    return tolerance(dtype, "collapse_update/cpu/sw_delta" if output == "sw_delta" else "collapse_update/cpu")[1]


def _update_inputs(n: int, k: int, d: int):
    x = torch.randn(n, d, dtype=torch.float64) * 2 + 5
    inv = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,))])[torch.randperm(n)]
    m_old = torch.randn(k, d, dtype=torch.float64) + 5
    n_old = torch.randint(0, 6, (k,))
    n_old[0] = 0  # a class new to the meter
    return x, inv, m_old, n_old


# ----------------------------------------------------------------------------------------------------------
# ops, every backend vs the reference
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (29, 5, 13), (40, 17, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_op_every_backend(device, n, k, d, dtype):
    x, inv, m_old, n_old = _update_inputs(n, k, d)
    x = x.to(dtype)
    want = ref.collapse_update(x, inv, m_old, n_old)
    # non-contiguous features: a transposed view
    xt = x.T.contiguous().T.to(device)
    assert not xt.is_contiguous() or n == 1
    for backend in backends_for("collapse_update", device):
        with etfkern.use_backend(backend):
            got = torch.ops.etfkern.collapse_update(xt, inv.to(device), m_old.to(device), n_old.to(device))
        for g, w, name in zip(got, want, ("m_new", "m2_delta", "sw_delta")):
            assert g.dtype == torch.float64 and g.shape == w.shape
            tol = _tol(backend, dtype, name)
            scale = float(w.abs().max()) + 1.0
            _close(g.cpu(), w, rtol=tol, atol=tol * scale, msg=f"{backend} {name}")
    if device == "cpu":  # the chunked-torch CPU path (the compiled kernel shadows it in the router)
        got = collapse_cpu._update_cpu(xt, inv, m_old, n_old)
        for g, w, name in zip(got, want, ("m_new", "m2_delta", "sw_delta")):
            tol = _tol("cpu", dtype, name)
            _close(g, w, rtol=tol, atol=tol * (float(w.abs().max()) + 1.0), msg=f"chunked torch {name}")


def test_cpu_backend_uses_compiled_update_kernel():
    from etfkern._core import backend as _backend

    assert _backend.has_native("collapse_update", "cpu"), etfkern._C_ERROR
    assert _backend.implementation("collapse_update", "cpu", "cpu") is torch.ops.etfkern.collapse_update_native


def test_cpu_kernel_scratch_reuse_across_shapes_and_dtypes():
    # the compiled CPU kernel keeps per-thread scratch between calls: shrinking / growing K, d, N and switching
    # the product dtype (float64 vs float32 operands) must give what a fresh call gives (the reference)
    native = torch.ops.etfkern.collapse_update_native
    for n, k, d, dtype in [(300, 40, 24, torch.float32), (50, 3, 24, torch.float64), (400, 90, 33, torch.bfloat16),
                           (7, 7, 5, torch.float32), (300, 40, 24, torch.float64), (2, 1, 64, torch.float16)]:
        x, inv, m_old, n_old = _update_inputs(n, k, d)
        x = x.to(dtype)
        want = ref.collapse_update(x, inv, m_old, n_old)
        for g, w, name in zip(native(x, inv, m_old, n_old), want, ("m_new", "m2_delta", "sw_delta")):
            tol = _tol("cpu", dtype, name)
            _close(g, w, rtol=tol, atol=tol * (float(w.abs().max()) + 1.0), msg=f"{n},{k},{d},{dtype} {name}")


def _run_in_fresh_thread(fn):
    # the compiled CPU kernel's scratch is thread_local: a fresh thread starts with an empty cache, so the
    # first call below is the one that allocates it
    import threading

    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_kernel_scratch_allocated_under_inference_mode(dtype):
    # Scratch first allocated inside torch.inference_mode() is an inference tensor; the kernel's in-place ops on
    # it (float32 partial product) then failed on every later call outside inference mode in that thread:
    # "Inplace update to inference tensor outside InferenceMode is not allowed".
    native = torch.ops.etfkern.collapse_update_native
    x, inv, m_old, n_old = _update_inputs(300, 40, 24)
    x = x.to(dtype)
    want = ref.collapse_update(x, inv, m_old, n_old)

    def calls():
        with torch.inference_mode():
            first = native(x, inv, m_old, n_old)
        second = native(x, inv, m_old, n_old)  # same shapes: the cached scratch is reused
        with torch.inference_mode():
            third = native(x, inv, m_old, n_old)
        return first, second, third

    for got in _run_in_fresh_thread(calls):
        for g, w, name in zip(got, want, ("m_new", "m2_delta", "sw_delta")):
            tol = _tol("cpu", dtype, name)
            _close(g, w, rtol=tol, atol=tol * (float(w.abs().max()) + 1.0), msg=f"{dtype} {name}")


def test_meter_update_after_inference_mode_update():
    # the user-facing form of the scratch defect: evaluation under inference_mode, then training-time updates
    x, y = _clustered(200, 6, 8)
    x = x.float()

    def updates():
        m = etfkern.CollapseMeter(6, 8)
        with torch.inference_mode():
            m.update(x[:100], y[:100])
        m.update(x[100:], y[100:])
        return m

    m = _run_in_fresh_thread(updates)
    one = etfkern.CollapseMeter(6, 8)
    one.update(x, y)
    torch.testing.assert_close(m.means, one.means, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.equal(m.counts, one.counts)


@pytest.mark.parametrize("args,match", [
    (lambda x, inv, m, n: (x[0], inv, m, n), r"features must be \(N, d\)"),
    (lambda x, inv, m, n: (x, inv[:-1], m, n), r"inv must be \(N,\)"),
    (lambda x, inv, m, n: (x, inv, m[:, :-1], n), r"m_old must be \(K, d\)"),
    (lambda x, inv, m, n: (x, inv, m, n[:-1]), r"n_old must be \(K,\)"),
    (lambda x, inv, m, n: (x, inv.double(), m, n), "inv must be an integer tensor"),
    (lambda x, inv, m, n: (x, inv - 1, m, n), r"inv must lie in \[0, 5\)"),
    (lambda x, inv, m, n: (x, inv + 1, m, n), r"inv must lie in \[0, 5\)"),
    (lambda x, inv, m, n: (x, inv, m[:0], n[:0]), r"inv must lie in \[0, K\)"),
])
def test_cpu_update_kernel_bad_input_is_value_error(args, match):
    # native-op checks raise ValueError naming the argument (DESIGN.md); a float inv was silently truncated and
    # K = 0 with rows returned empty statistics instead of rejecting the labels
    x, inv, m_old, n_old = _update_inputs(29, 5, 13)
    with pytest.raises(ValueError, match=match):
        torch.ops.etfkern.collapse_update_native(*args(x, inv, m_old, n_old))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_update_op_bf16_within_twice_plain_torch_error(backend):
    if backend not in backends_for("collapse_update", "cpu"):
        pytest.skip(f"{backend} unavailable here")
    x, inv, m_old, n_old = _update_inputs(40, 6, 16)
    xb = x.to(torch.bfloat16)
    exact = ref.collapse_update(xb, inv, m_old, n_old)[2]
    # plain torch in bf16: centre in bf16, scatter in bf16
    m_new = ref.collapse_update(xb, inv, m_old, n_old)[0]
    m_o = torch.where((n_old > 0)[:, None], m_old, m_new)
    a = (xb - m_o[inv].to(torch.bfloat16))
    b = (xb - m_new[inv].to(torch.bfloat16))
    plain_err = float((a.T @ b).to(torch.float64).sub(exact).abs().max())
    with etfkern.use_backend(backend):
        got = torch.ops.etfkern.collapse_update(xb, inv, m_old, n_old)[2]
    err = float((got - exact).abs().max())
    assert err <= 2 * plain_err + 1e-12, (err, plain_err)


def test_cpu_update_single_operand_far_from_origin():
    # The CPU paths centre class c on p_c = m_b - sqrt(n_o/(n_o+n_b)) (m_b - m_o) and form one A^T A; check it
    # against the textbook two-operand reference where cancellation would show: offset 1e4, old means close to
    # the batch means, old counts large, fp32 input, several rows per class, a class new to the meter.
    gen = torch.Generator().manual_seed(3)
    n, k, d = 300, 7, 9
    inv = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=gen)])
    centres = torch.randn(k, d, generator=gen, dtype=torch.float64) + 1e4
    x = (centres[inv] + 0.1 * torch.randn(n, d, generator=gen, dtype=torch.float64)).float()
    m_old = centres + 0.01 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    n_old = torch.randint(1, 10**6, (k,), generator=gen)
    n_old[2] = 0
    want = ref.collapse_update(x, inv, m_old, n_old)
    # the same values as float64 features (float64 products: the algebra to 1e-9) and as float32 features
    # (float32 products of the float64-centred operand: sw_delta to float32 accuracy, no cancellation)
    for feats, sw_tol in ((x.double(), 1e-9), (x, 2e-6)):
        for got in (torch.ops.etfkern.collapse_update_native(feats, inv, m_old, n_old),
                    collapse_cpu._update_cpu(feats, inv, m_old, n_old)):
            for g, w, name in zip(got, want, ("m_new", "m2_delta", "sw_delta")):
                tol = sw_tol if name == "sw_delta" else 1e-9
                _close(g, w, rtol=tol, atol=tol * float(w.abs().max()), msg=f"{feats.dtype} {name}")
            assert torch.equal(got[2], got[2].T)


@pytest.mark.parametrize("k,d", [(2, 3), (5, 20), (37, 7)])
def test_pair_op_every_backend(device, k, d):
    mt = torch.randn(k, d, dtype=torch.float64)
    mt = mt - mt.mean(0)
    s = torch.rand(k, dtype=torch.float64) + 0.1
    shift = -0.5 * math.log(2 * k / (k - 1))
    want = ref.collapse_pair_stats(mt, s, shift)
    mt_nc = mt.T.contiguous().T  # non-contiguous view
    for backend in backends_for("collapse_pair_stats", device):
        with etfkern.use_backend(backend):
            got = torch.ops.etfkern.collapse_pair_stats(mt_nc.to(device), s.to(device), shift)
        tol = 1e-10 if backend != "triton" else 5e-5
        _close(got.cpu(), want, rtol=tol, atol=tol * k * k, msg=backend)


@pytest.mark.parametrize("n,c,k,d,with_bias", [(1, 1, 1, 4, False), (23, 37, 11, 9, True), (40, 20, 20, 32, False)])
def test_ncc_op_every_backend(device, n, c, k, d, with_bias):
    x = torch.randn(n, d)
    means = torch.randn(k, d)
    weights = torch.randn(d, c).T  # non-contiguous (C, d)
    bias = torch.randn(2 * c)[::2] if with_bias else None  # non-contiguous
    want = ref.collapse_ncc(x, means, weights, bias)
    for backend in backends_for("collapse_ncc", device):
        with etfkern.use_backend(backend):
            got = torch.ops.etfkern.collapse_ncc(x.to(device), means.to(device), weights.to(device),
                                                 None if bias is None else bias.to(device))
        assert torch.equal(got[0].cpu(), want[0]), backend
        assert torch.equal(got[1].cpu(), want[1]), backend


def test_update_op_empty_batch_every_backend():
    x = torch.zeros(0, 5)
    inv = torch.zeros(0, dtype=torch.int64)
    m_old = torch.randn(2, 5, dtype=torch.float64)
    n_old = torch.tensor([3, 4])
    for backend in backends_for("collapse_update", "cpu") + ["cpu-torch"]:
        if backend == "cpu-torch":
            m_new, m2, sw = collapse_cpu._update_cpu(x, inv, m_old, n_old)
        else:
            with etfkern.use_backend(backend):
                m_new, m2, sw = torch.ops.etfkern.collapse_update(x, inv, m_old, n_old)
        assert torch.allclose(m_new, m_old, rtol=1e-14, atol=0) and not m2.any() and not sw.any(), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x, inv, m_old, n_old = _update_inputs(11, 3, 5)
    torch.library.opcheck(torch.ops.etfkern.collapse_update.default, (x.to(dtype), inv, m_old, n_old))
    mt = torch.randn(6, 4, dtype=dtype)
    torch.library.opcheck(torch.ops.etfkern.collapse_pair_stats.default, (mt, torch.rand(6, dtype=dtype), -0.3))
    w = torch.randn(7, 4, dtype=dtype)
    for b in (None, torch.randn(7, dtype=dtype)):
        torch.library.opcheck(torch.ops.etfkern.collapse_ncc.default, (x[:, :4].to(dtype), mt, w, b))


def test_triton_update_is_deterministic():
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton unavailable")
    x, inv, m_old, n_old = _update_inputs(35, 4, 18)
    with etfkern.use_backend("triton"):
        a = torch.ops.etfkern.collapse_update(x.float(), inv, m_old, n_old)
        b = torch.ops.etfkern.collapse_update(x.float(), inv, m_old, n_old)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_update_row_splits_match_reference(dtype):
    # The scatter GEMM splits the rows when d is small (d-tile triangle below the SM count); in the interpreter a
    # flush step is 32 rows: 230 rows in 3 splits of 96/96/38 rows, a ragged last split, against the reference.
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton unavailable")
    import etfkern.triton_kernels.collapse as tk

    x, inv, m_old, n_old = _update_inputs(230, 11, 21)
    x = x.to(dtype)
    want = ref.collapse_update(x, inv, m_old, n_old)
    one = tk.collapse_update(x, inv, m_old, n_old, splits=1)
    three = tk.collapse_update(x, inv, m_old, n_old, splits=3)
    tol = _tol("triton", dtype, "sw_delta")
    scale = float(want[2].abs().max())
    for got in (one, three):
        _close(got[0], want[0], rtol=1e-12, atol=1e-12)
        _close(got[1], want[1], rtol=1e-10, atol=1e-10 * float(want[1].abs().max()))
        _close(got[2], want[2], rtol=tol, atol=tol * scale)
    assert torch.equal(three[2], three[2].T)
    with pytest.raises(ValueError, match="splits"):
        tk.collapse_update(x, inv, m_old, n_old, splits=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_update_mm_product(dtype, monkeypatch):
    # ETFKERN_COLLAPSE_PRODUCT=mm: centre on P = m_b - t u in the 16-bit type, then float32 GEMMs per row chunk.
    # Means and m2 are the segment kernel's (exact); the scatter within 2x plain torch's 16-bit error, over
    # 3 row chunks, with a class seen 1e5 times before (t ~ 1) and a class new to the meter.
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton interpreter unavailable")
    import etfkern.triton_kernels.collapse as tk

    monkeypatch.setattr(tk, "MM_CHUNK_ROWS", 100)
    x, inv, m_old, n_old = _update_inputs(230, 17, 40)
    n_old[1] = 100_000
    xb = (x + 25).to(dtype)
    m_old = m_old + 25
    want = ref.collapse_update(xb, inv, m_old, n_old)
    got = tk.collapse_update(xb, inv, m_old, n_old, product="mm")
    _close(got[0], want[0], rtol=1e-12, atol=1e-12)
    _close(got[1], want[1], rtol=1e-9, atol=1e-9)
    m_o = torch.where((n_old > 0)[:, None], m_old, want[0])
    plain = ((xb - m_o[inv].to(dtype)).double().T @ (xb - want[0][inv].to(dtype)).double())
    assert float((got[2] - want[2]).abs().max()) <= 2 * float((plain - want[2]).abs().max())
    torch.testing.assert_close(got[2], got[2].T, rtol=0, atol=0)
    # the env var selects it for the routed op; float32 features keep the fused kernel; bad values are named
    monkeypatch.setenv("ETFKERN_COLLAPSE_PRODUCT", "mm")
    with etfkern.use_backend("triton"):
        routed = torch.ops.etfkern.collapse_update(xb, inv, m_old, n_old)
    assert torch.equal(routed[2], got[2])
    x32 = x.to(torch.float32)
    assert torch.equal(tk.collapse_update(x32, inv, m_old, n_old, product="mm")[2],
                       tk.collapse_update(x32, inv, m_old, n_old, product="triton")[2])
    with pytest.raises(ValueError, match="ETFKERN_COLLAPSE_PRODUCT"):
        tk.collapse_update(xb, inv, m_old, n_old, product="cublas")



# ----------------------------------------------------------------------------------------------------------
# issue 18: tensor-core scatter products from float64-centred bfloat16 pieces ("split", "split_tri")
# ----------------------------------------------------------------------------------------------------------
def _far_update_inputs(n: int, k: int, d: int, offset: float, seed: int):
    # features far from the origin, old means close to the batch means, a class seen 10^6 times before and one
    # new to the meter: where centring in float32 (or rounding the centred operand once) would show
    gen = torch.Generator().manual_seed(seed)
    inv = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=gen)])
    centres = offset + 3.0 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    x = centres[inv] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    m_old = centres + 0.1 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    n_old = torch.randint(1, 50, (k,), generator=gen)
    n_old[0] = 0
    n_old[1] = 10**6
    return x, inv, m_old, n_old


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("product", ["split", "split_tri"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_split_products_float32_within_1e6_of_float64(product, offset):
    # float32 features: three bfloat16 pieces of the float64-centred operand, float32-level products; non-contiguous
    # (transposed) features, odd sizes, 3 tiles of the interpreter's triangle; split_tri also in 3 row splits
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton interpreter unavailable")
    import etfkern.triton_kernels.collapse as tk

    x, inv, m_old, n_old = _far_update_inputs(150, 7, 37, offset, seed=1)
    x32 = x.float().T.contiguous().T
    want = ref.collapse_update(x32, inv, m_old, n_old)
    runs = [tk.collapse_update(x32, inv, m_old, n_old, product=product)]
    if product == "split_tri":
        runs.append(tk.collapse_update(x32, inv, m_old, n_old, product=product, splits=3))
    for got in runs:
        _close(got[0], want[0], rtol=1e-12, atol=1e-12 * offset)
        _close(got[1], want[1], rtol=1e-9, atol=1e-9 * float(want[1].abs().max()))
        assert _rel(got[2], want[2]) < 1e-6, _rel(got[2], want[2])
        assert torch.equal(got[2], got[2].T)


@pytest.mark.parametrize("product", ["split", "split_tri"])
def test_split_products_over_row_chunks(product, monkeypatch):
    # small buffers: 230 rows in centring chunks of 128 (the second one 102 rows, zero-padded to 128) and cuBLAS
    # sub-chunks of 64 rows, against the reference
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton interpreter unavailable")
    import etfkern.triton_kernels.collapse as tk

    x, inv, m_old, n_old = _far_update_inputs(230, 9, 21, 1e3, seed=5)
    monkeypatch.setattr(tk, "SPLIT_MM_ROWS", 64)
    monkeypatch.setattr(tk, "SPLIT_BUFFER_BYTES", 2 * 3 * 21 * 128)
    x32 = x.float()
    want = ref.collapse_update(x32, inv, m_old, n_old)
    got = tk.collapse_update(x32, inv, m_old, n_old, product=product)
    assert _rel(got[2], want[2]) < 1e-6, _rel(got[2], want[2])
    assert torch.equal(got[2], got[2].T)


@pytest.mark.parametrize("product", ["split", "split_tri"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_products_16bit_far_below_plain_torch_error(product, dtype):
    # 16-bit features: two bfloat16 pieces (~2^-18 per centred value) plus the exact diagonal of mid^T mid; plain
    # torch (centre in the 16-bit type, 16-bit GEMM) is off by ~1e-3, the split product by ~1e-6
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton interpreter unavailable")
    import etfkern.triton_kernels.collapse as tk

    x, inv, m_old, n_old = _far_update_inputs(130, 6, 21, 100.0, seed=2)
    xh = x.to(dtype)
    want = ref.collapse_update(xh, inv, m_old, n_old)
    got = tk.collapse_update(xh, inv, m_old, n_old, product=product)
    m_o = torch.where((n_old > 0)[:, None], m_old, want[0])
    plain = ((xh - m_o[inv].to(dtype)).T @ (xh - want[0][inv].to(dtype))).double()
    assert _rel(got[2], want[2]) < 1e-5 and _rel(got[2], want[2]) < 1e-2 * _rel(plain, want[2])
    assert torch.equal(got[2], got[2].T)


def test_meter_large_offset_with_split_product(monkeypatch):
    # the routed op (env ETFKERN_COLLAPSE_PRODUCT) through the meter: Sigma_W within 1e-6 of the float64 two-pass
    # definition for float32 features at offset 1e4 (the bound test_collapse.py holds the default product to)
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton interpreter unavailable")
    monkeypatch.setenv("ETFKERN_COLLAPSE_PRODUCT", "split")
    c, d = 5, 8
    x, y = _clustered(300, c, d, spread=1.0, sep=0.5, offset=1e4)
    x = x.float()
    _, _, sigma_w, _ = ref.two_pass_stats(x, y, c)
    m = etfkern.CollapseMeter(c, d)
    with etfkern.use_backend("triton"):
        for i in range(0, 300, 64):
            m.update(x[i:i + 64], y[i:i + 64])
    got = (m._sw + m._sw.T) / 2 / x.shape[0]
    assert _rel(got, sigma_w) < 1e-6


def test_update_product_choice_defaults_and_validation(monkeypatch):
    # no unmeasured variant is a default on CUDA: the dispatch rows are empty until a GPU run adds them
    from etfkern._core import dispatch
    from etfkern.collapse import ops

    for dtype in ("bfloat16", "float32"):
        assert dispatch.choose_variant("collapse_update_product", dtype=dtype, d=4096, N=65536) == ("triton", None)
    assert dispatch.choose_variant("collapse_pair_precision", K=131072, d=4096) == ("tf32x3", None)
    x = torch.zeros(3, 2)
    assert ops.update_product(x) == "triton" and ops.pair_precision(x) == "tf32x3"
    monkeypatch.setenv("ETFKERN_COLLAPSE_PRODUCT", "split_tri")
    monkeypatch.setenv("ETFKERN_COLLAPSE_PAIR_PRECISION", "bf16x3")
    assert ops.update_product(x) == "split_tri" and ops.pair_precision(x) == "bf16x3"
    if "triton" not in backends_for("collapse_update", "cpu"):
        return
    import etfkern.triton_kernels.collapse as tk

    x, inv, m_old, n_old = _update_inputs(9, 3, 4)
    with pytest.raises(ValueError, match="ETFKERN_COLLAPSE_PRODUCT"):
        tk.collapse_update(x.float(), inv, m_old, n_old, product="split4")
    with pytest.raises(ValueError, match="precision must be one of"):
        tk.collapse_pair_partials(m_old, n_old.double(), 0.0, precision="fp8")
    # float64 features keep the fused kernel's float32-or-better products under every product name
    for product in ("split", "split_tri"):
        assert torch.equal(tk.collapse_update(x, inv, m_old, n_old, product=product)[2],
                           tk.collapse_update(x, inv, m_old, n_old, product="triton")[2])


# ----------------------------------------------------------------------------------------------------------
# issue 19 item 14: 64-bit offsets (a column stride past 2^31 / its column count, without a large tensor)
# ----------------------------------------------------------------------------------------------------------
_BIG_STRIDE = 1 << 30  # column 2 of a (rows, 3) view sits 2^31 elements past its first: int32 offsets wrap


def _far_strided(values: torch.Tensor) -> torch.Tensor:
    """A (rows, 3) view of ``values`` whose column stride is 2^30 elements: a 4 GiB (bfloat16) allocation of which
    only the pages holding the rows*3 values are ever touched (the OS backs the rest lazily)."""
    rows = values.shape[0]
    try:
        storage = torch.empty(2 * _BIG_STRIDE + rows, dtype=values.dtype)
    except RuntimeError as e:  # an address space too small for a lazy 4 GiB allocation
        pytest.skip(f"cannot reserve the strided view's address range: {e}")
    view = storage.as_strided((rows, 3), (1, _BIG_STRIDE))
    view.copy_(values)
    return view


@pytest.mark.parametrize("product", ["triton", "mm", "split", "split_tri"])
def test_update_large_column_stride_int64_offsets(product):
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton interpreter unavailable")
    import etfkern.triton_kernels.collapse as tk

    x, inv, m_old, n_old = _update_inputs(20, 4, 3)
    xb = x.to(torch.bfloat16)
    want = ref.collapse_update(xb, inv, m_old, n_old)
    view = _far_strided(xb)
    assert view.stride(1) * 2 >= 2**31  # the last column's element offset does not fit in int32
    got = tk.collapse_update(view, inv, m_old, n_old, product=product)
    _close(got[0], want[0], rtol=1e-12, atol=1e-12)
    _close(got[1], want[1], rtol=1e-9, atol=1e-9 * float(want[1].abs().max()))
    plain = ((xb.double() - want[0][inv]).T @ (xb.double() - want[0][inv]))  # scale for the 16-bit operands
    _close(got[2], want[2], rtol=1e-2, atol=1e-2 * float(plain.abs().max()))


def test_ncc_large_column_stride_int64_offsets():
    if "triton" not in backends_for("collapse_ncc", "cpu"):
        pytest.skip("triton interpreter unavailable")
    import etfkern.triton_kernels.collapse as tk

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 3, generator=gen).to(torch.bfloat16)
    means = torch.randn(5, 3, generator=gen)
    weights = torch.randn(6, 3, generator=gen).to(torch.bfloat16)
    want = ref.collapse_ncc(x, means, weights, None)
    got = tk.collapse_ncc(_far_strided(x), means, _far_strided(weights), None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------------------
# issue 19 item 8 / issue 18: pair terms of coincident and near-coincident class means
# ----------------------------------------------------------------------------------------------------------
def _pairs_with_coincidences(k: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    mt = torch.randn(k, d, generator=gen, dtype=torch.float64)
    mt[3] = mt[1]  # coincident means: no CDNV term, no GNC2 term
    mt[5] = 2.0 * mt[2]  # coincident directions, distinct means: a CDNV term, no GNC2 term
    # near-coincident: the Gram identities cancel (|mu_c - mu_c'|^2 ~ 1e-14 |mu_c|^2), float64 differences do not
    mt[k - 1] = mt[0] + 1e-7 * torch.randn(d, generator=gen, dtype=torch.float64)
    mt[k - 2] = mt[4] + 1e-6 * torch.randn(d, generator=gen, dtype=torch.float64)
    s = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    return mt, s


@pytest.mark.parametrize("k,d", [(9, 5), (37, 20)])
def test_pair_op_coincident_and_near_pairs_every_backend(device, k, d, monkeypatch):
    mt, s = _pairs_with_coincidences(k, d, seed=k)
    shift = -0.5 * math.log(2 * k / (k - 1))
    want = ref.collapse_pair_stats(mt, s, shift)
    assert want.tolist()[4:] == [1.0, 2.0] and bool(torch.isfinite(want).all())
    for backend in backends_for("collapse_pair_stats", device):
        for precision in (("tf32x3", "bf16x3") if backend == "triton" else ("-",)):
            monkeypatch.setenv("ETFKERN_COLLAPSE_PAIR_PRECISION", precision if backend == "triton" else "")
            with etfkern.use_backend(backend):
                got = torch.ops.etfkern.collapse_pair_stats(mt.to(device), s.to(device), shift).cpu()
            assert got[4:].tolist() == [1.0, 2.0], (backend, precision)
            # the near pairs' CDNV terms (~1e12) dominate the first sum: only float64 differences get them
            tol = 1e-9 if backend != "triton" else 5e-5
            _close(got, want, rtol=tol, atol=tol * k * k, msg=f"{backend} {precision}")


def test_pair_op_single_class_kernels():
    # one class, no pair: zeros (the Triton launcher divided by K - 1 before looking at the tiles)
    mt = torch.randn(1, 5, dtype=torch.float64)
    for backend in set(backends_for("collapse_pair_stats", "cpu")) - {"reference"}:
        with etfkern.use_backend(backend):
            got = torch.ops.etfkern.collapse_pair_stats(mt, torch.ones(1, dtype=torch.float64), 0.0)
        assert got.tolist() == [0.0] * 6, backend


def test_pair_op_every_pair_coincident():
    mt = torch.ones(4, 3, dtype=torch.float64)
    s = torch.ones(4, dtype=torch.float64)
    for got in (collapse_cpu._pair_stats_cpu(mt, s, 0.0), ref.collapse_pair_stats(mt, s, 0.0)):
        _close(got, torch.tensor([0.0, 0.0, 0.0, 6.0 * (1.0 + 1.0 / 3.0), 6.0, 6.0], dtype=torch.float64),
               rtol=1e-12, atol=0.0)


def test_compute_warns_and_reports_coincident_class_means():
    # two classes with the very same samples: identical means (a language model's rare tokens after one prefix);
    # cdnv / gnc2 / gnc2_mean average over the other pairs, with a warning and the counts, never NaN/inf
    gen = torch.Generator().manual_seed(8)
    c, d = 6, 5
    x, y = _clustered(120, c, d, generator=gen)
    y[y == 1] = 2
    m = etfkern.CollapseMeter(c, d)
    m.update(x[y != 0], y[y != 0])
    for row in x[y == 0]:  # class 1 sees exactly class 0's samples, in the same order: bit-identical means
        m.update(row[None], torch.tensor([0]))
        m.update(row[None], torch.tensor([1]))
    assert torch.equal(m.means[0], m.means[1])
    with pytest.warns(RuntimeWarning, match="1 of 15 class pairs have coincident means"):
        out = m.compute()
    assert out["num_pairs_excluded_cdnv"] == 1 and out["num_pairs_excluded_gnc2"] == 1
    means, counts = m.means, m.counts
    mt = means - means.mean(0)
    t = ref.pair_terms(mt, m._m2 / counts, 0.0)
    keep = torch.isfinite(t["cdnv"])
    assert int((~keep).sum()) == 1
    assert math.isclose(out["cdnv"], float(t["cdnv"][keep].mean()), rel_tol=1e-8)
    assert math.isclose(out["gnc2_mean"], float(t["log_inv"][keep].mean()), rel_tol=1e-8)
    assert math.isclose(out["gnc2"], float(t["log_inv"][keep].var(unbiased=False)), rel_tol=1e-6)
    assert all(math.isfinite(v) for v in out.values())


# ----------------------------------------------------------------------------------------------------------
# GPU-sized shapes (the real tile configs; skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,product", [(torch.float32, "triton"), (torch.bfloat16, "triton"),
                                           (torch.bfloat16, "mm"), (torch.float32, "split"),
                                           (torch.float32, "split_tri"), (torch.bfloat16, "split"),
                                           (torch.bfloat16, "split_tri")])
def test_gpu_update_tiles(dtype, product, monkeypatch):
    monkeypatch.setenv("ETFKERN_COLLAPSE_PRODUCT", product)
    n, k, d = 5000, 300, 520  # several 128-tiles, ragged edges, more rows than one flush (mm: 2 row chunks)
    x, inv, m_old, n_old = _update_inputs(n, k, d)
    x = x.to("cuda", dtype)
    inv, m_old, n_old = inv.cuda(), m_old.cuda(), n_old.cuda()
    want = ref.collapse_update(x, inv, m_old, n_old)
    with etfkern.use_backend("triton"):
        got = torch.ops.etfkern.collapse_update(x, inv, m_old, n_old)
    _close(got[0], want[0], rtol=1e-12, atol=1e-12)
    _close(got[1], want[1], rtol=1e-9, atol=1e-9)
    if dtype == torch.float32:
        _close(got[2], want[2], rtol=2e-5, atol=2e-5 * float(want[2].abs().max()))
    else:  # within 2x plain torch in bf16 (centre, then a bf16 GEMM)
        m_o = torch.where((n_old > 0)[:, None], m_old, want[0])
        plain = ((x - m_o[inv].to(dtype)).T @ (x - want[0][inv].to(dtype))).double()
        assert float((got[2] - want[2]).abs().max()) <= 2 * float((plain - want[2]).abs().max())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3", "bf16x3"])
def test_gpu_pair_and_ncc_tiles(precision, monkeypatch):
    monkeypatch.setenv("ETFKERN_COLLAPSE_PAIR_PRECISION", precision)
    k, d = 3001, 200
    mt = torch.randn(k, d, dtype=torch.float64, device="cuda")
    s = torch.rand(k, dtype=torch.float64, device="cuda") + 0.1
    shift = -0.5 * math.log(2 * k / (k - 1))
    want = ref.collapse_pair_stats(mt, s, shift)
    with etfkern.use_backend("triton"):
        got = torch.ops.etfkern.collapse_pair_stats(mt, s, shift)
    _close(got, want, rtol=1e-4, atol=1e-6 * k * k)
    x = torch.randn(777, d, device="cuda")
    w = torch.randn(k, d, device="cuda")
    b = torch.randn(k, device="cuda")
    wc, wn = ref.collapse_ncc(x, mt[:999], w, b)
    with etfkern.use_backend("triton"):
        gc, gn = torch.ops.etfkern.collapse_ncc(x, mt[:999], w, b)
    assert float((gc == wc).double().mean()) > 0.999 and float((gn == wn).double().mean()) > 0.999


# ------------------------------------------------------------------------------------------------------------
# GPU build check without a GPU: the GPU launch configs of every collapse kernel (bf16 inputs,
# tf32x3 dots)
# lower to PTX and assemble for sm_90 (the interpreter cannot run 16-bit dots or check types the way ptx does).
# ------------------------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import etfkern.triton_kernels.collapse as tk


def scatter(xt, half, prec):
    sig = dict(x_ptr=xt, stride_xn="i64", stride_xd="i64", inv_ptr="*i64", mo_ptr="*fp32" if half else "*fp64",
               mn_ptr="*fp32" if half else "*fp64", out_ptr="*fp64", tiles_ptr="*i32", N="i64", D="i32",
               ROWS="i64")
    const = dict(BM=128, BN=128, BK=32, FLUSH=32, CDT=tl.float32 if half else tl.float64, HALF=half, UPCAST=False,
                 PREC=prec)
    return build(tk._scatter_gemm_kernel, sig, const, num_warps=8)

def build_aligned(fn, sig, const, aligned, **options):
    # as launched: Triton specialises pointers and ints divisible by 16; reports whether the operand loads of the
    # dot loop became asynchronous copies (software pipelining: the tensor cores then wait on no load)
    import re
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    k = triton.compile(ASTSource(fn, {**sig, **{c: "constexpr" for c in const}}, const, attrs),
                       target=GPUTarget("cuda", 90, 32), options=options)
    ptx = k.asm["ptx"]
    return {"shared": k.metadata.shared, "sm90": ".target sm_90" in ptx, "cubin": len(k.asm["cubin"]) > 0,
            "wgmma": len(re.findall(r"wgmma.mma_async", ptx)),
            "async_copies": len(re.findall(r"cp[.]async[.]c[ag]", ptx))}


def pair(rows, pieces, bk):
    sig = dict(mt_ptr=rows, nsq_ptr="*fp32", s_ptr="*fp32", tiles_ptr="*i32", part_ptr="*fp32", K="i32", D="i32",
               inv_km1="fp32", shift="fp32", RECHECK="fp32")
    const = dict(PIECES=pieces, BM=tk.PAIR_BLOCK, BK=bk, PREC="tf32x3", UPCAST=False)
    return build_aligned(tk._pair_kernel, sig, const, ["mt_ptr", "K", "D"], num_warps=8)


def split_centre(xt, pieces):
    sig = dict(x_ptr=xt, stride_xn="i64", stride_xd="i64", inv_ptr="*i64", p_ptr="*fp64", at_ptr="*bf16",
               losq_ptr="*fp32", R0="i64", NR="i32", NPAD="i32", D="i32")
    return build(tk._split_centre_kernel, sig, dict(PIECES=pieces, BR=64, BD=64), num_warps=4)


def split_gram(pieces):
    sig = dict(at_ptr="*bf16", out_ptr="*fp64", tiles_ptr="*i32", NR="i32", NPAD="i32", D="i32", ROWS="i32")
    bm, bk, flush = tk.split_gram_config(pieces, False)
    return build_aligned(tk._split_gram_kernel, sig, dict(PIECES=pieces, BM=bm, BK=bk, FLUSH=flush, UPCAST=False),
                         ["at_ptr", "NR", "NPAD", "D", "ROWS"], num_warps=8)


out = {
    "segment_stats_bf16": build(tk._segment_stats_kernel, dict(
        x_ptr="*bf16", stride_xn="i64", stride_xd="i64", perm_ptr="*i64", seg_ptr="*i64", mold_ptr="*fp64",
        nold_ptr="*i64", mnew_ptr="*fp64", m2_ptr="*fp64", D="i32", NBD="i32"), dict(BR=32, BD=128), num_warps=4),
    "scatter_gemm_bf16": scatter("*bf16", True, "ieee"),
    "scatter_gemm_fp32": scatter("*fp32", False, tk._dot_precision(__import__("torch").float32)),
    "pair": pair("*fp32", 1, 32),
    "pair_bf16x3": pair("*bf16", 2, 64),
    "split_centre_bf16_2": split_centre("*bf16", 2),
    "split_centre_fp32_3": split_centre("*fp32", 3),
    "split_centre_fp32_3_i32": build(tk._split_centre_kernel, dict(
        x_ptr="*fp32", stride_xn="i32", stride_xd="i32", inv_ptr="*i64", p_ptr="*fp64", at_ptr="*bf16",
        losq_ptr="*fp32", R0="i32", NR="i32", NPAD="i32", D="i32"), dict(PIECES=3, BR=64, BD=64), num_warps=4),
    "split_gram_2": split_gram(2),
    "split_gram_3": split_gram(3),
    "centre_bf16": build(tk._centre_kernel, dict(
        x_ptr="*bf16", stride_xn="i64", stride_xd="i64", inv_ptr="*i64", p_ptr="*fp32", out_ptr="*bf16", N="i64",
        D="i32"), dict(BR=64, BD=128), num_warps=4),
    "ncc_bf16": build(tk._ncc_kernel, dict(
        x_ptr="*bf16", stride_xn="i64", stride_xd="i64", w_ptr="*bf16", stride_wc="i64", stride_wd="i64",
        b_ptr="*bf16", mu_ptr="*fp32", musq_ptr="*fp32", cls_ptr="*i64", ncc_ptr="*i64", N="i32", C="i32", K="i32",
        D="i32"), dict(HAS_BIAS=True, BM=64, BC=128, BK=32, PREC="tf32x3"), num_warps=4),
}
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    report = compile_triton_for_sm90(_AOT_SCRIPT, tmp_path)
    # the tensor-core GEMM loops: wgmma, with their operand loads pipelined at launch-time alignment (the split
    # pieces are padded to whole K steps for this: an unaligned row count made every load synchronous)
    for name in ("pair", "pair_bf16x3", "split_gram_2", "split_gram_3"):
        assert report[name]["wgmma"] > 0 and report[name]["async_copies"] > 0, (name, report[name])
    assert set(report) == {
        "segment_stats_bf16", "scatter_gemm_bf16", "scatter_gemm_fp32", "centre_bf16", "pair", "ncc_bf16",
        "pair_bf16x3", "split_centre_bf16_2", "split_centre_fp32_3", "split_centre_fp32_3_i32", "split_gram_2",
        "split_gram_3"}
