"""torch.library schemas and fake kernels of the collapse family: streaming class statistics, pair kernels, NC4 mismatch.

Each op routes through :mod:`etfkern._core.backend`; see ``etfkern/collapse/reference.py`` for the math."""
from __future__ import annotations

import torch

from etfkern._core.backend import register
from etfkern._core.library import define
from etfkern.collapse import cpu, reference


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


# Implementations per backend (the router in etfkern._core.backend picks one per call; a compiled
# ``<op>_native`` kernel shadows the cpu entry when etfkern._C has it).
for _op in ("collapse_update", "collapse_pair_stats", "collapse_ncc"):
    register(_op, "reference", getattr(reference, _op))
    register(_op, "triton", f"etfkern.triton_kernels.collapse:{_op}")
register("collapse_update", "cpu", cpu._update_cpu)
register("collapse_pair_stats", "cpu", cpu._pair_stats_cpu)
register("collapse_ncc", "cpu", cpu._ncc_cpu)
