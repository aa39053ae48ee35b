"""Triton kernels for the spherical family: fused cross-entropy forward (+ x-gradient), bank gradient, top-k.

No kernel stores an N x C tensor. Every reduction is deterministic: one program owns a (row block, class slab)
(forward, nearest) or a class block (bank gradient) and walks the other axis in a fixed order; there are no
atomics, and split partials are combined in torch in a fixed order.

* ``_ce_fwd_kernel``: per (row block, class slab), for each class tile: cos = x̂ W^T (K loop over d, fp32/fp64
  accumulation), z, the log-sum-exp and, when x needs a gradient, A += (p * s) @ W_tile (flash-attention style
  "P @ V", V = bank): 2 matmuls per tile = 4 N C d FLOPs in total and the backward for x is O(N d).
  FIXED (the op layer decides with fixed_shift(), cached per bank version): p = exp(z - shift), no
  running max and no per-tile rescale of l and A; otherwise an online max with rescaling.
  Split-C (_splits()): when the row blocks cannot fill the GPU's SMs, S slabs of the class range run as
  separate programs writing raw partials (S, N, ...), combined by the launcher. d <= MAX_REG_D keeps A in
  registers; larger d read-modify-writes a global fp32 slab owned by the program (volatile loads + barrier).
* ``_ce_dw_kernel`` (bank.requires_grad only): per (class tile, row split), for each row block of the split:
  recompute cos and p from the saved lse, coef = g (p - t) s, dW_tile += coef^T @ x̂; with S > 1 row splits
  (few classes: too few class tiles to fill the GPU) each split owns a C x d partial, summed in a fixed order.
* Every tl.dot with an accumulator names out_dtype=ACC: Triton 3.6 defaults out_dtype to float32 and rejects a
  float64 accumulator (the float64 bank gradient failed to compile on the H200, 2026-12-04); 3.9 infers it.
* ``_nearest_kernel``: per (row block, class slab), a running sorted top-k merged with each class tile by k
  selection steps; slabs merged by a stable sort (lower class index wins ties, as unsplit).

* ``_chunk_ce_kernel`` (the "chunked" variant): one program per row of a chunk of logits that a cuBLAS GEMM wrote
  (cosines, in the GEMM's operand dtype). "cos" with the fixed shift (bf16/fp32/fp64): ONE read of the row gives
  the sum-exp, the target terms and the loss and writes exp(z) in place (the op layer scales exp(Z) @ W by 1/l and
  adds the target terms). Otherwise pass 1 reads the row for the log-sum-exp (online max) and the loss, and pass 2
  (also the bank gradient's only pass, given the saved lse) reads it again and writes dlogits IN PLACE:
  (p - t) times tau * dz/dcos (1 for "cos"; "arc": <= 1000, so float16 cannot overflow), with label smoothing,
  mixup pairs and ignored rows (0). The op layer applies 1/tau after the next GEMM.

Launchers return raw partials (split slabs uncombined, no target terms); the op layer (etfkern/spherical/ops.py)
normalises x, picks the variant, combines the slabs in a fixed order and adds the target terms. Inputs: x̂, the
bank with any strides, int64 offsets throughout. Constants (arc_eps, the fixed shift) come in as arguments.
Written for H100/H200 (bf16/fp16/fp32 inputs); tested only under TRITON_INTERPRET=1 at tiny shapes; every
kernel also compiles offline for sm_90a (see _config()). Test hooks: env ETFKERN_TRITON_SPLIT_C=S forces the
class split S of the forward and nearest(), ETFKERN_TRITON_SPLIT_N=S the row split of the bank gradient.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from typing import NamedTuple

from ._common import triton_interpret

MAX_REG_D = 512  # d above this keeps the (rows x d) accumulators in a global slab instead of registers
SPLIT_BUDGET_MIB = 48.0  # split-C: at most this much memory for the (S, N, ...) partials
SPLIT_MIN_TILES = 4  # split-C: at least this many BLOCK_C class tiles per slab
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
def _add_dot_in_place(ptr, mask, a, b, row_scale, SCALE: tl.constexpr, PREC: tl.constexpr):
    """*ptr = (*ptr [* row_scale]) + a @ b for a slab-mode tile this program alone owns. The load is volatile
    (never cached in registers/L1 nor hoisted) and uses the store's pointers and mask; the caller's
    tl.debug_barrier() orders these stores before the next class tile's loads across the CTA's threads."""
    prev = tl.load(ptr, mask=mask, other=0.0, volatile=True)
    if SCALE:
        prev = prev * row_scale[:, None]
    tl.store(ptr, tl.dot(a, b, prev, input_precision=PREC, out_dtype=prev.dtype), mask=mask)


@triton.jit
def _cos_tile(X, W, rows, cols, row_mask, col_mask, D, sxn, sxd, swc, swd,
              ACC: tl.constexpr, PREC: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_C) tile of x̂ W^T; masked rows/columns read zeros."""
    s = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # ks * swd passes 2^31 for a transposed (d, C) bank
        km = ks < D
        xt = tl.load(X + rows[:, None] * sxn + ks[None, :] * sxd, mask=row_mask[:, None] & km[None, :], other=0.0)
        wt = tl.load(W + cols[None, :] * swc + ks[:, None] * swd, mask=col_mask[None, :] & km[:, None], other=0.0)
        s = tl.dot(xt, wt, s, input_precision=PREC, out_dtype=ACC)
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
def _arc_unit_slope(cosv, arc_eps):
    """tau * dz/dcos for "arc": 1 / sqrt(max(1 - cos^2, eps)) <= 1 / sqrt(eps) = 1000. float16 dot operands take this
    (times p <= 1, or the row's coefficient) and the epilogue or launcher applies 1/tau in fp32 (see _tau_free): the
    full slope (1000 / tau at |cos| = 1) overflows float16 (65504) for tau < 0.0153: inf/NaN gradients."""
    cc = tl.minimum(tl.maximum(cosv, -1.0), 1.0)
    return 1.0 / tl.sqrt(tl.maximum(1.0 - cc * cc, arc_eps))


@triton.jit
def _ce_fwd_kernel(X, W, LSE, L, SUMZ, A, B, N, C, D, sxn, sxd, swc, swd, inv_tau, arc_eps, shift, c_split,
                   ARC: tl.constexpr, NEED_SUMZ: tl.constexpr, NEED_GRAD: tl.constexpr, NEED_B: tl.constexpr,
                   FIXED: tl.constexpr, SPLIT: tl.constexpr, TAU_FREE: tl.constexpr, REG_ACC: tl.constexpr,
                   ACC: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """Program (row block, slab): classes [slab * c_split, min(C, (slab + 1) * c_split)) in BLOCK_C tiles.

    FIXED: p = exp(z - shift) with a host-proven safe constant shift (no running max, no rescale of l or A);
    else an online max. SPLIT: store the slab's raw partials (shift or max into LSE, sum-exp into L, unscaled
    A) at [slab * N + row] for a fixed-order combine by the launcher; else the final lse and A / (l tau).
    A slab may hold no class at all (forced split counts): it then stores max -inf (or shift), l = 0, A = 0.
    """
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    c_lo = sid * c_split
    c_hi = tl.minimum(c_lo + c_split, C)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    prow = sid.to(tl.int64) * N + rows  # row of the (S * N, ...) partial buffers (S = 1: the row itself)
    dv0 = tl.arange(0, BLOCK_DV).to(tl.int64)
    if FIXED:
        m_i = tl.zeros((BLOCK_N,), ACC) + shift
    else:
        m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_N,), ACC)
    sum_z = tl.zeros((BLOCK_N,), ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    accb = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < c_hi
        cosv = _cos_tile(X, W, rows, cols, row_mask, col_mask, D, sxn, sxd, swc, swd,
                         ACC, PREC, BLOCK_N, BLOCK_C, BLOCK_K)
        z, slope = _z_slope(cosv, inv_tau, arc_eps, ARC)
        z = tl.where(col_mask[None, :], z, float("-inf"))  # padded classes never enter the LSE
        if NEED_SUMZ:
            sum_z += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)
        if FIXED:
            p = tl.exp(z - shift)
            alpha = tl.full((BLOCK_N,), 1.0, ACC)  # no rescale with a fixed shift (unused below)
        else:
            m_new = tl.maximum(m_i, tl.max(z, 1))  # every tile has >= 1 real class, so m_new is finite
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(z - m_new[:, None])
            l_i = l_i * alpha
            m_i = m_new
        l_i += tl.sum(p, 1)
        if NEED_GRAD:
            if ARC:
                if TAU_FREE:  # tau-free operands (_tau_free): A gets 1/tau below, B in the launcher
                    slope = _arc_unit_slope(cosv, arc_eps)
                p = p * slope
            pm = p.to(W.dtype.element_ty)
            if REG_ACC:
                wv = tl.load(W + cols[:, None] * swc + dv0[None, :] * swd,
                             mask=col_mask[:, None] & (dv0 < D)[None, :], other=0.0)
                if FIXED:
                    acc = tl.dot(pm, wv, acc, input_precision=PREC, out_dtype=ACC)
                else:
                    acc = tl.dot(pm, wv, acc * alpha[:, None], input_precision=PREC, out_dtype=ACC)
                if NEED_B:
                    sm = tl.where(col_mask[None, :], slope, 0.0).to(W.dtype.element_ty)
                    accb = tl.dot(sm, wv, accb, input_precision=PREC, out_dtype=ACC)
            else:
                # Slab mode (d > MAX_REG_D): this program alone owns rows prow of A and B (zero-initialised)
                # and adds into them once per class tile (_add_dot_in_place); the barrier below orders this
                # tile's stores before the next tile's loads across the CTA's threads (CUDA: bar.sync makes
                # prior global writes visible to the block).
                for d0 in range(0, D, BLOCK_DV):
                    dv = d0 + dv0
                    dmask = row_mask[:, None] & (dv < D)[None, :]
                    wv = tl.load(W + cols[:, None] * swc + dv[None, :] * swd,
                                 mask=col_mask[:, None] & (dv < D)[None, :], other=0.0)
                    _add_dot_in_place(A + prow[:, None] * D + dv[None, :], dmask, pm, wv, alpha, not FIXED, PREC)
                    if NEED_B:
                        sm = tl.where(col_mask[None, :], slope, 0.0).to(W.dtype.element_ty)
                        _add_dot_in_place(B + prow[:, None] * D + dv[None, :], dmask, sm, wv, alpha, False, PREC)
                tl.debug_barrier()
    if SPLIT:
        tl.store(LSE + prow, m_i, mask=row_mask)
        tl.store(L + prow, l_i, mask=row_mask)
    else:
        tl.store(LSE + prow, m_i + tl.log(l_i), mask=row_mask)
    if NEED_SUMZ:
        tl.store(SUMZ + prow, sum_z, mask=row_mask)
    if NEED_GRAD:
        if SPLIT:  # raw partials (l may be 0 in an empty slab): the combine divides by the total sum-exp
            scale = tl.full((BLOCK_N,), 1.0, ACC)
        else:
            scale = 1.0 / l_i
            if not ARC:
                scale = scale * inv_tau
            elif TAU_FREE:
                scale = scale * inv_tau
        if REG_ACC:
            dmask = row_mask[:, None] & (dv0 < D)[None, :]
            tl.store(A + prow[:, None] * D + dv0[None, :], acc * scale[:, None], mask=dmask)
            if NEED_B:
                tl.store(B + prow[:, None] * D + dv0[None, :], accb, mask=dmask)
        elif not SPLIT:
            for d0 in range(0, D, BLOCK_DV):
                dv = d0 + dv0
                dmask = row_mask[:, None] & (dv < D)[None, :]
                a_ptr = A + prow[:, None] * D + dv[None, :]
                tl.store(a_ptr, tl.load(a_ptr, mask=dmask, other=0.0, volatile=True) * scale[:, None], mask=dmask)


@triton.jit
def _ce_dw_kernel(X, W, LSE, G, TA, TB, WA, WB, DW, N, C, D, sxn, sxd, swc, swd, inv_tau, arc_eps, eps_over_c,
                  n_split, ARC: tl.constexpr, TAU_FREE: tl.constexpr, REG_ACC: tl.constexpr, ACC: tl.constexpr,
                  PREC: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)  # rows [split * n_split, (split + 1) * n_split) into its own C x D slab
    DW += split * C * D
    r_end = tl.minimum(split * n_split + n_split, N)
    cols = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    dv0 = tl.arange(0, BLOCK_DV).to(tl.int64)
    dw = tl.zeros((BLOCK_C, BLOCK_DV), ACC)
    for r0 in range(split * n_split, r_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < r_end
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
        if ARC:
            if TAU_FREE:  # tau-free operand (_arc_unit_slope, _tau_free); the launcher applies 1/tau
                slope = _arc_unit_slope(cosv, arc_eps)
        coef = tl.where(row_mask[:, None] & col_mask[None, :], coef * slope, 0.0)
        coef_t = tl.trans(coef.to(X.dtype.element_ty))
        if REG_ACC:
            xv = tl.load(X + rows[:, None] * sxn + dv0[None, :] * sxd,
                         mask=row_mask[:, None] & (dv0 < D)[None, :], other=0.0)
            dw = tl.dot(coef_t, xv, dw, input_precision=PREC, out_dtype=ACC)
        else:
            for d0 in range(0, D, BLOCK_DV):
                dv = d0 + dv0
                dmask = col_mask[:, None] & (dv < D)[None, :]
                xv = tl.load(X + rows[:, None] * sxn + dv[None, :] * sxd,
                             mask=row_mask[:, None] & (dv < D)[None, :], other=0.0)
                _add_dot_in_place(DW + cols[:, None] * D + dv[None, :], dmask, coef_t, xv, col_mask, False, PREC)
            tl.debug_barrier()
    if REG_ACC:
        tl.store(DW + cols[:, None] * D + dv0[None, :], dw, mask=col_mask[:, None] & (dv0 < D)[None, :])


@triton.jit
def _nearest_kernel(X, W, VALS, IDX, N, C, D, sxn, sxd, swc, swd, c_split,
                    K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, slab): sorted top-K of the slab's classes into VALS/IDX[slab * N + row]
    (entries beyond the slab's class count stay -inf / -1; the launcher merges slabs in a fixed order)."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    c_lo = sid * c_split
    c_hi = tl.minimum(c_lo + c_split, C)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    kk = tl.arange(0, KP)[None, :]
    lane = tl.arange(0, BLOCK_C)[None, :]
    run_v = tl.full((BLOCK_N, KP), float("-inf"), ACC)  # sorted descending; earlier classes win ties
    run_i = tl.full((BLOCK_N, KP), -1, tl.int64)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_mask = cols < c_hi
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
    out = (sid.to(tl.int64) * N + rows)[:, None] * K + kk
    omask = row_mask[:, None] & (kk < K)
    tl.store(VALS + out, run_v, mask=omask)
    tl.store(IDX + out, run_i, mask=omask)


@triton.jit
def _chunk_ce_kernel(Z, TA, TB, LAM, LSE, LOSS, C, szn, inv_tau, arc_eps, eps, eps_over_c,
                     ARC: tl.constexpr, NEED_SUMZ: tl.constexpr, WRITE_GRAD: tl.constexpr,
                     LSE_GIVEN: tl.constexpr, ONE_PASS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Program = one row of the chunk Z (cosines, any float dtype, row stride szn).

    TA/TB: int64 targets (-1 = ignored row); LAM: mixup weight. LSE_GIVEN: read the row's lse (bank gradient),
    else compute it (pass 1) and store lse and the loss lse - (1-eps)(lam z_a + (1-lam) z_b) - eps/C sum_c z_c
    (0 for an ignored row). WRITE_GRAD: pass 2 overwrites Z in place with (p - t) * tau dz/dcos, where
    t = (1-eps)(lam [c = a] + (1-lam) [c = b]) + eps/C (0 for an ignored row). ONE_PASS ("cos" with the fixed shift
    0, the caller's proof that |z| <= 40): no max and no second read; with WRITE_GRAD pass 1 overwrites Z in place
    with exp(z) (the op layer divides (exp(Z) @ W) by the row's sum-exp and adds the target terms, as for the fused
    kernel's split of the gradient).
    """
    row = tl.program_id(0).to(tl.int64)
    zrow = Z + row * szn
    ta = tl.load(TA + row)
    tb = tl.load(TB + row)
    lam = tl.load(LAM + row).to(ACC)
    valid = ta >= 0
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    if LSE_GIVEN:
        lse = tl.load(LSE + row).to(ACC)
    else:
        m = tl.full((BLOCK,), float("-inf"), ACC)  # per-lane online max and sum-exp, merged after the loop
        acc_l = tl.zeros((BLOCK,), ACC)
        acc_z = tl.zeros((BLOCK,), ACC)
        acc_t = tl.zeros((BLOCK,), ACC)
        for c0 in range(0, C, BLOCK):
            cols = c0 + lanes
            cmask = cols < C
            cosv = tl.load(zrow + cols, mask=cmask, other=0.0).to(ACC)
            z, _ = _z_slope(cosv, inv_tau, arc_eps, ARC)
            if ONE_PASS:
                e = tl.where(cmask, tl.exp(z), 0.0)
                acc_l += e
                if WRITE_GRAD:
                    tl.store(zrow + cols, e.to(Z.dtype.element_ty), mask=cmask)
            else:
                zm = tl.where(cmask, z, float("-inf"))
                m_new = tl.maximum(m, zm)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw no class yet
                acc_l = acc_l * tl.exp(m - m_safe) + tl.exp(zm - m_safe)
                m = m_new
            if NEED_SUMZ:
                acc_z += tl.where(cmask, z, 0.0)
            acc_t += tl.where(cols == ta, lam * z, 0.0) + tl.where(cols == tb, (1.0 - lam) * z, 0.0)
        if ONE_PASS:
            lse = tl.log(tl.sum(acc_l, 0))
        else:
            top = tl.max(m, 0)
            lse = top + tl.log(tl.sum(acc_l * tl.exp(m - top), 0))
        loss = lse - (1.0 - eps) * tl.sum(acc_t, 0)
        if NEED_SUMZ:
            loss -= eps_over_c * tl.sum(acc_z, 0)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD and not ONE_PASS:
        for c0 in range(0, C, BLOCK):
            cols = c0 + lanes
            cmask = cols < C
            cosv = tl.load(zrow + cols, mask=cmask, other=0.0).to(ACC)
            z, _ = _z_slope(cosv, inv_tau, arc_eps, ARC)
            t = tl.where(cols == ta, (1.0 - eps) * lam, 0.0) + tl.where(cols == tb, (1.0 - eps) * (1.0 - lam), 0.0)
            coef = tl.exp(z - lse) - t - eps_over_c
            if ARC:
                coef = coef * _arc_unit_slope(cosv, arc_eps)
            coef = tl.where(valid, coef, 0.0)
            tl.store(zrow + cols, coef.to(Z.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launchers: raw partials; the op layer (etfkern/spherical/ops.py) finishes them
# ----------------------------------------------------------------------------------------------------------
def tl_acc(dtype: torch.dtype):
    """Triton accumulation dtype of an accumulation torch dtype (float64 -> tl.float64, else tl.float32)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's TF32 setting for matmuls (off by default: exact fp32); fp64 always exact."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # bf16/fp16 operands: the flag is irrelevant


def config(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes: tiny under the interpreter (tests); for H100/H200 otherwise (reasoned, never run on a GPU).

    GPU (8 warps; checked by an offline sm_90a compile with ptxas -v, no GPU run): BLOCK_N = 64 rows is one
    wgmma M per warpgroup; the (BLOCK_N x BLOCK_DV) fp32 accumulator(s) stay in
    registers up to d = MAX_REG_D (64 x 256 or 32 x 512 fp32 = 64 KiB: 64 registers per thread at 8 warps, two
    of them for "arc" with label smoothing). The (BLOCK_C x BLOCK_DV) bank tile of the P @ W dot is held to
    64 KiB of shared memory (BLOCK_C = 32 for fp32 at d = 512), next to the 3-stage pipelined K loop of the cos
    tile: BLOCK_K = 64 for bf16/fp16 (128-byte rows), 32 for fp32/fp64, <= 3 x (64 + 64) x 32 x 4 B = 48 KiB.
    Of the 228 KiB per SM that leaves room for the layout-conversion scratch of the epilogue.
    """
    reg = d <= MAX_REG_D
    dv = max(16, triton.next_power_of_2(d)) if reg else 64  # slab: 128 spilled ~1 KB (ptxas, sm_90a)
    if triton_interpret():
        return dict(BLOCK_N=16, BLOCK_C=16, BLOCK_K=16, BLOCK_DV=dv if reg else 16, REG_ACC=reg)
    return dict(BLOCK_N=64 if dv <= 256 else 32, BLOCK_C=max(16, min(64, 2**16 // (dv * dtype.itemsize))),
                BLOCK_K=64 if dtype.itemsize <= 2 else 32, BLOCK_DV=dv, REG_ACC=reg,
                num_warps=8, num_stages=3)  # 4 warps spilled 0.2-2 KB at d = 100 (ptxas, sm_90a)


def tau_free(metric: str, dtype: torch.dtype) -> bool:
    """"arc" with a float16 bank: the kernels' dot operands carry tau * slope (<= 1000, _arc_unit_slope) instead of
    the slope (up to 1000 / tau, past float16's 65504 for tau < 0.0153); the 1/tau is applied in fp32 afterwards
    (A in the forward's epilogue, B and dW by the op layer); the kernels get it as their TAU_FREE flag."""
    return metric == "arc" and dtype == torch.float16


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(n: int, n_cls: int, block_n: int, block_c: int, row_bytes: int, device: torch.device
            ) -> tuple[int, int]:
    """(S, classes per slab) for the split-C grid (cdiv(n, block_n), S); slabs are whole BLOCK_C tiles.

    Env ETFKERN_TRITON_SPLIT_C=S forces S exactly (tests; trailing slabs may then hold no class). Otherwise
    S > 1 only on a GPU whose SMs the cdiv(n, block_n) row programs cannot fill: S = cdiv(SMs, programs), with
    >= SPLIT_MIN_TILES class tiles per slab and the (S, n) partials (row_bytes per row) <= SPLIT_BUDGET_MIB;
    then trimmed so that no slab is empty.
    """
    tiles = triton.cdiv(n_cls, block_c)
    forced = os.environ.get("ETFKERN_TRITON_SPLIT_C")
    if forced:
        s = max(1, int(forced))
        return s, triton.cdiv(triton.cdiv(n_cls, s), block_c) * block_c
    s = 1
    programs = triton.cdiv(n, block_n)
    if device.type == "cuda" and not triton_interpret() and programs < _sm_count(device.index or 0):
        budget = int(SPLIT_BUDGET_MIB * 2**20) // max(1, n * row_bytes)
        s = max(1, min(triton.cdiv(_sm_count(device.index or 0), programs), tiles // SPLIT_MIN_TILES, budget))
    per = triton.cdiv(tiles, s)
    return triton.cdiv(tiles, per), per * block_c


def _row_splits(n: int, n_cls: int, block_n: int, block_c: int, slab_bytes: int, device: torch.device
                ) -> tuple[int, int]:
    """(S, rows per split) for the bank-gradient grid (cdiv(n_cls, block_c), S); splits are whole BLOCK_N blocks.

    Env ETFKERN_TRITON_SPLIT_N=S asks for S (tests). Otherwise S > 1 only on a GPU whose SMs the class-tile
    programs cannot fill (C = 1000 gives 16-32 programs for 132 SMs): S = cdiv(SMs, programs), with
    >= SPLIT_MIN_TILES row blocks per split and the S - 1 extra C x d partials (slab_bytes each) <= SPLIT_BUDGET_MIB.
    Trimmed so that no split is empty.
    """
    forced = os.environ.get("ETFKERN_TRITON_SPLIT_N")
    s = 1
    if forced:
        s = max(1, int(forced))
    else:
        programs = triton.cdiv(n_cls, block_c)
        if device.type == "cuda" and not triton_interpret() and programs < _sm_count(device.index or 0):
            budget = 1 + int(SPLIT_BUDGET_MIB * 2**20) // max(1, slab_bytes)
            s = max(1, min(triton.cdiv(_sm_count(device.index or 0), programs),
                           triton.cdiv(n, block_n) // SPLIT_MIN_TILES, budget))
    rows = triton.cdiv(triton.cdiv(n, s), block_n) * block_n
    return triton.cdiv(n, rows), rows


class ClassLoopParts(NamedTuple):
    """Raw results of _ce_fwd_kernel over S class slabs (rows of slab s at [s * n, (s + 1) * n)).

    S == 1: ``m`` is the lse, ``a`` holds sum_c p s w / (l tau) ("cos", or tau-free "arc") or / l ("arc").
    S > 1: ``m`` the slab's max (or the fixed shift), ``l`` its sum-exp, ``a`` unscaled sum_c p s w.
    ``b`` = sum_c s w (tau * that for a tau-free "arc"); ``sum_z`` per slab. Unrequested parts are None."""
    s: int
    m: torch.Tensor
    l: torch.Tensor | None
    sum_z: torch.Tensor | None
    a: torch.Tensor | None
    b: torch.Tensor | None


def class_loop(xh: torch.Tensor, bank: torch.Tensor, tau: float, metric: str, shift: float | None, arc_eps: float,
               need_sumz: bool, need_grad: bool, need_b: bool, acc: torch.dtype) -> ClassLoopParts:
    """Launch _ce_fwd_kernel on x̂ (N, d) in the bank's dtype. shift: the fixed shift (None: online max)."""
    n, d = xh.shape
    n_cls = bank.shape[0]
    cfg = config(d, bank.dtype)
    if need_b and cfg["REG_ACC"] and cfg["BLOCK_DV"] >= 256 and not triton_interpret():
        cfg["BLOCK_N"] = 32  # two register accumulators: halve the rows (ptxas: 64 x 256 x 2 spilled ~1.3 KB)
    row_bytes = torch.empty((), dtype=acc).element_size() * (3 + d * (int(need_grad) + int(need_b)))
    s, c_split = _splits(n, n_cls, cfg["BLOCK_N"], cfg["BLOCK_C"], row_bytes, xh.device)
    m_part = xh.new_empty(s * n, dtype=acc)  # s == 1: the lse itself
    l_part = xh.new_empty(s * n, dtype=acc) if s > 1 else m_part
    sum_z = xh.new_empty(s * n, dtype=acc) if need_sumz else m_part
    a_part = xh.new_zeros(s, n, d, dtype=acc) if need_grad else m_part
    b_part = xh.new_zeros(s, n, d, dtype=acc) if need_b else a_part
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), s)
    _ce_fwd_kernel[grid](xh, bank, m_part, l_part, sum_z, a_part, b_part, n, n_cls, d, xh.stride(0), xh.stride(1),
                         bank.stride(0), bank.stride(1), 1.0 / tau, arc_eps,
                         shift if shift is not None else 0.0, c_split,
                         ARC=metric == "arc", NEED_SUMZ=need_sumz, NEED_GRAD=need_grad, NEED_B=need_b,
                         FIXED=shift is not None, SPLIT=s > 1, TAU_FREE=tau_free(metric, bank.dtype),
                         ACC=tl_acc(acc), PREC=precision(bank.dtype), **cfg)
    return ClassLoopParts(s, m_part, l_part if s > 1 else None, sum_z if need_sumz else None,
                          a_part if need_grad else None, b_part if need_b else None)


def bank_grad_parts(xh: torch.Tensor, bank: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, ta: torch.Tensor,
                    tb: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, tau: float, metric: str, arc_eps: float,
                    eps_over_c: float, acc: torch.dtype) -> torch.Tensor:
    """Launch _ce_dw_kernel: (S, C, d) row-split partials of dW (sum them over S in order; a tau-free "arc"
    partial still needs its 1/tau). g: row weights (0 on ignored rows); ta/tb: targets (-1 ignored); wa/wb: the
    target coefficients g (1-eps) lam and g (1-eps) (1-lam). All contiguous, lse/g/wa/wb in ``acc``."""
    n, d = xh.shape
    n_cls = bank.shape[0]
    cfg = config(d, bank.dtype)
    # roles swap: the (BLOCK_C x BLOCK_DV) accumulator here is the forward's (BLOCK_N x BLOCK_DV) one and the
    # (BLOCK_N x BLOCK_DV) x tile of coef^T @ x the forward's (BLOCK_C x BLOCK_DV) bank tile
    cfg.update(BLOCK_N=cfg["BLOCK_C"], BLOCK_C=cfg["BLOCK_N"])
    slab_bytes = n_cls * d * torch.empty((), dtype=acc).element_size()
    s, rows = _row_splits(n, n_cls, cfg["BLOCK_N"], cfg["BLOCK_C"], slab_bytes, xh.device)
    part = bank.new_zeros(s, n_cls, d, dtype=acc)
    grid = (triton.cdiv(n_cls, cfg["BLOCK_C"]), s)
    _ce_dw_kernel[grid](xh, bank, lse, g, ta, tb, wa, wb, part, n, n_cls, d,
                        xh.stride(0), xh.stride(1), bank.stride(0), bank.stride(1), 1.0 / tau, arc_eps,
                        eps_over_c, rows, ARC=metric == "arc", TAU_FREE=tau_free(metric, bank.dtype),
                        ACC=tl_acc(acc), PREC=precision(bank.dtype), **cfg)
    return part


def nearest_parts(xh: torch.Tensor, bank: torch.Tensor, k: int, acc: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch _nearest_kernel (k <= MAX_FUSED_K): per class slab s, sorted top-k (values (S, N, k) in ``acc``,
    int64 indices (S, N, k)); slab entries past its class count are -inf / -1. The op layer merges slabs."""
    n, d = xh.shape
    n_cls = bank.shape[0]
    cfg = config(d, bank.dtype)
    # no (rows x d) accumulator here; the unrolled k selection steps spill at large k (k = 64: 1.7 KB at 32 rows)
    block_n = cfg["BLOCK_N"] if triton_interpret() else 64 if k <= 16 else 32
    s, c_split = _splits(n, n_cls, block_n, cfg["BLOCK_C"], 16 * k, xh.device)
    vals = xh.new_empty(s, n, k, dtype=acc)
    idx = xh.new_empty(s, n, k, dtype=torch.int64)
    grid = (triton.cdiv(n, block_n), s)
    _nearest_kernel[grid](xh, bank, vals, idx, n, n_cls, d, xh.stride(0), xh.stride(1),
                          bank.stride(0), bank.stride(1), c_split, K=k, KP=max(2, triton.next_power_of_2(k)),
                          ACC=tl_acc(acc), PREC=precision(bank.dtype), BLOCK_N=block_n,
                          BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"],
                          **({k_: cfg[k_] for k_ in ("num_warps", "num_stages") if k_ in cfg}))
    return vals, idx


def chunk_config(n_cls: int) -> dict:
    """_chunk_ce_kernel tile: BLOCK classes per step (4096 on a GPU: 8 warps x 32 lanes x 16; tiny when
    interpreting), never more than the padded row."""
    cap = 32 if triton_interpret() else 4096
    return dict(BLOCK=min(cap, max(16, triton.next_power_of_2(n_cls))),
                **({} if triton_interpret() else dict(num_warps=8)))


def chunk_ce_rows(z: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor, lam: torch.Tensor, lse: torch.Tensor,
                  loss: torch.Tensor | None, tau: float, metric: str, eps: float, arc_eps: float,
                  write_grad: bool, lse_given: bool, one_pass: bool = False) -> None:
    """Launch _chunk_ce_kernel over the rows of z (rows, C) (cosines; unit column stride): fills lse and loss
    (rows,) unless lse_given (then lse is read); with write_grad, z becomes tau * dlogits in place, with one_pass
    ("cos", fixed shift 0) exp(z) instead (see the kernel). ta/tb int64 (-1 = ignored), lam/lse/loss in the
    accumulation dtype, all contiguous with z's rows."""
    rows, n_cls = z.shape
    if rows == 0:
        return
    assert z.stride(1) == 1
    acc = lse.dtype
    _chunk_ce_kernel[(rows,)](z, ta, tb, lam, lse, loss if loss is not None else lse, n_cls, z.stride(0),
                              1.0 / tau, arc_eps, eps, eps / n_cls,
                              ARC=metric == "arc", NEED_SUMZ=eps > 0, WRITE_GRAD=write_grad, LSE_GIVEN=lse_given,
                              ONE_PASS=one_pass, ACC=tl_acc(acc), **chunk_config(n_cls))
