"""torch.library schemas and fake (meta) kernels for every etfkern op.

Each op ``etfkern::<name>`` defined here gets
  * its schema and fake kernel (shapes/dtypes only, so torch.compile can trace through it),
  * a CPU and a CUDA kernel that route through :mod:`etfkern._backend` (reference | cpu | triton | cuda),
  * with ``native=True``, a twin ``etfkern::<name>_native`` with the same schema: the op the compiled library
    implements in C++/CUDA with ``TORCH_LIBRARY_IMPL(etfkern, CPU|CUDA)``; the router calls it when present.
Autograd (``torch.library.register_autograd``) and the public functions live in the family files
(``banks.py``, ``spherical.py``, ``collapse.py``, ``optim/``), next to the backends they register.

Schemas take positional arguments only (no ``*``): the router forwards them untouched.
"""
from __future__ import annotations

from typing import Callable

import torch

from etfkern import _backend

LIB = torch.library.Library("etfkern", "DEF")


def define(name: str, schema: str, fake: Callable, *, native: bool = False) -> Callable:
    """Define ``etfkern::<name><schema>`` with its fake kernel and routed CPU/CUDA kernels; return the op."""
    LIB.define(name + schema)
    torch.library.register_fake(f"etfkern::{name}", fake, lib=LIB)
    routed = _backend.router(name)
    LIB.impl(name, routed, "CPU")
    LIB.impl(name, routed, "CUDA")
    if native:
        LIB.define(f"{name}_native{schema}")
    return getattr(torch.ops.etfkern, name).default


# ==========================================================================================================
# banks: bank_stats (tiled pairwise |cos| statistics), optimisation steps for ebv_bank / sparse_etf
# ==========================================================================================================


def _bank_pair_stats_fake(bank, bins, lo, hi):
    return (bank.new_empty((), dtype=torch.float64), bank.new_empty((), dtype=torch.float64),
            bank.new_empty((bins + 2,), dtype=torch.int64))


# |<w_i, w_j>| over pairs i < j of the rows as given: (max f64, sum f64, hist i64 (bins + 2,): [< lo, bins..., >= hi])
bank_pair_stats = define("bank_pair_stats", "(Tensor bank, int bins, float lo, float hi) -> (Tensor, Tensor, Tensor)",
                         _bank_pair_stats_fake)


def _ebv_dir_fake(bank, beta):
    return torch.empty_like(bank), bank.new_empty((bank.shape[0],))


# ebv_bank optimiser step, one tiled pass over the pairs: rowmax_i = max_{j != i} |c_ij| and
# dir_i = sum_{j != i} e^{beta (|c_ij| - rowmax_i)} sign(c_ij) w_j (row-scaled gradient of the soft-max coherence)
ebv_dir = define("ebv_dir", "(Tensor bank, float beta) -> (Tensor, Tensor)", _ebv_dir_fake)


# ==========================================================================================================
# spherical: fused spherical logits + cross-entropy, nearest()
# ==========================================================================================================


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spherical_ce_forward_fake(x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad):
    acc = _acc(x.dtype)
    n, d = x.shape
    return (x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc), x.new_empty(n if need_grad else 0, d, dtype=acc))


def _spherical_ce_bank_grad_fake(x, bank, target, target_b, lam, grad_rows, lse, tau, metric, eps, ignore_index):
    return bank.new_empty(bank.shape, dtype=_acc(bank.dtype))


def _spherical_nearest_fake(x, bank, k):
    return x.new_empty(x.shape[0], k, dtype=_acc(x.dtype)), x.new_empty(x.shape[0], k, dtype=torch.int64)


# (loss_rows (N,), lse (N,), grad_xhat (N, d) | (0, d)); see etfkern/reference/spherical.py for the math.
spherical_ce_forward = define(
    "spherical_ce_forward",
    "(Tensor x, Tensor bank, Tensor target, Tensor target_b, Tensor lam, float tau, str metric, float eps, "
    "int ignore_index, bool need_grad) -> (Tensor, Tensor, Tensor)",
    _spherical_ce_forward_fake)
def _spherical_ce_partials_fake(x, bank, tau, metric, need_sumz, need_grad, need_b):
    acc = _acc(x.dtype)
    n, d = x.shape
    return (x.new_empty(n, dtype=acc), x.new_empty(n if need_sumz else 0, dtype=acc),
            x.new_empty(n if need_grad else 0, d, dtype=acc), x.new_empty(n if need_b else 0, d, dtype=acc))


# Class-loop partials over a bank shard (lse, sum_c z, sum_c p s w, sum_c s w): the vocab-parallel building block.
spherical_ce_partials = define(
    "spherical_ce_partials",
    "(Tensor x, Tensor bank, float tau, str metric, bool need_sumz, bool need_grad, bool need_b) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _spherical_ce_partials_fake)
# dW (C, d) = sum_i g_i (p_ic - t_ic) s_ic x̂_i, recomputing the probabilities from the saved lse.
spherical_ce_bank_grad = define(
    "spherical_ce_bank_grad",
    "(Tensor x, Tensor bank, Tensor target, Tensor target_b, Tensor lam, Tensor grad_rows, Tensor lse, float tau, "
    "str metric, float eps, int ignore_index) -> Tensor",
    _spherical_ce_bank_grad_fake)
# (top-k cosines (N, k), int64 indices (N, k)), sorted descending; no N x C buffer.
# C++: csrc/cpu/spherical_ce.cpp (GEMM tiles + running top-k merge); torch fallback: spherical.chunked_nearest.
spherical_nearest = define("spherical_nearest", "(Tensor x, Tensor bank, int k) -> (Tensor, Tensor)",
                           _spherical_nearest_fake, native=True)


def _spherical_cos_tiles_fake(xs, bank, tau, need_grad, tile_rows, tile_classes):
    acc = _acc(xs.dtype)
    n, d = xs.shape
    return xs.new_empty(n, dtype=acc), xs.new_empty(n if need_grad else 0, d, dtype=acc)


# CPU-internal: the "cos" fixed-shift class loop over (tile_rows x tile_classes) tiles of z = xs @ bank^T
# (xs = x̂ / tau): (lse (N,), sum_c exp(z) w_c / (tau sum_c exp(z)) (N, d) | (0, d)). C++: csrc/cpu/spherical_ce.cpp.
spherical_cos_tiles = define(
    "spherical_cos_tiles",
    "(Tensor xs, Tensor bank, float tau, bool need_grad, int tile_rows, int tile_classes) -> (Tensor, Tensor)",
    _spherical_cos_tiles_fake, native=True)


# ==========================================================================================================
# collapse: streaming class statistics, pair kernels, NC4 mismatch
# ==========================================================================================================

def _collapse_update_fake(features, inv, m_old, n_old):
    k, d = m_old.shape
    return (m_old.new_empty(k, d, dtype=torch.float64), m_old.new_empty(k, dtype=torch.float64),
            m_old.new_empty(d, d, dtype=torch.float64))


def _collapse_pair_stats_fake(mt, s, shift):
    return mt.new_empty(4, dtype=torch.float64)


def _collapse_ncc_fake(features, means, weights, bias):
    n = features.shape[0]
    return features.new_empty(n, dtype=torch.int64), features.new_empty(n, dtype=torch.int64)


# One batch merged into K running class statistics: (m_new (K,d) f64, m2_delta (K,) f64, sw_delta (d,d) f64).
collapse_update = define("collapse_update", "(Tensor features, Tensor inv, Tensor m_old, Tensor n_old) "
                         "-> (Tensor, Tensor, Tensor)", _collapse_update_fake, native=True)
# Pair sums over c < c' (CDNV, shifted GNC2 sum and sum of squares, max-angle): (4,) float64.
collapse_pair_stats = define("collapse_pair_stats", "(Tensor mt, Tensor s, float shift) -> Tensor",
                             _collapse_pair_stats_fake)
# NC4 indices: classifier argmax over C rows, nearest-mean argmin over K rows: two (N,) int64.
collapse_ncc = define("collapse_ncc", "(Tensor features, Tensor means, Tensor weights, Tensor? bias) "
                      "-> (Tensor, Tensor)", _collapse_ncc_fake)



# ==========================================================================================================
# msam: fused Momentum-SAM optimizer steps
# ==========================================================================================================
# Pass 1 of exact MSAM: the squared global norm of the next momentum (one 0-dim tensor, kept on the device).
# Pass 2: undo + update + perturb in one sweep, in place; returns the squared norm of the new momentum (the
# lagged mode's norm for the next step). scale_old/scale_new are 0-dim device tensors: no host sync.
def _msam_norm_fake(params, grads, bufs, scale, *rest):
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in bufs) else torch.float32
    return scale.new_empty((), dtype=dtype)


def _msam_sgd_fake(params, grads, bufs, scale_old, *rest):
    return _msam_norm_fake(params, grads, bufs, scale_old)


def _msam_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, scale_old, *rest):
    return _msam_norm_fake(params, grads, exp_avgs, scale_old)


msam_sq_norm = define(
    "msam_sq_norm",
    "(Tensor[] params, Tensor[] grads, Tensor[] bufs, Tensor scale, float[] momentum, float[] grad_coef, "
    "float[] weight_decay, Tensor? grad_scale) -> Tensor",
    _msam_norm_fake, native=True)
msam_sgd_step = define(
    "msam_sgd_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor scale_old, Tensor scale_new, float[] lr, "
    "float[] momentum, float[] weight_decay, bool[] nesterov, Tensor? grad_scale, Tensor? found_inf) -> Tensor",
    _msam_sgd_fake, native=True)
msam_adamw_step = define(
    "msam_adamw_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor scale_old, "
    "Tensor scale_new, Tensor step, float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
    "Tensor? grad_scale, Tensor? found_inf) -> Tensor",
    _msam_adamw_fake, native=True)
