"""torch.library schemas and fake kernels of the collapse family: streaming class statistics, pair kernels, NC4 mismatch.

Each op routes through :mod:`etfkern._core.backend`; see ``etfkern/collapse/reference.py`` for the math."""
from __future__ import annotations

import torch

import os

from etfkern._core import dispatch
from etfkern._core.backend import register
from etfkern._core.library import define
from etfkern.collapse import cpu, reference


def _collapse_update_fake(features, inv, m_old, n_old):
    k, d = m_old.shape
    return (m_old.new_empty(k, d, dtype=torch.float64), m_old.new_empty(k, dtype=torch.float64),
            m_old.new_empty(d, d, dtype=torch.float64))


def _collapse_pair_stats_fake(mt, s, shift):
    return mt.new_empty(6, dtype=torch.float64)


def _collapse_ncc_fake(features, means, weights, bias):
    n = features.shape[0]
    return features.new_empty(n, dtype=torch.int64), features.new_empty(n, dtype=torch.int64)


# One batch merged into K running class statistics: (m_new (K,d) f64, m2_delta (K,) f64, sw_delta (d,d) f64).
collapse_update = define("collapse_update", "(Tensor features, Tensor inv, Tensor m_old, Tensor n_old) "
                         "-> (Tensor, Tensor, Tensor)", _collapse_update_fake, native=True)
# Pair sums over c < c' (CDNV, shifted GNC2 sum and sum of squares, max-angle) and the numbers of pairs without a
# CDNV / GNC2 term (coincident means / directions): (6,) float64.
collapse_pair_stats = define("collapse_pair_stats", "(Tensor mt, Tensor s, float shift) -> Tensor",
                             _collapse_pair_stats_fake)
# NC4 indices: classifier argmax over C rows, nearest-mean argmin over K rows: two (N,) int64.
collapse_ncc = define("collapse_ncc", "(Tensor features, Tensor means, Tensor weights, Tensor? bias) "
                      "-> (Tensor, Tensor)", _collapse_ncc_fake)


def _variant(env: str, table: str, default: str, t: torch.Tensor, **features) -> str:
    """A Triton kernel variant: env ``env`` when set (validated by the launcher), else the CUDA dispatch table's
    choice for ``features`` (etfkern/_core/dispatch.py), else ``default`` (CPU tensors: the interpreter)."""
    explicit = os.environ.get(env)
    if explicit:
        return explicit
    return dispatch.choose_variant(table, **features)[0] if t.is_cuda else default


def update_product(features: torch.Tensor) -> str:
    """The Triton backend's scatter product (ETFKERN_COLLAPSE_PRODUCT, see triton_kernels/collapse.py)."""
    n, d = features.shape
    return _variant("ETFKERN_COLLAPSE_PRODUCT", "collapse_update_product", "triton", features,
                    dtype=dispatch.dtype_name(features.dtype), d=d, N=n)


def pair_precision(mt: torch.Tensor) -> str:
    """The Triton pair kernel's Gram precision (ETFKERN_COLLAPSE_PAIR_PRECISION: "tf32x3" or "bf16x3")."""
    k, d = mt.shape
    return _variant("ETFKERN_COLLAPSE_PAIR_PRECISION", "collapse_pair_precision", "tf32x3", mt, K=k, d=d)


def _update_triton(features, inv, m_old, n_old):
    from etfkern.triton_kernels import collapse as tk

    return tk.collapse_update(features, inv, m_old, n_old, product=update_product(features))


def _pair_stats_triton(mt, s, shift):
    from etfkern.triton_kernels import collapse as tk

    tiles, part = tk.collapse_pair_partials(mt, s, shift, precision=pair_precision(mt))
    return cpu.finish_pair_partials(mt, s, shift, tiles, part, tk.pair_block(mt.device))


# Implementations per backend (the router in etfkern._core.backend picks one per call; a compiled
# ``<op>_native`` kernel shadows the cpu entry when etfkern._C has it).
for _op in ("collapse_update", "collapse_pair_stats", "collapse_ncc"):
    register(_op, "reference", getattr(reference, _op))
register("collapse_update", "triton", _update_triton)
register("collapse_pair_stats", "triton", _pair_stats_triton)
register("collapse_ncc", "triton", "etfkern.triton_kernels.collapse:collapse_ncc")
register("collapse_update", "cpu", cpu._update_cpu)
register("collapse_pair_stats", "cpu", cpu._pair_stats_cpu)
register("collapse_ncc", "cpu", cpu._ncc_cpu)
