"""Float64 references for the bank ops: dense C x C Gram matrices, written straight from the definitions.

Only for tests and small banks: every function here stores the full C x C matrix.
"""
from __future__ import annotations

import torch


def _abs_gram(bank: torch.Tensor) -> torch.Tensor:
    w = bank.detach().to(torch.float64)
    return (w @ w.T).abs()


def bank_pair_stats(bank: torch.Tensor, bins: int, lo: float, hi: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of a = |<w_i, w_j>| over the unordered pairs i < j (rows used as given, not normalised).

    Returns (max, sum, hist): max and sum float64 0-dim (0 when there is no pair); hist int64 (bins + 2,):
    hist[0] counts a < lo, hist[1 + k] counts lo + k*w <= a < lo + (k+1)*w with w = (hi - lo)/bins,
    hist[bins + 1] counts a >= hi. The bin index is floor((a - lo) * bins / (hi - lo)).
    """
    c = bank.shape[0]
    iu = torch.triu_indices(c, c, offset=1, device=bank.device)
    a = _abs_gram(bank)[iu[0], iu[1]]
    if a.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=bank.device)
        return zero, zero.clone(), torch.zeros(bins + 2, dtype=torch.int64, device=bank.device)
    k = torch.floor((a - lo) * (bins / (hi - lo))) + 1
    k = k.clamp(0, bins + 1).to(torch.int64)
    return a.max(), a.sum(), torch.bincount(k, minlength=bins + 2)


def ebv_dir(bank: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the EBV optimiser, c = bank bank^T, a = |c| (rows used as given):

    rowmax_i = max_{j != i} a_ij (0 for a single row) and dir_i = sum_{j != i} e^{beta (a_ij - rowmax_i)}
    sign(c_ij) w_j (sign(0) = 0). dir_i is the gradient of F = (1/beta) log sum_{k != l} e^{beta a_kl} with
    respect to w_i times the positive factor Z e^{-beta rowmax_i} / 2 (Z the sum inside the log): the
    row-local shift keeps every exponent <= 0. Returns (dir (C, d), rowmax (C,)) in the bank's dtype,
    computed in float64.
    """
    w = bank.detach().to(torch.float64)
    c = w @ w.T
    eye = torch.eye(len(w), dtype=torch.bool, device=bank.device)
    a = c.abs().masked_fill(eye, float("-inf"))
    rowmax = a.max(dim=1).values.clamp(min=0.0) if len(w) else a.new_zeros(0)
    p = torch.exp(beta * (c.abs() - rowmax[:, None])).masked_fill(eye, 0.0)
    return ((p * torch.sign(c)) @ w).to(bank.dtype), rowmax.to(bank.dtype)


def bank_pair_select(bank: torch.Tensor, bins: int, lo: float, hi: float, slot: int, capacity: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The values a = |<w_i, w_j>| (i < j, rows as given) that :func:`bank_pair_stats` with (bins, lo, hi) counts
    in histogram slot ``slot``: (values float64 (capacity,) holding them sorted ascending then +inf, or only +inf
    when there are more than ``capacity``; count int64 0-dim)."""
    c = bank.shape[0]
    iu = torch.triu_indices(c, c, offset=1, device=bank.device)
    a = _abs_gram(bank)[iu[0], iu[1]]
    k = (torch.floor((a - lo) * (bins / (hi - lo))) + 1).clamp(0, bins + 1)
    picked = a[k == slot]
    values = torch.full((capacity,), float("inf"), dtype=torch.float64, device=bank.device)
    if picked.numel() <= capacity:
        values[: picked.numel()] = torch.sort(picked).values
    return values, torch.tensor(picked.numel(), dtype=torch.int64, device=bank.device)
