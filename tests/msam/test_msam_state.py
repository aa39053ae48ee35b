"""MSAM state that is never half-applied (issue 19, items 2-7): load_state_dict validates before it applies, a
failed step creates no state, both checkpoint recipes resume bitwise, unperturbed() nests, lagged mode after a
GradScaler-skipped first step, duplicate parameters."""
from __future__ import annotations

import copy

import pytest
import torch

import etfkern
from etfkern.msam import reference as ref
from etfkern.optim import MSAM, AdamWMSAM, recompute_bn_stats

from conftest import backends_for
from test_msam import _bn_model_after_three_msam_steps


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(n)]


def _train(model, opt, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _make(cls, model, **kw):
    hyper = dict(lr=0.1, rho=0.3, weight_decay=1e-3) if cls is MSAM else dict(lr=1e-2, rho=0.5)
    return cls(model.parameters(), **hyper, **kw)


def _snapshot(model, opt) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in opt.state.get(p, {}).values()]
    return out + [v.clone() for v in opt._globals.values()] + [torch.tensor(opt._steps)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------
# 2: load_state_dict checks everything first, then applies
# ----------------------------------------------------------------------------------------------------------
def _trained(cls, norm="exact"):
    model = _model()
    opt = _make(cls, model, norm=norm)
    _train(model, opt, _batches(3))
    return model, opt


def _drop(sd, *path):
    d = sd
    for key in path[:-1]:
        d = d[key]
    del d[path[-1]]
    return sd


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: _drop(sd, "msam", "steps"), r"\['msam'\]\['steps'\] is missing"),
    (lambda sd: _drop(sd, "msam"), r"state_dict\['msam'\] is missing"),
    (lambda sd: _drop(sd, "msam", "globals", "lagged_sq"), r"\['lagged_sq'\] is missing"),
    (lambda sd: sd["state"][0]["momentum_buffer"].view(-1).__setitem__(3, float("nan")) or sd, "NaN"),
    (lambda sd: sd["state"][1].__setitem__("momentum_buffer", torch.zeros(5)) or sd, "shape"),
    (lambda sd: sd["msam"].__setitem__("norm", "lagged") or sd, r"\['norm'\] is 'lagged'"),
    (lambda sd: sd["msam"]["globals"].__setitem__("scale", torch.tensor(float("inf"))) or sd, "scale"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0) or sd, r"param_groups'\]\[0\]: lr"),
    (lambda sd: _drop(sd, "param_groups", 0, "momentum"), r"\['momentum'\] is missing"),
    (lambda sd: None, "must be a dict"),
])
def test_load_state_dict_validates_before_applying(corrupt, match):
    model, opt = _trained(MSAM)
    sd = corrupt(copy.deepcopy(opt.state_dict()))
    fresh_model = _model(5)
    fresh = _make(MSAM, fresh_model)
    _train(fresh_model, fresh, _batches(2, seed=9))
    fresh.param_groups[0]["lr"] = 0.07
    before = _snapshot(fresh_model, fresh)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(sd)
    assert _same(before, _snapshot(fresh_model, fresh))
    assert fresh.param_groups[0]["lr"] == 0.07


def test_checkpoints_of_the_other_class_are_rejected_at_load():
    _, msam = _trained(MSAM)
    _, adamw = _trained(AdamWMSAM)
    with pytest.raises(ValueError, match="MSAM checkpoint cannot be loaded into AdamWMSAM"):
        _make(AdamWMSAM, _model()).load_state_dict(msam.state_dict())
    with pytest.raises(ValueError, match="AdamWMSAM checkpoint cannot be loaded into MSAM"):
        _make(MSAM, _model()).load_state_dict(adamw.state_dict())
    sd = copy.deepcopy(msam.state_dict())
    del sd["msam"]["optimizer"]  # without the class name: the group keys tell
    with pytest.raises(ValueError, match=r"\['betas'\] is missing \(a checkpoint of another optimizer"):
        _make(AdamWMSAM, _model()).load_state_dict(sd)


# ----------------------------------------------------------------------------------------------------------
# 3: a failed step leaves no state behind
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["sparse", "lr"])
def test_failed_step_creates_no_state(bad):
    # the second group fails (a sparse gradient; an lr a schedule set to NaN) after the first group's
    # parameters were already gathered: no buffer may exist afterwards
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = MSAM([dict(params=[a]), dict(params=[b], lr=0.05)], lr=0.1)
    a.grad = torch.randn(4)
    if bad == "sparse":
        b.grad = torch.randn(4).to_sparse()
    else:
        b.grad = torch.randn(4)
        opt.param_groups[1]["lr"] = float("nan")
    before = (a.detach().clone(), b.detach().clone())
    with pytest.raises(ValueError, match="sparse|lr"):
        opt.step()
    assert not opt.state and not opt._globals and opt._steps == 0
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    b.grad = torch.randn(4)
    opt.param_groups[1]["lr"] = 0.05
    opt.step()  # and the optimizer still works
    assert len(opt.state) == 2


# ----------------------------------------------------------------------------------------------------------
# 4: both checkpoint recipes resume the uninterrupted run bitwise
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, norm", [(MSAM, "exact"), (MSAM, "lagged"), (AdamWMSAM, "exact")])
@pytest.mark.parametrize("recipe", ["perturbed", "inside_unperturbed"])
def test_checkpoint_recipes_resume_bitwise(cls, norm, recipe):
    batches = _batches(10)
    model = _model()
    opt = _make(cls, model, norm=norm)
    _train(model, opt, batches[:5])
    if recipe == "perturbed":
        saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    else:  # the README's recipe: true weights for the model file, the optimizer state beside them
        with opt.unperturbed():
            saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
        assert saved["opt"]["msam"]["weights"] == "unperturbed"
    _train(model, opt, batches[5:])

    resumed = _model(seed=123)
    opt2 = _make(cls, resumed, norm=norm)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, batches[5:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    with opt.unperturbed(), opt2.unperturbed():
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


# ----------------------------------------------------------------------------------------------------------
# 5: unperturbed() nests harmlessly; recompute_bn_stats inside it
# ----------------------------------------------------------------------------------------------------------
def test_unperturbed_is_reentrant_and_bn_stats_inside_it_are_right():
    model, opt, x = _bn_model_after_three_msam_steps(3, torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    stored = [p.detach().clone() for p in model.parameters()]
    with opt.unperturbed():
        true_w = [p.detach().clone() for p in model.parameters()]
        with opt.unperturbed():
            assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), true_w))
        assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), true_w))
        recompute_bn_stats(model, [x], opt)
        inside = (model[1].running_mean.clone(), model[1].running_var.clone())
        assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), true_w))
        with pytest.raises(RuntimeError, match="inside unperturbed"):
            opt.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), stored))
    recompute_bn_stats(model, [x], opt)
    assert torch.equal(inside[0], model[1].running_mean) and torch.equal(inside[1], model[1].running_var)


# ----------------------------------------------------------------------------------------------------------
# 6: norm="lagged" after a skipped first step
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the skipped steps' inf grads
@pytest.mark.parametrize("cls", [MSAM, AdamWMSAM])
def test_lagged_after_skipped_first_steps_matches_a_clean_run(cls):
    shapes = [(5, 4), (3,)]
    gen = torch.Generator().manual_seed(4)
    seq = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(6)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    hyper = dict(lr=0.05, rho=0.3) if cls is MSAM else dict(lr=1e-2, rho=0.5)
    # gradients evaluated at the stored (perturbed) weights, so the applied perturbation changes the trajectory
    w, st = [x.clone() for x in init], {}
    for gs in seq:  # the equations: lagged from the second step on
        if cls is MSAM:
            ref.msam_trajectory_step(w, [g + 0.5 * x for g, x in zip(gs, w)], st, momentum=0.9, lagged=True, **hyper)
    variants = [(b, impl) for b in backends_for(cls is MSAM and "msam_sgd_step" or "msam_adamw_step", "cpu")
                for impl in (("ops", "plan") if b == "triton" else ("ops",))]
    for backend, impl in variants:
        runs = []
        for skipped in (0, 2):
            params = [torch.nn.Parameter(x.clone()) for x in init]
            opt = cls(params, norm="lagged", step_impl=impl, **hyper)
            opt.grad_scale = torch.tensor([2.0], dtype=torch.float64)
            with etfkern.use_backend(backend):
                for t in range(skipped):
                    for p in params:
                        p.grad = torch.full_like(p, float("inf"))
                    opt.found_inf = torch.tensor([1.0])
                    opt.step()
                opt.found_inf = torch.tensor([0.0])
                for gs in seq:
                    for p, g in zip(params, gs):
                        p.grad = 2.0 * (g + 0.5 * p.detach())
                    opt.step()
            runs.append([p.detach().clone() for p in params])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), (backend, impl)
        if cls is MSAM:
            assert max((a - b).abs().max().item() for a, b in zip(runs[1], w)) < 1e-10, (backend, impl)


# ----------------------------------------------------------------------------------------------------------
# 7: duplicate parameters
# ----------------------------------------------------------------------------------------------------------
def test_duplicate_parameters_are_rejected():
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than once"):
        MSAM([p, p], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        AdamWMSAM([dict(params=[p]), dict(params=[q, p])])
    opt = MSAM([p], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": (t for t in [q])})  # a generator is fine
    assert opt.param_groups[1]["params"] == [q]
