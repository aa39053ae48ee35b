"""Fixed classifier banks: simplex ETF, Equiangular Basis Vectors (Kerdock / optimised), sparse ETF (SSE-C),
their quality statistics and storage.

Memory: every generator and statistic here is O(C*d) (plus O(d^2) for a random rotation); no C x C matrix is
ever stored. Pairwise work goes through three routed ops defined in :mod:`etfkern.banks.ops`:

* ``bank_pair_stats`` (max / sum / histogram of |cos| over pairs i < j) -- backs :func:`bank_stats`;
* ``bank_pair_select`` (the sorted |cos| of the pairs in one histogram slot) -- bank_stats' exact p99.9 on the
  tiled GPU kernels;
* ``ebv_dir`` -- one step of ``ebv_bank(method="optimize")``: per-row max |cos| and the row-scaled gradient of
  the soft-max coherence objective, in ONE pass over the pairs (two GEMM-sized products per step).

Backends: "reference" (dense float64, :mod:`etfkern.banks.reference`), "cpu" (row strips of chunked torch
matmuls, O(strip * C) scratch, :mod:`etfkern.banks.cpu`), "triton" (tiled kernels,
:mod:`etfkern.triton_kernels.banks`). On CUDA the Triton variant comes from the "banks" rows of
:mod:`etfkern._core.dispatch` unless ``ETFKERN_BANK_STATS_KERNEL`` (PAIR_STATS_KERNELS below) or
``ETFKERN_EBV_DIR_PRECISION`` (DIR_VARIANTS) names one; the tensor-core candidates and the "mm" ones (cuBLAS GEMM per
chunk of <= ETFKERN_BANK_CHUNK_MIB + one Triton epilogue) never ran on a GPU (``python bench/banks.py --device cuda
--sweep`` measures them against dense torch).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
import warnings
from typing import Any, Iterator

import torch

from etfkern._core import backend as _backend
from etfkern._core import dispatch as _dispatch
from etfkern._core.dtypes import acc_dtype
from etfkern.banks import cpu as _cpu_path
from etfkern.banks import ops as _ops
from etfkern.banks import reference as _ref

__all__ = ["simplex_etf", "ebv_bank", "sparse_etf", "bank_stats", "save_bank", "load_bank", "welch_bound",
           "kerdock_size", "chirp_size", "check_unit_bank"]

AUTO_KEEP_RATIO = 1.25  # ebv_bank(method="auto") keeps a structured start within this factor of the Welch bound
# ... and any structured start at C/d >= AUTO_KEEP_CLASSES_PER_DIM: there the optimiser's gain was measured at
# 0.5% of the start or less (C/d = 39: 0.5% in 300 steps, 50: 0.14% in 150; bench/results/ebv-warmstart-cpu-*.md)
AUTO_KEEP_CLASSES_PER_DIM = 36
HIST_BINS = 2048  # bank_stats: coarse bins over [0, 1], then the same number of fine bins inside one coarse bin
P999_RESOLUTION = 1.0 / HIST_BINS**2  # p99.9 is the upper edge of a fine bin: error in [0, 2.4e-7]
GPU_HIST_BINS = 253  # the tiled Triton kernels: 3 passes of 253 bins (resolution 1/253^3 ~ 6.2e-8)
SELECT_CAPACITY = 1 << 23  # the tiled kernels: p99.9 from the <= 8M pairs of one coarse bin (32 MiB of float32)


# ==========================================================================================================
# Validation helpers
# ==========================================================================================================
def _check_sizes(num_classes: int, dim: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")


def _check_output(dtype: Any, device: Any) -> None:
    """The generators' ``dtype`` (a floating-point torch dtype) and ``device`` (None, a str or torch.device)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (e.g. torch.float32), got {dtype!r}")
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch device or None, got {device!r} ({exc})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here")


def _check_steps_lr(steps: Any, lr: Any) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


def _check_bank(bank: Any, name: str = "bank") -> None:
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or not bank.is_floating_point():
        shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
        raise ValueError(f"{name} must be a floating-point (C, d) tensor, got {shape}")
    if bank.shape[0] < 2 or bank.shape[1] < 1:
        raise ValueError(f"{name} must have C >= 2 rows and d >= 1 columns, got shape {tuple(bank.shape)}")
    if not torch.isfinite(bank).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_unit_bank(bank: torch.Tensor, name: str = "bank", atol: float = 1e-3) -> None:
    """Raise ValueError naming ``name`` unless ``bank`` is a finite (C, d) float tensor with C >= 2 and every
    row of norm 1 within ``atol`` (for callers that use rows as given, e.g. fixed classifier heads)."""
    _check_bank(bank, name)
    err = (bank.detach().to(torch.float32).norm(dim=1) - 1).abs().max().item()
    if err > atol:
        raise ValueError(f"{name} rows must be unit-norm (max | |w_c| - 1 | <= {atol}), got {err:.3g}; "
                         f"normalise with torch.nn.functional.normalize({name}, dim=1)")


def welch_bound(num_classes: int, dim: int) -> float:
    """Welch lower bound on max |cos| of C unit vectors in R^d: sqrt((C-d)/(d(C-1))), 0 when C <= d."""
    if num_classes <= dim:
        return 0.0
    return math.sqrt((num_classes - dim) / (dim * (num_classes - 1)))


@contextlib.contextmanager
def _phase(progress: bool, text: str) -> Iterator[None]:
    """With ``progress``, "<text> ..." on stderr before a long phase and "<text>: <seconds> s" after it."""
    if not progress:
        yield
        return
    print(f"{text} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"{text}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _orthonormal_columns(dim: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(dim, k) float64 with orthonormal columns, Haar-random (QR of a Gaussian with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))[None, :]


def _finish(bank: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    return bank.to(device=device if device is not None else "cpu", dtype=dtype).contiguous()


def _unit_rows_as(bank: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32-computed bank in ``dtype``: float64 rows are re-normalised in float64 (unit to ~1e-16, not to
    float32's ~1e-7); other dtypes are a plain cast."""
    if dtype != torch.float64:
        return bank.to(dtype)
    b = bank.to(torch.float64)
    return (b / b.norm(dim=1, keepdim=True)).contiguous()


# ==========================================================================================================
# Simplex ETF
# ==========================================================================================================
def simplex_etf(num_classes: int, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The simplex ETF: C unit vectors in R^d with every pairwise cos exactly -1/(C-1). Needs C <= d + 1.

    Construction (float64, O(C*d) memory, never the C x C centring matrix): the Householder reflection H
    of R^C that maps 1/sqrt(C) to e_C sends the centred basis (I - 11^T/C) to the first C-1 columns of H,
    so the vertices are rows of sqrt(C/(C-1)) H[:, :C-1] Q^T with Q a seeded random (d, C-1) orthonormal
    frame; H Q^T is applied as a rank-one update. Returns (C, d) ``dtype`` on ``device``.
    """
    _check_sizes(num_classes, dim)
    _check_output(dtype, device)
    c = num_classes
    if c > dim + 1:
        raise ValueError(f"simplex_etf needs num_classes <= dim + 1 (got num_classes={c}, dim={dim}); "
                         "for more classes than that use ebv_bank(num_classes, dim) (minimal max |cos|)")
    q_t = _orthonormal_columns(dim, c - 1, _generator(seed)).T  # (C-1, d)
    v = torch.full((c,), 1.0 / math.sqrt(c), dtype=torch.float64)
    v[-1] -= 1.0  # Householder vector: H = I - 2 v v^T / |v|^2 maps 1/sqrt(C) onto e_C
    padded = torch.cat([q_t, torch.zeros(1, dim, dtype=torch.float64)])  # [I_{C-1}; 0] Q^T
    bank = padded - (2.0 / (v @ v)) * v[:, None] * (v[:-1] @ q_t)[None, :]
    bank = bank * math.sqrt(c / (c - 1))
    return _finish(bank, dtype, device)


# ==========================================================================================================
# Realified Z4-Kerdock mutually unbiased bases (d a power of 4)
# ==========================================================================================================
# Primitive polynomials over F_2 of odd degree k (bit i = coefficient of x^i): F_{2^k} for n = d/2 = 2^k.
# d = 4 .. 4096 (16, 64, 256 checked exhaustively or on large subsets by the tests, 1024 and 4096 on subsets).
_GF_POLY = {1: 0b11, 3: 0b1011, 5: 0b100101, 7: 0b10000011, 9: 0b1000010001, 11: 0b100000000101}


def _is_power_of_4(d: int) -> bool:
    return d >= 4 and d & (d - 1) == 0 and (d.bit_length() - 1) % 2 == 0


def kerdock_size(dim: int) -> int:
    """Number of vectors of the realified Kerdock bank in R^dim: dim*(dim/2+1) if dim is a power of 4, else 0."""
    return dim * (dim // 2 + 1) if _is_power_of_4(dim) and (dim.bit_length() - 2) in _GF_POLY else 0


def _gf_mul(a: int, b: int, k: int, poly: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        b >>= 1
        a <<= 1
        if a >> k:
            a ^= poly
    return r


def _kerdock_tables(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q[a, x] = x^T S_a x mod 4 (integer quadratic form, S_a[i,j] = Tr(a x^i x^j) over F_{2^k}, polynomial
    basis) and P[b, x] = b.x mod 2, both (n, n) uint8 with a, b, x read as k-bit vectors."""
    k = n.bit_length() - 1
    poly = _GF_POLY[k]
    gen = 2 if k > 1 else 1  # the field element x (for k = 1, F_2 = {0, 1})
    trace = []
    power = 1  # x^m
    for _ in range(3 * k - 2):
        s, z = 0, power
        for _ in range(k):  # Tr(y) = y + y^2 + y^4 + ... + y^(2^(k-1))
            s ^= z
            z = _gf_mul(z, z, k, poly)
        trace.append(s)
        power = _gf_mul(power, gen, k, poly)
    t = torch.tensor(trace, dtype=torch.float64)
    l = torch.arange(k)
    tri = t[l[:, None, None] + l[None, :, None] + l[None, None, :]]  # [l, i, j] = Tr(x^(l+i+j))
    bits = ((torch.arange(n)[:, None] >> l) & 1).to(torch.float64)  # (n, k)
    q = torch.empty(n, n, dtype=torch.uint8)
    for a0 in range(0, n, 128):  # S_a = sum_l a_l Tr(x^(l+i+j)) mod 2; Q = x^T S_a x over the integers mod 4
        s = torch.einsum("al,lij->aij", bits[a0:a0 + 128], tri).remainder(2)
        xs = torch.matmul(bits, s)  # (a, x, k)
        q[a0:a0 + 128] = (xs * bits).sum(-1).round().remainder(4).to(torch.uint8)
    p = (bits @ bits.T).round().remainder(2).to(torch.uint8)
    return q, p


def _kerdock_rows(dim: int, idx: torch.Tensor, dtype: torch.dtype = torch.float32,
                  chunk: int = 8192) -> torch.Tensor:
    """Rows ``idx`` (int64, any order) of the realified Kerdock bank in R^dim, generated one chunk at a time.

    Row r < 2n^2 (n = dim/2): basis a = r // 2n, vector b = (r % 2n) // 2, part = r % 2 of
    v_{a,b}(x) = i^(Q[a,x] + 2 b.x) / sqrt(n) realified as (Re v, Im v) (part 0) or (-Im v, Re v) (part 1):
    entries {0, +-sqrt(2/dim)}. Rows r >= 2n^2 realify the standard basis times e^(i pi/4): two entries +-1/sqrt2.
    Every pair of distinct rows has |cos| in {0, 1/sqrt(dim)}.
    """
    n = dim // 2
    q, p = _kerdock_tables(n)
    out = torch.empty(idx.numel(), dim, dtype=dtype)
    inv = 1.0 / math.sqrt(n)
    half = 1.0 / math.sqrt(2.0)
    for s in range(0, idx.numel(), chunk):
        r = idx[s:s + chunk]
        kerd = r < 2 * n * n
        a = torch.where(kerd, r // (2 * n), 0)
        b = torch.where(kerd, (r % (2 * n)) // 2, 0)
        m = (q[a] + 2 * p[b]) % 4  # (rows, n) uint8: the exponent of i
        re = ((m == 0).to(dtype) - (m == 2).to(dtype)) * inv
        im = ((m == 1).to(dtype) - (m == 3).to(dtype)) * inv
        first = (r % 2 == 0)[:, None]
        block = torch.where(first, torch.cat([re, im], 1), torch.cat([-im, re], 1))
        std = (r - 2 * n * n).clamp(min=0)
        j, part = std // 2, std % 2
        std_rows = torch.zeros(r.numel(), dim, dtype=dtype)
        ar = torch.arange(r.numel())
        h = torch.tensor(half, dtype=dtype)
        std_rows[ar, j.clamp(max=n - 1)] = torch.where(part == 0, h, -h)
        std_rows[ar, (n + j).clamp(max=dim - 1)] = h
        out[s:s + chunk] = torch.where(kerd[:, None], block, std_rows)
    return out


def _kerdock_subset(num_classes: int, dim: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A seeded subset of C rows of the Kerdock bank of R^dim: drawn among the 2n^2 rows with entries
    {0, +-sqrt(2/dim)} when C <= dim^2/2, else among all dim(dim/2+1) rows."""
    n = dim // 2
    pool = 2 * n * n if num_classes <= 2 * n * n else kerdock_size(dim)
    idx = torch.randperm(pool, generator=gen)[:num_classes]
    return _kerdock_rows(dim, idx, dtype)


def _largest_prime_at_most(n: int) -> int:
    """The largest odd prime <= n, or 0 when there is none (n < 3)."""
    for q in range(n, 2, -1):
        if q % 2 and all(q % f for f in range(3, math.isqrt(q) + 1, 2)):
            return q
    return 0


def chirp_size(prime: int) -> int:
    """Number of vectors of the realified chirp bank of an odd prime p (in R^2p): 2p(p+1)."""
    return 2 * prime * (prime + 1)


def _chirp_rows(prime: int, idx: torch.Tensor, dtype: torch.dtype = torch.float32,
                chunk: int = 8192) -> torch.Tensor:
    """Rows ``idx`` (int64) of the realified chirp bank of the odd prime p, in R^2p, one chunk at a time.

    The p+1 mutually unbiased bases of C^p (Wootters-Fields): the chirps u_{a,b}(x) = w^(a x^2 + b x) / sqrt(p),
    w = e^(2 pi i / p), x, a, b in Z_p (basis a), and the standard basis. Row r < 2p^2: a = r // 2p,
    b = (r % 2p) // 2, realified as (Re u, Im u) (r even) or that of i u, (-Im u, Re u) (r odd); rows r >= 2p^2
    realify e_j and i e_j. Each basis gives an orthonormal basis of R^2p. Across bases |<u, v>| = 1/sqrt(p)
    (a Gauss sum), so every pair of distinct rows has |cos| = |Re(phase)| / sqrt(p) <= 1/sqrt(p), with equality
    e.g. for chirps sharing b: coherence 1/sqrt(p) ~ sqrt(2) x Welch for C << p^2.
    """
    p = prime
    ang = torch.arange(p, dtype=torch.float64) * (2.0 * math.pi / p)
    cos_t, sin_t = (torch.cos(ang) / math.sqrt(p)).to(dtype), (torch.sin(ang) / math.sqrt(p)).to(dtype)
    x = torch.arange(p)
    x2 = x * x % p
    out = torch.zeros(idx.numel(), 2 * p, dtype=dtype)
    for s in range(0, idx.numel(), chunk):
        r = idx[s:s + chunk]
        chirp = r < 2 * p * p
        a = torch.where(chirp, r // (2 * p), 0)
        b = torch.where(chirp, (r % (2 * p)) // 2, 0)
        m = (a[:, None] * x2 + b[:, None] * x) % p  # (rows, p): the exponent of w
        re, im = cos_t[m], sin_t[m]
        odd = (r % 2 == 1)[:, None]
        block = torch.where(odd, torch.cat([-im, re], 1), torch.cat([re, im], 1))
        std = (r - 2 * p * p).clamp(min=0)  # e_j -> coordinate j, i e_j -> coordinate p + j
        std_rows = torch.zeros(r.numel(), 2 * p, dtype=dtype)
        std_rows[torch.arange(r.numel()), (std // 2 + p * (std % 2)).clamp(max=2 * p - 1)] = 1.0
        out[s:s + chunk] = torch.where(chirp[:, None], block, std_rows)
    return out


# ==========================================================================================================
# Routed ops: cpu backends (row strips of torch matmuls) and registration
# ==========================================================================================================
# = etfkern.triton_kernels.banks.PAIR_STATS_KERNELS / DIR_VARIANTS ("mm*": cuBLAS GEMM per chunk + Triton epilogue)
PAIR_STATS_KERNELS = ("rows", "tiles-ieee", "tiles-tf32x3", "mm-ieee", "mm-tf32x3")
DIR_VARIANTS = ("ieee", "tf32x3", "tf32", "tf32-wide", "mm", "mm-ieee")
STATS_KERNEL_ENV = "ETFKERN_BANK_STATS_KERNEL"
DIR_PRECISION_ENV = "ETFKERN_EBV_DIR_PRECISION"


_variant_override = threading.local()  # op -> variant for this thread (the optimiser's ebv_dir steps)
# The optimiser's ebv_dir: not a variant name but "the fastest measured one, any precision" (dispatch op
# "ebv_optimiser_dir"; the optimiser rescores its result exactly). ETFKERN_EBV_DIR_PRECISION still overrides.
OPTIMISER_DIR_PRECISION = "optimiser"


@contextlib.contextmanager
def _variant(op: str, name: str) -> Iterator[None]:
    """Inside the block, the Triton kernels of ``op`` run variant ``name`` unless its environment variable is set."""
    previous = getattr(_variant_override, op, None)
    setattr(_variant_override, op, name)
    try:
        yield
    finally:
        setattr(_variant_override, op, previous)


def _gpu_variant(op: str, env: str, choices: tuple[str, ...], bank: torch.Tensor) -> str:
    """The Triton variant of ``op`` for ``bank``: env ``env`` when set (ValueError naming it unless one of
    ``choices``), else the measured table in :mod:`etfkern._core.dispatch` on CUDA, else its default."""
    if os.environ.get(env, "").strip():
        return _backend.kernel_variant(env, choices, os.environ[env].strip().lower())
    inside = getattr(_variant_override, op, None)
    if inside == OPTIMISER_DIR_PRECISION:
        return _dispatch.choose_variant("ebv_optimiser_dir", C=int(bank.shape[0]), d=int(bank.shape[1]),
                                        dtype=_dispatch.dtype_name(bank.dtype))[0]
    if inside is not None:
        return inside
    if bank.device.type != "cuda":
        return choices[0]
    return _dispatch.choose_variant(op, C=int(bank.shape[0]), d=int(bank.shape[1]),
                                    dtype=_dispatch.dtype_name(bank.dtype))[0]


def _pair_stats_triton(bank: torch.Tensor, bins: int, lo: float, hi: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from etfkern.triton_kernels import banks as _tk

    kernel = _gpu_variant("bank_pair_stats", STATS_KERNEL_ENV, PAIR_STATS_KERNELS, bank)
    return _tk.pair_stats(bank, bins, lo, hi, kernel=kernel)


def _pair_select_triton(bank: torch.Tensor, bins: int, lo: float, hi: float, slot: int, capacity: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    from etfkern.triton_kernels import banks as _tk

    kernel = _gpu_variant("bank_pair_stats", STATS_KERNEL_ENV, PAIR_STATS_KERNELS, bank)
    return _tk.pair_select(bank, bins, lo, hi, slot, capacity, kernel=kernel)


def _dir_triton(bank: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    from etfkern.triton_kernels import banks as _tk

    return _tk.ebv_dir(bank, beta, variant=_gpu_variant("ebv_dir", DIR_PRECISION_ENV, DIR_VARIANTS, bank))


for _op, _cpu, _ref_fn, _tri in (("bank_pair_stats", _cpu_path.pair_stats, _ref.bank_pair_stats, _pair_stats_triton),
                                 ("bank_pair_select", _cpu_path.pair_select, _ref.bank_pair_select,
                                  _pair_select_triton),
                                 ("ebv_dir", _cpu_path.ebv_dir, _ref.ebv_dir, _dir_triton)):
    _backend.register(_op, "reference", _ref_fn)
    _backend.register(_op, "cpu", _cpu)
    _backend.register(_op, "triton", _tri)


# ==========================================================================================================
# Statistics
# ==========================================================================================================
def _unit_rows(bank: torch.Tensor) -> torch.Tensor:
    dtype = acc_dtype(bank.dtype)
    w = bank.detach().to(dtype)
    return (w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)).contiguous()


def bank_max_abs_cos(bank: torch.Tensor) -> float:
    """max over i != j of |cos(w_i, w_j)| (one tiled pass, no histogram work beyond 1 bin)."""
    _check_bank(bank)
    mx, _, _ = _ops.bank_pair_stats(_unit_rows(bank), 1, 0.0, 2.0)
    return float(mx)


def _histogram_plan(u: torch.Tensor) -> tuple[int, int]:
    """(bins per pass, passes) of bank_stats' p99.9 search for unit rows ``u``: 2048 bins x 2 passes, or on the
    tiled Triton kernels 253 bins (253 + 3 slots fill a 256-slot ``tl.histogram``, cheap in the kernel's
    epilogue; 2048 would need 4096) x 3 passes, the last two replaced by one ``bank_pair_select`` pass when the
    pairs of the first pass's bin fit SELECT_CAPACITY. Both resolve p99.9 to <= P999_RESOLUTION."""
    if _backend.choose("bank_pair_stats", u.device) == "triton" and \
            _gpu_variant("bank_pair_stats", STATS_KERNEL_ENV, PAIR_STATS_KERNELS, u).startswith(("tiles", "mm")):
        return GPU_HIST_BINS, 3
    return HIST_BINS, 2


def bank_stats(bank: torch.Tensor, *, progress: bool = False) -> dict[str, float]:
    """Quality statistics of a (C, d) bank (C >= 2), from tiled passes that never store a C x C matrix.

    Keys: ``max_abs_cos``, ``mean_abs_cos`` (over the C(C-1)/2 pairs c != c'), ``p999_abs_cos`` (the 99.9th
    percentile of |cos| over those pairs: the smallest value at or below which >= 99.9% of them lie, found by a
    2048-bin histogram over [0, 1] and a second 2048-bin pass inside the bin holding it, reported as the upper
    edge of its fine bin, so it overestimates by at most P999_RESOLUTION = 1/2048^2 ~ 2.4e-7; on the tiled GPU
    kernels one 253-bin pass, then the pairs of the bin holding it are collected and sorted (``bank_pair_select``,
    up to SELECT_CAPACITY of them): the order statistic itself, else two more 253-bin passes), ``welch_bound``
    (for C, d) and ``max_norm_error`` (max | |w_c| - 1 |). Cosines use normalised rows; on CPU float64 banks are
    measured in float64, anything else in float32; the GPU (Triton) kernels always compute in float32 (``tiles-tf32x3``: split TF32 tensor
    core products, about float32 accuracy). ``progress``: one stderr line per pass with its time.
    """
    _check_bank(bank)
    c, d = bank.shape
    norm_err = (bank.detach().to(torch.float64).norm(dim=1) - 1).abs().max().item()
    u = _unit_rows(bank)
    bins, passes = _histogram_plan(u)
    pairs = c * (c - 1) // 2
    rank = torch.tensor(math.ceil(0.999 * pairs))  # 1-based rank of the percentile among sorted values
    lo, hi = 0.0, 1.0
    mx = total = None
    exact = None
    for level in range(passes):
        with _phase(progress, f"bank_stats C={c} d={d}: pass {level + 1}/{passes} over {pairs} pairs"):
            m, t, hist = _ops.bank_pair_stats(u, bins, lo, hi)
            if progress and u.is_cuda:
                torch.cuda.synchronize(u.device)
        if level == 0:
            mx, total = m, t
        cum = torch.cumsum(hist.cpu(), 0)
        # hist slot holding that rank: slot 0 counts everything below lo, so past the first pass slot >= 1
        k = int(torch.searchsorted(cum, rank).item())
        if level == 0 and k >= bins + 1:  # |cos| >= 1 (duplicate or antipodal rows; rounding): the max
            lo = hi = float(mx)
            break
        k = max(1, min(k, bins))
        below, inside = int(cum[k - 1]), int(hist[k])
        if level == 0 and passes == 3 and inside <= SELECT_CAPACITY:
            # the pairs of that bin, sorted: the rank-th smallest |cos| exactly, in one pass instead of two
            with _phase(progress, f"bank_stats C={c} d={d}: the {inside} pairs of bin {k}"):
                values, count = _ops.bank_pair_select(u, bins, lo, hi, k, SELECT_CAPACITY)
            if int(count) == inside:  # the histogram's own products (else: the histogram passes below)
                exact = float(values[int(rank) - below - 1])
                break
        lo, hi = lo + (k - 1) * (hi - lo) / bins, lo + k * (hi - lo) / bins
    p999 = min(hi if exact is None else exact, float(mx))
    return {"max_abs_cos": float(mx), "mean_abs_cos": float(total) / pairs, "p999_abs_cos": float(p999),
            "welch_bound": welch_bound(c, d), "max_norm_error": float(norm_err)}


# ==========================================================================================================
# EBV banks
# ==========================================================================================================
def _renorm(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True)


def _structured_start(num_classes: int, dim: int, gen: torch.Generator, dtype: torch.dtype,
                      device: torch.device | str | None) -> tuple[torch.Tensor, str, float | None]:
    """The best structured start for C > d + 1: (bank on device, description, known max |cos| or None).

    Candidates: the Kerdock bank of R^d (d a power of 4); the Kerdock bank of the largest power of 4 p < d
    zero-padded and randomly rotated (coherence 1/sqrt(p)); the chirp bank of the largest odd prime p <= d/2
    with 2p(p+1) >= C, zero-padded from R^2p and rotated (coherence 1/sqrt(p), ~sqrt(2) x Welch: the only
    structured start at shapes such as (5000, 128) or (100k, 1000)); the Kerdock bank of the next power of 4
    P > d with (P - d)/2 coordinate pairs (x, n + x) dropped, renormalised (its rows stay equinorm) and
    rotated; a Gaussian random bank. The truncated Kerdock bank's coherence is not known in closed form: it
    is measured on its first 4096 rows first (a lower bound, ~(C/4096)^2 times cheaper than the whole bank)
    and only measured in full when that does not already lose to a candidate with a known value.
    """
    if kerdock_size(dim) >= num_classes:
        return _finish(_kerdock_subset(num_classes, dim, gen, torch.float32), dtype, device), \
            f"kerdock{dim}", 1.0 / math.sqrt(dim)
    cands: list[tuple[float, str, torch.Tensor]] = []

    def rotated(rows: torch.Tensor) -> torch.Tensor:
        """(C, k) unit rows (k <= d) into R^d by a random rotation, on the target device in float32 (C x k x d
        flops: GPU work at C = 100k)."""
        rows = _finish(rows, torch.float32, device)
        rot = _finish(_orthonormal_columns(dim, rows.shape[1], gen).T, torch.float32, device)  # (k, d)
        return _finish(_renorm(rows @ rot), dtype, device)

    p = 4
    while p * 4 <= dim:
        p *= 4
    while p >= 4 and kerdock_size(p) < num_classes:
        p //= 4
    if 4 <= p <= dim:  # (d < 4 has no Kerdock bank to pad)
        cands.append((1.0 / math.sqrt(p), f"kerdock{p}-padded", rotated(_kerdock_subset(num_classes, p, gen,
                                                                                      torch.float32))))
    q = _largest_prime_at_most(dim // 2)
    if q and chirp_size(q) >= num_classes and (not cands or 1.0 / math.sqrt(q) < cands[0][0]):
        idx = torch.randperm(chirp_size(q), generator=gen)[:num_classes]
        cands.append((1.0 / math.sqrt(q), f"chirp{q}-padded", rotated(_chirp_rows(q, idx, torch.float32))))
    big = 4
    while big <= dim:
        big *= 4
    nb = big // 2
    drop = math.ceil((big - dim) / 2)
    if kerdock_size(big) and num_classes <= 2 * nb * nb and drop < nb // 2:
        idx = torch.randperm(2 * nb * nb, generator=gen)[:num_classes]
        keep = torch.cat([torch.arange(nb - drop), nb + torch.arange(nb - drop)])  # (Re x, Im x) pairs kept
        bank = rotated(_renorm(_kerdock_rows(big, idx, torch.float32)[:, keep]))
        known = min((c[0] for c in cands), default=float("inf"))
        if num_classes <= 4096 or bank_max_abs_cos(bank[:4096]) < known:
            cands.append((bank_max_abs_cos(bank), f"kerdock{big}-truncated", bank))
    if not cands:
        return _finish(_renorm(torch.randn(num_classes, dim, generator=gen)), dtype, device), "random", None
    best = min(cands, key=lambda t: t[0])
    return best[2], best[1], best[0]


def _step_seconds(w: torch.Tensor, beta: float) -> float:
    """Estimated seconds of one ``ebv_dir`` pass over all C rows of ``w``: a pass over its first m rows (~4 GFLOP)
    timed (second of two calls: the first may compile a Triton kernel) and scaled by (C/m)^2. 0 when m = C."""
    c, d = w.shape
    m = min(c, max(512, int(math.sqrt(1e9 / max(d, 1)))))
    if m >= c:
        return 0.0
    sub = w[:m].contiguous()
    dt = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        with _variant("ebv_dir", OPTIMISER_DIR_PRECISION):
            _ops.ebv_dir(sub, beta)
        if sub.is_cuda:
            torch.cuda.synchronize(sub.device)
        dt = time.perf_counter() - t0
    return dt * (c / m) ** 2


def _optimize(bank: torch.Tensor, steps: int, lr: float, progress: bool | None, start_max: float | None,
              time_budget_s: float | None = None, t_start: float | None = None,
              gen: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Heavy-ball descent on the unit sphere of F = (1/beta) log sum_{i != j} e^{beta |c_ij|}, beta annealed
    geometrically from 3/Welch to 1000/Welch. Each step: one ``ebv_dir`` pass, each row's Riemannian gradient
    normalised to length 1 (every row counts alike), velocity v <- 0.9 v + that direction, row -= eta v and
    renormalised, with eta annealed geometrically from lr * Welch to 0.01 lr * Welch (so a row first moves by up
    to ~lr * Welch / 0.1 radians, whatever the shape). The same schedule serves structured and Gaussian starts:
    on CPU it beat the former one (no momentum, angle lr -> 0.003 lr radians, beta 3 -> 300 / Welch) at every
    shape measured, e.g. 300 steps from the chirp start at (1000, 60): 1.483 -> 1.427-1.428 x Welch (3 seeds;
    former 1.443-1.444), padded Kerdock (1000, 100): 1.317 -> 1.268-1.284 (former: no gain), Gaussian (640, 64)
    with lr = 0.3 (``ebv_bank``'s default for Gaussian starts): 1.397 (former 1.431);
    bench/results/ebv-warmstart-cpu-2026-12-04.md has the log. A start at its own optimum
    (the Kerdock bank at (2000, 256), 1.07 x Welch) is not improved. Before the first step every row gets a
    seeded Gaussian kick of ~0.1 Welch radians (``gen``; default seed 0): a zero-padded structured start spans
    only a subspace (64 of 100 dimensions for the padded Kerdock bank at (1000, 100)), which the gradient never
    leaves except through rounding noise; with the kick, 100 steps take the chirp start at (400, 36) to
    1.418-1.419 x Welch (1.454-1.457 without), the padded Kerdock (140, 30) to 1.328-1.338 (no gain without). It
    costs at one measured shape: (140, 24) after 300 steps 1.265-1.273 with it, 1.209-1.232 without.

    ``time_budget_s`` counts from ``t_start`` (a ``time.perf_counter()`` value; default: now). From the second
    step on (the first may compile a kernel), the schedule is shortened to the steps that still fit at the last
    step's pace, less two reserved for the final scoring, so that the annealing still ends at its final beta and
    step (then the result depends on the machine's speed, and a RuntimeWarning says so); the loop stops before
    another step plus the final scoring would overrun the budget. It does not start when one step alone is
    estimated to take longer than what is left (a warning says so; the start is returned, with its max |cos| if
    known, else NaN).
    Returns the iterate with the smallest max |cos| seen (the start included) and that value."""
    from tqdm.auto import tqdm

    if steps == 0:  # the start itself (measured only when its coherence is not known)
        return bank.to(torch.float32).contiguous(), bank_max_abs_cos(bank) if start_max is None else start_max
    c, d = bank.shape
    welch = max(welch_bound(c, d), 1e-3)
    w = bank.to(torch.float32).contiguous()
    t0 = time.perf_counter() if t_start is None else t_start
    if time_budget_s is not None:
        est = _step_seconds(w, 3.0 / welch)  # 0 for small problems: then at least one step runs
        left = time_budget_s - (time.perf_counter() - t0)
        if est > 0 and est > left:
            warnings.warn(f"ebv_bank: one optimiser step at C={c}, d={d} would take ~{est:.0f} s on this "
                          f"{w.device.type} device, more than the {max(left, 0):.3g} s left of time_budget_s="
                          f"{time_budget_s:g} s; returning the structured start unoptimised (pass "
                          "time_budget_s=None to optimise anyway)", RuntimeWarning, stacklevel=3)
            return w, float("nan") if start_max is None else start_max
    best, best_max = w.clone(), float("inf") if start_max is None else start_max
    if gen is None:
        gen = torch.Generator().manual_seed(0)
    kick = torch.randn(c, d, generator=gen, dtype=torch.float32).to(w.device)
    w = w + (0.1 * welch / math.sqrt(d)) * kick
    w = (w / w.norm(dim=1, keepdim=True)).contiguous()
    del kick
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(range(steps), desc=f"ebv_bank C={c} d={d}", disable=not progress, leave=False)
    velocity = torch.zeros_like(w)
    planned = steps  # the schedule's length: shortened when the time budget cannot fit every step
    for step in bar:
        t_step = time.perf_counter()
        frac = step / max(1, planned - 1)
        beta = (3.0 / welch) * (1000.0 / 3.0) ** frac
        with _variant("ebv_dir", OPTIMISER_DIR_PRECISION):  # a descent direction; the result is rescored below
            g, rowmax = _ops.ebv_dir(w, beta)
        cur = float(rowmax.max())
        if cur < best_max:
            best, best_max = w.clone(), cur
        bar.set_postfix(max_cos=f"{cur:.5f}", best=f"{best_max:.5f}", refresh=False)
        g = g - (g * w).sum(dim=1, keepdim=True) * w  # Riemannian gradient: drop the radial part
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)  # every row's direction counts alike
        velocity.mul_(0.9).add_(g)  # heavy ball; v is not transported to the new tangent space (as measured)
        w = w - (lr * welch * 0.01 ** frac) * velocity
        w = (w / w.norm(dim=1, keepdim=True)).contiguous()
        now = time.perf_counter()
        if time_budget_s is not None and step + 1 < planned:
            # steps that still fit at this step's pace, less 2 for the final scoring (up to 3 max |cos| passes,
            # each ~half a step); too few: the annealing is compressed so that it still ends at its final beta
            # and step (a run cut mid-schedule ends in its low-beta phase, above the start)
            fit = math.floor((time_budget_s - (now - t0)) / max(now - t_step, 1e-9)) - 2
            if step > 0 or fit <= 0:
                planned = max(step + 1, min(planned, step + 1 + fit))
                bar.total = planned
        if step + 1 >= planned:
            break
    bar.close()
    if planned < steps:
        warnings.warn(f"ebv_bank: time budget of {time_budget_s:g} s reached after {planned}/{steps} steps (the "
                      "annealing schedule was shortened to fit it); returning the best iterate (pass "
                      "time_budget_s=None for all steps)", RuntimeWarning, stacklevel=3)
    # The per-step maxima may come from TF32 products (GPU): re-measure the candidates exactly before choosing.
    with _phase(progress, f"ebv_bank C={c} d={d}: exact max |cos| of the start, the last and the best iterate"):
        start_exact = bank_max_abs_cos(bank) if start_max is None else start_max
        cands = [(start_exact, bank.to(torch.float32)), (bank_max_abs_cos(w), w)]
        if best_max < start_exact or start_max is None:
            cands.append((bank_max_abs_cos(best), best))
        best_max, best = min(cands, key=lambda t: t[0])
    return best.contiguous(), best_max


# Default optimiser budget in units of C^2 d per device: a step is one ebv_dir pass, ~4 C^2 d FLOPs (two
# GEMM-sized products). CPU: ~100 steps at (10k, 64), ~200 at (5000, 128), the 1000-step cap at (1000, 100).
_GPU_STEP_BUDGET = 3e15
_CPU_STEP_BUDGET = 6.4e11
_MAX_STEPS = 1000


def ebv_bank(num_classes: int, dim: int, *, seed: int = 0, method: str = "auto", steps: int | None = None,
             lr: float | None = None, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
             progress: bool | None = None, time_budget_s: float | None = 120.0) -> torch.Tensor:
    """Equiangular Basis Vectors: C unit vectors in R^d with the smallest max |cos| we can reach.

    * C <= d: a random orthonormal set (max |cos| = 0); C = d + 1: the simplex ETF (meets the Welch bound).
    * ``method="kerdock"``: d a power of 4 (4..4096) and C <= d(d/2+1): a seeded subset of the realified
      Z4-Kerdock bank, every pairwise |cos| in {0, 1/sqrt(d)} (Levenshtein bound); entries {0, +-sqrt(2/d)}
      when C <= d^2/2. Only the C chosen rows are generated (O(C*d) memory).
    * ``method="optimize"``: starts from the best structured bank available (see ``_structured_start``: the
      Kerdock bank of a smaller power of 4, or the chirp bank of the largest odd prime p <= d/2 with
      2p(p+1) >= C, coherence 1/sqrt(p) ~ 1.42 x Welch at (100k, 1000)) and runs ``steps`` heavy-ball
      steps on the annealed soft-max of |cos| over all pairs (see ``_optimize``; one tiled ``ebv_dir`` pass per
      step, never a C x C matrix; float32, on ``device``); returns the iterate with the smallest max |cos|
      (never worse than the start). ``steps=0`` returns the structured start itself.
    * ``method="auto"``: the structured start when it is within AUTO_KEEP_RATIO = 1.25x the Welch bound or
      C >= AUTO_KEEP_CLASSES_PER_DIM = 36 d (where the optimiser gains under 0.5% of the start: at
      (100k, 1000) auto returns the 1.423x chirp start in seconds instead of spending time_budget_s on a gain
      expected well under 0.5%; ``method="optimize"`` still runs it), else ``optimize`` from it (also when
      only a Gaussian start exists, e.g. (10k, 64)). Measured on CPU, 300 steps
      from the start (log and commands: bench/results/ebv-warmstart-cpu-2026-12-04.md): kept starts gain
      nothing or next to nothing -- Kerdock (2000, 256) 1.07x; padded Kerdock (1000, 80) 1.165x,
      (1500, 90) 1.223x -> 1.218x --; optimised: padded Kerdock (800, 90) 1.258x -> 1.245-1.247x (3 seeds),
      (1000, 100) 1.317x -> 1.268-1.284x (3 seeds); chirp (400, 36) 1.524x -> 1.389-1.390x, (1000, 60)
      1.483x -> 1.427-1.428x, (2500, 90) 1.473x -> 1.457x; kept (C/d >= 36): (5000, 128) 1.467x -> 1.461x
      (200 steps, the CPU default: 44 s on one core, a 0.4% gain), (10000, 200) 1.4504x -> 1.4484x (150
      steps, 437 s). The chirp starts' gain shrinks as C/d grows (11, 17, 28, 39, 50 above). Where ``auto``
      optimises and one step alone would overrun ``time_budget_s``, it returns the start with the
      RuntimeWarning below.

    ``steps`` (optimiser) defaults to min(1000, max(20, budget / (C^2 d))), budget 6.4e11 on CPU (~100 steps
    at (10k, 64)) and 3e15 on GPU (300 at (100k, 1000)). ``time_budget_s`` (default 120 s, None: no limit)
    bounds the whole call (to within the final scoring's spread): the optimiser stops before another step plus
    the final scoring would overrun it, and the best iterate so far is returned with a RuntimeWarning (a run
    cut short depends on the machine's speed; otherwise the result is deterministic for a seed on a device).
    When one step alone is estimated (from a timed pass over a row subset) to exceed what is left, e.g.
    (100k, 1000) on a CPU, the optimiser does not start: a RuntimeWarning says so and the structured start is
    returned.
    ``lr``: initial step in units of the Welch bound (row -= lr * Welch * v, v the heavy-ball velocity, |v| < 10;
    annealed to 0.01 lr). Default: 0.1 from a structured start, 0.3 from a Gaussian one -- measured (CPU, seed 0):
    Gaussian starts 0.3 beats 0.1 at every shape tried ((640, 64) 300 steps 1.397 vs 1.408 x Welch; (10k, 64)
    100 steps 2.351 vs 2.410, the former schedule 2.374); structured starts 0.1 wins longer runs ((1000, 100)
    1000 steps 1.232 vs 1.243) and 0.3 short ones ((1000, 60) 100 steps 1.437 vs 1.443).
    ``progress``: tqdm bar (default: when stderr is a tty).
    Returns (C, d) ``dtype`` on ``device`` (CPU by default).
    """
    t_call = time.perf_counter()
    _check_sizes(num_classes, dim)
    _check_output(dtype, device)
    if method not in ("auto", "optimize", "kerdock"):
        raise ValueError(f"method must be one of 'auto', 'optimize', 'kerdock', got {method!r}")
    if steps is None:
        on_gpu = device is not None and torch.device(device).type == "cuda"
        budget = _GPU_STEP_BUDGET if on_gpu else _CPU_STEP_BUDGET
        steps = int(min(_MAX_STEPS, max(20, budget / (float(num_classes) ** 2 * dim))))
    _check_steps_lr(steps, 0.1 if lr is None else lr)
    if time_budget_s is not None and not (isinstance(time_budget_s, (int, float)) and
                                          not isinstance(time_budget_s, bool) and time_budget_s > 0):
        raise ValueError(f"time_budget_s must be a number > 0 or None, got {time_budget_s!r}")
    gen = _generator(seed)
    if method == "kerdock":
        if kerdock_size(dim) < num_classes:
            why = (f"dim={dim} is not a power of 4 in 4..4096" if not kerdock_size(dim)
                   else f"num_classes={num_classes} > {kerdock_size(dim)} = dim*(dim/2+1)")
            raise ValueError(f"method='kerdock' needs dim a power of 4 and num_classes <= dim*(dim/2+1): {why}; "
                             "use method='optimize' or 'auto'")
        return _finish(_kerdock_subset(num_classes, dim, gen, torch.float32 if dtype != torch.float64
                                       else torch.float64), dtype, device)
    if num_classes <= dim:
        return _finish(_orthonormal_columns(dim, num_classes, gen).T, dtype, device)
    if num_classes == dim + 1:
        return simplex_etf(num_classes, dim, seed=seed, dtype=dtype, device=device)
    if progress is None:
        progress = sys.stderr.isatty()
    with _phase(progress, f"ebv_bank C={num_classes} d={dim}: structured start"):
        start, _, start_max = _structured_start(num_classes, dim, gen, torch.float32, device)
    if method == "auto" and start_max is not None and (
            start_max <= AUTO_KEEP_RATIO * welch_bound(num_classes, dim)
            or num_classes >= AUTO_KEEP_CLASSES_PER_DIM * dim):
        return _unit_rows_as(start, dtype)  # see "auto" above: the optimiser does not (measurably) improve it
    if lr is None:  # see ``lr`` above
        lr = 0.1 if start_max is not None else 0.3
    best, _ = _optimize(start, steps, lr, progress, start_max, time_budget_s, t_call, gen)
    return _unit_rows_as(best, dtype)


# ==========================================================================================================
# Sparse ETF (FedLoGe SSE-C)
# ==========================================================================================================
def sparse_etf(num_classes: int, dim: int, *, sparsity: float = 0.6, seed: int = 0, steps: int = 500,
               lr: float = 1e-3, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
               ) -> torch.Tensor:
    """FedLoGe's static sparse ETF (SSE-C): unit rows with at least ``sparsity`` of the entries exactly zero
    and pairwise cos close to -1/(C-1).

    Start: the simplex ETF when C <= d + 1, else a Gaussian bank (no exact ETF exists; the same target is
    then a least-squares compromise). Mask: every row gets exactly ceil(sparsity * d) zeros at seeded random
    positions (so the whole bank has at least ``sparsity`` zeros too). Then ``steps`` Adam steps on the masked
    entries minimise mean over c != c' of (cos_cc' + 1/(C-1))^2 with rows normalised in the forward; the loss
    uses the Gram identities sum_ij cos_ij^2 = |U^T U|_F^2 and sum_ij cos_ij = |U^T 1|^2, so memory is
    O(C*d + d^2), never C x C. Returns (C, d) ``dtype`` on ``device``; zeros are exact.
    """
    _check_sizes(num_classes, dim)
    _check_output(dtype, device)
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    zeros = math.ceil(sparsity * dim - 1e-9)
    if zeros > dim - 1:
        raise ValueError(f"sparsity={sparsity} leaves no nonzero entry per row at dim={dim} "
                         f"(needs ceil(sparsity*dim) <= dim - 1)")
    _check_steps_lr(steps, lr)
    c = num_classes
    gen = _generator(seed)
    if c <= dim + 1:
        dense = simplex_etf(c, dim, seed=seed, dtype=torch.float64)
    else:
        dense = torch.randn(c, dim, generator=gen, dtype=torch.float64)
    order = torch.rand(c, dim, generator=gen).argsort(dim=1)
    mask = torch.ones(c, dim, dtype=torch.float64)
    mask.scatter_(1, order[:, :zeros], 0.0)
    dev = device if device is not None else "cpu"
    mask = mask.to(dev)
    w = (dense.to(dev) * mask).requires_grad_(True)
    a = 1.0 / (c - 1)  # target cos is -a
    opt = torch.optim.Adam([w], lr=lr)

    def unit() -> torch.Tensor:
        m = w * mask
        return m / m.norm(dim=1, keepdim=True).clamp_min(1e-30)

    for _ in range(steps):
        u = unit()
        gram = u.T @ u
        s1 = u.sum(0)
        # sum over c != c' of (cos + a)^2 = |U^T U|_F^2 + 2a |U^T 1|^2 + a^2 C^2 - C (1 + a)^2  (diagonal cos = 1)
        loss = ((gram * gram).sum() + 2 * a * (s1 @ s1) + a**2 * c * c - c * (1 + a) ** 2) \
            / (c * (c - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = unit()
    return out.to(dtype).contiguous()


# ==========================================================================================================
# Storage
# ==========================================================================================================
def save_bank(path: str | os.PathLike, bank: torch.Tensor, **meta: Any) -> None:
    """Write ``bank`` to a safetensors file (tensor "bank", stored contiguous on CPU) with metadata.

    Metadata: every keyword (JSON-encoded), plus ``num_classes``, ``dim``, ``dtype`` and ``stats`` (the
    :func:`bank_stats` dict). ``stats`` is computed when not given; pass ``stats=None`` to skip it.
    Conventional keys: ``kind`` (simplex|ebv|sparse), ``seed``, ``method``, ``sparsity``.
    FileNotFoundError when the directory of ``path`` does not exist, IsADirectoryError when ``path`` is one.
    """
    from safetensors.torch import save

    _check_bank(bank)
    if "stats" not in meta:
        meta["stats"] = bank_stats(bank)
    meta.update(num_classes=int(bank.shape[0]), dim=int(bank.shape[1]), dtype=str(bank.dtype).replace("torch.", ""))
    try:
        encoded = {k: json.dumps(v) for k, v in meta.items()}
    except TypeError as exc:
        raise ValueError(f"save_bank metadata must be JSON-serialisable: {exc}") from None
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"save_bank: path {path!r} is a directory; give a file name, e.g. bank.safetensors")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"save_bank: the directory of path {path!r} does not exist ({parent!r})")
    try:
        data = save({"bank": bank.detach().contiguous().cpu()}, metadata=encoded)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise OSError(f"save_bank could not encode the bank for {path!r}: {exc}") from None
    # written with open() so that the file mode follows the umask (safetensors' save_file creates 0600 files)
    with open(path, "wb") as f:
        f.write(data)


def load_bank(path: str | os.PathLike, *, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a bank written by :func:`save_bank`: returns (bank (C, d) on ``device`` or CPU, metadata dict).
    FileNotFoundError for a missing file; ValueError for a file that holds no "bank" tensor, one that is not a
    finite floating-point (C, d) matrix with C >= 2 and d >= 1 (what :func:`save_bank` accepts), or metadata
    ``num_classes`` / ``dim`` / ``dtype`` that contradict the tensor."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no bank file at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            if "bank" not in f.keys():
                raise ValueError(f"{path!r} holds no 'bank' tensor (keys: {sorted(f.keys())})")
            bank = f.get_tensor("bank")
            raw = f.metadata() or {}
        if bank.dim() != 2 or not bank.is_floating_point():
            raise ValueError(f"{path!r}: 'bank' must be a floating-point (C, d) tensor, got {bank.dtype} "
                             f"of shape {tuple(bank.shape)}")
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise ValueError(f"{path!r} is not a readable safetensors bank: {exc}") from None
    try:
        _check_bank(bank, f"{path!r}: 'bank'")
    except ValueError as exc:
        raise ValueError(f"{exc} (save_bank writes only such banks)") from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    actual = {"num_classes": int(bank.shape[0]), "dim": int(bank.shape[1]),
              "dtype": str(bank.dtype).replace("torch.", "")}
    for key, value in actual.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"{path!r}: metadata {key}={meta[key]!r} contradicts the stored bank "
                             f"({key}={value!r}, shape {tuple(bank.shape)}, {bank.dtype})")
    return (bank.to(device) if device is not None else bank), meta
