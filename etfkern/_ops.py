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


def _ebv_row_stats_fake(bank, beta):
    return bank.new_empty((bank.shape[0],)), bank.new_empty((bank.shape[0],))


# ebv_bank optimiser pass 1: per row max_{j != i} |c_ij| and lse_i = log sum_{j != i} exp(beta |c_ij|)
ebv_row_stats = define("ebv_row_stats", "(Tensor bank, float beta) -> (Tensor, Tensor)", _ebv_row_stats_fake)


def _ebv_grad_fake(bank, lse, beta):
    return torch.empty_like(bank)


# ebv_bank optimiser pass 2: grad_i = sum_{j != i} (e^{beta a_ij - lse_i} + e^{beta a_ij - lse_j}) sign(c_ij) w_j
ebv_grad = define("ebv_grad", "(Tensor bank, Tensor lse, float beta) -> Tensor", _ebv_grad_fake)


# ==========================================================================================================
# spherical: fused spherical logits + cross-entropy, nearest()
# ==========================================================================================================


# ==========================================================================================================
# collapse: streaming class statistics, pair kernels, NC4 mismatch
# ==========================================================================================================


# ==========================================================================================================
# msam: fused Momentum-SAM optimizer steps
# ==========================================================================================================
