"""Float64 references for the spherical family, written straight from the definitions in DESIGN.md.

z_ic = cos_ic / tau ("cos") or -arccos(cos_ic) / tau ("arc"), cos_ic = x̂_i . w_c with x̂ = x / max(|x|, NORM_EPS)
(bank rows used as given). s_ic = dz_ic / dcos_ic: 1/tau ("cos"), 1/(tau sqrt(max(1 - cos^2, ARC_GRAD_EPS))) ("arc"),
so the arc gradient stays finite at |cos| = 1 (cos is clamped to [-1, 1] before arccos).
Soft target t_i = (1-eps)(lam_i onehot(a_i) + (1-lam_i) onehot(b_i)) + eps/C; loss_i = lse_i - sum_c t_ic z_ic.

Every function accepts any float dtype, computes in float64 and returns the accumulation dtype
(float64 for float64 inputs, else float32) or, for gradients w.r.t. inputs, that dtype too.
"""
from __future__ import annotations

import torch

from etfkern._core.dtypes import acc_dtype  # noqa: F401 (the ops return row results in it)

NORM_EPS = 1e-12
ARC_GRAD_EPS = 1e-6
METRICS = ("cos", "arc")




def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def _transform(cos: torch.Tensor, tau: float, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    if metric == "cos":
        return cos / tau, torch.full_like(cos, 1.0 / tau)
    if metric == "arc":
        c = cos.clamp(-1.0, 1.0)
        return -torch.arccos(c) / tau, 1.0 / (tau * (1.0 - c * c).clamp_min(ARC_GRAD_EPS).sqrt())
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def spherical_logits(x: torch.Tensor, bank: torch.Tensor, tau: float, metric: str) -> torch.Tensor:
    """(N, d), (C, d) -> (N, C) logits z in x.dtype (computed in float64)."""
    z, _ = _transform(_normalize(x.double()) @ bank.double().T, tau, metric)
    return z.to(x.dtype)


def soft_targets(target: torch.Tensor, target_b: torch.Tensor, lam: torch.Tensor, num_classes: int, eps: float,
                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float64 soft targets (zero rows where target == ignore_index) and the (N,) bool valid mask."""
    valid = target != ignore_index
    n = target.shape[0]
    t = torch.zeros(n, num_classes, dtype=torch.float64, device=target.device)
    lam = lam.double()
    ta = torch.where(valid, target, 0).long().view(-1, 1)
    tb = torch.where(valid, target_b, 0).long().view(-1, 1)
    t.scatter_add_(1, ta, ((1 - eps) * lam).view(-1, 1))
    t.scatter_add_(1, tb, ((1 - eps) * (1 - lam)).view(-1, 1))
    t += eps / num_classes
    return t * valid.view(-1, 1), valid


def spherical_ce_forward(x: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, target_b: torch.Tensor,
                         lam: torch.Tensor, tau: float, metric: str, eps: float, ignore_index: int,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss_rows (N,), lse (N,), grad_xhat (N, d) or (0, d)).

    grad_xhat_i = sum_c (p_ic - t_ic) s_ic w_c: d loss_i / d x̂_i (before the normalisation and the upstream
    grad). Rows with target == ignore_index have loss 0 and grad 0; their lse is still computed.
    """
    out = acc_dtype(x.dtype)
    w = bank.double()
    xh = _normalize(x.double())
    z, s = _transform(xh @ w.T, tau, metric)
    lse = torch.logsumexp(z, dim=1) if z.shape[1] else torch.full_like(z[:, 0], float("-inf"))
    t, valid = soft_targets(target, target_b, lam, bank.shape[0], eps, ignore_index)
    loss = torch.where(valid, lse - (t * z).sum(1), torch.zeros_like(lse))
    if need_grad:
        p = torch.softmax(z, dim=1)
        g = ((p - t) * s * valid.view(-1, 1)) @ w
    else:
        g = x.new_zeros(0, x.shape[1], dtype=torch.float64)
    return loss.to(out), lse.to(out), g.to(out)


def spherical_ce_partials(x: torch.Tensor, bank: torch.Tensor, tau: float, metric: str, need_sumz: bool,
                          need_grad: bool, need_b: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-loop partials over this bank (a shard of the classes): lse (N,), sum_c z_ic (N,) | (0,),
    sum_c p_ic s_ic w_c (N, d) | (0, d) with p normalised over THESE classes, sum_c s_ic w_c (N, d) | (0, d)."""
    out = acc_dtype(x.dtype)
    w = bank.double()
    z, s = _transform(_normalize(x.double()) @ w.T, tau, metric)
    empty = z.new_zeros(0, x.shape[1])
    lse = torch.logsumexp(z, dim=1)
    sum_z = z.sum(1) if need_sumz else z.new_zeros(0)
    a = (torch.softmax(z, dim=1) * s) @ w if need_grad else empty
    b = s @ w if need_b else empty
    return lse.to(out), sum_z.to(out), a.to(out), b.to(out)


def spherical_ce_bank_grad(x: torch.Tensor, bank: torch.Tensor, target: torch.Tensor, target_b: torch.Tensor,
                           lam: torch.Tensor, grad_rows: torch.Tensor, lse: torch.Tensor, tau: float, metric: str,
                           eps: float, ignore_index: int) -> torch.Tensor:
    """dW (C, d) = sum_i g_i (p_ic - t_ic) s_ic x̂_i, in the accumulation dtype of bank (lse is recomputed)."""
    w = bank.double()
    xh = _normalize(x.double())
    z, s = _transform(xh @ w.T, tau, metric)
    t, valid = soft_targets(target, target_b, lam, bank.shape[0], eps, ignore_index)
    coef = (torch.softmax(z, dim=1) - t) * s * (grad_rows.double() * valid).view(-1, 1)
    return (coef.T @ xh).to(acc_dtype(bank.dtype))


def spherical_nearest(x: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosines (N, k) in the accumulation dtype, sorted descending, and their int64 indices (N, k)."""
    cos = _normalize(x.double()) @ bank.double().T
    vals, idx = torch.topk(cos, k, dim=1, largest=True, sorted=True)
    return vals.to(acc_dtype(x.dtype)), idx
