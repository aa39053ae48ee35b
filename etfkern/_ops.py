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
spherical_nearest = define("spherical_nearest", "(Tensor x, Tensor bank, int k) -> (Tensor, Tensor)",
                           _spherical_nearest_fake)


# ==========================================================================================================
# collapse: streaming class statistics, pair kernels, NC4 mismatch
# ==========================================================================================================


# ==========================================================================================================
# msam: fused Momentum-SAM optimizer steps
# ==========================================================================================================
