"""Triton kernels for the bank ops (tiled: no C x C matrix is ever stored) and their launchers.

* ``pair_stats`` (``etfkern::bank_pair_stats``), three kernel layouts:
  - ``"rows"``: one program per row block I walks the column blocks J >= I (the layout measured on the H200,
    float32 FFMA dot products);
  - ``"tiles-ieee"`` / ``"tiles-tf32x3"``: one program per upper-triangle tile (I <= J), so the work is spread
    evenly; ``tf32x3`` runs the dot products on tensor cores as three TF32 products of split operands
    (hi*hi + hi*lo + lo*hi: about float32 accuracy), ``ieee`` as float32 FFMA.
  - ``"mm-ieee"`` / ``"mm-tf32x3"``: chunks of rows r0:r1 against the columns r0:C (the upper triangle only), each
    product a cuBLAS GEMM (torch.matmul: float32, or three TF32 GEMMs of ``split_tf32`` operands) into one reused
    float32 buffer of <= ETFKERN_BANK_CHUNK_MIB (default 1024 MiB; a bank that fits is ONE chunk), then ONE
    Triton epilogue per chunk with the same max / float64 sum / histogram arithmetic (``_slot_of``); each
    epilogue program keeps its histogram in registers over its columns and adds it once.
  Per program (all layouts): max and a float64 sum (reduced on the host in a fixed order), and a per-tile
  ``tl.histogram`` added to a global int64 histogram with integer atomics (integer addition: the result does not depend on the
  order). The histogram takes no ``mask``: the compiler marks both reshapes feeding ``tt.histogram`` as
  reorderable and may reorder the values and the mask differently (it did on the H200: counts moved between
  bins); pairs that do not count go to a trash slot past the last real one instead.
* ``pair_select`` (``etfkern::bank_pair_select``): the tiles layout appending the |cos| that the histogram puts
  in one slot to a buffer (one integer atomic per tile reserves its slots; the launcher sorts, so the slot
  order does not matter): bank_stats' exact p99.9 from the pairs of one histogram bin.
* ``ebv_dir`` (one EBV optimiser step): per (row block, feature block), online row max of |cos| and
  accumulation of P @ W_J with P = e^{beta (|cos| - running max)} sign(cos), rescaled when the max grows
  (flash-attention style); no atomics. Variants: ``"ieee"`` (float32 FFMA, the default: the op returns
  float32-accurate values), ``"tf32"`` (TF32 tensor cores, ~1e-3 relative, 32-row blocks: the layout that ran
  on the H200, where it missed the op's float32 tolerances), ``"tf32-wide"`` (the same in 64-row blocks, one
  Hopper warpgroup MMA) and ``"tf32x3"`` (64-row blocks, three TF32 products of split operands: about float32).
  ``"mm"`` / ``"mm-ieee"``: per chunk of rows R (the (R, C) float32 buffer <= ETFKERN_BANK_CHUNK_MIB), G = W_R W^T
  by torch.matmul (TF32 / float32, whatever torch's global flag says, restored after), one Triton epilogue
  turning G into P in place (row max, then e^{beta (|G| - max)} sign(G), 0 on the diagonal), out_R = P W.
  ``pair_select`` on a "mm" kernel appends from the chunks of that kernel (the same GEMMs: the same values).
Inputs are computed in float32 (float64 banks are cast); outputs are cast back to the bank's dtype.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
import triton
import triton.language as tl

from ._common import triton_interpret

PAIR_STATS_KERNELS = ("rows", "tiles-ieee", "tiles-tf32x3", "mm-ieee", "mm-tf32x3")
DIR_VARIANTS = ("ieee", "tf32x3", "tf32", "tf32-wide", "mm", "mm-ieee")
CHUNK_ENV = "ETFKERN_BANK_CHUNK_MIB"  # the "mm" layouts' (rows x columns) float32 product buffer, in MiB
DEFAULT_CHUNK_MIB = 1024.0


def histogram_slots(bins: int) -> int:
    """Power-of-two ``tl.histogram`` size for ``bins`` bins: [< lo], bins, [>= hi] and one trash slot."""
    return triton.next_power_of_2(bins + 3)


@triton.jit
def _dot_tile(w_ptr, rows, cols, rmask, cmask, D, stride_w,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 tile of W[rows] W[cols]^T (masked rows/cols give 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    roff = rows.to(tl.int64)[:, None] * stride_w
    coff = cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(w_ptr + roff + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + coff + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _triangle_tile(w_ptr, tile_i_ptr, tile_j_ptr, t, C, D, stride_w,
                   BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(|cos| tile, which entries are pairs i < j) of upper-triangle tile t: row block tile_i[t] <= tile_j[t]."""
    rows = tl.load(tile_i_ptr + t) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.load(tile_j_ptr + t) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < C
    cmask = cols < C
    v = tl.abs(_dot_tile(w_ptr, rows, cols, rmask, cmask, D, stride_w, BLOCK, BLOCK, BLOCK_K, PRECISION))
    return v, (rows[:, None] < cols[None, :]) & rmask[:, None] & cmask[None, :]


@triton.jit
def _slot_of(v, lo, scale, top):
    """Histogram slot (a float) of v: 0 below lo, 1 + floor((v - lo) * scale) inside, ``top`` (= bins + 1) at or
    above hi. The one bin arithmetic of every kernel here (the reference's, in float32)."""
    return tl.minimum(tl.maximum(tl.floor((v - lo) * scale) + 1.0, 0.0), top)


@triton.jit
def _histogram_tile(v, valid, lo, scale, top, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """(NB,) int32 counts of the valid entries of the (BLOCK_M, BLOCK_N) tile v per slot (``_slot_of``).
    Invalid entries go to slot top + 1 (< NB), which is never stored: no mask on tl.histogram (module doc)."""
    k = tl.where(valid, _slot_of(v, lo, scale, top), top + 1.0).to(tl.int32)
    return tl.histogram(tl.reshape(k, (BLOCK_M * BLOCK_N,)), NB)


@triton.jit
def _histogram_store(hist_ptr, h, nslots, NB: tl.constexpr):
    """hist[slot] += h[slot] for the nonzero slots below nslots (integer atomics: order-independent)."""
    idx = tl.arange(0, NB)
    tl.atomic_add(hist_ptr + idx, h.to(tl.int64), mask=(h > 0) & (idx < nslots))


@triton.jit
def _histogram_add(hist_ptr, v, valid, lo, scale, top, nslots,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """hist[slot] += count of valid v per slot (``_histogram_tile``)."""
    _histogram_store(hist_ptr, _histogram_tile(v, valid, lo, scale, top, BLOCK_M, BLOCK_N, NB), nslots, NB)


@triton.jit
def _pair_stats_kernel(w_ptr, C, D, stride_w, lo, scale, top, nslots, max_ptr, sum_ptr, hist_ptr,
                       BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, NB: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < C
    row_max = tl.zeros((BLOCK,), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK,), dtype=tl.float64)
    nblocks = tl.cdiv(C, BLOCK)
    for jb in range(pid, nblocks):
        cols = jb * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < C
        v = tl.abs(_dot_tile(w_ptr, rows, cols, rmask, cmask, D, stride_w, BLOCK, BLOCK, BLOCK_K, PRECISION))
        valid = (rows[:, None] < cols[None, :]) & rmask[:, None] & cmask[None, :]
        vm = tl.where(valid, v, 0.0)
        row_max = tl.maximum(row_max, tl.max(vm, axis=1))
        row_sum += tl.sum(vm, axis=1).to(tl.float64)
        _histogram_add(hist_ptr, v, valid, lo, scale, top, nslots, BLOCK, BLOCK, NB)
    tl.store(max_ptr + pid, tl.max(row_max, axis=0))
    tl.store(sum_ptr + pid, tl.sum(row_sum, axis=0))


@triton.jit
def _pair_tiles_kernel(w_ptr, tile_i_ptr, tile_j_ptr, C, D, stride_w, lo, scale, top, nslots, max_ptr, sum_ptr,
                       hist_ptr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, NB: tl.constexpr,
                       PRECISION: tl.constexpr):
    """One upper-triangle tile (row block tile_i[t] <= column block tile_j[t]) per program t."""
    t = tl.program_id(0)
    v, valid = _triangle_tile(w_ptr, tile_i_ptr, tile_j_ptr, t, C, D, stride_w, BLOCK, BLOCK_K, PRECISION)
    vm = tl.where(valid, v, 0.0)
    tl.store(max_ptr + t, tl.max(tl.max(vm, axis=1), axis=0))
    tl.store(sum_ptr + t, tl.sum(tl.sum(vm, axis=1).to(tl.float64), axis=0))
    _histogram_add(hist_ptr, v, valid, lo, scale, top, nslots, BLOCK, BLOCK, NB)


@triton.jit
def _append_kept(v, keep, count_ptr, out_ptr, capacity):
    """Appends the entries of the 2-D tile v where ``keep`` to out_ptr at slots reserved with one integer atomic
    (none when nothing is kept); slots >= capacity are not written. No reshape: per-row counts and in-row prefix
    sums give each value its slot (the compiler may reorder a reshaped tile)."""
    ki = keep.to(tl.int32)
    row_n = tl.sum(ki, axis=1)
    n = tl.sum(row_n, axis=0)
    if n > 0:
        base = tl.atomic_add(count_ptr, n.to(tl.int64))
        row_start = tl.cumsum(row_n, axis=0) - row_n
        slot = base + row_start[:, None].to(tl.int64) + (tl.cumsum(ki, axis=1) - ki).to(tl.int64)
        tl.store(out_ptr + slot, v, mask=keep & (slot < capacity))


@triton.jit
def _pair_select_kernel(w_ptr, tile_i_ptr, tile_j_ptr, C, D, stride_w, lo, scale, top, slot, capacity, count_ptr,
                        out_ptr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """One upper-triangle tile per program: appends the |cos| of its pairs that ``_histogram_add`` (same
    arithmetic) puts in slot ``slot`` (a float, like ``top``) to out_ptr (float32) at
    slots reserved with one integer atomic per tile (``_append_kept``); slots >= capacity are not written. The
    slots depend on the order the tiles run in, the set of values does not (the launcher sorts it)."""
    t = tl.program_id(0)
    v, valid = _triangle_tile(w_ptr, tile_i_ptr, tile_j_ptr, t, C, D, stride_w, BLOCK, BLOCK_K, PRECISION)
    _append_kept(v, valid & (_slot_of(v, lo, scale, top) == slot), count_ptr, out_ptr, capacity)


@triton.jit
def _dir_kernel(w_ptr, out_ptr, rowmax_ptr, C, D, stride_w, stride_o, beta,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
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
        cos = _dot_tile(w_ptr, rows, cols, rmask, cmask, D, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        valid = (rows[:, None] != cols[None, :]) & rmask[:, None] & cmask[None, :]
        a = tl.where(valid, tl.abs(cos), float("-inf"))
        m_new = tl.maximum(m, tl.max(a, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp(beta * (m - m_safe)))  # no column yet: acc is 0
        sgn = tl.where(cos > 0, 1.0, tl.where(cos < 0, -1.0, 0.0))
        p = tl.where(valid, tl.exp(beta * (a - m_safe[:, None])) * sgn, 0.0)
        wj = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + dcols[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(p, wj, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + dcols[None, :], acc,
             mask=rmask[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(rowmax_ptr + rows, tl.maximum(m, 0.0), mask=rmask)


# ----------------------------------------------------------------------------------------------------------
# "mm" layouts: a torch (cuBLAS) GEMM per chunk of rows into one reused float32 buffer, then ONE Triton epilogue
# over the chunk (the products never go through Triton dots)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_tile(g_ptr, rows, cols, rmask, cmask, stride_g):
    """(|g| tile, which entries are pairs i < j) of a chunk buffer g: entry (i, j) is <w_{r0+i}, w_{r0+j}>."""
    v = tl.abs(tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :],
                       mask=rmask[:, None] & cmask[None, :], other=0.0))
    return v, (rows[:, None] < cols[None, :]) & rmask[:, None] & cmask[None, :]


@triton.jit(do_not_specialize=["R", "CW", "first_out"])  # one compile for every chunk (see chunk_plan)
def _pair_chunk_kernel(g_ptr, R, CW, stride_g, span, lo, scale, top, nslots, max_ptr, sum_ptr, hist_ptr, first_out,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """Epilogue of one upper-triangle chunk (rows r0:r0+R against columns r0:r0+CW, in g (R, CW) float32).
    Program (m, n): rows m*BLOCK_M.., columns n*span..(n+1)*span (span a multiple of BLOCK_N), only the column
    tiles that hold a pair i < j; its max, float64 sum (float32 per tile row, as the other layouts) and
    histogram (in registers, one atomic add per slot at the end) over those pairs. Writes max and sum at
    first_out + m * (programs along n) + n."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    c_end = tl.minimum(pid_n * span + span, CW)
    c_begin = tl.maximum(pid_n * span, (pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N)  # tiles left of it: j <= i
    row_max = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float64)
    h = tl.zeros((NB,), dtype=tl.int32)
    for j0 in range(c_begin, c_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        v, valid = _chunk_tile(g_ptr, rows, cols, rmask, cols < c_end, stride_g)
        vm = tl.where(valid, v, 0.0)
        row_max = tl.maximum(row_max, tl.max(vm, axis=1))
        row_sum += tl.sum(vm, axis=1).to(tl.float64)
        h += _histogram_tile(v, valid, lo, scale, top, BLOCK_M, BLOCK_N, NB)
    out = first_out + pid_m * tl.num_programs(1) + pid_n
    tl.store(max_ptr + out, tl.max(row_max, axis=0))
    tl.store(sum_ptr + out, tl.sum(row_sum, axis=0))
    _histogram_store(hist_ptr, h, nslots, NB)


@triton.jit(do_not_specialize=["R", "CW"])
def _pair_select_chunk_kernel(g_ptr, R, CW, stride_g, span, lo, scale, top, slot, capacity, count_ptr, out_ptr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_pair_select_kernel`` over one chunk of the "mm" layout (the programs of ``_pair_chunk_kernel``)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    c_end = tl.minimum(pid_n * span + span, CW)
    c_begin = tl.maximum(pid_n * span, (pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N)
    for j0 in range(c_begin, c_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        v, valid = _chunk_tile(g_ptr, rows, cols, rmask, cols < c_end, stride_g)
        _append_kept(v, valid & (_slot_of(v, lo, scale, top) == slot), count_ptr, out_ptr, capacity)


@triton.jit(do_not_specialize=["row0"])  # one compile for every chunk
def _dir_chunk_kernel(g_ptr, rowmax_ptr, C, stride_g, row0, beta, BLOCK_N: tl.constexpr):
    """Epilogue of one chunk of ``ebv_dir`` "mm", in place: program i owns row i of g (R, C) float32, the cosines
    of bank row r = row0 + i with every row j. rowmax_r = max_{j != r} |g_ij| (0 without such j), then
    g_ij <- e^{beta (|g_ij| - rowmax_r)} sign(g_ij), and g_ir <- 0 (every exponent <= 0)."""
    i = tl.program_id(0)
    r = row0 + i
    row = g_ptr + i.to(tl.int64) * stride_g
    m = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, C, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        a = tl.abs(tl.load(row + cols, mask=cols < C, other=0.0))
        m = tl.maximum(m, tl.where(cols != r, a, 0.0))
    row_max = tl.max(m, axis=0)
    tl.store(rowmax_ptr + r, row_max)
    for j0 in range(0, C, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < C
        g = tl.load(row + cols, mask=cmask, other=0.0)
        sgn = tl.where(cols == r, 0.0, tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)))
        p = tl.exp(beta * (tl.where(cols == r, row_max, tl.abs(g)) - row_max)) * sgn  # |g_rr| may exceed rowmax
        tl.store(row + cols, p, mask=cmask)


def _f32(bank: torch.Tensor) -> torch.Tensor:
    return bank.detach().to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------------------
# "mm" plumbing: chunk plan, TF32 split, the matmul precision switch
# ----------------------------------------------------------------------------------------------------------
def chunk_mib() -> float:
    """The "mm" layouts' chunk budget in MiB: env ``ETFKERN_BANK_CHUNK_MIB`` (a number > 0; tests force tiny
    chunks) or DEFAULT_CHUNK_MIB. ValueError naming the variable otherwise."""
    raw = os.environ.get(CHUNK_ENV, "").strip()
    if not raw:
        return DEFAULT_CHUNK_MIB
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    if not (math.isfinite(mib) and mib > 0):
        raise ValueError(f"{CHUNK_ENV} must be a number of MiB > 0, got {raw!r}")
    return mib


def chunk_plan(c: int, triangle: bool, budget_mib: float | None = None) -> list[tuple[int, int]]:
    """Row chunks (r0, r1) of a "mm" pass over C rows: chunk rows r0:r1 are multiplied against rows r0:C
    (``triangle``: the pairs i < j all lie there; the last row has none and is left out) or against all C rows,
    and the (r1 - r0, width) float32 product fits ``budget_mib`` (default :func:`chunk_mib`), with at least one
    row; as many rows as fit, in multiples of 16 when 16 fit (then every chunk's width, the epilogue's row stride,
    has the same alignment: one Triton compile serves every chunk). Pure host arithmetic: no device work."""
    budget = int((chunk_mib() if budget_mib is None else budget_mib) * 2**20) // 4
    end = c - 1 if triangle else c
    plan, r0 = [], 0
    while r0 < end:
        width = c - r0 if triangle else c
        fit = budget // width
        r1 = min(end, r0 + (fit // 16 * 16 if fit >= 16 else max(1, fit)))
        plan.append((r0, r1))
        r0 = r1
    return plan


def split_tf32(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of float32 ``w``: hi = w with its 13 low mantissa bits cleared (exactly a TF32 number), lo = w - hi
    (exact, so hi + lo == w bitwise). hi hi^T + hi lo^T + lo hi^T on TF32 tensor cores is about float32 accurate
    (the dropped lo lo^T is ~2^-22 relative, and lo itself is rounded to TF32's 11 bits: ~2^-24 of w)."""
    if w.dtype != torch.float32:
        raise ValueError(f"w must be float32, got {w.dtype}")
    hi = (w.contiguous().view(torch.int32) & -0x2000).view(torch.float32)  # -0x2000 = 0xFFFFE000
    return hi, (w - hi).copysign(w)  # a nonzero lo has w's sign anyway (hi rounds toward 0); -0.0 stays -0.0


@contextlib.contextmanager
def cuda_matmul_precision(device: torch.device, precision: str) -> Iterator[None]:
    """Inside the block, float32 torch.matmul on CUDA runs with ``precision`` ("tf32": tensor cores, "ieee":
    exact float32) whatever the caller's setting; torch's flag (``fp32_precision``, or ``allow_tf32`` before
    torch 2.9: never both, torch refuses a mix) is restored afterwards. Process-wide flag: another thread's
    float32 matmul inside the block sees it too. No-op off CUDA."""
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"precision must be 'tf32' or 'ieee', got {precision!r}")
    if torch.device(device).type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    new_api = hasattr(flags, "fp32_precision")
    previous = flags.fp32_precision if new_api else flags.allow_tf32
    if new_api:
        flags.fp32_precision = precision
    else:
        flags.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        if new_api:
            flags.fp32_precision = previous
        else:
            flags.allow_tf32 = previous


def _gram_into(g: torch.Tensor, parts: tuple[torch.Tensor, ...], r0: int, r1: int, c0: int, precision: str) -> None:
    """g (r1 - r0, C - c0) <- W[r0:r1] W[c0:]^T: one float32 GEMM (``precision`` "ieee" or "tf32", parts = (w,)) or
    three TF32 GEMMs of split operands ("tf32x3", parts = split_tf32(w)), small products first."""
    with cuda_matmul_precision(g.device, "ieee" if precision == "ieee" else "tf32"):
        if precision == "tf32x3":
            hi, lo = parts
            torch.matmul(hi[r0:r1], lo[c0:].T, out=g)
            g.addmm_(lo[r0:r1], hi[c0:].T)
            g.addmm_(hi[r0:r1], hi[c0:].T)
        else:
            torch.matmul(parts[0][r0:r1], parts[0][c0:].T, out=g)


def _mm_parts(w: torch.Tensor, precision: str) -> tuple[torch.Tensor, ...]:
    return split_tf32(w) if precision == "tf32x3" else (w,)


def _chunk_grids(plan: list[tuple[int, int]], c: int, cfg: dict) -> list[tuple[int, int, int]]:
    """Per chunk of a triangle plan: (row programs, column programs, span): each program covers BLOCK_M rows and
    ``span`` columns, span a multiple of BLOCK_N chosen so that a chunk has about cfg["PROGRAMS"] programs (the
    histogram of a program stays in registers: more columns per program, fewer atomics)."""
    grids = []
    for r0, r1 in plan:
        row_programs = triton.cdiv(r1 - r0, cfg["BLOCK_M"])
        col_tiles = triton.cdiv(c - r0, cfg["BLOCK_N"])
        per_program = max(1, min(cfg["MAX_TILES"], triton.cdiv(row_programs * col_tiles, cfg["PROGRAMS"])))
        span = per_program * cfg["BLOCK_N"]
        grids.append((row_programs, triton.cdiv(c - r0, span), span))
    return grids


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def pair_stats_config(kernel: str, interpret: bool | None = None) -> dict:
    """Launch constants of ``pair_stats`` for ``kernel`` (the sm_90 compile test builds exactly these); for the
    "mm" kernels those of the epilogue (``_pair_chunk_kernel``), plus PROGRAMS (target programs per chunk) and
    MAX_TILES (most column tiles per program), which are not kernel arguments."""
    if kernel not in PAIR_STATS_KERNELS:
        raise ValueError(f"kernel must be one of {PAIR_STATS_KERNELS}, got {kernel!r}")
    interpret = triton_interpret() if interpret is None else interpret
    if kernel.startswith("mm"):
        if interpret:  # several tiles per program and several programs per chunk even at C = 37
            return {"BLOCK_M": 16, "BLOCK_N": 16, "PROGRAMS": 4, "MAX_TILES": 2, "num_warps": 4, "num_stages": 1}
        # 8 x 512 float32 tile, 16 values per thread at 8 warps: 80 registers, no spill (ptxas -v, sm_90a; 32 x 256
        # took 255 and spilled); a chunk of C = 131072 (2048 rows) gets 256 x 8 programs of 32 tiles each
        return {"BLOCK_M": 8, "BLOCK_N": 512, "PROGRAMS": 2048, "MAX_TILES": 64, "num_warps": 8, "num_stages": 1}
    if interpret:
        return {"BLOCK": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1,
                "PRECISION": "ieee" if kernel == "rows" else kernel.removeprefix("tiles-")}
    if kernel == "rows":
        return {"BLOCK": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "PRECISION": "ieee"}
    return {"BLOCK": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3, "PRECISION": kernel.removeprefix("tiles-")}


def _launch_consts(cfg: dict, **extra) -> dict:
    return {k: v for k, v in {**cfg, **extra}.items() if k not in ("PROGRAMS", "MAX_TILES")}


def _pair_stats_mm(w: torch.Tensor, kernel: str, scalars: tuple, hist: torch.Tensor, nb: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The "mm" kernels' per-program (maxes, sums) over every chunk of the upper triangle; hist updated."""
    c = w.shape[0]
    cfg = pair_stats_config(kernel)
    parts = _mm_parts(w, kernel.removeprefix("mm-"))
    plan = chunk_plan(c, triangle=True)
    grids = _chunk_grids(plan, c, cfg)
    nprog = sum(gm * gn for gm, gn, _ in grids)
    maxes = torch.zeros(nprog, dtype=torch.float32, device=w.device)
    sums = torch.zeros(nprog, dtype=torch.float64, device=w.device)
    buf = torch.empty(max((r1 - r0) * (c - r0) for r0, r1 in plan), dtype=torch.float32, device=w.device)
    first = 0
    for (r0, r1), (gm, gn, span) in zip(plan, grids):
        g = buf[: (r1 - r0) * (c - r0)].view(r1 - r0, c - r0)
        _gram_into(g, parts, r0, r1, r0, kernel.removeprefix("mm-"))
        _pair_chunk_kernel[(gm, gn)](g, r1 - r0, c - r0, g.stride(0), span, *scalars, maxes, sums, hist, first,
                                     **_launch_consts(cfg, NB=nb))
        first += gm * gn
    return maxes, sums


def pair_stats(bank: torch.Tensor, bins: int, lo: float, hi: float, kernel: str = "rows"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher for ``etfkern::bank_pair_stats`` (see etfkern.banks.reference.bank_pair_stats); ``kernel`` one
    of PAIR_STATS_KERNELS."""
    cfg = pair_stats_config(kernel)
    w = _f32(bank)
    c, d = w.shape
    hist = torch.zeros(bins + 2, dtype=torch.int64, device=w.device)
    if c < 2 or d == 0:
        zero = torch.zeros((), dtype=torch.float64, device=w.device)
        if c > 1:  # d == 0: every pair has cos 0
            hist[min(max(int((0.0 - lo) * bins / (hi - lo)) + 1, 0), bins + 1)] = c * (c - 1) // 2
        return zero, zero.clone(), hist
    # bins + 1 goes in as a float: Triton would specialise an int argument equal to 1 into a constexpr
    scalars = (float(lo), float(bins / (hi - lo)), float(bins + 1), bins + 2)
    if kernel.startswith("mm"):
        maxes, sums = _pair_stats_mm(w, kernel, scalars, hist, histogram_slots(bins))
        return maxes.max().to(torch.float64), sums.sum(), hist
    block = cfg["BLOCK"]
    nblocks = triton.cdiv(c, block)
    consts = dict(BLOCK=block, BLOCK_K=cfg["BLOCK_K"], NB=histogram_slots(bins), PRECISION=cfg["PRECISION"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if kernel == "rows":
        nprog = nblocks
        maxes = torch.zeros(nprog, dtype=torch.float32, device=w.device)
        sums = torch.zeros(nprog, dtype=torch.float64, device=w.device)
        _pair_stats_kernel[(nprog,)](w, c, d, w.stride(0), *scalars, maxes, sums, hist, **consts)
    else:
        tiles = torch.triu_indices(nblocks, nblocks, device=w.device).to(torch.int32)
        nprog = tiles.shape[1]
        maxes = torch.zeros(nprog, dtype=torch.float32, device=w.device)
        sums = torch.zeros(nprog, dtype=torch.float64, device=w.device)
        _pair_tiles_kernel[(nprog,)](w, tiles[0].contiguous(), tiles[1].contiguous(), c, d, w.stride(0), *scalars,
                                     maxes, sums, hist, **consts)
    return maxes.max().to(torch.float64), sums.sum(), hist


def _pair_select_mm(w: torch.Tensor, kernel: str, scalars: tuple, count: torch.Tensor, out: torch.Tensor) -> None:
    """The "mm" kernels' pass of ``pair_select`` (the chunks and products of ``_pair_stats_mm``)."""
    c = w.shape[0]
    cfg = pair_stats_config(kernel)
    parts = _mm_parts(w, kernel.removeprefix("mm-"))
    plan = chunk_plan(c, triangle=True)
    buf = torch.empty(max((r1 - r0) * (c - r0) for r0, r1 in plan), dtype=torch.float32, device=w.device)
    for (r0, r1), (gm, gn, span) in zip(plan, _chunk_grids(plan, c, cfg)):
        g = buf[: (r1 - r0) * (c - r0)].view(r1 - r0, c - r0)
        _gram_into(g, parts, r0, r1, r0, kernel.removeprefix("mm-"))
        _pair_select_chunk_kernel[(gm, gn)](g, r1 - r0, c - r0, g.stride(0), span, *scalars, count, out,
                                            **_launch_consts(cfg))


def pair_select(bank: torch.Tensor, bins: int, lo: float, hi: float, slot: int, capacity: int,
                kernel: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher for ``etfkern::bank_pair_select`` (see etfkern.banks.reference.bank_pair_select): the tile grid
    and dot precision of ``kernel`` ("rows": its float32 FFMA products over the tiles layout; "mm-*": the chunks
    and GEMMs of that kernel's ``pair_stats``, so both see the same products)."""
    if kernel not in PAIR_STATS_KERNELS:
        raise ValueError(f"kernel must be one of {PAIR_STATS_KERNELS}, got {kernel!r}")
    w = _f32(bank)
    c, d = w.shape
    count = torch.zeros((), dtype=torch.int64, device=w.device)
    out = torch.full((max(capacity, 1),), float("inf"), dtype=torch.float32, device=w.device)
    scalars = (float(lo), float(bins / (hi - lo)), float(bins + 1), float(slot), capacity)
    if c > 1 and d and kernel.startswith("mm"):
        _pair_select_mm(w, kernel, scalars, count, out)
    elif c > 1 and d:
        cfg = pair_stats_config("tiles-ieee" if kernel == "rows" else kernel)
        nblocks = triton.cdiv(c, cfg["BLOCK"])
        tiles = torch.triu_indices(nblocks, nblocks, device=w.device).to(torch.int32)
        _pair_select_kernel[(tiles.shape[1],)](w, tiles[0].contiguous(), tiles[1].contiguous(), c, d, w.stride(0),
                                              *scalars, count, out, BLOCK=cfg["BLOCK"],
                                              BLOCK_K=cfg["BLOCK_K"], PRECISION=cfg["PRECISION"],
                                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    elif c > 1 and min(max(int((0.0 - lo) * bins / (hi - lo)) + 1, 0), bins + 1) == slot:  # d == 0: cos 0
        count.fill_(c * (c - 1) // 2)
        out[: min(capacity, c * (c - 1) // 2)] = 0.0
    values = torch.full((capacity,), float("inf"), dtype=torch.float64, device=w.device)
    n = int(count)
    if n <= capacity:
        values[:n] = torch.sort(out[:n]).values.to(torch.float64)
    return values, count


def ebv_dir_config(variant: str, d: int, interpret: bool | None = None) -> dict:
    """Launch constants of ``ebv_dir`` for ``variant`` (one of DIR_VARIANTS) and feature dimension ``d``; for the
    "mm" variants those of the epilogue (``_dir_chunk_kernel``, one program per row)."""
    if variant not in DIR_VARIANTS:
        raise ValueError(f"variant must be one of {DIR_VARIANTS}, got {variant!r}")
    interpret = triton_interpret() if interpret is None else interpret
    if variant.startswith("mm"):
        return {"BLOCK_N": 32 if interpret else 1024, "num_warps": 4, "num_stages": 1}
    precision = variant.removesuffix("-wide")
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": max(16, min(32, triton.next_power_of_2(d))),
                "num_warps": 4, "num_stages": 1, "PRECISION": precision}
    bd = min(256, max(16, triton.next_power_of_2(d)))
    if variant in ("ieee", "tf32"):  # the layout that ran on the H200 with TF32 (7 s a step at (100k, 1000))
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": bd, "num_warps": 8, "num_stages": 2,
                "PRECISION": precision}
    # tf32x3, tf32-wide: 64-row blocks (a Hopper warpgroup MMA is 64 rows), W_J tile 64 KB per stage
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": bd, "num_warps": 8, "num_stages": 2,
            "PRECISION": precision}


def _ebv_dir_mm(w: torch.Tensor, beta: float, variant: str, out: torch.Tensor, rowmax: torch.Tensor) -> None:
    """``ebv_dir`` "mm" / "mm-ieee": per chunk of rows R, G = W_R W^T (cuBLAS, TF32 or float32) into one reused
    (R, C) buffer, the epilogue turns it into P in place (and writes rowmax), out_R = P W (cuBLAS)."""
    c = w.shape[0]
    cfg = ebv_dir_config(variant, w.shape[1])
    plan = chunk_plan(c, triangle=False)
    buf = torch.empty(max(r1 - r0 for r0, r1 in plan), c, dtype=torch.float32, device=w.device)
    with cuda_matmul_precision(w.device, "ieee" if variant == "mm-ieee" else "tf32"):
        for r0, r1 in plan:
            g = buf[: r1 - r0]
            torch.matmul(w[r0:r1], w.T, out=g)
            _dir_chunk_kernel[(r1 - r0,)](g, rowmax, c, g.stride(0), r0, float(beta), **cfg)
            torch.matmul(g, w, out=out[r0:r1])


def ebv_dir(bank: torch.Tensor, beta: float, variant: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher for ``etfkern::ebv_dir``: float32 inside, ``variant`` one of DIR_VARIANTS. Fused variants: grid (row
    blocks, feature blocks of <= 256; each feature block recomputes its cosine tiles, so d <= 256 is one pass);
    "mm" variants: chunks of rows, two cuBLAS GEMMs and one epilogue each (no C x C buffer, no atomics)."""
    if variant not in DIR_VARIANTS:
        raise ValueError(f"variant must be one of {DIR_VARIANTS}, got {variant!r}")
    w = _f32(bank)
    c, d = w.shape
    out = torch.zeros(c, d, dtype=torch.float32, device=w.device)
    rowmax = torch.zeros(c, dtype=torch.float32, device=w.device)
    if c > 0 and d > 0 and variant.startswith("mm"):
        _ebv_dir_mm(w, beta, variant, out, rowmax)
    elif c > 0 and d > 0:
        cfg = ebv_dir_config(variant, d)
        grid = (triton.cdiv(c, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"]))
        _dir_kernel[grid](w, out, rowmax, c, d, w.stride(0), out.stride(0), float(beta), **cfg)
    return out.to(bank.dtype), rowmax.to(bank.dtype)
