"""Triton kernels for the bank ops (tiled: no C x C matrix is ever stored) and their launchers.

* ``pair_stats``: one program per row block I walks the column blocks J >= I (upper triangle), K-looped dot
  tiles; per-row max and float64 sums are kept per program and reduced on the host side in a fixed order;
  the histogram is a per-tile ``tl.histogram`` added to a global int64 histogram with integer atomics
  (integer addition: the result does not depend on the order).
* ``ebv_dir`` (one EBV optimiser step): per (row block, feature block), online row max of |cos| and
  accumulation of P @ W_J with P = e^{beta (|cos| - running max)} sign(cos), rescaled when the max grows
  (flash-attention style); no atomics.
Inputs are computed in float32 (float64 banks are cast); outputs are cast back to the bank's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from etfkern.triton_kernels._common import triton_interpret


def _interp() -> bool:
    return triton_interpret()


@triton.jit
def _dot_tile(w_ptr, rows, cols, rmask, cmask, D, stride_w,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TF32: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    roff = rows.to(tl.int64)[:, None] * stride_w
    coff = cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(w_ptr + roff + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + coff + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if TF32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="tf32")
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc


@triton.jit
def _pair_stats_kernel(w_ptr, C, D, stride_w, lo, scale, top, nslots, max_ptr, sum_ptr, hist_ptr,
                       BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < C
    row_max = tl.zeros((BLOCK,), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK,), dtype=tl.float64)
    nblocks = tl.cdiv(C, BLOCK)
    bins_idx = tl.arange(0, NB)
    for jb in range(pid, nblocks):
        cols = jb * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < C
        v = tl.abs(_dot_tile(w_ptr, rows, cols, rmask, cmask, D, stride_w, BLOCK, BLOCK, BLOCK_K, False))
        valid = (rows[:, None] < cols[None, :]) & rmask[:, None] & cmask[None, :]
        vm = tl.where(valid, v, 0.0)
        row_max = tl.maximum(row_max, tl.max(vm, axis=1))
        row_sum += tl.sum(vm, axis=1).to(tl.float64)
        k = tl.floor((v - lo) * scale) + 1.0
        k = tl.minimum(tl.maximum(k, 0.0), top).to(tl.int32)  # top = bins + 1 (the overflow slot)
        h = tl.histogram(tl.reshape(k, (BLOCK * BLOCK,)), NB, mask=tl.reshape(valid, (BLOCK * BLOCK,)))
        tl.atomic_add(hist_ptr + bins_idx, h.to(tl.int64), mask=(h > 0) & (bins_idx < nslots))
    tl.store(max_ptr + pid, tl.max(row_max, axis=0))
    tl.store(sum_ptr + pid, tl.sum(row_sum, axis=0))


@triton.jit
def _dir_kernel(w_ptr, out_ptr, rowmax_ptr, C, D, stride_w, stride_o, beta,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                TF32: tl.constexpr):
    """One (row block, feature block): flash-attention style online rescaling. acc holds
    sum_j e^{beta (a_ij - m_i)} sign(c_ij) W[j, dcols] for the running row max m_i; when m_i grows, acc is
    scaled by e^{beta (m_old - m_new)} <= 1. Every exponent is <= 0, so nothing overflows."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < C
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, C, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < C
        cos = _dot_tile(w_ptr, rows, cols, rmask, cmask, D, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, TF32)
        valid = (rows[:, None] != cols[None, :]) & rmask[:, None] & cmask[None, :]
        a = tl.where(valid, tl.abs(cos), float("-inf"))
        m_new = tl.maximum(m, tl.max(a, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp(beta * (m - m_safe)))  # no column yet: acc is 0
        sgn = tl.where(cos > 0, 1.0, tl.where(cos < 0, -1.0, 0.0))
        p = tl.where(valid, tl.exp(beta * (a - m_safe[:, None])) * sgn, 0.0)
        wj = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + dcols[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None]
        if TF32:
            acc = tl.dot(p, wj, acc, input_precision="tf32")
        else:
            acc = tl.dot(p, wj, acc, input_precision="ieee")
        m = m_new
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + dcols[None, :], acc,
             mask=rmask[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(rowmax_ptr + rows, tl.maximum(m, 0.0), mask=rmask)


def _f32(bank: torch.Tensor) -> torch.Tensor:
    return bank.detach().to(torch.float32).contiguous()


def pair_stats(bank: torch.Tensor, bins: int, lo: float, hi: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher for ``etfkern::bank_pair_stats`` (see etfkern.banks.reference.bank_pair_stats)."""
    w = _f32(bank)
    c, d = w.shape
    hist = torch.zeros(bins + 2, dtype=torch.int64, device=w.device)
    block = 16 if _interp() else 64
    nprog = triton.cdiv(c, block)
    if nprog == 0 or d == 0:
        zero = torch.zeros((), dtype=torch.float64, device=w.device)
        if c > 1:  # d == 0: every pair has cos 0
            hist[min(max(int((0.0 - lo) * bins / (hi - lo)) + 1, 0), bins + 1)] = c * (c - 1) // 2
        return zero, zero.clone(), hist
    maxes = torch.zeros(nprog, dtype=torch.float32, device=w.device)
    sums = torch.zeros(nprog, dtype=torch.float64, device=w.device)
    nb = triton.next_power_of_2(bins + 2)
    # bins + 1 goes in as a float: Triton would specialise an int argument equal to 1 into a constexpr
    _pair_stats_kernel[(nprog,)](w, c, d, w.stride(0), float(lo), float(bins / (hi - lo)), float(bins + 1),
                                 bins + 2, maxes, sums, hist, BLOCK=block, BLOCK_K=16 if _interp() else 32,
                                 NB=nb, num_warps=4)
    return maxes.max().to(torch.float64), sums.sum(), hist


def ebv_dir(bank: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher for ``etfkern::ebv_dir``: grid (row blocks, feature blocks of <= 256; each feature block
    recomputes its cosine tiles, so d <= 256 is one pass); float32 inside, TF32 dot products on GPU."""
    w = _f32(bank)
    c, d = w.shape
    out = torch.zeros(c, d, dtype=torch.float32, device=w.device)
    rowmax = torch.zeros(c, dtype=torch.float32, device=w.device)
    if c > 0 and d > 0:
        if _interp():
            bm, bn, bk, bd, warps = 16, 16, 16, min(32, triton.next_power_of_2(d)), 4
        else:
            # W_J tile (BLOCK_N x BLOCK_D fp32) = 32 KB per pipeline stage
            bm, bn, bk, bd, warps = 32, 32, 32, min(256, max(16, triton.next_power_of_2(d))), 8
        grid = (triton.cdiv(c, bm), triton.cdiv(d, bd))
        _dir_kernel[grid](w, out, rowmax, c, d, w.stride(0), out.stride(0), float(beta), BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, BLOCK_D=max(16, bd), TF32=not _interp(), num_warps=warps, num_stages=2)
    return out.to(bank.dtype), rowmax.to(bank.dtype)
