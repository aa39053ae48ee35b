"""torch.library schemas and fake kernels of the spherical family: fused spherical logits + cross-entropy, nearest().

Each op routes through :mod:`etfkern._core.backend`; see ``etfkern/spherical/reference.py`` for the math."""
from __future__ import annotations

import torch

from etfkern._core.dtypes import acc_dtype
from etfkern._core.library import define


def _spherical_ce_forward_fake(x, bank, target, target_b, lam, tau, metric, eps, ignore_index, need_grad):
    acc = acc_dtype(x.dtype)
    n, d = x.shape
    return (x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc), x.new_empty(n if need_grad else 0, d, dtype=acc))


def _spherical_ce_bank_grad_fake(x, bank, target, target_b, lam, grad_rows, lse, tau, metric, eps, ignore_index):
    return bank.new_empty(bank.shape, dtype=acc_dtype(bank.dtype))


def _spherical_nearest_fake(x, bank, k):
    return x.new_empty(x.shape[0], k, dtype=acc_dtype(x.dtype)), x.new_empty(x.shape[0], k, dtype=torch.int64)


# (loss_rows (N,), lse (N,), grad_xhat (N, d) | (0, d)); see etfkern/reference/spherical.py for the math.
spherical_ce_forward = define(
    "spherical_ce_forward",
    "(Tensor x, Tensor bank, Tensor target, Tensor target_b, Tensor lam, float tau, str metric, float eps, "
    "int ignore_index, bool need_grad) -> (Tensor, Tensor, Tensor)",
    _spherical_ce_forward_fake)
def _spherical_ce_partials_fake(x, bank, tau, metric, need_sumz, need_grad, need_b):
    acc = acc_dtype(x.dtype)
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
# C++: csrc/spherical/cpu.cpp (GEMM tiles + running top-k merge); torch fallback: spherical.chunked_nearest.
spherical_nearest = define("spherical_nearest", "(Tensor x, Tensor bank, int k) -> (Tensor, Tensor)",
                           _spherical_nearest_fake, native=True)


def _spherical_cos_tiles_fake(xs, bank, tau, need_grad, tile_rows, tile_classes):
    acc = acc_dtype(xs.dtype)
    n, d = xs.shape
    return xs.new_empty(n, dtype=acc), xs.new_empty(n if need_grad else 0, d, dtype=acc)


# CPU-internal: the "cos" fixed-shift class loop over (tile_rows x tile_classes) tiles of z = xs @ bank^T
# (xs = x̂ / tau): (lse (N,), sum_c exp(z) w_c / (tau sum_c exp(z)) (N, d) | (0, d)). C++: csrc/spherical/cpu.cpp.
spherical_cos_tiles = define(
    "spherical_cos_tiles",
    "(Tensor xs, Tensor bank, float tau, bool need_grad, int tile_rows, int tile_classes) -> (Tensor, Tensor)",
    _spherical_cos_tiles_fake, native=True)
