"""Streaming collapse statistics (issue 4): every backend of every op vs the float64 reference, and the meter's
metrics vs the dense two-pass definitions of DESIGN.md."""
from __future__ import annotations

import io
import math

import pytest
import torch

import etfkern
from etfkern import collapse as col
from etfkern.collapse import reference as ref
from conftest import backends_for, compile_triton_for_sm90

OPS = ("collapse_update", "collapse_pair_stats", "collapse_ncc")


def _close(a, b, rtol, atol=0.0, msg=""):
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), rtol=rtol, atol=atol, msg=msg)


def _tol(backend: str, dtype: torch.dtype, output: str = "sw_delta") -> float:
    if backend == "triton" and dtype != torch.float64:
        return 2e-5  # float32 tensor-core operands (exact fp32 in the interpreter), float64 sums
    if backend == "triton":
        return 2e-6  # float64 inputs are centred in float64 but multiplied in float32
    if output == "sw_delta" and dtype != torch.float64:
        return 2e-6  # CPU: centred in float64, scatter products in float32 for 16/32-bit features
    return 1e-10


def _clustered(n: int, c: int, d: int, *, spread: float = 1.0, sep: float = 3.0, offset: float = 0.0,
               generator: torch.Generator | None = None):
    centres = sep * torch.randn(c, d, generator=generator, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=generator)
    x = offset + centres[y] + spread * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return x, y


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
        got = col._update_cpu(xt, inv, m_old, n_old)
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
                    col._update_cpu(feats, inv, m_old, n_old)):
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
            m_new, m2, sw = col._update_cpu(x, inv, m_old, n_old)
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


# ----------------------------------------------------------------------------------------------------------
# the meter vs the dense definitions
# ----------------------------------------------------------------------------------------------------------
def _meter_from(x, y, c, *, global_mean="class", batch=37, backend="cpu") -> etfkern.CollapseMeter:
    m = etfkern.CollapseMeter(c, x.shape[1], global_mean=global_mean)
    with etfkern.use_backend(backend):
        for i in range(0, x.shape[0], batch):
            m.update(x[i:i + batch], y[i:i + batch])
    return m


def _assert_metrics(got: dict, want: dict, rtol: float, atol: float = 1e-9):
    assert got["num_classes_seen"] == want["num_classes_seen"]
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=rtol, abs_tol=atol), (key, got[key], value)


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


@pytest.mark.parametrize("c,d", [(9, 24), (40, 6)], ids=["C'<d", "C'>d"])
@pytest.mark.parametrize("global_mean", ["class", "sample"])
def test_metrics_match_dense_definitions(c, d, global_mean):
    x, y = _clustered(400, c, d)
    y[y == 2] = 3  # a class never seen
    w = torch.randn(c, d)
    want = ref.dense_metrics(x, y, c, global_mean=global_mean, weights=w)
    assert want["num_classes_seen"] == c - 1
    got = _meter_from(x, y, c, global_mean=global_mean).compute(w)
    assert set(got) == set(col.METRIC_KEYS)
    _assert_metrics(got, want, rtol=1e-8)


def test_metrics_with_triton_update_and_pairs():
    if "triton" not in backends_for("collapse_update", "cpu"):
        pytest.skip("triton unavailable")
    c, d = 12, 10
    x, y = _clustered(120, c, d)
    x = x.float()
    w = torch.randn(c, d)
    want = ref.dense_metrics(x, y, c, weights=w)
    m = _meter_from(x, y, c, batch=50, backend="triton")
    with etfkern.use_backend("triton"):
        got = m.compute(w)
    _assert_metrics(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("c,d", [(9, 24), (40, 6)], ids=["C'<d", "C'>d"])
def test_compute_selected_metrics_match_full(c, d):
    x, y = _clustered(300, c, d)
    w = torch.randn(c, d)
    m = _meter_from(x, y, c)
    full = m.compute(w)
    for key in col.METRIC_KEYS:
        got = m.compute(w, metrics=[key])
        assert set(got) == {key, "num_classes_seen"}, key
        assert got[key] == full[key], key  # the same arithmetic, only less of it
    got = m.compute(metrics=("nc1", "nc2_equiangular"))
    assert set(got) == {"nc1", "nc2_equiangular", "num_classes_seen"}
    assert m.compute(metrics="nc1")["nc1"] == full["nc1"]
    with pytest.raises(ValueError, match="metrics has unknown keys"):
        m.compute(metrics=["nc1", "nc7"])
    with pytest.raises(ValueError, match="pass weights"):
        m.compute(metrics=["unc3"])
    with pytest.raises(ValueError, match="pair_metrics=False"):
        m.compute(metrics=["cdnv"], pair_metrics=False)


def test_nc1_small_space_constant_and_pinv_tolerance():
    # C' <= d goes through the C' x C' Gram identity; check it against pinv(Sigma_B) directly, also with a
    # loose tolerance that drops real directions (both sides must drop the same ones).
    c, d = 6, 30
    x, y = _clustered(200, c, d)
    m = _meter_from(x, y, c)
    counts, means, sigma_w, _ = ref.two_pass_stats(x, y, c)
    mt = means - means.mean(0)
    sigma_b = mt.T @ mt / c
    lam = torch.linalg.eigvalsh(sigma_b)
    loose = float(lam[-2] / lam[-1]) * 1.01  # keeps only the leading direction
    for rtol in (None, loose):
        kw = {} if rtol is None else {"rtol": rtol}
        want = float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True, **kw)) / c)
        got = m.compute(pinv_rtol=rtol)["nc1"]
        assert math.isclose(got, want, rel_tol=1e-8), (rtol, got, want)
    assert m.compute(pinv_rtol=loose)["nc1"] < 0.5 * m.compute()["nc1"]


def test_nc1_large_space_pinv_tolerance():
    # C' > d goes through the d x d Sigma_B: the same cut-off as torch.linalg.pinv(hermitian=True, rtol=...)
    c, d = 30, 5
    gen = torch.Generator().manual_seed(11)
    centres = torch.randn(c, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    y = torch.randint(0, c, (300,), generator=gen)
    x = centres[y] + 0.1 * torch.randn(300, d, generator=gen, dtype=torch.float64)
    for global_mean in ("class", "sample"):
        m = _meter_from(x, y, c, global_mean=global_mean)
        counts, means, sigma_w, _ = ref.two_pass_stats(x, y, c)
        mt = means - (means.mean(0) if global_mean == "class" else x.mean(0))
        sigma_b = mt.T @ mt / c
        for rtol in (None, 1e-5, 1e-3, 0.5):
            kw = {} if rtol is None else {"rtol": rtol}
            want = float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True, **kw)) / c)
            got = m.compute(pinv_rtol=rtol, metrics=["nc1"])["nc1"]
            assert math.isclose(got, want, rel_tol=1e-9), (global_mean, rtol, got, want)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1e-3", True])
def test_compute_rejects_bad_pinv_rtol(bad):
    # NaN used to give nc1 = 0.0 (every eigenvalue dropped) and a negative rtol kept round-off eigenvalues
    x, y = _clustered(60, 4, 5)
    m = _meter_from(x, y, 4)
    with pytest.raises(ValueError, match="pinv_rtol must be None or a finite number >= 0"):
        m.compute(pinv_rtol=bad)
    assert m.compute(pinv_rtol=1e-10)["nc1"] == pytest.approx(m.compute()["nc1"], rel=1e-9)  # ints/floats >= 0 ok


def test_merge_with_itself_doubles_the_data():
    c, d = 5, 4
    x, y = _clustered(50, c, d, offset=100.0)
    m = _meter_from(x, y, c)
    m.merge(m)
    two = _meter_from(torch.cat([x, x]), torch.cat([y, y]), c)
    assert torch.equal(m.counts, two.counts)
    _close(m._sw, two._sw, rtol=1e-10, atol=1e-10)
    _close(m._m2, two._m2, rtol=1e-10, atol=1e-10)
    _close(m._means, two._means, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key,corrupt,match", [
    ("counts", lambda t: t - 1000, r"state\['counts'\] must be >= 0"),
    ("counts", lambda t: t.double(), r"state\['counts'\] must be an integer tensor"),
    ("means", lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), r"state\['means'\] must be a finite"),
    ("sw", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), r"state\['sw'\] must be a finite"),
    ("m2", lambda t: -t, r"state\['m2'\] .* must be >= 0"),
])
def test_load_state_dict_rejects_corrupted_state(key, corrupt, match):
    # a corrupted checkpoint used to load silently and surface later as NaN (or nonsense) metrics
    c, d = 5, 3
    x, y = _clustered(40, c, d)
    src = _meter_from(x, y, c)
    m = _meter_from(x[:10], y[:10], c)
    before = _state(m)
    state = src.state_dict()
    state[key] = corrupt(state[key])
    with pytest.raises(ValueError, match=match):
        m.load_state_dict(state)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_simplex_etf_means_give_zero_nc2_errors():
    c, d = 8, 12
    etf = torch.eye(c, dtype=torch.float64) - 1.0 / c
    etf = torch.cat([etf, torch.zeros(c, d - c, dtype=torch.float64)], 1) * 5
    y = torch.arange(c).repeat(30)
    noise = 1e-3 * torch.randn(y.shape[0], d, dtype=torch.float64)
    noise -= torch.zeros(c, d, dtype=torch.float64).index_add_(0, y, noise)[y] / 30  # class means exactly ETF
    m = _meter_from(etf[y] + noise, y, c)
    out = m.compute(weights=etf.float())
    for key in ("nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc2_etf_error", "gnc2", "nc3", "unc3"):
        assert abs(out[key]) < 1e-6, (key, out[key])
    assert math.isclose(out["nc3_cos_mean"], 1.0, rel_tol=1e-9)
    assert math.isclose(out["gnc2_mean"], -0.5 * math.log(2 * c / (c - 1)), rel_tol=1e-9)
    assert out["nc1"] < 1e-6 and out["cdnv"] < 1e-6


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_large_common_offset_fp32(backend):
    # Collapsed features far from the origin: the naive raw-moment formula in fp32 loses everything, the
    # meter (centred one-pass merge) keeps Sigma_W to float32 input accuracy.
    if backend not in backends_for("collapse_update", "cpu"):
        pytest.skip(f"{backend} unavailable")
    c, d = 5, 8
    x, y = _clustered(300, c, d, spread=1.0, sep=0.5, offset=1e4)
    x = x.float()
    _, _, sigma_w, _ = ref.two_pass_stats(x, y, c)
    m = _meter_from(x, y, c, batch=64, backend=backend)
    got = (m._sw + m._sw.T) / 2 / x.shape[0]
    rel = float((got - sigma_w).norm() / sigma_w.norm())
    assert rel < 1e-6, rel
    # the naive formula in fp32 for contrast (E[hh^T] - sum n_c mu_c mu_c^T / N)
    counts = torch.bincount(y, minlength=c).float()
    mu = torch.zeros(c, d).index_add_(0, y, x) / counts[:, None]
    naive = (x.T @ x - (mu * counts[:, None]).T @ mu) / x.shape[0]
    naive_rel = float((naive.double() - sigma_w).norm() / sigma_w.norm())
    assert naive_rel > 1e-2, naive_rel


def test_float32_product_overflow_falls_back_to_float64():
    # finite float32 features whose centred squares overflow float32 (deviations ~3e19): the batch is redone with
    # float64 products instead of storing inf; NaN features are still rejected with the meter unchanged
    c, d = 3, 4
    gen = torch.Generator().manual_seed(5)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x = (3e19 * torch.randn(6, d, generator=gen, dtype=torch.float64)).float()
    assert bool(torch.isfinite(x).all())
    m = etfkern.CollapseMeter(c, d)
    m.update(x, y)
    _, _, sigma_w, _ = ref.two_pass_stats(x, y, c)
    got = (m._sw + m._sw.T) / 2 / x.shape[0]
    assert bool(torch.isfinite(got).all())
    _close(got, sigma_w, rtol=1e-12, atol=1e-12 * float(sigma_w.abs().max()))
    before = m.state_dict()
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        m.update(bad, y)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_batch_size_does_not_matter(batch):
    c, d = 6, 5
    x, y = _clustered(150, c, d, offset=3.0)
    one = _meter_from(x, y, c, batch=1000)
    other = _meter_from(x, y, c, batch=batch)
    _close(other._sw, one._sw, rtol=1e-10, atol=1e-10)
    _close(other._means, one._means, rtol=1e-12, atol=1e-12)
    _close(other._m2, one._m2, rtol=1e-10, atol=1e-10)
    assert torch.equal(other.counts, one.counts)


def test_merge_equals_one_meter():
    c, d = 10, 7
    x, y = _clustered(300, c, d, offset=2.0)
    one = _meter_from(x, y, c)
    a = _meter_from(x[:100], y[:100], c)
    b = _meter_from(x[100:], y[100:], c)
    # b also holds a class a never saw and vice versa
    a.merge(b)
    _assert_metrics(a.compute(), one.compute(), rtol=1e-9)
    assert torch.equal(a.counts, one.counts)
    _close(a._sw, one._sw, rtol=1e-10, atol=1e-10)
    # disjoint class sets
    lo, hi = y < 5, y >= 5
    p = _meter_from(x[lo], y[lo], c)
    q = _meter_from(x[hi], y[hi], c)
    p.merge(q)
    _close(p._sw, one._sw, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="other must have num_classes"):
        p.merge(etfkern.CollapseMeter(c + 1, d))


def test_resume_equals_uninterrupted():
    c, d = 7, 6
    x, y = _clustered(200, c, d)
    one = _meter_from(x, y, c, global_mean="sample")
    first = _meter_from(x[:90], y[:90], c, global_mean="sample")
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = etfkern.CollapseMeter(c, d)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.global_mean == "sample"
    for i in range(90, 200, 37):
        resumed.update(x[i:i + 37], y[i:i + 37])
    assert resumed.compute() == pytest.approx(one.compute(), rel=1e-10)
    with pytest.raises(ValueError, match="dim"):
        etfkern.CollapseMeter(c, d + 1).load_state_dict(first.state_dict())


def _state(m):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}


@pytest.mark.parametrize("bad,match", [
    (lambda x, y: (x[:, :-1], y), "features must have shape"),
    (lambda x, y: (x, y[:-1]), "features must have shape"),
    (lambda x, y: (x, y + 100), r"labels must lie in \[0, 6\)"),
    (lambda x, y: (x, y - 100), r"labels must lie in \[0, 6\)"),
    (lambda x, y: (x.index_fill(0, torch.tensor([3]), float("nan")), y), "features contains NaN or inf"),
    (lambda x, y: (x.index_fill(0, torch.tensor([0]), float("inf")), y), "features contains NaN or inf"),
    (lambda x, y: (x, y.float()), "labels must be an integer tensor"),
    (lambda x, y: (x.int(), y), "features must be float16"),
    (lambda x, y: (x, y[None]), r"labels must have shape \(N,\)"),
    (lambda x, y: (x.to("meta"), y), "features must hold data"),
    (lambda x, y: (x, y.to("meta")), "labels must hold data"),
])
def test_bad_update_raises_and_leaves_meter_unchanged(bad, match):
    c, d = 6, 4
    x, y = _clustered(40, c, d)
    m = _meter_from(x, y, c)
    before = _state(m)
    with pytest.raises(ValueError, match=match):
        m.update(*bad(x[:10], y[:10]))
    after = m.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key


def test_constructor_and_compute_errors():
    with pytest.raises(ValueError, match="num_classes"):
        etfkern.CollapseMeter(0, 3)
    with pytest.raises(ValueError, match="dim"):
        etfkern.CollapseMeter(3, -1)
    with pytest.raises(ValueError, match="global_mean"):
        etfkern.CollapseMeter(3, 2, global_mean="median")
    m = etfkern.CollapseMeter(4, 3)
    with pytest.raises(ValueError, match="at least 2 classes with samples, got 0"):
        m.compute()
    m.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 classes"):
        m.compute()
    m.update(torch.randn(5, 3), torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"weights must have shape \(4, 3\)"):
        m.compute(weights=torch.randn(3, 3))
    with pytest.raises(ValueError, match="all-zero row"):
        m.compute(weights=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        m.compute(weights=torch.randn(4, 3), bias=torch.randn(5))


def test_empty_batch_and_sequence_shaped_input():
    m = etfkern.CollapseMeter(5, 3)
    m.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    assert m.num_samples == 0
    x = torch.randn(2, 4, 3)
    y = torch.randint(0, 5, (2, 4))
    m.update(x, y)
    flat = etfkern.CollapseMeter(5, 3)
    flat.update(x.reshape(8, 3), y.reshape(8))
    assert torch.equal(m.counts, flat.counts)
    assert torch.allclose(m.means.nan_to_num(), flat.means.nan_to_num())
    assert torch.isnan(m.means[m.counts == 0]).all()


# ----------------------------------------------------------------------------------------------------------
# NC4
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_ncc_mismatch(backend):
    if backend not in backends_for("collapse_ncc", "cpu"):
        pytest.skip(f"{backend} unavailable")
    c, d = 9, 6
    x, y = _clustered(60, c, d)
    y[y == 4] = 5
    m = _meter_from(x, y, c)
    mu = m.means
    assert torch.isnan(mu[4]).all()
    with etfkern.use_backend(backend):
        # the nearest-mean classifier written as a linear one: mismatch 0, even with an unseen class around
        w = mu.nan_to_num()
        b = -(w * w).sum(1) / 2
        b[4] = -1e30
        assert m.ncc_mismatch(x, w, b) == 0.0
        w2 = w + 2.0 * torch.randn(c, d, dtype=w.dtype)  # a perturbed classifier: partial agreement
        got = etfkern.ncc_mismatch(x.float(), mu, w2.float(), b)
    want = ref.dense_ncc_mismatch(x.float(), mu, w2.float(), b)
    assert got == want and 0.0 < want < 1.0


@pytest.mark.parametrize("offset,dtype", [(1e4, torch.float32), (1e8, torch.float64)])
def test_ncc_nearest_mean_far_from_origin(offset, dtype):
    # |mu|^2 - 2 h.mu loses the class gaps when the means sit far from the origin (float32 kernel at 1e4, float64
    # CPU path and torch.cdist's mm mode at 1e8): every backend must find the exact nearest mean here
    gen = torch.Generator().manual_seed(8)
    k, d = 6, 3
    centres = offset + 2.0 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (48,), generator=gen)
    x = (centres[y] + 0.5 * torch.randn(48, d, generator=gen, dtype=torch.float64)).to(dtype)
    mu = torch.zeros(k, d, dtype=torch.float64).index_add_(0, y, x.double()) / torch.bincount(y, minlength=k)[:, None]
    exact = (x.double()[:, None, :] - mu[None]).pow(2).sum(-1).argmin(1)
    w = torch.randn(k, d, generator=gen, dtype=torch.float64).to(dtype)
    backends = backends_for("collapse_ncc", "cpu")
    if dtype == torch.float64:  # the float32 Triton kernel cannot resolve unit gaps at 1e8
        backends = [b for b in backends if b != "triton"]
    for backend in backends:
        with etfkern.use_backend(backend):
            _, nearest = torch.ops.etfkern.collapse_ncc(x, mu, w, None)
        assert torch.equal(nearest, exact), backend
    assert torch.equal(ref.collapse_ncc(x, mu, w, None)[1], exact)


def test_ncc_mismatch_validates():
    mu = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"weights must have shape \(3, 4\)"):
        etfkern.ncc_mismatch(torch.randn(2, 4), mu, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"features must have shape \(\?, 4\)"):
        etfkern.ncc_mismatch(torch.randn(2, 5), mu, torch.randn(3, 4))
    with pytest.raises(ValueError, match="no row without NaN"):
        etfkern.ncc_mismatch(torch.randn(2, 4), torch.full((3, 4), float("nan")), torch.randn(3, 4))
    with pytest.raises(ValueError, match="features contains NaN"):
        etfkern.ncc_mismatch(torch.full((2, 4), float("nan")), mu, torch.randn(3, 4))


# ----------------------------------------------------------------------------------------------------------
# Hugging Face-style collection and plotting
# ----------------------------------------------------------------------------------------------------------
class _FakeOutput:
    def __init__(self, hidden_states):
        self.hidden_states = hidden_states


class _FakeConfig:
    vocab_size = 11
    hidden_size = 4


class _FakeCausalLM:
    """Mimics the HF API: model(input_ids=, attention_mask=, output_hidden_states=True).hidden_states."""

    def __init__(self):
        self.config = _FakeConfig()
        self.emb = torch.randn(11, 4)
        self.calls = 0

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False):
        assert output_hidden_states
        self.calls += 1
        h0 = self.emb[input_ids]
        h1 = h0.cumsum(1)  # "last layer": depends on the prefix, like a causal model
        return _FakeOutput((h0, h1))


def test_collect_lm_features_next_tokens_and_padding(capsys):
    model = _FakeCausalLM()
    ids = torch.randint(0, 11, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[1, 4:] = 0  # right padding
    labels = ids.clone()
    labels[2, 3] = -100  # an ignored target
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": labels}, {"input_ids": ids[:1]}]
    meter = col.collect_lm_features(model, batches, progress=True, total=2)
    assert model.calls == 2 and isinstance(meter, etfkern.CollapseMeter) and meter.num_classes == 11
    assert "collapse stats" in capsys.readouterr().err  # the tqdm bar
    # by hand: feature at t pairs with token t+1
    feats, targs = [], []
    hid = model.emb[ids].cumsum(1)
    for b in range(3):
        for t in range(5):
            if mask[b, t] and mask[b, t + 1] and labels[b, t + 1] != -100:
                feats.append(hid[b, t])
                targs.append(ids[b, t + 1])
    for t in range(5):
        feats.append(hid[0, t])
        targs.append(ids[0, t + 1])
    want = etfkern.CollapseMeter(11, 4)
    want.update(torch.stack(feats), torch.stack(targs))
    assert meter.num_samples == len(targs) == 3 * 5 - 2 - 1 + 5
    assert torch.equal(meter.counts, want.counts)
    _close(meter.means.nan_to_num(), want.means.nan_to_num(), rtol=1e-12, atol=1e-12)
    # float32 hidden states: float32 scatter products, summed over different batches on each side
    _close(meter._sw, want._sw, rtol=2e-6, atol=2e-6 * float(want._sw.abs().max()))
    # layer 0 and an existing meter
    m0 = col.collect_lm_features(model, [ids], etfkern.CollapseMeter(11, 4), layer=0, progress=False)
    assert m0.num_samples == 15


def test_collect_lm_features_moves_inputs_to_the_model_device():
    # a model on another device (here "meta", standing in for a GPU) gets input_ids/attention_mask moved there;
    # labels stay with the hidden states
    seen = []

    class _Elsewhere(_FakeCausalLM):
        device = torch.device("meta")

        def __call__(self, input_ids, attention_mask=None, output_hidden_states=False):
            seen.append((input_ids.device.type, attention_mask.device.type))
            b, t = input_ids.shape
            return _FakeOutput((torch.randn(b, t, 4),))

    ids = torch.randint(0, 11, (2, 5))
    meter = col.collect_lm_features(_Elsewhere(), [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                    "labels": ids}], progress=False)
    assert seen == [("meta", "meta")] and meter.num_samples == 8


def test_plot_metrics_writes_png(tmp_path):
    x, y = _clustered(100, 5, 6)
    history = [_meter_from(x[:n], y[:n], 5).compute(torch.randn(5, 6)) for n in (40, 70, 100)]
    path = col.plot_metrics(history, tmp_path / "nc.png", x=["ck1", "ck2", "ck3"], title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    path2 = col.plot_metrics({"nc1": [3.0, 2.0], "gnc2_mean": [-0.1, -0.2]}, tmp_path / "layers.png",
                             xlabel="layer")
    assert (tmp_path / "layers.png").stat().st_size > 1000 and path2.endswith("layers.png")
    with pytest.raises(ValueError, match="keys must name metrics"):
        col.plot_metrics(history, tmp_path / "x.png", keys=["nope"])


def test_plot_metrics_leaves_pyplot_backend_and_figures_alone(tmp_path):
    # plot_metrics used to call matplotlib.use("Agg"): a user's interactive (here: svg) backend was switched
    # under them, so a later plt.show() showed nothing
    import matplotlib

    import matplotlib.pyplot as plt

    original = matplotlib.get_backend()
    try:
        plt.switch_backend("svg")
        fig = plt.figure()
        col.plot_metrics({"nc1": [3.0, 2.0]}, tmp_path / "p.png")
        assert matplotlib.get_backend().lower() == "svg"
        assert plt.get_fignums() == [fig.number]
        plt.close(fig)
    finally:
        plt.switch_backend(original)
    assert (tmp_path / "p.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------
# GPU-sized shapes (the real tile configs; skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,product", [(torch.float32, "triton"), (torch.bfloat16, "triton"),
                                           (torch.bfloat16, "mm")])
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
def test_gpu_pair_and_ncc_tiles():
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

out = {
    "segment_stats_bf16": build(tk._segment_stats_kernel, dict(
        x_ptr="*bf16", stride_xn="i64", stride_xd="i64", perm_ptr="*i64", seg_ptr="*i64", mold_ptr="*fp64",
        nold_ptr="*i64", mnew_ptr="*fp64", m2_ptr="*fp64", D="i32", NBD="i32"), dict(BR=32, BD=128), num_warps=4),
    "scatter_gemm_bf16": scatter("*bf16", True, "ieee"),
    "scatter_gemm_fp32": scatter("*fp32", False, tk._dot_precision(__import__("torch").float32)),
    "pair": build(tk._pair_kernel, dict(mt_ptr="*fp32", nsq_ptr="*fp32", s_ptr="*fp32", tiles_ptr="*i32",
                                        part_ptr="*fp32", K="i32", D="i32", inv_km1="fp32", shift="fp32"),
                  dict(BM=128, BK=32, PREC="tf32x3"), num_warps=8),
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
    assert set(compile_triton_for_sm90(_AOT_SCRIPT, tmp_path)) == {
        "segment_stats_bf16", "scatter_gemm_bf16", "scatter_gemm_fp32", "centre_bf16", "pair", "ncc_bf16"}
