"""The spherical public API (issues 20 and 19): (..., d) sequence inputs, a learnable 0-dim tau, the tau bound of
the compute dtype, the bank check contract and first-order-only gradients -- every backend against float64
autograd through materialised logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, backends_for

import etfkern
import etfkern.spherical as sph
from etfkern.spherical import reference as R


def _bank(c, d, dtype=torch.float64):
    return F.normalize(torch.randn(c, d, dtype=torch.float64), dim=1).to(dtype)


def _sequence(b, t, d, c, dtype=torch.float64):
    """x (b, t, d) that is NOT contiguous (a transposed (t, b, d) buffer), targets (b, t) with ignored positions."""
    x = torch.randn(t, b, d, dtype=dtype).transpose(0, 1)
    target = torch.randint(0, c, (b, t))
    target[0, 1] = -100
    target[-1, -1] = -100
    return x, target


def _float64_rows(x, bank, target, tau, metric, eps=0.0, target_b=None, lam=None, ignore_index=-100):
    """Per-position float64 losses (target's shape) by autograd through the materialised logits; tau a float or
    a tensor (then it gets its gradient)."""
    rows = x.reshape(-1, x.shape[-1]).double()
    cos = F.normalize(rows, dim=1, eps=R.NORM_EPS) @ bank.double().T
    tau = tau.double() if isinstance(tau, torch.Tensor) else tau
    z = cos / tau if metric == "cos" else -torch.arccos(cos.clamp(-1.0, 1.0)) / tau
    flat = target.reshape(-1)
    flat_b = flat if target_b is None else target_b.reshape(-1)
    lam_t = torch.ones(flat.shape, dtype=torch.float64) if lam is None else \
        torch.as_tensor(lam, dtype=torch.float64).expand(target.shape).reshape(-1)
    soft, valid = R.soft_targets(flat, flat_b, lam_t, bank.shape[0], eps, ignore_index)
    loss = torch.where(valid, torch.logsumexp(z, 1) - (soft * z).sum(1), torch.zeros_like(z[:, 0]))
    return loss.reshape(target.shape), valid.reshape(target.shape)


def _reduce(rows, valid, reduction):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum().clamp_min(1)


def _tol(backend):
    """float64 inputs: float64 tolerance, except Triton, whose kernels take tau, eps/C and the shift as fp32
    scalars (README limits): float32's tolerance there."""
    atol, rtol = TOL[torch.float32 if backend == "triton" else torch.float64]
    return dict(atol=atol, rtol=rtol)


# ---- (..., d) inputs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cos", "arc"])
def test_sequence_inputs_match_float64_on_every_backend(device, metric):
    b, t, d, c = 3, 5, 6, 13
    x0, target = _sequence(b, t, d, c)
    bank = _bank(c, d)
    target_b = torch.randint(0, c, (b, t))
    lam = torch.rand(b, t, dtype=torch.float64)
    xr = x0.detach().clone().requires_grad_()
    want, valid = _float64_rows(xr, bank, target, 0.1, metric, 0.1, target_b, lam)
    up = torch.randn(b, t, dtype=torch.float64)
    (want * up).sum().backward()
    want, valid, up, xr_grad = want.to(device), valid.to(device), up.to(device), xr.grad.to(device)
    x0, bank, target = x0.to(device), bank.to(device), target.to(device)
    kw = dict(tau=0.1, metric=metric, label_smoothing=0.1, target_b=target_b.to(device), lam=lam.to(device))
    assert not x0.is_contiguous()
    for backend in backends_for("spherical_ce_forward", device):
        x = x0.detach().clone().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same strides
        with etfkern.use_backend(backend):
            rows = etfkern.spherical_cross_entropy(x, bank, target, reduction="none", **kw)
            assert rows.shape == (b, t), backend
            (rows * up).sum().backward()
            mean = etfkern.spherical_cross_entropy(x.detach(), bank, target, **kw)
            loss_rows, lse = sph.spherical_ce_rows(x.detach(), bank, target, **kw)
        tol = _tol(backend)
        torch.testing.assert_close(rows, want.detach(), **tol, msg=lambda m: f"{backend} loss: {m}")
        torch.testing.assert_close(x.grad, xr_grad, **tol, msg=lambda m: f"{backend} x.grad: {m}")
        torch.testing.assert_close(mean, _reduce(want, valid, "mean").detach(), **tol)
        assert loss_rows.shape == lse.shape == (b, t)
        assert rows[0, 1] == 0 and x.grad[0, 1].abs().max() == 0  # an ignored position


def test_sequence_nearest_logits_and_head_shapes():
    b, t, d, c = 2, 7, 5, 11
    x, target = _sequence(b, t, d, c, dtype=torch.float32)
    bank = _bank(c, d, torch.float32)
    flat = x.reshape(-1, d)
    for backend in backends_for("spherical_nearest", "cpu"):
        with etfkern.use_backend(backend):
            for k in (1, 3):
                v, i = etfkern.nearest(x, bank, k=k)
                fv, fi = etfkern.nearest(flat, bank, k=k)
                assert v.shape == i.shape == (b, t, k)
                assert torch.equal(i.reshape(-1, k), fi) and torch.equal(v.reshape(-1, k), fv)
    z = etfkern.spherical_logits(x, bank, tau=0.1)
    assert z.shape == (b, t, c)
    torch.testing.assert_close(z.reshape(-1, c), etfkern.spherical_logits(flat, bank, tau=0.1))
    v1, i1 = etfkern.nearest(x[0, 0], bank, k=2)  # x (d,): the leading shape is ()
    assert v1.shape == i1.shape == (2,)
    head = etfkern.nn.EBVHead(bank, tau=0.1)
    assert head.predict(x).shape == (b, t) and head.predict(x, k=2).shape == (b, t, 2)
    assert torch.equal(head.predict(x), etfkern.nearest(x, bank)[1][..., 0])
    loss = head(x, target, reduction="none")
    assert loss.shape == (b, t)
    torch.testing.assert_close(loss.reshape(-1), head(flat, target.reshape(-1), reduction="none"))


def test_mismatched_leading_shapes_raise_value_error():
    x, target = _sequence(2, 5, 4, 9, dtype=torch.float32)
    bank = _bank(9, 4, torch.float32)
    ce = etfkern.spherical_cross_entropy
    cases = [
        (lambda: ce(x, bank, target.T), r"target must be an integer tensor of shape \(2, 5\)"),
        (lambda: ce(x, bank, target.reshape(-1)), r"target .*\(2, 5\)"),
        (lambda: ce(x, bank, target, target_b=target[:, :4]), r"target_b .*\(2, 5\)"),
        (lambda: ce(x, bank, target, lam=torch.rand(10)), r"lam .*\(2, 5\)"),
        (lambda: ce(x, bank, target, tau=torch.tensor([0.1])), "tau"),
        (lambda: ce(x, bank, target, tau=torch.tensor(1)), "tau"),
        (lambda: ce(x, bank, target, tau=torch.tensor(0.0)), "tau"),
        (lambda: ce(x, bank, target, tau=torch.tensor(float("nan"))), "tau"),
        (lambda: ce(x[..., :3], bank, target), "bank"),
        (lambda: etfkern.nearest(torch.tensor(1.0), bank), "x"),
        (lambda: etfkern.spherical_logits(x, bank, tau=torch.ones(2)), "tau"),
        (lambda: sph.spherical_ce_rows(x, bank, target[0]), "target"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


# ---- learnable tau ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("metric", ["cos", "arc"])
def test_learnable_tau_gradient_matches_float64_on_every_backend(device, metric, reduction):
    """tau.grad (and x.grad, bank.grad) with smoothing, mixup and ignored rows == float64 autograd."""
    n, d, c = 9, 5, 17
    x0 = torch.randn(n, d, dtype=torch.float64)
    bank0 = _bank(c, d)
    target = torch.randint(0, c, (n,))
    target[3] = -100
    target_b = torch.randint(0, c, (n,))
    for eps, lam in ((0.0, None), (0.1, torch.rand(n, dtype=torch.float64))):
        kw = dict(metric=metric, label_smoothing=eps, target_b=target_b if lam is not None else None, lam=lam,
                  reduction=reduction)
        xr, br = x0.clone().requires_grad_(), bank0.clone().requires_grad_()
        tr = torch.tensor(0.08, dtype=torch.float64, requires_grad=True)
        rows, valid = _float64_rows(xr, br, target, tr, metric, eps, kw["target_b"], lam)
        want = _reduce(rows, valid, reduction)
        up = torch.randn_like(want)
        want.backward(up)
        dev_kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        for backend in backends_for("spherical_ce_forward", device):
            x, b = x0.clone().to(device).requires_grad_(), bank0.clone().to(device).requires_grad_()
            tau = torch.tensor(0.08, dtype=torch.float64, requires_grad=True)  # a CPU scalar (also for CUDA x)
            with etfkern.use_backend(backend):
                got = etfkern.spherical_cross_entropy(x, b, target.to(device), tau=tau, **dev_kw)
                got.backward(up.to(device))
            tol = _tol(backend)
            msg = f"{backend} eps={eps}"
            got = got.cpu()
            torch.testing.assert_close(got, want.detach(), **tol, msg=lambda m: f"{msg} loss: {m}")
            # |dL/dtau| ~ N |z| / tau: the float tolerance scales with it
            torch.testing.assert_close(tau.grad, tr.grad, atol=tol["atol"] * 100, rtol=tol["rtol"],
                                       msg=lambda m: f"{msg} tau.grad: {m}")
            torch.testing.assert_close(x.grad.cpu(), xr.grad, **tol, msg=lambda m: f"{msg} x.grad: {m}")
            torch.testing.assert_close(b.grad.cpu(), br.grad, **tol, msg=lambda m: f"{msg} bank.grad: {m}")
            assert tr.grad.abs() > 1e-3  # the test has something to compare


@pytest.mark.parametrize("metric", ["cos", "arc"])
def test_learnable_tau_gradcheck_float64(metric):
    n, d, c = 5, 4, 7
    bank = _bank(c, d)
    target = torch.tensor([0, 3, -100, 6, 2])
    target_b = torch.tensor([1, 3, 0, 5, 5])
    lam = torch.rand(n, dtype=torch.float64)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "cpu"):
        with etfkern.use_backend(backend):
            def fn(x_, tau_):
                return etfkern.spherical_cross_entropy(x_, bank, target, tau=tau_, metric=metric, label_smoothing=0.1,
                                                       target_b=target_b, lam=lam, reduction="none")

            assert torch.autograd.gradcheck(fn, (x, tau), eps=1e-6, atol=1e-6)


def test_learnable_tau_float32_and_no_grad_paths():
    x = torch.randn(2, 6, 8, requires_grad=True)
    bank = _bank(21, 8, torch.float32)
    target = torch.randint(0, 21, (2, 6))
    for metric in ("cos", "arc"):
        tau = torch.tensor(0.07, requires_grad=True)
        loss = etfkern.spherical_cross_entropy(x, bank, target, tau=tau, metric=metric, label_smoothing=0.1)
        loss.backward()
        tr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
        rows, valid = _float64_rows(x.detach(), bank, target, tr, metric, 0.1)
        _reduce(rows, valid, "mean").backward()
        assert tau.grad.dtype == torch.float32
        torch.testing.assert_close(tau.grad.double(), tr.grad, atol=1e-3, rtol=1e-4)
        x.grad = None
    # tau needs a gradient although x does not; and no gradient at all under no_grad
    tau = torch.tensor(0.1, requires_grad=True)
    etfkern.spherical_cross_entropy(x.detach(), bank, target, tau=tau).backward()
    assert tau.grad is not None and tau.grad != 0
    with torch.no_grad():
        assert not etfkern.spherical_cross_entropy(x, bank, target, tau=tau).requires_grad
    # a tensor tau without requires_grad is just a number
    torch.testing.assert_close(etfkern.spherical_cross_entropy(x, bank, target, tau=torch.tensor(0.1)),
                               etfkern.spherical_cross_entropy(x, bank, target, tau=0.1))


def test_ebv_head_learnable_tau_trains():
    torch.manual_seed(4)
    bank = _bank(12, 6, torch.float32)
    head = etfkern.nn.EBVHead(bank, tau=0.5, learnable_tau=True)
    assert [name for name, _ in head.named_parameters()] == ["log_tau"]
    assert isinstance(head.tau, torch.Tensor) and abs(float(head.tau.detach()) - 0.5) < 1e-6
    feats = bank[torch.randint(0, 12, (3, 8))] + 0.1 * torch.randn(3, 8, 6)
    target = feats.matmul(bank.T).argmax(-1)
    loss = head(feats, target)
    loss.backward()
    # d/dlog_tau = tau * d/dtau (float64 autograd)
    tr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    rows, valid = _float64_rows(feats, bank, target, tr, "cos")
    _reduce(rows, valid, "mean").backward()
    torch.testing.assert_close(head.log_tau.grad.double(), 0.5 * tr.grad, atol=1e-5, rtol=1e-4)
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        step_loss = head(feats, target)
        step_loss.backward()
        opt.step()
        losses.append(float(step_loss.detach()))
    assert losses[-1] < losses[0] and 0 < float(head.tau.detach()) < 0.5  # separable data: a sharper temperature helps


# ---- the tau bound (issue 19 item 9) ---------------------------------------------------------------------------
def test_tau_too_small_for_the_compute_dtype_is_rejected():
    """tau=1e-38 gave an inf loss and 1e-39 a NaN ("arc") before; now a ValueError naming the bound."""
    x = torch.randn(4, 8)
    bank = _bank(10, 8, torch.float32)
    target = torch.tensor([0, 1, 2, 3])
    ce = etfkern.spherical_cross_entropy
    cos_bound = sph.tau_lower_bound(1.0, "cos", torch.float32)
    assert 1e-38 < cos_bound < 1.2e-38
    cases = [
        (lambda: ce(x, bank, target, tau=1e-38), r"tau >= 1\.18e-38"),
        (lambda: ce(x, bank, target, tau=1e-39, metric="arc"), "tau >= "),
        (lambda: ce(x, bank, target, tau=1e-37, metric="arc"), "tau >= "),  # 1000/tau slopes at |cos| = 1
        (lambda: ce(x, 1e3 * bank, target, tau=1e-36), "max_c |w_c| = 1e\\+03"),  # the bound scales with |w|
        (lambda: ce(x, bank, target, tau=torch.tensor(1e-20, requires_grad=True)), "dloss/dtau"),
        (lambda: etfkern.spherical_logits(x.half(), bank.half(), tau=1e-5), "float16"),  # logits in x.dtype
    ]
    for backend in backends_for("spherical_ce_forward", "cpu"):
        with etfkern.use_backend(backend):
            for fn, pattern in cases:
                with pytest.raises(ValueError, match=pattern):
                    fn()
    # just above the bounds: finite results
    for tau, metric in ((1.2e-38 * 1.01, "cos"), (sph.tau_lower_bound(1.0, "arc", torch.float32) * 1.01, "arc")):
        assert torch.isfinite(ce(x, bank, target, tau=tau, metric=metric))
    assert torch.isfinite(ce(x, bank, target, tau=torch.tensor(1e-20)))  # no gradient wanted: fp32 bound only
    assert torch.isfinite(ce(x.double(), bank.double(), target, tau=1e-38))  # float64 computes in float64


# ---- bank check contract (issue 19 item 12) --------------------------------------------------------------------
def test_bank_writes_behind_the_version_counter_need_validate_or_clear():
    bank = _bank(7, 5, torch.float32)
    x, t = torch.randn(3, 5), torch.tensor([0, 6, 2])
    sph.clear_bank_check_cache()
    etfkern.spherical_cross_entropy(x, bank, t)  # checked and remembered
    bank.data[1, 2] = float("nan")  # .data does not move bank._version: the documented blind spot
    for force in (lambda: etfkern.spherical_cross_entropy(x, bank, t, validate=True),
                  lambda: (sph.clear_bank_check_cache(), etfkern.spherical_cross_entropy(x, bank, t))):
        with pytest.raises(ValueError, match="bank must be finite"):
            force()
    bank.data[1, 2] = 0.5
    etfkern.spherical_cross_entropy(x, bank, t)
    bank.numpy()[0, 0] = float("inf")  # the same through numpy
    with pytest.raises(ValueError, match="bank must be finite"):
        etfkern.spherical_cross_entropy(x, bank, t, validate=True)
    with pytest.raises(ValueError, match="bank must be finite"):  # a failed check is never remembered
        etfkern.spherical_cross_entropy(x, bank, t)


# ---- first-order gradients only (issue 19 item 13) -------------------------------------------------------------
def test_double_backward_says_it_is_not_supported():
    x = torch.randn(4, 6, requires_grad=True)
    bank = _bank(9, 6, torch.float32)
    target = torch.tensor([1, 2, 3, 4])
    for backend in backends_for("spherical_ce_forward", "cpu"):
        with etfkern.use_backend(backend):
            for metric in ("cos", "arc"):
                tau = torch.tensor(0.1, requires_grad=True)
                loss = etfkern.spherical_cross_entropy(x, bank, target, metric=metric, tau=tau)
                with pytest.raises(RuntimeError, match="higher-order gradients .* are not supported"):
                    torch.autograd.grad(loss, x, create_graph=True)
                gx, = torch.autograd.grad(etfkern.spherical_cross_entropy(x, bank, target, metric=metric), x)
                assert torch.isfinite(gx).all()  # first order still works


@pytest.mark.parametrize("metric", ["cos", "arc"])
def test_spherical_logits_second_derivatives(metric):
    """The documented way to higher-order gradients: spherical_logits is plain torch; its "arc" arccos keeps the
    finite-slope clamp and now has correct second derivatives (the old detach trick gave zero)."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bank = _bank(5, 4)
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def fn(x_, tau_):
        return etfkern.spherical_logits(x_, bank, tau=tau_, metric=metric)

    assert torch.autograd.gradgradcheck(fn, (x, tau))


def test_ebv_head_keeps_one_cast_bank_until_the_bank_changes():
    """bf16 features on a float32 head: the bank is cast (and checked) once, not on every call; an in-place write
    to the bank buffer, or .to(), gives a fresh cast."""
    head = etfkern.nn.EBVHead(_bank(10, 4, torch.float32), tau=0.1)
    feats, target = torch.randn(6, 4, dtype=torch.bfloat16), torch.randint(0, 10, (6,))
    first = head._bank_for(feats)
    assert first.dtype == torch.bfloat16 and head._bank_for(feats) is first
    loss = head(feats, target)
    assert loss.dtype == torch.bfloat16 and torch.isfinite(loss)
    with torch.no_grad():
        head.bank[0] = -head.bank[0]
    fresh = head._bank_for(feats)
    assert fresh is not first and torch.equal(fresh[0], -first[0])
    assert head._bank_for(torch.randn(2, 4)) is head.bank  # same dtype: the buffer itself


def test_arc_tau_pass_is_chunked_and_exact(monkeypatch):
    """The "arc" tau-gradient pass walks row chunks of about _TAU_PASS_MIB (never N x C at once): one-row chunks
    give the same tau gradient as one chunk."""
    x = torch.randn(7, 5, dtype=torch.float64)
    bank = _bank(11, 5)
    target = torch.tensor([0, 4, -100, 10, 3, 3, 9])

    def tau_grad():
        tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        etfkern.spherical_cross_entropy(x, bank, target, tau=tau, metric="arc", label_smoothing=0.2).backward()
        return tau.grad

    whole = tau_grad()
    seen = []
    real = torch.arccos
    monkeypatch.setattr(torch, "arccos", lambda t: seen.append(tuple(t.shape)) or real(t))
    monkeypatch.setattr(sph, "_TAU_PASS_MIB", 1e-6)  # one row per chunk
    torch.testing.assert_close(tau_grad(), whole, atol=1e-12, rtol=1e-12)
    assert seen.count((1, 11)) == 7  # the tau pass: 7 one-row chunks (the forward's own class loop aside)
