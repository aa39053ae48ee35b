"""Momentum-SAM (issue 5): fused ops vs the float64 reference, optimizer trajectories vs the equations,
GradScaler, state_dict, unperturbed(), BN statistics, bad hyperparameters."""
from __future__ import annotations

import copy

import pytest
import torch

import etfkern
from etfkern.optim import MSAM, AdamWMSAM, recompute_bn_stats
from etfkern.msam import reference as ref

from conftest import backends_for, compile_triton_for_sm90, tolerance

OPS = ("msam_sq_norm", "msam_sgd_step", "msam_adamw_step")
SHAPES = [(7, 3), (5,), (1,), (2, 3, 4)]


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make(shapes, dtype, device="cpu", with_q=False, noncontig_grads=False):
    params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    if noncontig_grads:
        grads = [torch.randn(tuple(s) + (2,), dtype=dtype, device=device)[..., 0] for s in shapes]
    else:
        grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    bufs = [torch.randn(s, dtype=_state_dtype(dtype), device=device) for s in shapes]
    qs = [torch.rand(s, dtype=_state_dtype(dtype), device=device) for s in shapes] if with_q else None
    return params, grads, bufs, qs


def _clone(ts):
    return None if ts is None else [t.clone() for t in ts]


# ----------------------------------------------------------------------------------------------------------
# ops against the reference
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_ops_match_reference_every_backend(op, dtype, device):
    backends = backends_for(op, device)
    assert "reference" in backends and "cpu" in backends or device != "cpu"
    n = len(SHAPES)
    params, grads, bufs, qs = _make(SHAPES, dtype, device, with_q=True, noncontig_grads=True)
    sdt = _state_dtype(dtype)
    so = torch.tensor(0.37, dtype=sdt, device=device)
    sn = torch.tensor(0.21, dtype=sdt, device=device)
    gs = torch.tensor([4.0], device=device)
    lr, mu, wd = [0.1, 0.1, 0.05, 0.05], [0.9, 0.9, 0.5, 0.5], [0.0, 0.0, 0.01, 0.01]
    nest = [False, False, True, True]
    step = torch.tensor(3.0, device=device)

    def run(backend):
        p, v, q = _clone(params), _clone(bufs), _clone(qs)
        with etfkern.use_backend(backend):
            if op == "msam_sq_norm":
                out = torch.ops.etfkern.msam_sq_norm(p, grads, v, so, mu, [1.0, 0.5, 1.0, 1.0], wd, gs)
            elif op == "msam_sgd_step":
                out = torch.ops.etfkern.msam_sgd_step(p, grads, v, so, sn, lr, mu, wd, nest, gs, None)
            else:
                out = torch.ops.etfkern.msam_adamw_step(p, grads, v, q, so, sn, step, lr, mu, [0.999] * n,
                                                        [1e-8] * n, wd, gs, None)
        return out, p, v, q

    want = run("reference")
    assert want[0].dtype == sdt and want[0].dim() == 0
    atol, rtol = tolerance(dtype, "msam_step")
    for backend in backends:
        got = run(backend)
        torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol, msg=lambda m: f"{backend}: {m}")
        for a, b in zip(got[1] + got[2] + (got[3] or []), want[1] + want[2] + (want[3] or [])):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("op", ["msam_sgd_step", "msam_adamw_step"])
def test_ops_found_inf_every_backend(op, skip, device):
    # A found_inf tensor (GradScaler) reaches every backend's kernel: 0 runs the step, nonzero writes nothing.
    # (The Triton kernels once failed in interpreter mode whenever found_inf was given.)
    n = len(SHAPES)
    params, grads, bufs, qs = _make(SHAPES, torch.float32, device, with_q=True)
    so, sn = torch.tensor(0.37, device=device), torch.tensor(0.21, device=device)
    gs, fi = torch.tensor([4.0], device=device), torch.tensor([1.0 if skip else 0.0], device=device)

    def run(backend, found_inf):
        p, v, q = _clone(params), _clone(bufs), _clone(qs)
        with etfkern.use_backend(backend):
            if op == "msam_sgd_step":
                out = torch.ops.etfkern.msam_sgd_step(p, grads, v, so, sn, [0.1] * n, [0.9] * n, [0.01] * n,
                                                      [True] * n, gs, found_inf)
            else:
                out = torch.ops.etfkern.msam_adamw_step(p, grads, v, q, so, sn, torch.tensor(3.0, device=device),
                                                        [0.1] * n, [0.9] * n, [0.999] * n, [1e-8] * n, [0.01] * n,
                                                        gs, found_inf)
        return [out] + p + v + (q if op == "msam_adamw_step" else [])

    want = run("reference", None)
    for backend in backends_for(op, device):
        got = run(backend, fi)
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(got[1:], params + bufs + qs)), backend
            torch.testing.assert_close(got[0], sum((b.double() ** 2).sum() for b in bufs).float())
        else:
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_bitwise_with_reference_in_float64(nesterov):
    # Same operation order in every backend: float64 results are bitwise identical to the reference.
    params, grads, bufs, _ = _make(SHAPES, torch.float64)
    so, sn = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    n = len(SHAPES)
    outs = {}
    for backend in backends_for("msam_sgd_step", "cpu"):
        p, v = _clone(params), _clone(bufs)
        with etfkern.use_backend(backend):
            torch.ops.etfkern.msam_sgd_step(p, grads, v, so, sn, [0.1] * n, [0.9] * n, [0.01] * n, [nesterov] * n,
                                            None, None)
        outs[backend] = (p, v)
    assert len(outs) >= 2
    for backend, (p, v) in outs.items():
        for a, b in zip(p + v, outs["reference"][0] + outs["reference"][1]):
            assert torch.equal(a, b), backend


def test_adamw_step_bitwise_with_reference_in_float64():
    # Block and 16-lane boundaries of the CPU AdamW kernel (256-element blocks, 16 double lanes for ||m'||^2):
    # moments bitwise equal to the reference; parameters to an ulp (the bias-corrected step size lr / (1 - b1^t)
    # comes from std::pow in C++ and torch.pow in the reference, which may differ in the last bit); the returned
    # squared norm to rounding.
    shapes = [(300, 257), (77,), (5,), (16,), (256,), (272,)]
    params, grads, bufs, qs = _make(shapes, torch.float64, with_q=True)
    so, sn = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    n = len(shapes)
    args = (torch.tensor(3.0), [0.1] * n, [0.9] * n, [0.999] * n, [1e-8] * n, [0.0, 0.01, 0.01, 0.0, 0.1, 0.01],
            torch.tensor([4.0], dtype=torch.float64), None)
    outs = {}
    for backend in backends_for("msam_adamw_step", "cpu"):
        p, m, q = _clone(params), _clone(bufs), _clone(qs)
        with etfkern.use_backend(backend):
            sq = torch.ops.etfkern.msam_adamw_step(p, grads, m, q, so, sn, *args)
        outs[backend] = (sq, p + m + q)
    assert len(outs) >= 2
    want_sq = sum(float((t.double() ** 2).sum()) for t in outs["reference"][1][len(shapes):2 * len(shapes)])
    k = len(shapes)
    for backend, (sq, tensors) in outs.items():
        want = outs["reference"][1]
        assert all(torch.equal(a, b) for a, b in zip(tensors[k:], want[k:])), backend
        torch.testing.assert_close(tensors[:k], want[:k], rtol=1e-15, atol=4e-15, msg=lambda m: f"{backend}: {m}")
        assert float(sq) == pytest.approx(want_sq, rel=1e-13), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_kernel_bitwise_with_torch_path(dtype):
    # The compiled kernel (AVX2 or baseline loop, own bf16 rounding) and the torch fallback (same order of
    # fp32 operations, torch's bf16 rounding) agree bit for bit.
    shapes = [(300, 257), (77,), (5,)]
    params, grads, bufs, _ = _make(shapes, dtype)
    so, sn, gs = torch.tensor(0.3), torch.tensor(0.7), torch.tensor([8.0])
    n = len(shapes)
    args = ([0.1] * n, [0.9] * n, [0.0, 0.01, 0.01], [False, True, False], gs, torch.zeros(1))
    p1, v1, p2, v2 = _clone(params), _clone(bufs), _clone(params), _clone(bufs)
    torch.ops.etfkern.msam_sgd_step_native(p1, grads, v1, so, sn, *args)
    ref.msam_sgd_step(p2, grads, v2, so, sn, *args, compute=None)
    assert all(torch.equal(a, b) for a, b in zip(p1 + v1, p2 + v2))


def test_ops_edge_cases_empty_and_zero_size():
    s = torch.tensor(0.5)
    for backend in backends_for("msam_sq_norm", "cpu"):
        with etfkern.use_backend(backend):
            out = torch.ops.etfkern.msam_sq_norm([], [], [], s, [], [], [], None)
            assert out.item() == 0.0 and out.dtype == torch.float32
            z = torch.empty(0, 3)
            out = torch.ops.etfkern.msam_sgd_step([z], [z.clone()], [z.clone()], s, s, [0.1], [0.9], [0.0],
                                                  [False], None, None)
            assert out.item() == 0.0


def test_op_bad_input_raises_value_error():
    p = [torch.randn(3)]
    with etfkern.use_backend("cpu"):
        with pytest.raises(ValueError, match="grads"):
            torch.ops.etfkern.msam_sq_norm(p, [torch.randn(3, dtype=torch.float64)], [torch.zeros(3)],
                                           torch.tensor(0.0), [0.9], [1.0], [0.0], None)
        with pytest.raises(ValueError, match="state"):
            torch.ops.etfkern.msam_sq_norm(p, [torch.randn(3)], [torch.zeros(3, dtype=torch.float64)],
                                           torch.tensor(0.0), [0.9], [1.0], [0.0], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    params, grads, bufs, qs = _make([(3, 2), (4,)], dtype, with_q=True)
    so, sn = torch.tensor(0.3, dtype=dtype), torch.tensor(0.2, dtype=dtype)
    mu, lr, wd = [0.9, 0.8], [0.1, 0.1], [0.01, 0.0]
    fi = torch.zeros(1)
    with etfkern.use_backend("cpu"):
        torch.library.opcheck(torch.ops.etfkern.msam_sq_norm.default, (params, grads, bufs, so, mu, [1.0, 1.0], wd,
                                                                        None))
        torch.library.opcheck(torch.ops.etfkern.msam_sgd_step.default,
                              (_clone(params), grads, _clone(bufs), so, sn, lr, mu, wd, [True, False], None, fi))
        torch.library.opcheck(torch.ops.etfkern.msam_adamw_step.default,
                              (_clone(params), grads, _clone(bufs), _clone(qs), so, sn, torch.tensor(2.0), lr, mu,
                               [0.99, 0.99], [1e-8, 1e-8], wd, torch.tensor([2.0]), fi))


def test_cpu_kernel_deterministic_across_thread_counts():
    shapes = [(300, 257), (70001,)]  # several chunks per tensor
    params, grads, bufs, _ = _make(shapes, torch.float32)
    s = torch.tensor(0.4)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with etfkern.use_backend("cpu"):
                outs.append(torch.ops.etfkern.msam_sq_norm(params, grads, bufs, s, [0.9, 0.9], [1.0, 1.0],
                                                           [0.1, 0.1], None))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])


# ----------------------------------------------------------------------------------------------------------
# optimizer trajectories against the equations (float64, many steps)
# ----------------------------------------------------------------------------------------------------------
def _grads_seq(shapes, steps, seed, drop=None):
    gen = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(steps):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        if drop is not None:
            gs = [None if (k, t) in drop else g for k, g in enumerate(gs)]
        seq.append(gs)
    return seq


def _max_err(a, b):
    return max((x.detach() - y).abs().max().item() for x, y in zip(a, b))


def _check_trajectory(op, make_opt, init, seq, want, device="cpu"):
    """Every backend of ``op``: the optimizer's stored weights after each step match ``want`` to 1e-10."""
    for backend in backends_for(op, device):
        for impl in ("ops", "plan") if backend == "triton" else ("ops",):  # Triton: both step variants
            params = [torch.nn.Parameter(x.to(device, copy=True)) for x in init]
            opt = make_opt(params)
            opt.step_impl = impl
            with etfkern.use_backend(backend):
                for t, gs in enumerate(seq):
                    for p, g in zip(params, gs):
                        p.grad = None if g is None else g.to(device, copy=True)
                    opt.step()
                    assert _max_err([p.cpu() for p in params], want[t]) < 1e-10, (backend, impl, t)
            assert (opt._plan is not None) == (impl == "plan"), (backend, impl)


@pytest.mark.parametrize("norm", ["exact", "lagged"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_msam_trajectory_matches_equations_every_backend(norm, nesterov):
    shapes, steps = [(6, 5), (7,), (1,)], 25
    seq = _grads_seq(shapes, steps, seed=1, drop={(2, 3), (2, 4), (0, 10)})
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    w, st = [x.clone() for x in init], {}
    want = []
    for gs in seq:
        ref.msam_trajectory_step(w, gs, st, rho=0.3, lagged=norm == "lagged", **hyper)
        want.append([x.clone() for x in w])
    _check_trajectory("msam_sgd_step", lambda ps: MSAM(ps, rho=0.3, norm=norm, **hyper), init, seq, want)


def test_msam_param_groups_and_rho_schedule():
    shapes = [(4, 3), (5,)]
    seq = _grads_seq(shapes, 12, seed=2)
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    groups = [dict(lr=0.1, momentum=0.9, weight_decay=0.0), dict(lr=0.02, momentum=0.5, weight_decay=0.1)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = MSAM([dict(params=[params[0]], **groups[0]), dict(params=[params[1]], **groups[1])], lr=1.0, rho=0.5)
    # reference: per-group hyperparameters with a global norm, written out here for two tensors
    w = [x.clone() for x in init]
    v = [torch.zeros_like(x) for x in init]
    s = 0.0
    for t, gs in enumerate(seq):
        rho = 0.5 if t < 6 else 0.1 * t  # a rho schedule: the undo must use the scale actually applied
        for g in opt.param_groups:
            g["rho"] = rho
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        u = [wt + s * vi for wt, vi in zip(w, v)]
        v = [h["momentum"] * vi + g + h["weight_decay"] * ui for h, vi, g, ui in zip(groups, v, gs, u)]
        u = [ui - h["lr"] * vi for h, ui, vi in zip(groups, u, v)]
        s = rho / (torch.sqrt(sum((vi * vi).sum() for vi in v)).item() + 1e-12)
        w = [ui - s * vi for ui, vi in zip(u, v)]
        assert _max_err(params, w) < 1e-10, t
        assert abs(opt._globals["scale"].item() - s) < 1e-12


def test_msam_rho_zero_is_torch_sgd():
    shapes = [(5, 4), (3,)]
    seq = _grads_seq(shapes, 10, seed=3)
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = MSAM(a, lr=0.1, momentum=0.9, rho=0.0, weight_decay=1e-3, nesterov=True)
    opt_b = torch.optim.SGD(b, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for gs in seq:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert _max_err(a, b) < 1e-12


def test_adamw_msam_trajectory_every_backend():
    shapes, steps = [(6, 5), (7,)], 20
    seq = _grads_seq(shapes, steps, seed=4, drop={(1, 5)})
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    w, st, want = [x.clone() for x in init], {}, []
    for gs in seq:
        ref.adamw_msam_trajectory_step(w, gs, st, rho=0.5, **hyper)
        want.append([x.clone() for x in w])
    _check_trajectory("msam_adamw_step", lambda ps: AdamWMSAM(ps, rho=0.5, **hyper), init, seq, want)


def test_adamw_msam_rho_zero_is_torch_adamw():
    shapes = [(5, 4), (3,)]
    seq = _grads_seq(shapes, 10, seed=5)
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = AdamWMSAM(a, lr=1e-2, weight_decay=0.1, rho=0.0)
    opt_b = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    for gs in seq:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert _max_err(a, b) < 1e-12


# ----------------------------------------------------------------------------------------------------------
# hyperparameters, precision, GradScaler
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "lr"), (dict(lr=0.1, rho=-1.0), "rho"), (dict(lr=0.1, momentum=1.0), "momentum"),
    (dict(lr=0.1, momentum=-0.1), "momentum"), (dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"), (dict(lr=0.1, norm="approx"), "norm"),
    (dict(lr=float("nan")), "lr"),
    # non-numbers are a ValueError too (not a TypeError from the range comparison); infinities are rejected
    (dict(lr=None), "lr"), (dict(lr="0.1"), "lr"), (dict(lr=0.1, momentum="0.9"), "momentum"),
    (dict(lr=float("inf")), "lr"), (dict(lr=0.1, rho=float("inf")), "rho"),
    (dict(lr=0.1, weight_decay=float("inf")), "weight_decay"),
])
def test_msam_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSAM([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "lr"), (dict(betas=(1.0, 0.9)), "betas"), (dict(betas=(0.9, -0.1)), "betas"),
    (dict(eps=-1.0), "eps"), (dict(rho=-0.5), "rho"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=0.9), "betas"), (dict(betas=(0.9, "x")), "betas"), (dict(eps=None), "eps"),
    (dict(eps=float("inf")), "eps"), (dict(lr=float("inf")), "lr"),
])
def test_adamw_msam_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamWMSAM([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_rho_must_agree_across_groups_and_params_contiguous():
    # issue 19.3: per-group rho is rejected at construction; a schedule that makes the groups differ is
    # rejected by step() before any state exists (it used to fail after creating buffers for earlier groups)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="rho must be the same"):
        MSAM([dict(params=[a], rho=0.1), dict(params=[b], rho=0.2)], lr=0.1)
    opt = MSAM([dict(params=[a], rho=0.1), dict(params=[b], rho=0.1)], lr=0.1)
    opt.param_groups[1]["rho"] = 0.2
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    before = (a.detach().clone(), b.detach().clone())
    with pytest.raises(ValueError, match="rho must be the same"):
        opt.step()
    assert not opt.state and opt._steps == 0 and not opt._globals
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    with pytest.raises(ValueError, match="contiguous"):
        MSAM([torch.nn.Parameter(torch.randn(4, 3).t())], lr=0.1)


def test_rejected_param_group_is_not_kept():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = MSAM([a], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    with pytest.raises(ValueError, match="contiguous"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 3).t())]})
    assert len(opt.param_groups) == 1
    a.grad = torch.randn(3)
    opt.step()  # the optimizer still works


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(dtype):
    shapes = [(16, 8), (8,)]
    seq = _grads_seq(shapes, 8, seed=6)
    init = [torch.randn(s) for s in shapes]
    lo = [torch.nn.Parameter(x.to(dtype)) for x in init]
    hi = [torch.nn.Parameter(x.to(dtype).float()) for x in init]
    opt_lo, opt_hi = MSAM(lo, lr=0.05, rho=0.3), MSAM(hi, lr=0.05, rho=0.3)
    for gs in seq:
        for p, q, g in zip(lo, hi, gs):
            p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        opt_lo.step()
        opt_hi.step()
    for p in lo:
        assert p.dtype == dtype and opt_lo.state[p]["momentum_buffer"].dtype == torch.float32
    # the only difference is rounding the stored weights to dtype once per step
    unit = torch.finfo(dtype).eps
    assert _max_err([p.float() for p in lo], hi) < 16 * unit * max(x.abs().max().item() for x in init)


def _train_pair(steps, scaler_scale, inf_at=None):
    torch.manual_seed(7)
    model = torch.nn.Linear(6, 3)
    ref_model = copy.deepcopy(model)
    opt = MSAM(model.parameters(), lr=0.1, rho=0.2, weight_decay=1e-3)
    opt_ref = MSAM(ref_model.parameters(), lr=0.1, rho=0.2, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale, growth_interval=1000)
    x, y = torch.randn(10, 6), torch.randn(10, 3)
    for t in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if t == inf_at:
            model.weight.grad[0, 0] = float("inf")
            before = ([p.detach().clone() for p in model.parameters()],
                      [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
                      opt._globals["scale"].clone())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if t == inf_at:
            after = ([p.detach() for p in model.parameters()],
                     [opt.state[p]["momentum_buffer"] for p in model.parameters()], opt._globals["scale"])
            assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1]))
            assert torch.equal(before[2], after[2])
            continue
        ref_loss = torch.nn.functional.mse_loss(ref_model(x), y)
        ref_loss.backward()
        opt_ref.step()
        opt_ref.zero_grad()
    return model, ref_model


def test_grad_scaler_unscales_in_kernel_and_skips_inf_steps():
    assert MSAM._step_supports_amp_scaling
    model, ref_model = _train_pair(6, 1024.0)
    torch.testing.assert_close(list(model.parameters()), list(ref_model.parameters()), rtol=1e-5, atol=1e-6)
    # a step with an inf gradient changes nothing (weights, momentum and applied scale keep their bits)
    model, ref_model = _train_pair(6, 1024.0, inf_at=3)
    torch.testing.assert_close(list(model.parameters()), list(ref_model.parameters()), rtol=1e-5, atol=1e-6)


def test_found_inf_skips_adamw_step_count():
    p = torch.nn.Parameter(torch.randn(5))
    opt = AdamWMSAM([p], lr=1e-2)
    p.grad = torch.randn(5)
    opt.step()
    snapshot = (p.detach().clone(), opt._globals["step"].clone(), opt._globals["scale"].clone())
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([1.0])
    p.grad = torch.full((5,), float("nan"))
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert torch.equal(p.detach(), snapshot[0]) and torch.equal(opt._globals["step"], snapshot[1])
    assert torch.equal(opt._globals["scale"], snapshot[2]) and opt._globals["step"].item() == 1


# ----------------------------------------------------------------------------------------------------------
# unperturbed(), state_dict, BN statistics
# ----------------------------------------------------------------------------------------------------------
def test_unperturbed_gives_true_weights_and_restores_bitwise():
    shapes = [(4, 3), (3,)]
    seq = _grads_seq(shapes, 5, seed=8)
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = MSAM(params, lr=0.1, rho=0.4)
    w, st = [x.clone() for x in init], {}
    for gs in seq:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        ref.msam_trajectory_step(w, gs, st, lr=0.1, momentum=0.9, rho=0.4)
    stored = [p.detach().clone() for p in params]
    true_w = [wt + st["s"] * v for wt, v in zip(w, st["v"])]
    with opt.unperturbed():
        assert _max_err(params, true_w) < 1e-12
        assert _max_err(params, stored) > 1e-3  # really moved
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, stored))


@pytest.mark.parametrize("cls, dtype", [(MSAM, torch.float32), (AdamWMSAM, torch.float32), (MSAM, torch.bfloat16)])
def test_state_dict_round_trip_resumes_bitwise(cls, dtype):
    shapes = [(5, 4), (4,)]
    seq = _grads_seq(shapes, 10, seed=9)
    init = [torch.randn(s).to(dtype) for s in shapes]
    kw = dict(lr=0.05, rho=0.3) if cls is MSAM else dict(lr=1e-2, rho=0.5)

    def run(params, opt, gs_list):
        for gs in gs_list:
            for p, g in zip(params, gs):
                p.grad = g.to(dtype)
            opt.step()

    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = cls(a, norm="lagged", **kw) if cls is MSAM else cls(a, **kw)
    run(a, opt_a, seq[:5])
    saved_sd = copy.deepcopy(opt_a.state_dict())
    saved_params = [p.detach().clone() for p in a]
    run(a, opt_a, seq[5:])

    b = [torch.nn.Parameter(x.clone()) for x in saved_params]
    opt_b = cls(b, norm="lagged", **kw) if cls is MSAM else cls(b, **kw)
    opt_b.load_state_dict(saved_sd)
    for p in b:
        for v in opt_b.state[p].values():
            assert v.dtype == torch.float32
    run(b, opt_b, seq[5:])
    assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(opt_a._globals.values(), opt_b._globals.values()))


def _bn_model_after_three_msam_steps(seed: int, *layers: torch.nn.Module):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*layers)
    opt = MSAM(model.parameters(), lr=0.1, rho=1.0)
    x = torch.randn(32, 4)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def test_recompute_bn_stats_at_unperturbed_weights():
    model, opt, x = _bn_model_after_three_msam_steps(10, torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    stored = [p.detach().clone() for p in model.parameters()]
    batches = [x[:16], (x[16:], None)]
    recompute_bn_stats(model, batches, opt)
    with opt.unperturbed():
        h = model[0](x)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    halves = torch.stack([h[:16].var(0), h[16:].var(0)]).mean(0)  # average of the unbiased batch variances
    torch.testing.assert_close(bn.running_var, halves, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and model.training
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), stored))
    with pytest.raises(ValueError, match="empty"):
        recompute_bn_stats(model, [], opt)


def test_recompute_bn_stats_keeps_statistics_and_modes_on_failure():
    model, opt, x = _bn_model_after_three_msam_steps(11, torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                                     torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6))
    bufs = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    stored = [p.detach().clone() for p in model.parameters()]

    def unchanged():
        sd = model.state_dict()
        return all(torch.equal(sd[k], v) for k, v in bufs.items()) and \
            all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), stored))

    with pytest.raises(ValueError, match="empty"):  # no batch: the old statistics stay (not the reset ones)
        recompute_bn_stats(model, [], opt)
    assert unchanged()
    with pytest.raises(RuntimeError):  # an error in the forward (wrong input width) as well
        recompute_bn_stats(model, [torch.randn(8, 5)], opt)
    assert unchanged()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_batches"):
            recompute_bn_stats(model, [x], opt, num_batches=bad)
    # each module's own training flag comes back (a frozen BN in eval mode inside a training model stays eval)
    model.train()
    model[1].eval()
    recompute_bn_stats(model, [x], opt)
    assert model.training and not model[1].training and model[3].training
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), stored))


# ----------------------------------------------------------------------------------------------------------
# GPU only: no host synchronisation inside step()
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [MSAM, AdamWMSAM])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_step_has_no_host_sync_on_gpu(cls, backend):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(300, 200), (77,)]]
    opt = cls(params, lr=1e-2)
    with etfkern.use_backend(backend):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # first step builds and caches the launch tables
        opt.grad_scale, opt.found_inf = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _gpu_twins(cls, norm, dtype):
    torch.manual_seed(21)
    shapes = [(300, 200), (77,), (5, 3)]
    init = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    kw = dict(lr=1e-2, rho=0.3, weight_decay=1e-3) if cls is MSAM else dict(lr=1e-3, rho=0.5)
    out = []
    for _ in range(2):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        for p in params:
            p.grad = torch.zeros_like(p)  # static gradient tensors (a captured graph reads these addresses)
        out.append((params, cls([dict(params=params[:2]), dict(params=params[2:], lr=5e-3)], norm=norm,
                                step_impl="plan", **kw)))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls, norm", [(MSAM, "exact"), (MSAM, "lagged"), (AdamWMSAM, "exact")])
def test_cuda_graph_step_equals_eager_step_bitwise(cls, norm, dtype):
    # capturable operation (issue 17): after eager warm-up steps, opt.step() captured in a CUDA graph and
    # replayed equals the eager step bit for bit (weights, state, device scalars), lr changes included
    (pa, eager), (pb, graphed) = _gpu_twins(cls, norm, dtype)
    gen = torch.Generator(device="cuda").manual_seed(5)
    grads = [[torch.randn(p.shape, device="cuda", generator=gen).to(dtype) for p in pa] for _ in range(8)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with etfkern.use_backend("triton"), torch.cuda.stream(side):
        for t in range(3):  # warm-up: builds the launch tables, compiles the kernels, confirms a step was taken
            for a, b, g in zip(pa, pb, grads[t]):
                a.grad.copy_(g)
                b.grad.copy_(g)
            eager.step()
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with etfkern.use_backend("triton"), torch.cuda.graph(graph):
        graphed.step()
    with etfkern.use_backend("triton"):
        for t in range(3, 8):
            if t == 5:
                for o in (eager, graphed):
                    o.param_groups[0]["lr"] *= 0.5
                graphed.sync_hyperparameters()
            for a, b, g in zip(pa, pb, grads[t]):
                a.grad.copy_(g)
                b.grad.copy_(g)
            eager.step()
            graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    for a, b in zip(pa, pb):
        assert all(torch.equal(x, y) for x, y in zip(eager.state[a].values(), graphed.state[b].values()))
    assert all(torch.equal(x, y) for x, y in zip(eager._globals.values(), graphed._globals.values()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [MSAM, AdamWMSAM])
def test_steady_state_step_allocates_no_gpu_memory(cls):
    (params, opt), _ = _gpu_twins(cls, "exact", torch.float32)
    opt.grad_scale, opt.found_inf = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda")
    with etfkern.use_backend("triton"):
        for _ in range(2):
            opt.step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trajectories_on_gpu_every_backend():
    shapes, steps = [(300, 70), (7,), (1,)], 12
    seq = _grads_seq(shapes, steps, seed=11, drop={(1, 3)})
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    adam = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    w, st, want = [x.clone() for x in init], {}, []
    for gs in seq:
        ref.msam_trajectory_step(w, gs, st, rho=0.3, **sgd)
        want.append([x.clone() for x in w])
    _check_trajectory("msam_sgd_step", lambda ps: MSAM(ps, rho=0.3, **sgd), init, seq, want, "cuda")
    w, st, want = [x.clone() for x in init], {}, []
    for gs in seq:
        ref.adamw_msam_trajectory_step(w, gs, st, rho=0.5, **adam)
        want.append([x.clone() for x in w])
    _check_trajectory("msam_adamw_step", lambda ps: AdamWMSAM(ps, rho=0.5, **adam), init, seq, want, "cuda")


# ------------------------------------------------------------------------------------------------------------
# GPU build check without a GPU: the multi-tensor step kernels with bf16 params and fp32 state
# lower to PTX and assemble for sm_90 (the interpreter cannot run 16-bit dots or check types the way ptx does).
# ------------------------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import etfkern.triton_kernels.msam as tk

out = {}
# the per-run kernels (the ops' Triton backend), bf16 params with fp32 state
tabs = dict(blk_t="*i32", blk_o="*i64", numels="*i64", partial="*fp32")
common = dict(PT=tl.bfloat16, T=tl.float32, BLOCK=tk.BLOCK)
out["sq_norm_bf16"] = build(tk._sq_norm_kernel, dict(p_tab="*i64", g_tab="*i64", v_tab="*i64", **tabs,
    scale_ptr="*fp32", gs_ptr="*fp32", hyp="*fp32"), dict(HAS_GS=True, USE_WD=True, **common), num_warps=4)
out["sgd_bf16"] = build(tk._sgd_kernel, dict(p_tab="*i64", g_tab="*i64", v_tab="*i64", **tabs, so_ptr="*fp32",
    sn_ptr="*fp32", gs_ptr="*fp32", fi_ptr="*fp32", hyp="*fp32"),
    dict(HAS_GS=True, HAS_FI=True, USE_WD=True, NESTEROV=True, **common), num_warps=4)
out["adamw_bf16"] = build(tk._adamw_kernel, dict(p_tab="*i64", g_tab="*i64", m_tab="*i64", q_tab="*i64", **tabs,
    so_ptr="*fp32", sn_ptr="*fp32", gs_ptr="*fp32", fi_ptr="*fp32", step_size_ptr="*fp32",
    bc2_sqrt_ptr="*fp32", hyp="*fp32"), dict(HAS_GS=True, HAS_FI=True, **common), num_warps=4)
# the StepPlan kernels: bf16/fp32/fp64 params, exact and lagged, the finish kernels for fp32 and fp64 scalars
tabs = dict(blk_t="*i32", blk_o="*i64", numels="*i64", hyp="*fp64", partial="*fp64")
for pt, st, g in (("bf16", "fp32", "fp32"), ("fp32", "fp32", "fp32"), ("fp64", "fp64", "fp64")):
    common = dict(PT=getattr(tl, {"bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}[pt]),
                  T=tl.float64 if st == "fp64" else tl.float32, BLOCK=tk.BLOCK)
    f64 = g == "fp64"
    for lag in (False, True):
        out[f"plan_sgd_{pt}_lag{int(lag)}"] = build(tk._plan_sgd_kernel, dict(p_tab="*i64", g_tab="*i64",
            v_tab="*i64", **tabs, so_ptr="*" + g, sn_ptr="*" + g, rho_ptr="*fp64", gs_ptr="*fp32", fi_ptr="*fp32"),
            dict(HAS_GS=True, HAS_FI=True, SN_FROM_LAG=lag, F64=f64, **common), num_warps=4)
        out[f"plan_adamw_{pt}_lag{int(lag)}"] = build(tk._plan_adamw_kernel, dict(p_tab="*i64", g_tab="*i64",
            m_tab="*i64", q_tab="*i64", **tabs, so_ptr="*" + g, sn_ptr="*" + g, rho_ptr="*fp64", gs_ptr="*fp32",
            fi_ptr="*fp32", step_ptr="*" + g),
            dict(STEP_OFFSET=1, HAS_GS=True, HAS_FI=True, SN_FROM_LAG=lag, F64=f64, **common), num_warps=4)
    out[f"plan_sq_norm_{pt}"] = build(tk._plan_sq_norm_kernel, dict(p_tab="*i64", g_tab="*i64", v_tab="*i64",
        **tabs, scale_ptr="*" + g, gs_ptr="*fp32"), dict(HAS_GS=True, **common), num_warps=4)
for g in ("fp32", "fp64"):
    for mode in (0, 1, 2):
        if mode != 1:
            out[f"finish_norm_{g}_{mode}"] = build(tk._finish_norm_kernel, dict(partial="*fp64", n="i32", G="*" + g,
                rho_ptr="*fp64"), dict(MODE=mode, F64=g == "fp64", BLOCK=tk.FINISH_BLOCK), num_warps=4)
        out[f"finish_step_{g}_{mode}"] = build(tk._finish_step_kernel, dict(partial="*fp64", n="i32", G="*" + g,
            rho_ptr="*fp64", fi_ptr="*fp32"), dict(MODE=mode, HAS_FI=True, F64=g == "fp64", BLOCK=tk.FINISH_BLOCK),
            num_warps=4)
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    # every launch configuration the plan and the op launchers use: bf16/fp32/fp64 params, exact and lagged, the
    # finish kernels for float32 and float64 device scalars
    report = compile_triton_for_sm90(_AOT_SCRIPT, tmp_path)
    assert len(report) == 3 + 3 * 5 + 2 * 5
    assert {"sgd_bf16", "plan_sgd_bf16_lag1", "plan_adamw_fp64_lag0", "finish_step_fp64_2"} <= set(report)
