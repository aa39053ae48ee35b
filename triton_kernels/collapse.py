"""Triton kernels for the collapse family (streaming class statistics, pair metrics, NC4) and their launchers.

Kernels:
  _segment_stats_kernel   per (class, feature block): one read of the class's rows (sorted by class: deterministic),
                          shifted sums and squares in float64 -> merged mean and the class's sum of squared
                          deviations increment.
  _scatter_gemm_kernel    per (upper-triangle (d-block, d-block) tile, row split): sum_r (x_r - m_old[y_r])
                          (x_r - m_new[y_r])^T over the split's rows, centring fused into the operand loads (gathered
                          class means), tensor-core dot, float32 partial sums flushed into the split's float64 tile;
                          the splits (enough programs to fill the GPU when d is small) are summed in a fixed order.
  _centre_kernel          (ETFKERN_COLLAPSE_PRODUCT=mm only) per (row block, feature block): A = X - P[Y] in the
                          input's 16-bit type, the single centred operand of csrc/collapse/cpu.cpp, whose
                          A^T A (one cuBLAS GEMM per 4096-row chunk, float32 out) replaces the scatter GEMM.
  _split_centre_kernel    (ETFKERN_COLLAPSE_PRODUCT=split|split_tri) per (row block, feature block): A = X - P[Y]
                          centred in float64 and split into 2 or 3 bfloat16 pieces, stored K-major (transposed),
                          zero-padded to whole K steps; the products of the pieces then run on tensor cores
                          (cuBLAS for "split", _split_gram_kernel for "split_tri").
  _split_gram_kernel      per (upper-triangle (d-block, d-block) tile, row split): the 3 (or 6) bfloat16 products of
                          the pieces that float32-level accuracy needs, float32 flushed into float64 every 1024 rows.
  _pair_kernel            per upper-triangle (class-block, class-block) tile: the Gram tile (tf32x3, or bf16x3 from
                          hi/lo rows), then an epilogue that reduces the CDNV / GNC2 / max-angle terms of the pairs
                          c < c' to 4 numbers and counts the pairs too close for the Gram identities (the op layer
                          recomputes those tiles in float64). No K x K store.
  _ncc_kernel             per row block: running argmax of the classifier logits and running argmin of the distance
                          to the class means over class blocks. No N x C store.
All reductions have a fixed order (no atomics): results are deterministic run to run. Column, row and stride
products are 64-bit (features passed transposed have a column stride of N).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import kernel_variant


def _triangle_tiles(nb: int, device: torch.device) -> torch.Tensor:
    """(T, 2) int32 block pairs (i, j) with i <= j, T = nb (nb + 1) / 2."""
    i, j = torch.triu_indices(nb, nb, device=device)
    return torch.stack([i, j], 1).to(torch.int32).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 operands keep ~fp32 accuracy on tensor cores (3 tf32 products); the interpreter computes exactly.
    return "tf32x3" if dtype == torch.float32 else "ieee"


# ----------------------------------------------------------------------------------------------------------
# update
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_rows(x_ptr, stride_xn, stride_xd, perm_ptr, r0, end, cols, cmask, BR: tl.constexpr):
    """(BR, BD) float64 tile of the class's rows perm[r0 : min(r0 + BR, end)] (zeros outside), and its mask."""
    r = r0 + tl.arange(0, BR)
    rmask = r < end
    rows = tl.load(perm_ptr + r, mask=rmask, other=0).to(tl.int64)
    m = rmask[:, None] & cmask[None, :]
    xv = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=m, other=0.0)
    return xv.to(tl.float64), m


@triton.jit
def _segment_stats_kernel(x_ptr, stride_xn, stride_xd, perm_ptr, seg_ptr, mold_ptr, nold_ptr, mnew_ptr, m2_ptr,
                          D, NBD, BR: tl.constexpr, BD: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1)
    cols = db * BD + tl.arange(0, BD).to(tl.int64)  # 64-bit: cols * stride_xd passes 2^31 for transposed features
    cmask = cols < D
    start = tl.load(seg_ptr + k)
    end = tl.load(seg_ptr + k + 1)
    no = tl.load(nold_ptr + k).to(tl.float64)
    mo = tl.load(mold_ptr + k * D + cols, mask=cmask, other=0.0)
    # One read of the class's rows, shifted by a reference point r: the old mean, or for a class new to the meter
    # its first row in the batch (near the data: no cancellation from a far common offset).
    first = tl.load(perm_ptr + tl.where(start < end, start, 0)).to(tl.int64)  # N > 0: perm[0] exists
    xf = tl.load(x_ptr + first * stride_xn + cols * stride_xd, mask=cmask, other=0.0)
    ref = tl.where(no > 0, mo, xf.to(tl.float64))
    s = tl.zeros((BD,), tl.float64)
    q = tl.zeros((BD,), tl.float64)
    for r0 in range(start, end, BR):
        xv, m = _segment_rows(x_ptr, stride_xn, stride_xd, perm_ptr, r0, end, cols, cmask, BR)
        y = tl.where(m, xv - ref[None, :], 0.0)
        s += tl.sum(y, axis=0)
        q += tl.sum(y * y, axis=0)
    nb = (end - start).to(tl.float64)
    n = tl.maximum(no + nb, 1.0)
    ybar = s / tl.maximum(nb, 1.0)  # batch mean - r
    tl.store(mnew_ptr + k * D + cols, ref + ybar * (nb / n), mask=cmask)
    # sum_rows (x - m_old)(x - m_new) per column = sum y^2 - (n_b^2 / n) ybar^2 (Chan merge, shifted by r)
    tl.store(m2_ptr + k * NBD + db, tl.sum(tl.where(cmask, q - (nb * nb / n) * ybar * ybar, 0.0), axis=0))


@triton.jit
def _centred_tile(x_ptr, stride_xn, stride_xd, lab, r, rmask, mean_ptr, cols, D, CDT: tl.constexpr):
    """(BK, BC) tile of x[r, cols] - mean[lab, cols], subtracted in CDT (float64 for 32/64-bit inputs: exact)."""
    cmask = cols < D
    m = rmask[:, None] & cmask[None, :]
    xv = tl.load(x_ptr + r[:, None] * stride_xn + cols[None, :] * stride_xd, mask=m, other=0.0).to(CDT)
    mv = tl.load(mean_ptr + lab[:, None] * D + cols[None, :], mask=m, other=0.0).to(CDT)
    return xv - mv


@triton.jit
def _scatter_gemm_kernel(x_ptr, stride_xn, stride_xd, inv_ptr, mo_ptr, mn_ptr, out_ptr, tiles_ptr, N, D, ROWS,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FLUSH: tl.constexpr,
                         CDT: tl.constexpr, HALF: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    t = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    bi = tl.load(tiles_ptr + 2 * t)
    bj = tl.load(tiles_ptr + 2 * t + 1)
    ci = bi.to(tl.int64) * BM + tl.arange(0, BM)
    cj = bj.to(tl.int64) * BN + tl.arange(0, BN)
    m_out = (ci[:, None] < D) & (cj[None, :] < D)
    out_ptrs = out_ptr + split * D * D + ci[:, None] * D + cj[None, :]
    row0 = split * ROWS
    row_end = tl.minimum(row0 + ROWS, N)
    # float32 register accumulator over FLUSH * BK rows, then added into this program's own float64 output
    # tile (no other program writes it: no atomics, fixed order).
    for n0 in range(row0, row_end, BK * FLUSH):
        acc = tl.zeros((BM, BN), tl.float32)
        for f in range(FLUSH):
            r = (n0 + f * BK + tl.arange(0, BK)).to(tl.int64)
            rmask = r < row_end
            lab = tl.load(inv_ptr + r, mask=rmask, other=0).to(tl.int64)
            a = _centred_tile(x_ptr, stride_xn, stride_xd, lab, r, rmask, mo_ptr, ci, D, CDT)
            b = _centred_tile(x_ptr, stride_xn, stride_xd, lab, r, rmask, mn_ptr, cj, D, CDT)
            if HALF:  # centred values rounded to the input's 16-bit type: tensor-core operands
                a_op = a.to(tl.float32).to(x_ptr.dtype.element_ty)
                b_op = b.to(tl.float32).to(x_ptr.dtype.element_ty)
                if UPCAST:  # the interpreter's 16-bit dot is wrong; same rounding, float32 product
                    a_op = a_op.to(tl.float32)
                    b_op = b_op.to(tl.float32)
            else:
                a_op = a.to(tl.float32)
                b_op = b.to(tl.float32)
            acc = tl.dot(tl.trans(a_op), b_op, acc, input_precision=PREC)
        prev = tl.load(out_ptrs, mask=m_out, other=0.0)
        tl.store(out_ptrs, prev + acc.to(tl.float64), mask=m_out)


@triton.jit
def _centre_kernel(x_ptr, stride_xn, stride_xd, inv_ptr, p_ptr, out_ptr, N, D, BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)
    rmask = r < N
    m = rmask[:, None] & (c < D)[None, :]
    lab = tl.load(inv_ptr + r, mask=rmask, other=0).to(tl.int64)
    xv = tl.load(x_ptr + r[:, None] * stride_xn + c[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
    pv = tl.load(p_ptr + lab[:, None] * D + c[None, :], mask=m, other=0.0)
    tl.store(out_ptr + r[:, None] * D + c[None, :], (xv - pv).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _round_bf16(v):
    """float32 v rounded to the nearest bfloat16 value (ties to even), returned as float32: by integer arithmetic,
    because a float32 -> bfloat16 cast truncates in the interpreter (and the rounding must not depend on it)."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _split_centre_kernel(x_ptr, stride_xn, stride_xd, inv_ptr, p_ptr, at_ptr, losq_ptr, R0, NR, NPAD, D,
                         PIECES: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Rows R0 + [0, NR) of A = X - P[Y], subtracted in float64 (exact for any input), split into PIECES bfloat16
    pieces a = hi + mid (+ lo), each rounded from the exact float64 residual of the previous ones (two pieces:
    |a - hi - mid| <= 2^-18 |a|; three: 2^-27), stored transposed: at[q, c, r] = piece q (row stride NPAD: the
    pieces are K-major GEMM operands); rows [NR, NPAD) of the pieces are written as zeros (a row count divisible by
    the GEMM's K step keeps its masks uniform, so its loads can be asynchronous copies). losq[row block, c] =
    sum_r mid^2 (float32): with two pieces, the diagonal of the mid^T mid product the 3-product scheme leaves
    out."""
    rb = tl.program_id(0).to(tl.int64)
    r = rb * BR + tl.arange(0, BR)
    c = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)
    rmask = r < NR
    cmask = c < D
    m = rmask[:, None] & cmask[None, :]
    g = R0 + r
    lab = tl.load(inv_ptr + g, mask=rmask, other=0).to(tl.int64)
    xv = tl.load(x_ptr + g[:, None] * stride_xn + c[None, :] * stride_xd, mask=m, other=0.0).to(tl.float64)
    pv = tl.load(p_ptr + lab[:, None] * D + c[None, :], mask=m, other=0.0)
    a = tl.where(m, xv - pv, 0.0)
    m = (r < NPAD)[:, None] & cmask[None, :]  # stores: the padding rows get zeros
    dst = at_ptr + c[None, :] * NPAD + r[:, None]
    plane = D * NPAD
    hi = _round_bf16(a.to(tl.float32))
    a -= hi.to(tl.float64)
    mid = _round_bf16(a.to(tl.float32))
    tl.store(dst, hi.to(tl.bfloat16), mask=m)  # exact: the pieces are bfloat16 values already
    tl.store(dst + plane, mid.to(tl.bfloat16), mask=m)
    if PIECES == 3:
        lo = _round_bf16((a - mid.to(tl.float64)).to(tl.float32))
        tl.store(dst + 2 * plane, lo.to(tl.bfloat16), mask=m)
    tl.store(losq_ptr + rb * D + c, tl.sum(mid * mid, axis=0), mask=cmask)


@triton.jit
def _split_gram_kernel(at_ptr, out_ptr, tiles_ptr, NR, NPAD, D, ROWS, PIECES: tl.constexpr, BM: tl.constexpr,
                       BK: tl.constexpr, FLUSH: tl.constexpr, UPCAST: tl.constexpr):
    """Per upper-triangle (d-block, d-block) tile and row split, over the split's rows of the transposed pieces
    of _split_centre_kernel: hi_i hi_j + hi_i mid_j + mid_i hi_j (two pieces), + hi_i lo_j + lo_i hi_j +
    mid_i mid_j (three): bfloat16 tensor-core dots, float32 accumulator flushed into this program's own float64
    tile every FLUSH * BK rows."""
    t = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    bi = tl.load(tiles_ptr + 2 * t).to(tl.int64)
    bj = tl.load(tiles_ptr + 2 * t + 1).to(tl.int64)
    ci = bi * BM + tl.arange(0, BM)
    cj = bj * BM + tl.arange(0, BM)
    m_out = (ci[:, None] < D) & (cj[None, :] < D)
    out_ptrs = out_ptr + split * D * D + ci[:, None] * D + cj[None, :]
    pi = at_ptr + ci[:, None] * NPAD
    pj = at_ptr + cj[:, None] * NPAD
    plane = D * NPAD
    row0 = split * ROWS
    row_end = tl.minimum(row0 + ROWS, NR)
    for n0 in range(row0, row_end, BK * FLUSH):
        acc = tl.zeros((BM, BM), tl.float32)
        for f in range(FLUSH):
            kk = n0 + f * BK + tl.arange(0, BK)
            km = (kk < row_end)[None, :]
            mi = (ci[:, None] < D) & km
            mj = (cj[:, None] < D) & km
            ah = tl.load(pi + kk[None, :], mask=mi, other=0.0)
            am = tl.load(pi + plane + kk[None, :], mask=mi, other=0.0)
            bh = tl.load(pj + kk[None, :], mask=mj, other=0.0)
            bm = tl.load(pj + plane + kk[None, :], mask=mj, other=0.0)
            if UPCAST:  # the interpreter's 16-bit dot is wrong; the same bfloat16 values, float32 products
                ah, am, bh, bm = ah.to(tl.float32), am.to(tl.float32), bh.to(tl.float32), bm.to(tl.float32)
            acc = tl.dot(ah, tl.trans(bh), acc)
            acc = tl.dot(ah, tl.trans(bm), acc)
            acc = tl.dot(am, tl.trans(bh), acc)
            if PIECES == 3:
                al = tl.load(pi + 2 * plane + kk[None, :], mask=mi, other=0.0)
                bl = tl.load(pj + 2 * plane + kk[None, :], mask=mj, other=0.0)
                if UPCAST:
                    al, bl = al.to(tl.float32), bl.to(tl.float32)
                acc = tl.dot(ah, tl.trans(bl), acc)
                acc = tl.dot(al, tl.trans(bh), acc)
                acc = tl.dot(am, tl.trans(bm), acc)
        prev = tl.load(out_ptrs, mask=m_out, other=0.0)
        tl.store(out_ptrs, prev + acc.to(tl.float64), mask=m_out)


MM_CHUNK_ROWS = 4096  # rows per float32 GEMM of the mm product before its float64 flush


PRODUCTS = ("triton", "mm", "split", "split_tri")
SPLIT_BUFFER_BYTES = 256 << 20  # bfloat16 (hi, lo) pieces of one row chunk of the split products
SPLIT_MM_ROWS = 4096  # rows per float32-accumulated cuBLAS GEMM of the "split" product before its float64 flush


def _product_mode(features: torch.Tensor, product: str | None) -> str:
    """Which scatter product runs: ``product`` (the op layer passes its choice), else env
    ETFKERN_COLLAPSE_PRODUCT, else "triton".
      "triton"     the fused scatter GEMM (centring in the operand loads; float32 features: tf32x3 dots).
      "mm"         16-bit features only: A = X - P[Y] rounded to the input's 16-bit type, cuBLAS A^T A.
      "split"      A centred in float64, split into bfloat16 pieces (two for 16-bit features, three for float32);
                   cuBLAS [hi | mid (| lo)]^T hi gives hi^T hi and the cross products, whose transposes are
                   the mirrored ones (three products for the price of two GEMMs; with three pieces one more
                   GEMM, mid^T mid): float32-level products whatever the offset (see :func:`_split_scatter`).
      "split_tri"  the same pieces, a Triton GEMM over the upper triangle of tiles only (3 or 6 bf16 dots).
    "mm" falls back to "triton" for 32/64-bit features, "split"/"split_tri" for float64 features (they keep
    their float32-or-better products). Every variant but "triton" is unmeasured until a GPU run."""
    mode = kernel_variant("ETFKERN_COLLAPSE_PRODUCT", PRODUCTS, product, "product")
    if mode == "mm" and features.dtype not in (torch.float16, torch.bfloat16):
        return "triton"
    if mode.startswith("split") and features.dtype == torch.float64:
        return "triton"
    return mode


def _single_operand_centre(m_old_eff: torch.Tensor, m_new: torch.Tensor, n_old: torch.Tensor,
                           seg: torch.Tensor) -> torch.Tensor:
    """(K, d) float64 P = m_b - t u (u = m_b - m_old, t = sqrt(n_old / (n_old + n_b))): then
    sum_r (x_r - P[y_r])(x_r - P[y_r])^T = sum_r (x_r - m_old[y_r])(x_r - m_new[y_r])^T (derivation in
    csrc/collapse/cpu.cpp). u comes back from the merged mean: m_new - m_old = u n_b / n."""
    nb = (seg[1:] - seg[:-1]).to(torch.float64)
    no = n_old.to(torch.float64)
    tot = no + nb
    u = (m_new - m_old_eff) * (tot / nb.clamp_min(1.0))[:, None]
    return m_old_eff + (1.0 - (no / tot.clamp_min(1.0)).sqrt())[:, None] * u


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of 16-bit operands with float32 output: a cuBLAS tensor-core GEMM on CUDA; in the interpreter the
    same 16-bit values multiplied in float32."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.to(torch.float32) @ b.to(torch.float32)


def _mm_scatter(features: torch.Tensor, inv: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_r (x_r - P[y_r])(x_r - P[y_r])^T as A^T A with A = X - P[Y] in the input's 16-bit type."""
    n, d = features.shape
    p = p.to(torch.float32).contiguous()
    a = torch.empty(n, d, dtype=features.dtype, device=features.device)
    interp = features.device.type == "cpu"
    br, bd = (16, 16) if interp else (64, 128)
    _centre_kernel[(triton.cdiv(n, br), triton.cdiv(d, bd))](features, features.stride(0), features.stride(1), inv,
                                                              p, a, n, d, BR=br, BD=bd)
    sw = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for r0 in range(0, n, MM_CHUNK_ROWS):
        chunk = a[r0:r0 + MM_CHUNK_ROWS]
        sw += _mm_f32(chunk.T, chunk).to(torch.float64)
    return 0.5 * (sw + sw.T)


def _split_pieces(dtype: torch.dtype) -> int:
    """bfloat16 pieces per centred value: 2 for 16-bit features (~2^-18 per value, far below the input's own
    rounding), 3 for float32 features (~2^-27: float32-level products)."""
    return 2 if dtype in (torch.float16, torch.bfloat16) else 3


def split_gram_config(pieces: int, interp: bool) -> tuple[int, int, int]:
    """(BM, BK, FLUSH) of _split_gram_kernel: 128 x 128 output tiles, K steps of 64 rows (two pieces) or 32 (three:
    six operand tiles per step, three pipeline stages within an H100/H200 block's shared memory), a float64 flush
    every 1024 rows."""
    if interp:
        return 16, 16, 2
    bk = 64 if pieces == 2 else 32
    return 128, bk, 1024 // bk


def _split_scatter(features: torch.Tensor, inv: torch.Tensor, p: torch.Tensor, mode: str,
                   splits: int | None) -> torch.Tensor:
    """sum_r a_r a_r^T, A = X - P[Y] (float64 centring), from bfloat16 pieces (:func:`_split_pieces`) on tensor
    cores: cuBLAS for "split", the Triton triangle kernel for "split_tri". Two pieces a = hi + mid: hi^T hi +
    mid^T hi + hi^T mid plus the diagonal of mid^T mid (its off-diagonal entries are sums of independent rounding
    residuals); three pieces add lo^T hi + hi^T lo + mid^T mid. Float32 products of each row block are flushed
    into float64."""
    n, d = features.shape
    dev = features.device
    interp = dev.type == "cpu"
    pieces = _split_pieces(features.dtype)
    p = p.contiguous()
    acc = torch.zeros(d, d, dtype=torch.float64, device=dev)  # "split_tri": the whole product (upper tiles)
    # "split": the stacked GEMM outputs, one float64 add per GEMM (the blocks are combined once, at the end)
    stacked = torch.zeros(pieces * d, d, dtype=torch.float64, device=dev) if mode == "split" else None
    diag = torch.zeros(d, dtype=torch.float64, device=dev)
    chunk = max(SPLIT_MM_ROWS, (SPLIT_BUFFER_BYTES // (2 * pieces * d)) // SPLIT_MM_ROWS * SPLIT_MM_ROWS)
    br, bd = (16, 16) if interp else (64, 64)
    bm, bk, flush = split_gram_config(pieces, interp)
    tiles = _triangle_tiles(triton.cdiv(d, bm), dev) if mode == "split_tri" else None
    for r0 in range(0, n, chunk):
        nr = min(chunk, n - r0)
        npad = triton.cdiv(nr, 64) * 64  # K-major pieces padded with zero rows to whole K steps
        at = torch.empty(pieces, d, npad, dtype=torch.bfloat16, device=dev)
        losq = torch.empty(triton.cdiv(npad, br), d, dtype=torch.float32, device=dev)
        _split_centre_kernel[(triton.cdiv(npad, br), triton.cdiv(d, bd))](
            features, features.stride(0), features.stride(1), inv, p, at, losq, r0, nr, npad, d, PIECES=pieces,
            BR=br, BD=bd)
        if pieces == 2:
            diag += losq.sum(0, dtype=torch.float64)
        if mode == "split":
            for s0 in range(0, nr, SPLIT_MM_ROWS):
                piece = at[:, :, s0:min(nr, s0 + SPLIT_MM_ROWS)]
                stacked += _mm_f32(piece.reshape(pieces * d, -1), piece[0].T)  # [hi^T hi; mid^T hi (; lo^T hi)]
                if pieces == 3:
                    acc += _mm_f32(piece[1], piece[1].T)  # mid^T mid
            continue
        step = bk * flush
        nsplit = splits if splits is not None else _row_splits(tiles.shape[0], nr, step, dev)
        if nsplit < 1:
            raise ValueError(f"splits must be >= 1, got {nsplit}")
        rows = triton.cdiv(triton.cdiv(npad, nsplit), step) * step
        nsplit = triton.cdiv(npad, rows)
        part = acc if nsplit == 1 else torch.zeros(nsplit, d, d, dtype=torch.float64, device=dev)
        _split_gram_kernel[(tiles.shape[0], nsplit)](at, part, tiles, npad, npad, d, rows, PIECES=pieces, BM=bm,
                                                     BK=bk, FLUSH=flush, UPCAST=interp,
                                                     num_warps=4 if interp else 8)
        if nsplit > 1:
            acc += part.sum(0)
    if mode == "split":
        cross = stacked[d:].view(pieces - 1, d, d).sum(0)  # mid^T hi (+ lo^T hi)
        sw = acc + stacked[:d] + cross + cross.T
        sw = 0.5 * (sw + sw.T)
    else:  # upper tiles only: mirror
        sw = torch.triu(acc) + torch.triu(acc, 1).T
    sw.diagonal().add_(diag)
    return sw


def _row_splits(tiles: int, n: int, rows_per_step: int, device: torch.device) -> int:
    """How many row ranges the scatter GEMM splits the batch into: enough (tile, split) programs for two per SM
    (a small d leaves the triangle of output tiles far below the SM count: d=768 gives 21 tiles for 132 SMs),
    never a range shorter than one flush step."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(n, rows_per_step)))


def collapse_update(features: torch.Tensor, inv: torch.Tensor, m_old: torch.Tensor, n_old: torch.Tensor, *,
                    splits: int | None = None, product: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher of ``etfkern::collapse_update`` (same contract as the reference). ``splits`` overrides the
    number of row ranges of the scatter GEMM (default: :func:`_row_splits`); every choice gives the same result
    up to the float64 summation order of the split partials. ``product``: the scatter product variant (see
    :func:`_product_mode`; default "triton")."""
    n, d = features.shape
    k = m_old.shape[0]
    dev = features.device
    m_old = m_old.to(torch.float64).contiguous()
    n_old = n_old.to(torch.int64).contiguous()
    m_new = torch.empty(k, d, dtype=torch.float64, device=dev)
    sw = torch.zeros(d, d, dtype=torch.float64, device=dev)
    if n == 0 or k == 0 or d == 0:
        return m_old.clone(), torch.zeros(k, dtype=torch.float64, device=dev), sw
    inv = inv.to(torch.int64).contiguous()
    perm = torch.sort(inv, stable=True).indices
    seg = torch.zeros(k + 1, dtype=torch.int64, device=dev)
    seg[1:] = torch.cumsum(torch.bincount(inv, minlength=k), 0)
    interp = dev.type == "cpu"
    bd = 16 if interp else 128
    nbd = triton.cdiv(d, bd)
    m2p = torch.empty(k, nbd, dtype=torch.float64, device=dev)
    _segment_stats_kernel[(k, nbd)](features, features.stride(0), features.stride(1), perm, seg, m_old, n_old,
                                    m_new, m2p, d, nbd, BR=16 if interp else 32, BD=bd)
    m_old_eff = torch.where((n_old > 0)[:, None], m_old, m_new)
    mode = _product_mode(features, product)
    if mode == "mm":
        return m_new, m2p.sum(1), _mm_scatter(features, inv, _single_operand_centre(m_old_eff, m_new, n_old, seg))
    if mode in ("split", "split_tri"):
        p = _single_operand_centre(m_old_eff, m_new, n_old, seg)
        return m_new, m2p.sum(1), _split_scatter(features, inv, p, mode, splits)
    half = features.dtype in (torch.float16, torch.bfloat16)
    if half:  # the centred operand is rounded to 16 bits anyway: gather float32 means (half the traffic)
        mo_g, mn_g = m_old_eff.to(torch.float32), m_new.to(torch.float32)
    else:
        mo_g, mn_g = m_old_eff, m_new
    bm, bk, flush = (16, 16, 2) if interp else (128, 32, 32)
    tiles = _triangle_tiles(triton.cdiv(d, bm), dev)
    step = bk * flush
    nsplit = splits if splits is not None else _row_splits(tiles.shape[0], n, step, dev)
    if nsplit < 1:
        raise ValueError(f"splits must be >= 1, got {nsplit}")
    rows = triton.cdiv(triton.cdiv(n, nsplit), step) * step  # whole flush steps per split
    nsplit = triton.cdiv(n, rows)
    part = sw if nsplit == 1 else torch.zeros(nsplit, d, d, dtype=torch.float64, device=dev)
    _scatter_gemm_kernel[(tiles.shape[0], nsplit)](
        features, features.stride(0), features.stride(1), inv, mo_g, mn_g, part, tiles, n, d, rows,
        BM=bm, BN=bm, BK=bk, FLUSH=flush, CDT=tl.float32 if half else tl.float64, HALF=half, UPCAST=interp,
        PREC=_dot_precision(features.dtype) if not half else "ieee", num_warps=4 if interp else 8)
    if nsplit > 1:
        sw = part.sum(0)  # fixed order: deterministic
    # Tiles below the block diagonal were skipped: the exact sum is symmetric, mirror the upper triangle.
    sw = torch.triu(sw) + torch.triu(sw, 1).T
    return m_new, m2p.sum(1), sw


# ----------------------------------------------------------------------------------------------------------
# pair statistics
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _pair_kernel(mt_ptr, nsq_ptr, s_ptr, tiles_ptr, part_ptr, K, D, inv_km1, shift, RECHECK,
                 PIECES: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Per upper-triangle (class-block, class-block) tile: the Gram tile of the centred means (PIECES=1: float32
    rows, dots at PREC; PIECES=2: bfloat16 planes hi, lo at mt_ptr and mt_ptr + K * D, hi hi + hi lo + lo hi),
    then the CDNV / GNC2 / max-angle terms of the pairs c < c' summed to 4 numbers, and a 5th: how many pairs the
    low-precision Gram cannot settle (|mu_c - mu_c'|^2 < RECHECK (|mu_c|^2 + |mu_c'|^2), cos > 1 - RECHECK, or a
    zero mean). The caller recomputes every tile with such a pair in float64. No K x K store."""
    t = tl.program_id(0)
    bi = tl.load(tiles_ptr + 2 * t).to(tl.int64)
    bj = tl.load(tiles_ptr + 2 * t + 1).to(tl.int64)
    ri = bi * BM + tl.arange(0, BM)
    rj = bj * BM + tl.arange(0, BM)
    acc = tl.zeros((BM, BM), tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        mi = (ri[:, None] < K) & kmask[None, :]
        mj = (rj[:, None] < K) & kmask[None, :]
        a = tl.load(mt_ptr + ri[:, None] * D + kk[None, :], mask=mi, other=0.0)
        b = tl.load(mt_ptr + rj[:, None] * D + kk[None, :], mask=mj, other=0.0)
        if PIECES == 1:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
        else:
            al = tl.load(mt_ptr + K * D + ri[:, None] * D + kk[None, :], mask=mi, other=0.0)
            bl = tl.load(mt_ptr + K * D + rj[:, None] * D + kk[None, :], mask=mj, other=0.0)
            if UPCAST:  # the interpreter's 16-bit dot is wrong; the same bfloat16 values, float32 products
                a, b, al, bl = a.to(tl.float32), b.to(tl.float32), al.to(tl.float32), bl.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc)
            acc = tl.dot(a, tl.trans(bl), acc)
            acc = tl.dot(al, tl.trans(b), acc)
    ni = tl.load(nsq_ptr + ri, mask=ri < K, other=1.0)
    nj = tl.load(nsq_ptr + rj, mask=rj < K, other=1.0)
    si = tl.load(s_ptr + ri, mask=ri < K, other=0.0)
    sj = tl.load(s_ptr + rj, mask=rj < K, other=0.0)
    valid = (ri[:, None] < rj[None, :]) & (rj[None, :] < K)
    # |mu_c - mu_c'|^2 = |mu_c|^2 + |mu_c'|^2 - 2 mu_c.mu_c' ;  |u_c - u_c'|^2 = 2 - 2 cos
    nsum = ni[:, None] + nj[None, :]
    dist2 = nsum - 2.0 * acc
    nprod = ni[:, None] * nj[None, :]
    cos = acc / tl.sqrt(tl.where(nprod > 0, nprod, 1.0))
    near = (dist2 < RECHECK * nsum) | (cos > 1.0 - RECHECK) | (nprod == 0.0)
    ok = valid & ~near
    # invalid and near slots get harmless operands, then contribute 0
    cd = tl.where(ok, (si[:, None] + sj[None, :]) / tl.where(ok, 2.0 * dist2, 1.0), 0.0)
    g = tl.where(ok, -0.5 * tl.log(tl.where(ok, 2.0 - 2.0 * cos, 1.0)) - shift, 0.0)
    ma = tl.where(ok, tl.abs(cos + inv_km1), 0.0)
    tl.store(part_ptr + 5 * t + 0, tl.sum(tl.sum(cd, axis=1), axis=0))
    tl.store(part_ptr + 5 * t + 1, tl.sum(tl.sum(g, axis=1), axis=0))
    tl.store(part_ptr + 5 * t + 2, tl.sum(tl.sum(g * g, axis=1), axis=0))
    tl.store(part_ptr + 5 * t + 3, tl.sum(tl.sum(ma, axis=1), axis=0))
    tl.store(part_ptr + 5 * t + 4, tl.sum(tl.sum((valid & near).to(tl.float32), axis=1), axis=0))


PAIR_PRECISIONS = ("tf32x3", "bf16x3")
PAIR_RECHECK = 0.125  # pairs this close (relative) are recomputed in float64 by the caller
PAIR_BLOCK = 128  # class rows per pair tile on the GPU (16 in the interpreter)


def pair_block(device: torch.device) -> int:
    """Class rows per side of a pair tile: the block size the tiles of :func:`collapse_pair_partials` use."""
    return 16 if device.type == "cpu" else PAIR_BLOCK


def collapse_pair_partials(mt: torch.Tensor, s: torch.Tensor, shift: float, *, precision: str = "tf32x3"
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw partials of ``etfkern::collapse_pair_stats``: (tiles (T, 2) int32 block pairs bi <= bj of
    :func:`pair_block` rows, part (T, 5) float32: per tile the sums of the CDNV, GNC2 (shifted), squared GNC2 and
    max-angle terms over its settled pairs, and the number of pairs it left unsettled). The op layer recomputes
    every tile with an unsettled pair in float64 and sums the rest in float64, in a fixed order.

    precision: "tf32x3" (float32 rows, three tf32 products) or "bf16x3" (rows split into bfloat16 hi + lo, three
    bf16 products: twice the tensor-core rate, ~2^-17 relative per dot instead of ~2^-21)."""
    if precision not in PAIR_PRECISIONS:
        raise ValueError(f"precision must be one of {PAIR_PRECISIONS}, got {precision!r}")
    k, d = mt.shape
    dev = mt.device
    mt64 = mt.to(torch.float64)
    nsq = (mt64 * mt64).sum(1).to(torch.float32).contiguous()
    s32 = s.to(torch.float32).contiguous()
    interp = dev.type == "cpu"
    bm = pair_block(dev)
    tiles = _triangle_tiles(triton.cdiv(k, bm), dev)
    part = torch.empty(tiles.shape[0], 5, dtype=torch.float32, device=dev)
    if precision == "tf32x3":
        rows, pieces, bk = mt64.to(torch.float32).contiguous(), 1, (16 if interp else 32)
    else:
        hi = mt64.to(torch.bfloat16)
        rows = torch.stack([hi, (mt64 - hi.to(torch.float64)).to(torch.bfloat16)]).contiguous()
        pieces, bk = 2, (16 if interp else 64)
    _pair_kernel[(tiles.shape[0],)](rows, nsq, s32, tiles, part, k, d, 1.0 / max(k - 1, 1), float(shift), PAIR_RECHECK,
                                    PIECES=pieces, BM=bm, BK=bk, PREC="ieee" if interp else "tf32x3",
                                    UPCAST=interp, num_warps=4 if interp else 8)
    return tiles, part


# ----------------------------------------------------------------------------------------------------------
# NC4: classifier argmax and nearest-class-mean argmin, fused
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _block_scores(x_ptr, stride_xn, stride_xd, rows, w_ptr, stride_wc, stride_wd, cols, NC, D,
                  BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    acc = tl.zeros((BM, BC), tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK).to(tl.int64)  # 64-bit: kk * stride passes 2^31 for transposed operands
        kmask = kk < D
        a = tl.load(x_ptr + rows[:, None] * stride_xn + kk[None, :] * stride_xd, mask=kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_wc + kk[None, :] * stride_wd,
                    mask=(cols[:, None] < NC) & kmask[None, :], other=0.0)
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision=PREC)
    return acc


@triton.jit
def _ncc_kernel(x_ptr, stride_xn, stride_xd, w_ptr, stride_wc, stride_wd, b_ptr, mu_ptr, musq_ptr,
                cls_ptr, ncc_ptr, N, C, K, D, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BM + tl.arange(0, BM)).to(tl.int64)
    rows_c = tl.minimum(rows, N - 1)  # clamp: padded rows recompute the last row, their result is not stored
    best = tl.full((BM,), float("-inf"), tl.float32)
    besti = tl.zeros((BM,), tl.int64)
    for c0 in range(0, C, BC):
        cols = (c0 + tl.arange(0, BC)).to(tl.int64)
        z = _block_scores(x_ptr, stride_xn, stride_xd, rows_c, w_ptr, stride_wc, stride_wd, cols, C, D,
                          BM, BC, BK, PREC)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        z = tl.where(cols[None, :] < C, z, float("-inf"))
        bmax = tl.max(z, axis=1)
        barg = tl.argmax(z, axis=1).to(tl.int64) + c0
        upd = bmax > best  # strict: the first maximum wins, as in torch.argmax
        best = tl.where(upd, bmax, best)
        besti = tl.where(upd, barg, besti)
    tl.store(cls_ptr + rows, besti, mask=rows < N)
    best = tl.full((BM,), float("inf"), tl.float32)
    besti = tl.zeros((BM,), tl.int64)
    for c0 in range(0, K, BC):
        cols = (c0 + tl.arange(0, BC)).to(tl.int64)
        dots = _block_scores(x_ptr, stride_xn, stride_xd, rows_c, mu_ptr, D, 1, cols, K, D, BM, BC, BK, PREC)
        # |h - mu|^2 - |h|^2 = |mu|^2 - 2 h.mu: the row term does not change the argmin
        z = tl.load(musq_ptr + cols, mask=cols < K, other=0.0)[None, :] - 2.0 * dots
        z = tl.where(cols[None, :] < K, z, float("inf"))
        bmin = tl.min(z, axis=1)
        barg = tl.argmin(z, axis=1).to(tl.int64) + c0
        upd = bmin < best
        best = tl.where(upd, bmin, best)
        besti = tl.where(upd, barg, besti)
    tl.store(ncc_ptr + rows, besti, mask=rows < N)


def collapse_ncc(features: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of ``etfkern::collapse_ncc``: two (N,) int64 index vectors, no N x C buffer."""
    n, d = features.shape
    c = weights.shape[0]
    k = means.shape[0]
    dev = features.device
    cls = torch.empty(n, dtype=torch.int64, device=dev)
    ncc = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return cls, ncc
    # argmin_k |h - mu_k|^2 = argmin_k |m_k|^2 + 2 o.m_k - 2 h.m_k with m_k = mu_k - o, o the mean of the means
    # (float64 here): the float32 kernel then sees terms of size |o||m_k| instead of |mu_k|^2, which for features
    # far from the origin (|o| >> |m_k|) swamped the gaps between classes (at offset 1e4 most argmins were wrong)
    mu64 = means.to(torch.float64)
    centre = mu64.mean(0)
    m64 = mu64 - centre
    musq = ((m64 * m64).sum(1) + 2.0 * (m64 @ centre)).to(torch.float32).contiguous()
    mu32 = m64.to(torch.float32).contiguous()
    interp = dev.type == "cpu"
    b = bias.contiguous() if bias is not None else musq  # dummy pointer when there is no bias
    _ncc_kernel[(triton.cdiv(n, 16 if interp else 64),)](
        features, features.stride(0), features.stride(1), weights, weights.stride(0), weights.stride(1), b,
        mu32, musq, cls, ncc, n, c, k, d, HAS_BIAS=bias is not None,
        BM=16 if interp else 64, BC=16 if interp else 128, BK=16 if interp else 32,
        PREC="ieee" if interp else "tf32x3", num_warps=4)
    return cls, ncc
