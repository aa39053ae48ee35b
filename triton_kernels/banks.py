"""Triton kernels for the bank ops (tiled: no C x C matrix is ever stored) and their launchers.

* ``pair_stats`` (``etfkern::bank_pair_stats``), two kernel layouts:
  - ``"rows"``: one program per row block I walks the column blocks J >= I (the layout measured on the H200,
    float32 FFMA dot products);
  - ``"tiles-ieee"`` / ``"tiles-tf32x3"``: one program per upper-triangle tile (I <= J), so the work is spread
    evenly; ``tf32x3`` runs the dot products on tensor cores as three TF32 products of split operands
    (hi*hi + hi*lo + lo*hi: about float32 accuracy), ``ieee`` as float32 FFMA.
  Per program: max and a float64 sum (reduced on the host in a fixed order), and a per-tile ``tl.histogram``
  added to a global int64 histogram with integer atomics (integer addition: the result does not depend on the
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
Inputs are computed in float32 (float64 banks are cast); outputs are cast back to the bank's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import triton_interpret

PAIR_STATS_KERNELS = ("rows", "tiles-ieee", "tiles-tf32x3")
DIR_VARIANTS = ("ieee", "tf32x3", "tf32", "tf32-wide")


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
def _histogram_add(hist_ptr, v, valid, lo, scale, top, nslots,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """hist[slot] += count of valid v per slot: slot 0 below lo, 1 + floor((v - lo) * scale) inside, ``top``
    (= bins + 1) at or above hi. Invalid elements go to slot top + 1 (< NB), which is never stored."""
    k = tl.floor((v - lo) * scale) + 1.0
    k = tl.minimum(tl.maximum(k, 0.0), top)
    k = tl.where(valid, k, top + 1.0).to(tl.int32)
    h = tl.histogram(tl.reshape(k, (BLOCK_M * BLOCK_N,)), NB)
    idx = tl.arange(0, NB)
    tl.atomic_add(hist_ptr + idx, h.to(tl.int64), mask=(h > 0) & (idx < nslots))


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
def _pair_select_kernel(w_ptr, tile_i_ptr, tile_j_ptr, C, D, stride_w, lo, scale, top, slot, capacity, count_ptr,
                        out_ptr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """One upper-triangle tile per program: appends the |cos| of its pairs that ``_histogram_add`` (same
    arithmetic) puts in slot ``slot`` (a float, like ``top``) to out_ptr (float32) at
    slots reserved with one integer atomic per tile; slots >= capacity are not written. The slots depend on the
    order the tiles run in, the set of values does not (the launcher sorts it). No reshape: per-row counts and
    in-row prefix sums give each value its slot (the compiler may reorder a reshaped tile)."""
    t = tl.program_id(0)
    v, valid = _triangle_tile(w_ptr, tile_i_ptr, tile_j_ptr, t, C, D, stride_w, BLOCK, BLOCK_K, PRECISION)
    k = tl.minimum(tl.maximum(tl.floor((v - lo) * scale) + 1.0, 0.0), top)
    keep = valid & (k == slot)
    ki = keep.to(tl.int32)
    row_n = tl.sum(ki, axis=1)
    base = tl.atomic_add(count_ptr, tl.sum(row_n, axis=0).to(tl.int64))
    row_start = tl.cumsum(row_n, axis=0) - row_n
    slot = base + row_start[:, None].to(tl.int64) + (tl.cumsum(ki, axis=1) - ki).to(tl.int64)
    tl.store(out_ptr + slot, v, mask=keep & (slot < capacity))


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


def _f32(bank: torch.Tensor) -> torch.Tensor:
    return bank.detach().to(torch.float32).contiguous()


def pair_stats_config(kernel: str, interpret: bool | None = None) -> dict:
    """Launch constants of ``pair_stats`` for ``kernel`` (the sm_90 compile test builds exactly these)."""
    if kernel not in PAIR_STATS_KERNELS:
        raise ValueError(f"kernel must be one of {PAIR_STATS_KERNELS}, got {kernel!r}")
    if triton_interpret() if interpret is None else interpret:
        return {"BLOCK": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1,
                "PRECISION": "ieee" if kernel == "rows" else kernel.removeprefix("tiles-")}
    if kernel == "rows":
        return {"BLOCK": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "PRECISION": "ieee"}
    return {"BLOCK": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3, "PRECISION": kernel.removeprefix("tiles-")}


def pair_stats(bank: torch.Tensor, bins: int, lo: float, hi: float, kernel: str = "rows"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher for ``etfkern::bank_pair_stats`` (see etfkern.banks.reference.bank_pair_stats); ``kernel`` one
    of PAIR_STATS_KERNELS."""
    cfg = pair_stats_config(kernel)
    w = _f32(bank)
    c, d = w.shape
    hist = torch.zeros(bins + 2, dtype=torch.int64, device=w.device)
    block = cfg["BLOCK"]
    nblocks = triton.cdiv(c, block)
    if nblocks == 0 or d == 0:
        zero = torch.zeros((), dtype=torch.float64, device=w.device)
        if c > 1:  # d == 0: every pair has cos 0
            hist[min(max(int((0.0 - lo) * bins / (hi - lo)) + 1, 0), bins + 1)] = c * (c - 1) // 2
        return zero, zero.clone(), hist
    # bins + 1 goes in as a float: Triton would specialise an int argument equal to 1 into a constexpr
    scalars = (float(lo), float(bins / (hi - lo)), float(bins + 1), bins + 2)
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


def pair_select(bank: torch.Tensor, bins: int, lo: float, hi: float, slot: int, capacity: int,
                kernel: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher for ``etfkern::bank_pair_select`` (see etfkern.banks.reference.bank_pair_select): the tile grid
    and dot precision of ``kernel`` ("rows": its float32 FFMA products over the tiles layout)."""
    cfg = pair_stats_config("tiles-ieee" if kernel == "rows" else kernel)
    w = _f32(bank)
    c, d = w.shape
    count = torch.zeros((), dtype=torch.int64, device=w.device)
    out = torch.full((max(capacity, 1),), float("inf"), dtype=torch.float32, device=w.device)
    nblocks = triton.cdiv(c, cfg["BLOCK"])
    if nblocks and d:
        tiles = torch.triu_indices(nblocks, nblocks, device=w.device).to(torch.int32)
        _pair_select_kernel[(tiles.shape[1],)](w, tiles[0].contiguous(), tiles[1].contiguous(), c, d, w.stride(0),
                                              float(lo), float(bins / (hi - lo)), float(bins + 1), float(slot),
                                              capacity, count, out, BLOCK=cfg["BLOCK"],
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
    """Launch constants of ``ebv_dir`` for ``variant`` (one of DIR_VARIANTS) and feature dimension ``d``."""
    if variant not in DIR_VARIANTS:
        raise ValueError(f"variant must be one of {DIR_VARIANTS}, got {variant!r}")
    precision = variant.removesuffix("-wide")
    if triton_interpret() if interpret is None else interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": max(16, min(32, triton.next_power_of_2(d))),
                "num_warps": 4, "num_stages": 1, "PRECISION": precision}
    bd = min(256, max(16, triton.next_power_of_2(d)))
    if variant in ("ieee", "tf32"):  # the layout that ran on the H200 with TF32 (7 s a step at (100k, 1000))
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": bd, "num_warps": 8, "num_stages": 2,
                "PRECISION": precision}
    # tf32x3, tf32-wide: 64-row blocks (a Hopper warpgroup MMA is 64 rows), W_J tile 64 KB per stage
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": bd, "num_warps": 8, "num_stages": 2,
            "PRECISION": precision}


def ebv_dir(bank: torch.Tensor, beta: float, variant: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher for ``etfkern::ebv_dir``: grid (row blocks, feature blocks of <= 256; each feature block
    recomputes its cosine tiles, so d <= 256 is one pass); float32 inside, ``variant`` one of DIR_VARIANTS."""
    w = _f32(bank)
    c, d = w.shape
    out = torch.zeros(c, d, dtype=torch.float32, device=w.device)
    rowmax = torch.zeros(c, dtype=torch.float32, device=w.device)
    if c > 0 and d > 0:
        cfg = ebv_dir_config(variant, d)
        grid = (triton.cdiv(c, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"]))
        _dir_kernel[grid](w, out, rowmax, c, d, w.stride(0), out.stride(0), float(beta), **cfg)
    return out.to(bank.dtype), rowmax.to(bank.dtype)
