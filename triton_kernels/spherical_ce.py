"""Triton kernels for the spherical family: fused cross-entropy forward (+ x-gradient), bank gradient, top-k.

No kernel stores an N x C tensor. Every reduction is deterministic: one program owns a row block (forward,
nearest) or a class block (bank gradient) and walks the other axis in a fixed order; there are no atomics.

* ``_ce_fwd_kernel``: per row block, for each class tile: cos = x̂ W^T (K loop over d, fp32/fp64 accumulation),
  z, online max / sum for the log-sum-exp and, when x needs a gradient, A += (p * s) @ W_tile rescaled with
  the running max (flash-attention style "P @ V", V = bank): 2 matmuls per tile = 4 N C d FLOPs in total and the
  backward for x is O(N d). d <= MAX_REG_D keeps A in registers; larger d keeps A in a global fp32 slab that
  the owning program read-modify-writes per class tile (still one pass over the bank, more traffic).
* ``_ce_dw_kernel`` (bank.requires_grad only): per class tile, for each row block: recompute cos and p from the
  saved lse, coef = g (p - t) s, dW_tile += coef^T @ x̂.
* ``_nearest_kernel``: per row block, a running sorted top-k merged with each class tile by k selection steps.

Inputs: x̂ (normalised by the launcher in torch, O(N d)), the bank with any strides, int64 offsets throughout.
Written for H100/H200 (bf16/fp16/fp32 inputs); tested only under TRITON_INTERPRET=1 at tiny shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from etfkern._backend import triton_interpret
from etfkern.reference.spherical import ARC_GRAD_EPS, acc_dtype
from etfkern.spherical import chunked_nearest, finish_forward, normalized, partials_or_empty

MAX_REG_D = 256  # d above this keeps the (rows x d) accumulators in a global slab instead of registers
MAX_FUSED_K = 64  # nearest(): larger k falls back to chunked torch topk on the device


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _acos(c):
    # Abramowitz & Stegun 4.4.46: acos(a) = sqrt(1 - a) * poly(a) on [0, 1], |error| <= 2e-8; reflected for c < 0.
    a = tl.abs(c)
    p = a * -0.0012624911 + 0.0066700901
    p = p * a - 0.0170881256
    p = p * a + 0.0308918810
    p = p * a - 0.0501743046
    p = p * a + 0.0889789874
    p = p * a - 0.2145988016
    p = p * a + 1.5707963050
    r = tl.sqrt(1.0 - a) * p
    return tl.where(c < 0, 3.141592653589793 - r, r)


@triton.jit
def _cos_tile(X, W, rows, cols, row_mask, col_mask, D, sxn, sxd, swc, swd,
              ACC: tl.constexpr, PREC: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_C) tile of x̂ W^T; masked rows/columns read zeros."""
    s = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < D
        xt = tl.load(X + rows[:, None] * sxn + ks[None, :] * sxd, mask=row_mask[:, None] & km[None, :], other=0.0)
        wt = tl.load(W + cols[None, :] * swc + ks[:, None] * swd, mask=col_mask[None, :] & km[:, None], other=0.0)
        s = tl.dot(xt, wt, s, input_precision=PREC)
    return s


@triton.jit
def _z_slope(cosv, inv_tau, arc_eps, ARC: tl.constexpr):
    """z = cos/tau or -acos(cos)/tau; slope = dz/dcos (arc: clamped so it stays finite at |cos| = 1)."""
    if ARC:
        cc = tl.minimum(tl.maximum(cosv, -1.0), 1.0)
        z = -_acos(cc) * inv_tau
        slope = inv_tau / tl.sqrt(tl.maximum(1.0 - cc * cc, arc_eps))
    else:
        z = cosv * inv_tau
        slope = z * 0.0 + inv_tau
    return z, slope


@triton.jit
def _ce_fwd_kernel(X, W, LSE, SUMZ, A, B, N, C, D, sxn, sxd, swc, swd, inv_tau, arc_eps,
                   ARC: tl.constexpr, NEED_SUMZ: tl.constexpr, NEED_GRAD: tl.constexpr, NEED_B: tl.constexpr,
                   REG_ACC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dv0 = tl.arange(0, BLOCK_DV).to(tl.int64)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_N,), ACC)
    sum_z = tl.zeros((BLOCK_N,), ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    accb = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < C
        cosv = _cos_tile(X, W, rows, cols, row_mask, col_mask, D, sxn, sxd, swc, swd,
                         ACC, PREC, BLOCK_N, BLOCK_C, BLOCK_K)
        z, slope = _z_slope(cosv, inv_tau, arc_eps, ARC)
        z = tl.where(col_mask[None, :], z, float("-inf"))  # padded classes never enter the LSE
        if NEED_SUMZ:
            sum_z += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(z, 1))  # every tile has >= 1 real class, so m_new is finite
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if NEED_GRAD:
            if ARC:
                p = p * slope
            pm = p.to(W.dtype.element_ty)
            if REG_ACC:
                wv = tl.load(W + cols[:, None] * swc + dv0[None, :] * swd,
                             mask=col_mask[:, None] & (dv0 < D)[None, :], other=0.0)
                acc = tl.dot(pm, wv, acc * alpha[:, None], input_precision=PREC)
                if NEED_B:
                    sm = tl.where(col_mask[None, :], slope, 0.0).to(W.dtype.element_ty)
                    accb = tl.dot(sm, wv, accb, input_precision=PREC)
            else:
                # slab mode: this program alone owns rows [pid*BLOCK_N, ...) of A and B (zero-initialised)
                for d0 in range(0, D, BLOCK_DV):
                    dv = d0 + dv0
                    dmask = row_mask[:, None] & (dv < D)[None, :]
                    wv = tl.load(W + cols[:, None] * swc + dv[None, :] * swd,
                                 mask=col_mask[:, None] & (dv < D)[None, :], other=0.0)
                    a_ptr = A + rows[:, None] * D + dv[None, :]
                    prev = tl.load(a_ptr, mask=dmask, other=0.0)
                    tl.store(a_ptr, tl.dot(pm, wv, prev * alpha[:, None], input_precision=PREC), mask=dmask)
                    if NEED_B:
                        sm = tl.where(col_mask[None, :], slope, 0.0).to(W.dtype.element_ty)
                        b_ptr = B + rows[:, None] * D + dv[None, :]
                        prevb = tl.load(b_ptr, mask=dmask, other=0.0)
                        tl.store(b_ptr, tl.dot(sm, wv, prevb, input_precision=PREC), mask=dmask)
                tl.debug_barrier()  # the next tile's loads must see this tile's stores from other threads
    tl.store(LSE + rows, m_i + tl.log(l_i), mask=row_mask)
    if NEED_SUMZ:
        tl.store(SUMZ + rows, sum_z, mask=row_mask)
    if NEED_GRAD:
        scale = 1.0 / l_i
        if not ARC:
            scale = scale * inv_tau
        if REG_ACC:
            dmask = row_mask[:, None] & (dv0 < D)[None, :]
            tl.store(A + rows[:, None] * D + dv0[None, :], acc * scale[:, None], mask=dmask)
            if NEED_B:
                tl.store(B + rows[:, None] * D + dv0[None, :], accb, mask=dmask)
        else:
            for d0 in range(0, D, BLOCK_DV):
                dv = d0 + dv0
                dmask = row_mask[:, None] & (dv < D)[None, :]
                a_ptr = A + rows[:, None] * D + dv[None, :]
                tl.store(a_ptr, tl.load(a_ptr, mask=dmask, other=0.0) * scale[:, None], mask=dmask)


@triton.jit
def _ce_dw_kernel(X, W, LSE, G, TA, TB, WA, WB, DW, N, C, D, sxn, sxd, swc, swd, inv_tau, arc_eps, eps_over_c,
                  ARC: tl.constexpr, REG_ACC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    dv0 = tl.arange(0, BLOCK_DV).to(tl.int64)
    dw = tl.zeros((BLOCK_C, BLOCK_DV), ACC)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        cosv = _cos_tile(X, W, rows, cols, row_mask, col_mask, D, sxn, sxd, swc, swd,
                         ACC, PREC, BLOCK_N, BLOCK_C, BLOCK_K)
        z, slope = _z_slope(cosv, inv_tau, arc_eps, ARC)
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
        g = tl.load(G + rows, mask=row_mask, other=0.0)  # 0 on ignored rows
        ta = tl.load(TA + rows, mask=row_mask, other=-1)
        tb = tl.load(TB + rows, mask=row_mask, other=-1)
        wa = tl.load(WA + rows, mask=row_mask, other=0.0)  # g (1-eps) lam
        wb = tl.load(WB + rows, mask=row_mask, other=0.0)  # g (1-eps) (1-lam)
        p = tl.exp(z - lse[:, None])
        coef = g[:, None] * (p - eps_over_c)
        coef -= tl.where(cols[None, :] == ta[:, None], wa[:, None], 0.0)
        coef -= tl.where(cols[None, :] == tb[:, None], wb[:, None], 0.0)
        coef = tl.where(row_mask[:, None] & col_mask[None, :], coef * slope, 0.0)
        coef_t = tl.trans(coef.to(X.dtype.element_ty))
        if REG_ACC:
            xv = tl.load(X + rows[:, None] * sxn + dv0[None, :] * sxd,
                         mask=row_mask[:, None] & (dv0 < D)[None, :], other=0.0)
            dw = tl.dot(coef_t, xv, dw, input_precision=PREC)
        else:
            for d0 in range(0, D, BLOCK_DV):
                dv = d0 + dv0
                dmask = col_mask[:, None] & (dv < D)[None, :]
                xv = tl.load(X + rows[:, None] * sxn + dv[None, :] * sxd,
                             mask=row_mask[:, None] & (dv < D)[None, :], other=0.0)
                d_ptr = DW + cols[:, None] * D + dv[None, :]
                prev = tl.load(d_ptr, mask=dmask, other=0.0)
                tl.store(d_ptr, tl.dot(coef_t, xv, prev, input_precision=PREC), mask=dmask)
            tl.debug_barrier()
    if REG_ACC:
        tl.store(DW + cols[:, None] * D + dv0[None, :], dw, mask=col_mask[:, None] & (dv0 < D)[None, :])


@triton.jit
def _nearest_kernel(X, W, VALS, IDX, N, C, D, sxn, sxd, swc, swd,
                    K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    kk = tl.arange(0, KP)[None, :]
    lane = tl.arange(0, BLOCK_C)[None, :]
    run_v = tl.full((BLOCK_N, KP), float("-inf"), ACC)  # sorted descending; earlier classes win ties
    run_i = tl.full((BLOCK_N, KP), -1, tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < C
        s = _cos_tile(X, W, rows, cols, row_mask, col_mask, D, sxn, sxd, swc, swd,
                      ACC, PREC, BLOCK_N, BLOCK_C, BLOCK_K)
        s = tl.where(col_mask[None, :], s, float("-inf"))
        head = tl.zeros((BLOCK_N,), tl.int32)  # next unused position in the running list
        new_v = tl.full((BLOCK_N, KP), float("-inf"), ACC)
        new_i = tl.full((BLOCK_N, KP), -1, tl.int64)
        for j in tl.static_range(K):
            at_head = kk == head[:, None]
            hv = tl.max(tl.where(at_head, run_v, float("-inf")), 1)
            hi = tl.max(tl.where(at_head, run_i, -1), 1)
            tv = tl.max(s, 1)
            ti = tl.argmax(s, 1)
            take_run = hv >= tv
            new_v = tl.where(kk == j, tl.where(take_run, hv, tv)[:, None], new_v)
            new_i = tl.where(kk == j, tl.where(take_run, hi, c0 + ti.to(tl.int64))[:, None], new_i)
            head = head + take_run.to(tl.int32)
            s = tl.where((take_run == 0)[:, None] & (lane == ti[:, None]), float("-inf"), s)
        run_v = new_v
        run_i = new_i
    out = rows[:, None] * K + kk
    omask = row_mask[:, None] & (kk < K)
    tl.store(VALS + out, run_v, mask=omask)
    tl.store(IDX + out, run_i, mask=omask)


# ----------------------------------------------------------------------------------------------------------
# Launchers (same arguments and results as the ops in etfkern/_ops.py)
# ----------------------------------------------------------------------------------------------------------
def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's TF32 setting for matmuls (off by default: exact fp32); fp64 always exact."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # bf16/fp16 operands: the flag is irrelevant


def _config(d: int) -> dict:
    """Tile sizes: tiny under the interpreter (tests), H100/H200-sized otherwise (untuned: no GPU session)."""
    reg = d <= MAX_REG_D
    dv = max(16, triton.next_power_of_2(d)) if reg else 64
    if triton_interpret():
        return dict(BLOCK_N=16, BLOCK_C=16, BLOCK_K=16, BLOCK_DV=dv if reg else 16, REG_ACC=reg)
    return dict(BLOCK_N=64, BLOCK_C=64, BLOCK_K=64, BLOCK_DV=dv, REG_ACC=reg, num_warps=8 if dv >= 128 else 4,
                num_stages=2)


def _class_loop(x, bank, tau, metric, need_sumz, need_grad, need_b):
    """Launch the fused class loop: (x̂ in acc dtype, lse, sum_z | None, a_sum | None, b_sum | None)."""
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    xh_acc = normalized(x, acc)
    xh = xh_acc.to(bank.dtype)
    lse = x.new_empty(n, dtype=acc)
    sum_z = x.new_empty(n, dtype=acc) if need_sumz else lse
    a_sum = x.new_zeros(n, d, dtype=acc) if need_grad else lse
    b_sum = x.new_zeros(n, d, dtype=acc) if need_b else a_sum
    cfg = _config(d)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _ce_fwd_kernel[grid](xh, bank, lse, sum_z, a_sum, b_sum, n, bank.shape[0], d, xh.stride(0), xh.stride(1),
                         bank.stride(0), bank.stride(1), 1.0 / tau, ARC_GRAD_EPS,
                         ARC=metric == "arc", NEED_SUMZ=need_sumz, NEED_GRAD=need_grad, NEED_B=need_b,
                         ACC=_tl_acc(x.dtype), PREC=_precision(x.dtype), **cfg)
    return (xh_acc, lse, sum_z if need_sumz else None, a_sum if need_grad else None, b_sum if need_b else None)


def ce_forward(x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad):
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    if n == 0:
        return (x.new_zeros(0, dtype=acc), x.new_zeros(0, dtype=acc), x.new_zeros(0, d, dtype=acc))
    arc = metric == "arc"
    xh_acc, lse, sum_z, a_sum, b_sum = _class_loop(x, bank, tau, metric, arc and eps > 0, need_grad,
                                                   need_grad and arc and eps > 0)
    loss, grad = finish_forward(xh_acc, bank, target, target_b, lam, tau, metric, eps, ignore_index, lse, sum_z,
                                a_sum, b_sum)
    return loss, lse, grad if grad is not None else x.new_zeros(0, d, dtype=acc)


def ce_partials(x, bank, tau, metric, need_sumz, need_grad, need_b):
    if x.shape[0] == 0:
        return partials_or_empty(x, x.new_zeros(0, dtype=acc_dtype(x.dtype)), None, None, None)
    return partials_or_empty(x, *_class_loop(x, bank, tau, metric, need_sumz, need_grad, need_b)[1:])


def ce_bank_grad(x, bank, target, target_b, lam, grad_rows, lse, tau, metric, eps, ignore_index):
    n, d = x.shape
    n_cls = bank.shape[0]
    acc = acc_dtype(bank.dtype)
    dw = bank.new_zeros(n_cls, d, dtype=acc)
    if n == 0:
        return dw
    xh = normalized(x, bank.dtype)
    valid = target != ignore_index
    g = torch.where(valid, grad_rows.to(acc), torch.zeros((), dtype=acc, device=x.device)).contiguous()
    lam = lam.to(acc)
    ta = torch.where(valid, target, -1).long().contiguous()
    tb = torch.where(valid, target_b, -1).long().contiguous()
    wa = (g * (1 - eps) * lam).contiguous()
    wb = (g * (1 - eps) * (1 - lam)).contiguous()
    cfg = _config(d)
    grid = (triton.cdiv(n_cls, cfg["BLOCK_C"]),)
    _ce_dw_kernel[grid](xh, bank, lse.to(acc).contiguous(), g, ta, tb, wa, wb, dw, n, n_cls, d,
                        xh.stride(0), xh.stride(1), bank.stride(0), bank.stride(1), 1.0 / tau, ARC_GRAD_EPS,
                        eps / n_cls, ARC=metric == "arc", ACC=_tl_acc(bank.dtype), PREC=_precision(bank.dtype),
                        **cfg)
    return dw


def nearest(x, bank, k):
    n, d = x.shape
    if k > MAX_FUSED_K:
        return chunked_nearest(x, bank, k)
    acc = acc_dtype(x.dtype)
    vals = x.new_empty(n, k, dtype=acc)
    idx = x.new_empty(n, k, dtype=torch.int64)
    if n == 0:
        return vals, idx
    xh = normalized(x, bank.dtype)
    cfg = _config(d)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _nearest_kernel[grid](xh, bank, vals, idx, n, bank.shape[0], d, xh.stride(0), xh.stride(1),
                          bank.stride(0), bank.stride(1), K=k, KP=max(2, triton.next_power_of_2(k)),
                          ACC=_tl_acc(x.dtype), PREC=_precision(x.dtype), BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"],
                          **({k_: cfg[k_] for k_ in ("num_warps", "num_stages") if k_ in cfg}))
    return vals, idx
