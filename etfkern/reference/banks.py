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


def ebv_row_stats(bank: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row i: rowmax_i = max_{j != i} |c_ij| and lse_i = log sum_{j != i} exp(beta |c_ij|), c = bank bank^T.

    Both (C,) in the bank's dtype (computed in float64); a single row gives rowmax 0 and lse -inf.
    """
    c = bank.shape[0]
    a = _abs_gram(bank)
    eye = torch.eye(c, dtype=torch.bool, device=bank.device)
    a = a.masked_fill(eye, float("-inf"))
    rowmax = a.max(dim=1).values.clamp(min=0.0) if c > 1 else torch.zeros(c, dtype=torch.float64,
                                                                          device=bank.device)
    lse = torch.logsumexp(beta * a, dim=1)
    return rowmax.to(bank.dtype), lse.to(bank.dtype)


def ebv_grad(bank: torch.Tensor, lse: torch.Tensor, beta: float) -> torch.Tensor:
    """Euclidean gradient of f(W) = (1/beta) sum_i lse_i(W) at the given per-row lse (from ebv_row_stats):
    grad_i = sum_{j != i} (exp(beta a_ij - lse_i) + exp(beta a_ij - lse_j)) sign(c_ij) w_j, a = |c|.
    (C, d) in the bank's dtype."""
    w = bank.detach().to(torch.float64)
    c = w @ w.T
    l = lse.to(torch.float64)
    ba = beta * c.abs()
    p = torch.exp(ba - l[:, None]) + torch.exp(ba - l[None, :])
    p.fill_diagonal_(0.0)
    return ((p * torch.sign(c)) @ w).to(bank.dtype)
