"""Momentum-SAM references: plain torch, float64 inside, per-tensor Python loops.

Two layers:
  * op references (``msam_sq_norm``, ``msam_sgd_step``, ``msam_adamw_step``): the oracle for the fused kernels,
    same arguments as the ``etfkern::`` ops, every element computed in float64 (or in ``compute`` dtype for the
    torch fallback) in the same operation order as the kernels, then cast back to the stored dtypes;
  * trajectory references (``msam_trajectory_step``, ``adamw_msam_trajectory_step``): the equations of the
    issue written out directly on float64 lists, independent of how the ops split the work. Tests compare
    whole optimizer trajectories against these.

Element math (g = grad / grad_scale when a scale is given; s_old/s_new the applied / next scale):
  SGD:    w = p + s_old v;  d = g + wd w;  v' = mu v + d;  u = d + mu v' (nesterov) or v';  w = w - lr u;
          p' = w - s_new v'
  AdamW:  w = p + s_old m;  w = w (1 - lr wd);  m' = b1 m + (1 - b1) g;  q' = b2 q + (1 - b2) g g;
          w = w - (lr / (1 - b1^t)) m' / (sqrt(q') / sqrt(1 - b2^t) + eps);  p' = w - s_new m'
On found_inf != 0 nothing is written (parameters and state keep their bits).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from etfkern._core.dtypes import acc_dtype_of

EPS_NORM = 1e-12


def _skip(found_inf: Tensor | None, device: torch.device) -> Tensor | None:
    return None if found_inf is None else (found_inf.to(device).reshape(-1)[0] != 0)


_out_dtype = acc_dtype_of  # the norm's dtype: float64 when any buffer is float64


def msam_sq_norm(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor], scale: Tensor,
                 momentum: Sequence[float], grad_coef: Sequence[float], weight_decay: Sequence[float],
                 grad_scale: Tensor | None, compute: torch.dtype | None = torch.float64) -> Tensor:
    """sum_i || mu_i v_i + (c_i g_i + wd_i (p_i + s v_i)) ||^2 as a 0-dim tensor (float64 if a buffer is
    float64, else float32) on ``scale``'s device: the squared norm of the next momentum, never stored."""
    total = torch.zeros((), dtype=torch.float64, device=scale.device)
    for p, g, v, mu, c, wd in zip(params, grads, bufs, momentum, grad_coef, weight_decay):
        dt = compute or v.dtype
        gg = g.to(dt)
        if grad_scale is not None:
            gg = gg / grad_scale.to(dt).reshape(())
        vv = v.to(dt)
        d = c * gg
        if wd != 0.0:
            d = d + wd * (p.to(dt) + scale.to(dt).reshape(()) * vv)
        vn = mu * vv + d
        total = total + (vn.double() * vn.double()).sum()
    return total.to(_out_dtype(bufs))


def msam_sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor], scale_old: Tensor,
                  scale_new: Tensor, lr: Sequence[float], momentum: Sequence[float], weight_decay: Sequence[float],
                  nesterov: Sequence[bool], grad_scale: Tensor | None, found_inf: Tensor | None,
                  compute: torch.dtype | None = torch.float64) -> Tensor:
    """Undo + SGD-momentum update + perturb, in place on params and bufs. Returns sum ||v'||^2 (0-dim)."""
    total = torch.zeros((), dtype=torch.float64, device=scale_old.device)
    for i, (p, g, v) in enumerate(zip(params, grads, bufs)):
        dt = compute or v.dtype
        skip = _skip(found_inf, p.device)
        so, sn = scale_old.to(dt).reshape(()), scale_new.to(dt).reshape(())
        pp, vv, gg = p.to(dt), v.to(dt), g.to(dt)
        if grad_scale is not None:
            gg = gg / grad_scale.to(dt).reshape(())
        w = pp + so * vv
        d = gg + weight_decay[i] * w if weight_decay[i] != 0.0 else gg
        vn = momentum[i] * vv + d
        u = d + momentum[i] * vn if nesterov[i] else vn
        w = w - lr[i] * u
        pn = w - sn * vn
        if skip is not None:
            pn, vn = torch.where(skip, pp, pn), torch.where(skip, vv, vn)
        p.copy_(pn)
        v.copy_(vn)
        total = total + (vn.double() * vn.double()).sum()
    return total.to(_out_dtype(bufs))


def msam_adamw_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                    exp_avg_sqs: Sequence[Tensor], scale_old: Tensor, scale_new: Tensor, step: Tensor,
                    lr: Sequence[float], beta1: Sequence[float], beta2: Sequence[float], eps: Sequence[float],
                    weight_decay: Sequence[float], grad_scale: Tensor | None, found_inf: Tensor | None,
                    compute: torch.dtype | None = torch.float64) -> Tensor:
    """Undo + AdamW update (decoupled decay, bias correction at step count ``step``, which already counts
    this step) + perturb along -m', in place. Returns sum ||m'||^2 (0-dim)."""
    total = torch.zeros((), dtype=torch.float64, device=scale_old.device)
    t = step.double().reshape(())
    for i, (p, g, m, q) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        dt = compute or m.dtype
        skip = _skip(found_inf, p.device)
        so, sn = scale_old.to(dt).reshape(()), scale_new.to(dt).reshape(())
        b1, b2 = beta1[i], beta2[i]
        step_size = (lr[i] / (1.0 - torch.pow(torch.tensor(b1, dtype=torch.float64, device=t.device), t))).to(dt)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(torch.tensor(b2, dtype=torch.float64, device=t.device), t)).to(dt)
        pp, mm, qq, gg = p.to(dt), m.to(dt), q.to(dt), g.to(dt)
        if grad_scale is not None:
            gg = gg / grad_scale.to(dt).reshape(())
        w = pp + so * mm
        w = w * (1.0 - lr[i] * weight_decay[i])
        mn = b1 * mm + (1.0 - b1) * gg
        qn = b2 * qq + (1.0 - b2) * (gg * gg)
        denom = torch.sqrt(qn) / bc2_sqrt + eps[i]
        w = w - step_size * (mn / denom)
        pn = w - sn * mn
        if skip is not None:
            pn, mn, qn = torch.where(skip, pp, pn), torch.where(skip, mm, mn), torch.where(skip, qq, qn)
        p.copy_(pn)
        m.copy_(mn)
        q.copy_(qn)
        total = total + (mn.double() * mn.double()).sum()
    return total.to(_out_dtype(exp_avgs))


# ----------------------------------------------------------------------------------------------------------
# Trajectory references: the equations, verbatim, on float64 lists (state: dict with "v", "s", ...)
# ----------------------------------------------------------------------------------------------------------
def msam_trajectory_step(w_tilde: list[Tensor], grads: list[Tensor | None], state: dict, *, lr: float,
                         momentum: float, rho: float, weight_decay: float = 0.0, nesterov: bool = False,
                         lagged: bool = False) -> None:
    """One MSAM step on float64 tensors (in place on ``w_tilde``); ``state`` holds "v" (list) and "s" (float).
    Parameters whose grad is None keep v and are re-perturbed with the new scale. ``lagged``: from the second
    step on, s' = rho / ||v|| (the momentum before this step's update) instead of rho / ||v'||."""
    v = state.setdefault("v", [torch.zeros_like(w) for w in w_tilde])
    s = state.get("s", 0.0)
    w = [wt + s * vi for wt, vi in zip(w_tilde, v)]
    new_v = []
    for wi, vi, g in zip(w, v, grads):
        if g is None:
            new_v.append(vi)
            continue
        d = g + weight_decay * wi
        new_v.append(momentum * vi + d)
    for k, (g, vn) in enumerate(zip(grads, new_v)):
        if g is None:
            continue
        d = g + weight_decay * w[k]
        w[k] = w[k] - lr * (d + momentum * vn if nesterov else vn)
    norm = torch.sqrt(sum((vn * vn).sum() for vn in new_v)).item()
    if lagged and "t" in state:
        old = torch.sqrt(sum((vi * vi).sum() for vi in v)).item()
        s_new = rho / (old + EPS_NORM) if old > 0 else 0.0
    else:
        s_new = rho / (norm + EPS_NORM)
    for k in range(len(w_tilde)):
        w_tilde[k].copy_(w[k] - s_new * new_v[k])
    state["v"], state["s"], state["t"] = new_v, s_new, state.get("t", 0) + 1


def adamw_msam_trajectory_step(w_tilde: list[Tensor], grads: list[Tensor | None], state: dict, *, lr: float,
                               betas: tuple[float, float], eps: float, weight_decay: float, rho: float) -> None:
    """One AdamW-MSAM step on float64 tensors: torch.optim.AdamW's update at the unperturbed weights, then
    w~ = w - rho m / ||m||; one global step counter."""
    b1, b2 = betas
    m = state.setdefault("m", [torch.zeros_like(w) for w in w_tilde])
    q = state.setdefault("q", [torch.zeros_like(w) for w in w_tilde])
    s = state.get("s", 0.0)
    t = state.get("t", 0) + 1
    w = [wt + s * mi for wt, mi in zip(w_tilde, m)]
    for k, g in enumerate(grads):
        if g is None:
            continue
        w[k] = w[k] * (1 - lr * weight_decay)
        m[k] = b1 * m[k] + (1 - b1) * g
        q[k] = b2 * q[k] + (1 - b2) * g * g
        denom = q[k].sqrt() / (1 - b2 ** t) ** 0.5 + eps
        w[k] = w[k] - lr / (1 - b1 ** t) * m[k] / denom
    norm = torch.sqrt(sum((mi * mi).sum() for mi in m)).item()
    s_new = rho / (norm + EPS_NORM)
    for k in range(len(w_tilde)):
        w_tilde[k].copy_(w[k] - s_new * m[k])
    state["s"], state["t"] = s_new, t
