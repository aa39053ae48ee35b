"""torch.library schemas and fake kernels of the banks family: bank_stats pair statistics and the ebv_bank optimiser step.

Each op routes through :mod:`etfkern._core.backend`; see ``etfkern/banks/reference.py`` for the math."""
from __future__ import annotations

import torch

from etfkern._core.library import define


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


def _bank_pair_select_fake(bank, bins, lo, hi, slot, capacity):
    return bank.new_empty((capacity,), dtype=torch.float64), bank.new_empty((), dtype=torch.int64)


# |<w_i, w_j>| over pairs i < j that bank_pair_stats(bank, bins, lo, hi) counts in histogram slot `slot`: (values f64
# (capacity,): those values sorted ascending, +inf after them, or all +inf when there are more than capacity;
# count i64 0-dim: how many there are)
bank_pair_select = define("bank_pair_select",
                          "(Tensor bank, int bins, float lo, float hi, int slot, int capacity) -> (Tensor, Tensor)",
                          _bank_pair_select_fake)
