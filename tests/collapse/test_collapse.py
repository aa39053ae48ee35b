"""Streaming collapse statistics (issue 4): every backend of every op vs the float64 reference, and the meter's
metrics vs the dense two-pass definitions of docs/metrics.md."""
from __future__ import annotations

import io
import math

import pytest
import torch

import etfkern
from etfkern import collapse as col
from etfkern.collapse import reference as ref
from conftest import backends_for

OPS = ("collapse_update", "collapse_pair_stats", "collapse_ncc")


def _close(a, b, rtol, atol=0.0, msg=""):
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), rtol=rtol, atol=atol, msg=msg)


def _clustered(n: int, c: int, d: int, *, spread: float = 1.0, sep: float = 3.0, offset: float = 0.0,
               generator: torch.Generator | None = None):
    centres = sep * torch.randn(c, d, generator=generator, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=generator)
    x = offset + centres[y] + spread * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return x, y


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
# language-model labels: ignore_index and min_count (issue 20)
# ----------------------------------------------------------------------------------------------------------
def test_ignore_index_skips_those_rows_unseen(device):
    c, d = 6, 4
    x, y = _clustered(60, c, d)
    y = y.clone()
    y[::7] = -100  # torch's ignore label: prompt / padding positions
    x = x.clone()
    x[::14] = float("nan")  # features at ignored positions are never looked at
    m = etfkern.CollapseMeter(c, d, device=device)  # ignore_index=-100 by default
    for i in range(0, 60, 11):
        m.update(x[i:i + 11].to(device), y[i:i + 11].to(device))
    kept = y != -100
    want = _meter_from(x[kept], y[kept], c, batch=11)
    assert torch.equal(m.counts.cpu(), want.counts) and m.num_samples == int(kept.sum())
    _assert_metrics(m.compute(), want.compute(), rtol=1e-9)
    before = _state(m)
    m.update(torch.randn(3, d, device=device), torch.full((3,), -100, device=device))  # only ignored rows: no-op
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if isinstance(v, torch.Tensor))
    # an index inside [0, C) skips that class, as torch's cross_entropy does
    x2, y2 = _clustered(80, c, d)
    skip2 = etfkern.CollapseMeter(c, d, ignore_index=2)
    skip2.update(x2, y2)
    assert int(skip2.counts[2]) == 0
    _assert_metrics(skip2.compute(), ref.dense_metrics(x2, y2, c, ignore_index=2), rtol=1e-8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\) or equal ignore_index=-1"):
        etfkern.CollapseMeter(c, d, ignore_index=-1).update(x2[:4], torch.full((4,), -100))


@pytest.mark.parametrize("global_mean", ["class", "sample"])
def test_min_count_leaves_rare_classes_out(global_mean):
    c, d, min_count = 12, 5, 4
    x, y = _clustered(120, 8, d)  # classes 0..7 frequent
    rare_x = 3.0 * torch.randn(6, d, dtype=torch.float64)
    rare_y = torch.tensor([8, 9, 9, 10, 10, 10])  # 1, 2 and 3 samples; class 11 never seen
    x, y = torch.cat([x, rare_x]), torch.cat([y, rare_y])
    perm = torch.randperm(x.shape[0])
    x, y = x[perm], y[perm]
    w = torch.randn(c, d, dtype=torch.float64)
    m = etfkern.CollapseMeter(c, d, global_mean=global_mean, min_count=min_count)
    for i in range(0, x.shape[0], 29):
        m.update(x[i:i + 29], y[i:i + 29])
    got = m.compute(weights=w)
    want = ref.dense_metrics(x, y, c, global_mean=global_mean, weights=w, min_count=min_count)
    frequent = int((torch.bincount(y, minlength=c) >= min_count).sum())
    assert want["num_classes_seen"] == 11 and frequent == 8  # the dense oracle really excluded three classes
    assert (got["num_classes_excluded"], got["num_samples_excluded"]) == (3, 6)
    _assert_metrics(got, want, rtol=1e-8)
    assert m.excluded_classes().tolist() == [8, 9, 10]
    # NC4: excluded classes are never the nearest mean
    means = m.means
    means[8:] = float("nan")
    assert m.ncc_mismatch(x.float(), w.float()) == ref.dense_ncc_mismatch(x.float(), means, w.float())
    # without min_count the same data keeps them (and reports no exclusion keys)
    plain = etfkern.CollapseMeter(c, d, global_mean=global_mean)
    plain.update(x, y)
    assert "num_classes_excluded" not in plain.compute() and plain.excluded_classes().numel() == 0
    # the setting survives a checkpoint
    resumed = etfkern.CollapseMeter(c, d)
    resumed.load_state_dict(m.state_dict())
    assert (resumed.min_count, resumed.global_mean) == (min_count, global_mean)
    assert resumed.compute(weights=w) == pytest.approx(got, rel=1e-12)
    rare_only = etfkern.CollapseMeter(c, d, min_count=100)
    rare_only.update(x, y)
    with pytest.raises(ValueError, match=r"at least 2 classes with samples \(at least min_count=100 each\), got 0"):
        rare_only.compute()


# ----------------------------------------------------------------------------------------------------------
# all or nothing (issue 19 items 1 and 10)
# ----------------------------------------------------------------------------------------------------------
def _tensors(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_same(before, m):
    after = _tensors(m)
    for key, value in before.items():
        assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key


def test_meter_made_under_inference_mode_updates_outside_it(device):
    # used to raise RuntimeError after _counts had already grown: a retry counted the batch twice
    c, d = 5, 3
    x, y = _clustered(40, c, d)
    with torch.inference_mode():
        m = etfkern.CollapseMeter(c, d, device=device)
        m.update(x[:10], y[:10])
    m.update(x[10:], y[10:])
    want = _meter_from(x, y, c, batch=10)
    assert torch.equal(m.counts.cpu(), want.counts)
    _close(m._sw.cpu(), want._sw, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        merged = etfkern.CollapseMeter(c, d, device=device)
    merged.merge(_meter_from(x, y, c))
    assert torch.equal(merged.counts.cpu(), want.counts)
    _assert_metrics(merged.compute(), want.compute(), rtol=1e-9)


@pytest.mark.parametrize("operation", ["update", "merge"])
def test_a_write_that_fails_part_way_changes_nothing(operation):
    # counts and means are written before m2 refuses the float64 rows (a float32 m2 stands in for any failure
    # in the commit): the rows already written must be restored
    c, d = 6, 4
    x, y = _clustered(60, c, d)
    m = _meter_from(x[:30], y[:30], c)
    m._m2 = m._m2.float()
    before = _tensors(m)
    with pytest.raises(RuntimeError):
        if operation == "update":
            m.update(x[30:], y[30:])
        else:
            m.merge(_meter_from(x[30:], y[30:], c))
    _assert_same(before, m)


@pytest.mark.parametrize("setting,value", [("global_mean", "sample"), ("ignore_index", -1), ("min_count", 3)])
def test_merge_refuses_different_settings(setting, value):
    # a merge of different global_mean used to be accepted, silently keeping the receiver's setting
    c, d = 5, 3
    x, y = _clustered(30, c, d)
    m = _meter_from(x, y, c)
    other = etfkern.CollapseMeter(c, d, **{setting: value})
    other.update(x, y)
    before = _tensors(m)
    with pytest.raises(ValueError, match=f"other must have {setting}="):
        m.merge(other)
    _assert_same(before, m)


@pytest.mark.parametrize("make_state,match", [
    (lambda s: None, r"state must be a mapping from CollapseMeter\.state_dict\(\), got NoneType"),
    (lambda s: [s], "state must be a mapping"),
    (lambda s: {**s, "sw": -s["sw"]}, r"state\['sw'\] .* diagonal >= 0"),
    (lambda s: {**s, "sw": s["sw"] + torch.triu(torch.ones_like(s["sw"]), 1)}, r"state\['sw'\] .* must be symmetric"),
    (lambda s: {**s, "num_classes": "6"}, r"state\['num_classes'\] must be an int >= 1, got str"),
    (lambda s: {**s, "dim": 4.0}, r"state\['dim'\] must be an int >= 1, got float"),
    (lambda s: {**s, "global_mean": "median"}, r"state\['global_mean'\] must be 'class' or 'sample'"),
    (lambda s: {**s, "min_count": 0}, r"state\['min_count'\] must be an int >= 1, got 0"),
    (lambda s: {**s, "ignore_index": None}, r"state\['ignore_index'\] must be an int"),
    (lambda s: {**s, "means": s["means"].tolist()}, r"state\['means'\] must be a tensor"),
])
def test_load_state_dict_rejects_bad_state_unchanged(make_state, match):
    # load_state_dict(None) used to raise TypeError; a negated scatter loaded and gave NC1 < 0
    c, d = 6, 4
    x, y = _clustered(50, c, d)
    m = _meter_from(x[:20], y[:20], c)
    before = _tensors(m)
    with pytest.raises(ValueError, match=match):
        m.load_state_dict(make_state(_meter_from(x, y, c).state_dict()))
    _assert_same(before, m)
    assert (m.global_mean, m.ignore_index, m.min_count) == ("class", -100, 1)


def test_state_after_merges_passes_the_symmetry_check():
    # merges leave sw symmetric only to rounding: the check must not refuse a real checkpoint
    c, d = 30, 17
    x, y = _clustered(600, c, d, offset=50.0)
    m = etfkern.CollapseMeter(c, d)
    for i in range(0, 600, 50):
        part = etfkern.CollapseMeter(c, d)
        part.update(x[i:i + 50].float(), y[i:i + 50])
        m.merge(part)
    etfkern.CollapseMeter(c, d).load_state_dict(m.state_dict())


@pytest.mark.parametrize("args,kwargs,match", [
    ((True, 6), {}, "num_classes must be an int >= 1, got bool True"),
    (("10", 3), {}, "num_classes must be an int >= 1, got str '10'"),
    ((4, 2.0), {}, "dim must be an int >= 1, got float 2.0"),
    ((4, False), {}, "dim must be an int >= 1, got bool"),
    ((4, 3), {"ignore_index": None}, "ignore_index must be an int, got NoneType"),
    ((4, 3), {"min_count": 0}, "min_count must be an int >= 1, got 0"),
    ((4, 3), {"global_mean": 1}, "global_mean must be 'class' or 'sample', got 1"),
    ((4, 3), {"device": "not-a-device"}, "device 'not-a-device' is not a torch device"),
    ((4, 3), {"device": 3.5}, "device must be a torch.device or a string"),
])
def test_constructor_rejects_wrong_types_by_name(args, kwargs, match):
    # CollapseMeter(True, 6) used to end in a torch TypeError
    with pytest.raises(ValueError, match=match):
        etfkern.CollapseMeter(*args, **kwargs)


def test_numpy_integer_sizes_are_accepted():
    np = pytest.importorskip("numpy")
    m = etfkern.CollapseMeter(np.int64(4), np.int32(3))
    assert (m.num_classes, m.dim) == (4, 3) and type(m.num_classes) is int


def test_to_moves_the_meter_and_refuses_bad_devices_unchanged():
    c, d = 4, 3
    x, y = _clustered(20, c, d)
    m = _meter_from(x, y, c)
    assert m.to("cpu") is m and m.device == torch.device("cpu")
    before = _tensors(m)
    with pytest.raises(ValueError, match="device 'nowhere' is not a torch device"):
        m.to("nowhere")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' cannot hold the meter here"):
            m.to("cuda")
    assert m.device == torch.device("cpu")
    _assert_same(before, m)
    m.update(x, y)  # still usable
    assert m.num_samples == 40


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


class _TinyCausalLM(torch.nn.Module):
    """A real (tiny) torch causal LM built here, no download: embeddings, dropout, then layers that each mix
    the prefix (a running mean over positions) and apply Linear + tanh. hidden_states = (embeddings, layer 1..L)
    as Hugging Face models return them; ``forward_calls`` counts forward passes."""

    def __init__(self, vocab: int = 13, dim: int = 6, num_layers: int = 3, declare_layers: bool = True):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vocab_size=vocab, hidden_size=dim)
        if declare_layers:
            self.config.num_hidden_layers = num_layers
        self.embed = torch.nn.Embedding(vocab, dim)
        self.drop = torch.nn.Dropout(0.3)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(num_layers))
        self.forward_calls = 0

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        from types import SimpleNamespace

        self.forward_calls += 1
        h = self.drop(self.embed(input_ids))
        hidden = [h]
        steps = torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype, device=h.device)[None, :, None]
        for layer in self.layers:
            h = torch.tanh(layer(h.cumsum(1) / steps))
            hidden.append(h)
        return SimpleNamespace(hidden_states=tuple(hidden) if output_hidden_states else None, logits=None)


def _lm_batches(vocab: int = 13, count: int = 3):
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(count):
        ids = torch.randint(0, vocab, (2, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 5 + i % 2:] = 0
        labels = ids.clone()
        labels[0, 2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_collect_lm_features_every_layer_from_one_forward_pass(device):
    torch.manual_seed(0)
    model = _TinyCausalLM().eval().to(device)
    batches = _lm_batches()
    meters = col.collect_lm_features(model, batches, layers=[0, 2, -1], progress=False)
    assert model.forward_calls == len(batches)  # one pass per batch, not one per layer
    assert list(meters) == [0, 2, -1] and len({id(m) for m in meters.values()}) == 3
    for index, meter in meters.items():
        one = col.collect_lm_features(model, batches, layer=index, progress=False)
        assert torch.equal(meter.counts, one.counts) and meter.num_samples == 28
        for key, value in _tensors(one).items():  # the same hidden states, the same updates: bitwise equal
            assert torch.equal(_tensors(meter)[key], value), (index, key)
    # the layers really differ (not one layer copied three times)
    assert not torch.equal(meters[0].means.nan_to_num(), meters[-1].means.nan_to_num())
    # into existing meters, by layer
    given = {1: etfkern.CollapseMeter(13, 6, device=device), 3: etfkern.CollapseMeter(13, 6, device=device)}
    assert col.collect_lm_features(model, batches[:1], given, layers=[1, 3], progress=False) == given
    assert given[1].num_samples == given[3].num_samples > 0


def test_collect_lm_features_layer_out_of_range_names_the_count():
    model = _TinyCausalLM().eval()
    with pytest.raises(ValueError, match=r"layer 4 out of range: the model returns 4 hidden states \(the embeddings "
                                         r"and 3 layers\), so valid indices are -4..3"):
        col.collect_lm_features(model, _lm_batches(), layer=4, progress=False)
    assert model.forward_calls == 0  # checked against model.config before any forward pass
    with pytest.raises(ValueError, match=r"layers \[-5, 7\] out of range"):
        col.collect_lm_features(model, _lm_batches(), layers=[0, -5, 7], progress=False)
    # a config without num_hidden_layers: found on the first batch, before any meter changes
    quiet = _TinyCausalLM(declare_layers=False).eval()
    meter = etfkern.CollapseMeter(13, 6)
    with pytest.raises(ValueError, match="the model returns 4 hidden states"):
        col.collect_lm_features(quiet, _lm_batches(), meter, layer=-5, progress=False)
    assert meter.num_samples == 0 and quiet.forward_calls == 1
    for bad, match in (({"layer": 1, "layers": [1]}, "pass layer or layers, not both"),
                       ({"layers": [1, 1]}, "layers must not repeat"), ({"layers": []}, "non-empty"),
                       ({"layer": "1"}, "layer must be an int"),
                       ({"layers": [1], "meter": etfkern.CollapseMeter(13, 6)}, "meter must be None or a dict")):
        with pytest.raises(ValueError, match=match):
            col.collect_lm_features(model, _lm_batches(), progress=False, **bad)


def test_collect_lm_features_warns_in_train_mode():
    # dropout changes the features and NC1 (0.93 vs 0.70 on the same data in issue 20)
    model = _TinyCausalLM().train()
    with pytest.warns(UserWarning, match="train mode"):
        col.collect_lm_features(model, _lm_batches(count=1), progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        col.collect_lm_features(model.eval(), _lm_batches(count=1), progress=False)


def test_collect_lm_features_progress_bar_shows_tokens_per_second(capsys):
    model = _TinyCausalLM().eval()
    col.collect_lm_features(model, _lm_batches(), total=3)  # default: a bar only on a terminal
    assert "collapse stats" not in capsys.readouterr().err
    col.collect_lm_features(model, _lm_batches(), total=3, progress=True)
    err = capsys.readouterr().err
    assert "collapse stats" in err and "tok_per_s=" in err and "tokens=28" in err


# plot_metrics: tests/collapse/test_plot.py


# ----------------------------------------------------------------------------------------------------------
# the collapse command with language-model labels
# ----------------------------------------------------------------------------------------------------------
def test_collapse_command_ignore_index_and_min_count(tmp_path, capsys):
    import json
    import re

    from etfkern.cli import main as cli_main

    c, d = 9, 5
    x, y = _clustered(90, 7, d)  # classes 0..6 frequent, 7 and 8 rare
    x = torch.cat([x, torch.randn(3, d, dtype=torch.float64), torch.full((4, d), float("nan"))]).float()
    y = torch.cat([y, torch.tensor([7, 8, 8]), torch.full((4,), -1)])  # -1: this file's "ignored" label
    w = torch.randn(c, d)
    for name, t in (("f", x), ("y", y), ("w", w)):
        torch.save(t, tmp_path / f"{name}.pt")
    argv = ["collapse", "--features", str(tmp_path / "f.pt"), "--labels", str(tmp_path / "y.pt"), "--weights",
            str(tmp_path / "w.pt"), "--device", "cpu", "--ignore-index", "-1", "--min-count", "3", "--json",
            str(tmp_path / "out.json")]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^num_classes_excluded +2$", out, re.M) and re.search(r"^num_samples_excluded +3$", out, re.M)
    got = json.loads((tmp_path / "out.json").read_text())
    meter = etfkern.CollapseMeter(c, d, ignore_index=-1, min_count=3)
    meter.update(x, y)
    want = meter.compute(weights=w)
    assert (got["num_classes_excluded"], got["num_samples_excluded"], got["excluded_classes"]) == (2, 3, [7, 8])
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-12), key
    assert got["ncc_mismatch"] == meter.ncc_mismatch(x[:-4], w)
    assert cli_main(argv[:-2] + ["--min-count", "0"]) == 2
    assert "--min-count must be at least 1, got 0" in capsys.readouterr().err


def test_coincident_rare_tokens_match_the_oracle_and_min_count_removes_them():
    # two tokens seen once each, after the same prefix: the same feature, so coincident class means. compute()
    # leaves that pair out of cdnv/gnc2 (with a warning and the count), exactly as the dense oracle does; with
    # min_count=2 the two classes are out of the metrics and nothing is left to warn about
    import warnings

    c, d = 10, 6
    x, y = _clustered(160, 8, d)
    shared = 2.0 * torch.randn(1, d, dtype=torch.float64)
    x, y = torch.cat([x, shared, shared]), torch.cat([y, torch.tensor([8, 9])])
    m = etfkern.CollapseMeter(c, d)
    m.update(x, y)
    with pytest.warns(RuntimeWarning, match="coincident means"):
        got = m.compute()
    want = ref.dense_metrics(x, y, c)
    assert want["num_pairs_excluded_cdnv"] == 1 and all(math.isfinite(v) for v in want.values())
    _assert_metrics(got, want, rtol=1e-8)
    rare_out = etfkern.CollapseMeter(c, d, min_count=2)
    rare_out.update(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = rare_out.compute()
    assert "num_pairs_excluded_cdnv" not in got and got["num_classes_excluded"] == 2
    _assert_metrics(got, ref.dense_metrics(x, y, c, min_count=2), rtol=1e-8)
