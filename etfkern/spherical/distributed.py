"""Vocab-parallel spherical cross-entropy and nearest: the bank's rows are sharded over the ranks of a group.

Rank r holds rows [class_start_r, class_start_r + C_r) of the (C, d) bank (C_r may be 0: a rank with no classes);
the non-empty shards must tile [0, C) (checked with one all-gather of (start, size, rejected) per call). x, target,
target_b and lam are replicated on every rank. A rank whose own bank_shard/class_start is bad (NaN, dtype, d,
requires_grad) reports it in that all-gather, so every rank raises before any other collective: no rank is left
waiting.

Forward communication is O(N): an all-reduce MAX and SUM of the per-row shard log-sum-exps, one SUM of the
(N, 3) target pieces (z at target / target_b, owned by exactly one rank, and the per-shard sum_c z_ic for
"arc" with label smoothing), plus O(d) for the bank column sum ("cos" with smoothing). The loss is the same on
every rank. Backward: each rank's x̂-gradient covers its classes only; they are summed with one all-reduce of
the (N, d) gradient (what the "copy to tensor-parallel region" of a vocab-parallel head does), so x.grad is
the full-bank gradient on every rank. Gradients for the bank shard are not implemented (freeze the bank).

x may be (..., d) with targets (...) (a language model's (B, T, d)); a learnable 0-dim tau gets its gradient
(one more O(N) all-reduce in the forward; "arc" also one more pass over this rank's classes). First-order
gradients only (create_graph=True raises RuntimeError).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from etfkern.spherical import ops as _ops
from etfkern.spherical.reference import acc_dtype
from etfkern.spherical import (HIGHER_ORDER_MESSAGE, REDUCTIONS, _as_rows, _bank_finite_checks, _check_tau_metric,
                                _check_x_bank, _data_checks, _desc, _finite_check, _prepare, _sequence_inputs,
                                _tau_checks, _tau_value, expected_arc_logit, first_order_only, normalize_backward,
                                normalized, reduce_rows, z_and_slope)

__all__ = ["spherical_cross_entropy", "nearest"]


def _check_shard(x: torch.Tensor, bank_shard, class_start, validate: bool | None, tau_check=None) -> None:
    """This rank's own arguments (class_start, bank_shard): ValueError / NotImplementedError naming them.
    tau_check: (tau, metric, grad_tau) to check tau against this shard's largest row norm (the loss only)."""
    if not isinstance(class_start, int) or isinstance(class_start, bool) or class_start < 0:
        raise ValueError(f"class_start must be an int >= 0, got {class_start!r}")
    if not isinstance(bank_shard, torch.Tensor) or bank_shard.dim() != 2:
        raise ValueError(f"bank_shard must be a floating (C_r, d) tensor (C_r >= 0), got {_desc(bank_shard)}")
    if bank_shard.requires_grad:
        raise NotImplementedError("vocab-parallel bank-shard gradients are not implemented: pass a frozen bank "
                                  "(bank_shard.requires_grad=False)")
    _check_x_bank(x, _proxy(bank_shard))
    recheck = validate is True
    checks = _bank_finite_checks(bank_shard, "bank_shard", recheck=recheck)
    if tau_check is not None and bank_shard.shape[0] > 0:
        tau, metric, grad_tau = tau_check
        checks += _tau_checks(bank_shard, tau, metric, acc_dtype(x.dtype), grad_tau, recheck)
    _data_checks(checks, validate, x.device)


def _proxy(bank_shard: torch.Tensor) -> torch.Tensor:
    """A (1, d) stand-in with bank_shard's dtype and device for the single-process argument checks (which need
    C >= 1): its first row, or zeros for a rank that holds no classes."""
    return bank_shard[:1] if bank_shard.shape[0] > 0 else bank_shard.new_zeros(1, bank_shard.shape[1])


def _shard_layout(x: torch.Tensor, bank_shard, class_start, group, validate: bool | None = None,
                  tau_check=None) -> int:
    """Check this rank's arguments and that the shards tile [0, C) across the group; return C.

    One all-gather of (class_start, rows, rejected) per rank. A rank whose own arguments are bad (a NaN in its
    shard, a wrong dtype or d, ...) still takes part in it, so EVERY rank raises (that rank its own error, the
    others a ValueError naming it) instead of the others waiting forever in the next collective. A rank may hold
    no classes (a (0, d) shard)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a floating (N, d) tensor, got {_desc(x)}")
    err: Exception | None = None
    try:
        _check_shard(x, bank_shard, class_start, validate, tau_check)
    except (ValueError, NotImplementedError) as exc:
        err = exc
    ok = err is None
    mine = torch.tensor([class_start if ok else -1, bank_shard.shape[0] if ok else 0, 0 if ok else 1],
                        dtype=torch.int64, device=x.device)
    world = dist.get_world_size(group)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    rows = [tuple(int(v) for v in t) for t in everyone]
    bad = [r for r, (_, _, rejected) in enumerate(rows) if rejected]
    if err is not None:
        raise err
    if bad:
        raise ValueError(f"rank(s) {bad} of the group rejected their bank_shard/class_start (see the error raised "
                         "there); every rank raises so that none waits in a collective")
    spans = sorted((start, size) for start, size, _ in rows if size > 0)  # empty shards own no classes
    expected = 0
    for start, size in spans:
        if start != expected:
            raise ValueError(f"bank shards must tile [0, C) without gaps or overlaps: got (class_start, rows) = "
                             f"{[(start, size) for start, size, _ in rows]} (rank order)")
        expected = start + size
    if expected == 0:
        raise ValueError("the bank shards hold no classes at all (C = 0): at least one rank needs rows")
    return expected


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard, target, target_b, lam, class_start, num_classes, tau, metric, eps, ignore_index,
                group, grad_tau):
        acc = acc_dtype(x.dtype)
        c_local = shard.shape[0]
        arc = metric == "arc"
        need_grad = ctx.needs_input_grad[0]
        need_a = need_grad or (grad_tau and not arc)  # "cos": dloss/dtau = -(1/tau) x̂ . (x̂-gradient)
        need_sumz = arc and eps > 0
        own_shard = shard
        if c_local > 0:
            lse_r, sumz_r, a_r, b_r = _ops.spherical_ce_partials(x, shard, tau, metric, need_sumz, need_a,
                                                                 need_a and need_sumz)
        else:  # this rank holds no classes: an empty log-sum-exp, no softmax mass, no target
            n, d = x.shape
            lse_r = x.new_full((n,), float("-inf"), dtype=acc)
            sumz_r = x.new_zeros(n, dtype=acc)
            a_r = b_r = x.new_zeros(n, d, dtype=acc)
            shard = shard.new_zeros(1, d)  # gathers below stay in bounds (and are masked out: own_a/b are False)
        m = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
        lse = m + _all_reduce(torch.exp(lse_r - m), dist.ReduceOp.SUM, group).log()
        valid = target != ignore_index
        xh = normalized(x, acc)
        own_a = valid & (target >= class_start) & (target < class_start + c_local)
        own_b = valid & (target_b >= class_start) & (target_b < class_start + c_local)
        wa = shard.index_select(0, torch.where(own_a, target - class_start, 0).long()).to(acc)
        wb = shard.index_select(0, torch.where(own_b, target_b - class_start, 0).long()).to(acc)
        za, sa = z_and_slope((xh * wa).sum(1), tau, metric)
        zb, sb = z_and_slope((xh * wb).sum(1), tau, metric)
        if sa is None:
            sa = sb = torch.full_like(za, 1.0 / tau)
        zeros = torch.zeros_like(za)
        colsum = shard.to(acc).sum(0) / tau if eps > 0 and not arc else None
        pieces = torch.stack([torch.where(own_a, za, zeros), torch.where(own_b, zb, zeros),
                              sumz_r if need_sumz else zeros], 1)
        pieces = _all_reduce(pieces, dist.ReduceOp.SUM, group)
        target_z = (1 - eps) * (lam * pieces[:, 0] + (1 - lam) * pieces[:, 1])
        if eps > 0:
            sum_z = pieces[:, 2] if arc else xh @ _all_reduce(colsum.clone(), dist.ReduceOp.SUM, group)
            target_z = target_z + (eps / num_classes) * sum_z
        loss = torch.where(valid, lse - target_z, zeros)
        g = None
        if need_a:
            weight = torch.exp(lse_r - lse)  # share of row i's softmax mass held by this rank
            g = weight.unsqueeze(1) * a_r
            g = g - (1 - eps) * ((lam * sa * own_a).unsqueeze(1) * wa + ((1 - lam) * sb * own_b).unsqueeze(1) * wb)
            if eps > 0:
                g = g - (eps / num_classes) * (b_r if arc else colsum.unsqueeze(0))
            g = torch.where(valid.unsqueeze(1), g, torch.zeros_like(g))
        if need_grad:
            ctx.save_for_backward(x, g)
        d_tau = loss.new_zeros(0)
        if grad_tau:  # -(1/tau) sum_c (p - t) z over ALL classes: this rank's share, summed (O(N))
            if arc:
                mine = expected_arc_logit(xh, own_shard, lse, tau, eps, num_classes) if c_local > 0 else zeros
                total = _all_reduce(mine, dist.ReduceOp.SUM, group) - (1 - eps) * (
                    lam * pieces[:, 0] + (1 - lam) * pieces[:, 1])
            else:
                total = _all_reduce((xh * g).sum(1), dist.ReduceOp.SUM, group)
            d_tau = torch.where(valid, total, zeros) / -tau
        ctx.mark_non_differentiable(d_tau)
        ctx.group = group
        return loss, d_tau

    @staticmethod
    def backward(ctx, grad_loss, _grad_d_tau):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(HIGHER_ORDER_MESSAGE)
        if not ctx.needs_input_grad[0]:
            return (None,) * 13
        x, g_local = ctx.saved_tensors
        dxh = _all_reduce(grad_loss.to(g_local.dtype).unsqueeze(1) * g_local, dist.ReduceOp.SUM, ctx.group)
        return (normalize_backward(x, dxh, inplace=True).to(x.dtype),) + (None,) * 12


def spherical_cross_entropy(x: torch.Tensor, bank_shard: torch.Tensor, target: torch.Tensor, *, class_start: int,
                            group=None, tau: float | torch.Tensor = 0.07, metric: str = "cos",
                            label_smoothing: float = 0.0,
                            ignore_index: int = -100, reduction: str = "mean", target_b: torch.Tensor | None = None,
                            lam: float | torch.Tensor | None = None, validate: bool | None = None) -> torch.Tensor:
    """Vocab-parallel :func:`etfkern.spherical_cross_entropy`: same loss and x-gradient as the full bank, on
    every rank of ``group``. bank_shard (C_r, d) holds global classes [class_start, class_start + C_r); target
    and target_b hold GLOBAL class indices. Collective: every rank of the group must call it with the same x,
    targets and keyword arguments. bank_shard may have 0 rows on some ranks. bank_shard.requires_grad is not
    supported (NotImplementedError on that rank, ValueError naming it on the others). x (..., d) with targets
    (...); reduction="none" returns target's shape. tau: a number or a 0-dim tensor (learnable: see
    :func:`etfkern.spherical_cross_entropy`; every rank gets the same tau gradient)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # replicated arguments first (every rank raises alike), then this rank's shard inside the layout all-gather
    rows, flat_target, flat_b, lam, lead = _sequence_inputs(x, target, target_b, lam)
    tau_f, tau_t = _tau_value(tau, x.device)
    _check_tau_metric(tau_f, metric)
    grad_tau = torch.is_grad_enabled() and tau_t is not None and tau_t.requires_grad
    num_classes = _shard_layout(rows, bank_shard, class_start, group, validate, (tau_f, metric, grad_tau))
    target_b, lam_t = _prepare(rows, _proxy(bank_shard), flat_target, tau_f, metric, label_smoothing, ignore_index,
                               flat_b, lam, validate, num_classes=num_classes, check_bank=False)
    loss, d_tau = _VocabParallelCE.apply(rows, bank_shard, flat_target, target_b, lam_t, class_start, num_classes,
                                         tau_f, metric, float(label_smoothing), int(ignore_index), group, grad_tau)
    if torch.is_grad_enabled() and (loss.requires_grad or grad_tau):
        loss = first_order_only(loss, tau_t if grad_tau else None, d_tau if grad_tau else None)
    return reduce_rows(loss.reshape(lead), target, ignore_index, reduction, x.dtype)


def nearest(x: torch.Tensor, bank_shard: torch.Tensor, *, class_start: int, k: int = 1, group=None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel :func:`etfkern.nearest`: global top-k (values, GLOBAL int64 indices) of shape (..., k) for x
    (..., d), sorted descending, on every rank; one all-gather of the per-rank top-k (O(N k world))."""
    lead = tuple(x.shape[:-1]) if isinstance(x, torch.Tensor) else ()
    x = _as_rows(x)
    num_classes = _shard_layout(x, bank_shard, class_start, group)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_classes:
        raise ValueError(f"k must be an int in [1, C={num_classes}], got {k!r}")
    _data_checks([_finite_check(x, "x")], None, x.device)
    n = x.shape[0]
    k_local = min(k, bank_shard.shape[0])
    if k_local > 0:
        vals, idx = _ops.spherical_nearest(x.detach(), bank_shard.detach(), k_local)
    else:  # this rank holds no classes
        vals = x.new_zeros(n, 0, dtype=acc_dtype(x.dtype))
        idx = x.new_zeros(n, 0, dtype=torch.int64)
    pad = k - k_local  # pad to k so that every rank contributes the same shape
    vals = torch.cat([vals, vals.new_full((n, pad), float("-inf"))], 1)
    idx = torch.cat([idx + class_start, idx.new_full((n, pad), -1)], 1)
    world = dist.get_world_size(group)
    all_v = [torch.empty_like(vals) for _ in range(world)]
    all_i = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_v, vals.contiguous(), group=group)
    dist.all_gather(all_i, idx.contiguous(), group=group)
    cat_v, cat_i = torch.cat(all_v, 1), torch.cat(all_i, 1)
    best_v, pos = torch.topk(cat_v, k, dim=1, largest=True, sorted=True)
    return best_v.to(x.dtype).reshape(*lead, k), torch.gather(cat_i, 1, pos).reshape(*lead, k)
