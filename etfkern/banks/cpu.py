"""The CPU path of the bank ops (backend "cpu"): row strips of chunked torch matmuls, O(strip * C) scratch.

Same arguments and outputs as the float64 references in :mod:`etfkern.banks.reference`; computed in the bank's
dtype (float32 or float64).
"""
from __future__ import annotations

import torch

STRIP_ELEMS = 1 << 22  # pair_stats: rows per strip chosen so that one strip holds <= 4M cosines (16 MiB fp32)
DIR_STRIP_ELEMS = 1 << 21  # ebv_dir: two reused (strip, C) buffers of <= 2M entries


def pair_stats(bank: torch.Tensor, bins: int, lo: float, hi: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``etfkern::bank_pair_stats`` on CPU: strips of rows i against the rows j > i, one GEMM per strip."""
    c = bank.shape[0]
    w = bank.contiguous()
    mx = torch.zeros((), dtype=torch.float64, device=bank.device)
    total = torch.zeros((), dtype=torch.float64, device=bank.device)
    hist = torch.zeros(bins + 2, dtype=torch.int64, device=bank.device)
    scale = bins / (hi - lo)
    rows = max(1, STRIP_ELEMS // max(1, c))
    for i0 in range(0, c - 1, rows):
        i1 = min(c - 1, i0 + rows)
        a = (w[i0:i1] @ w[i0 + 1:].T).abs()  # (strip, C - i0 - 1); keep j > i only
        keep = torch.ones_like(a, dtype=torch.bool).triu_(0)
        v = a[keep]
        mx = torch.maximum(mx, v.max().to(torch.float64))
        total += v.sum(dtype=torch.float64)
        k = (torch.floor((v - lo) * scale) + 1).clamp_(0, bins + 1).to(torch.int64)
        hist += torch.bincount(k, minlength=bins + 2)
    return mx, total, hist


def ebv_dir(bank: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``etfkern::ebv_dir`` on CPU: one pass of row strips. Per strip: one GEMM for the cosines, four in-place
    elementwise passes into two reused (strip, C) buffers (no allocation per strip: fresh multi-MiB tensors
    cost page faults that dominated the old step), one GEMM for the weighted sum of rows."""
    c, d = bank.shape
    w = bank.contiguous()
    out = torch.empty_like(w)
    rowmax = torch.zeros(c, dtype=w.dtype, device=w.device)
    if c == 0:
        return out, rowmax
    rows = max(1, min(c, DIR_STRIP_ELEMS // c))
    w_t = w.T.contiguous()
    cos_buf = torch.empty(rows, c, dtype=w.dtype, device=w.device)
    p_buf = torch.empty_like(cos_buf)
    diag = torch.arange(rows, device=w.device)
    for i0 in range(0, c, rows):
        i1 = min(c, i0 + rows)
        cos, p, ar = cos_buf[: i1 - i0], p_buf[: i1 - i0], diag[: i1 - i0]
        torch.matmul(w[i0:i1], w_t, out=cos)
        cos[ar, ar + i0] = 0.0  # sign(0) = 0 drops the diagonal from dir; rowmax >= 0 anyway
        torch.abs(cos, out=p)
        m = p.amax(dim=1, keepdim=True)
        rowmax[i0:i1] = m[:, 0]
        # clamp: e^-87 ~ 1.6e-38 beside the max term e^0 = 1 changes no sum, and exp below ~-87 (float32 underflow)
        # runs ~15x slower on x86 (the optimiser's high-beta steps: 17 -> 6 ms at C=1000, d=60)
        p.sub_(m).mul_(beta).clamp_(min=-87.0).exp_().mul_(cos.sign_())
        torch.matmul(p, w, out=out[i0:i1])
    return out, rowmax


def pair_select(bank: torch.Tensor, bins: int, lo: float, hi: float, slot: int, capacity: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``etfkern::bank_pair_select`` on CPU: the strips of :func:`pair_stats`, keeping the values it counts in
    histogram slot ``slot`` (the same bin arithmetic)."""
    c = bank.shape[0]
    w = bank.contiguous()
    kept: list[torch.Tensor] = []
    count = 0
    scale = bins / (hi - lo)
    rows = max(1, STRIP_ELEMS // max(1, c))
    for i0 in range(0, c - 1, rows):
        i1 = min(c - 1, i0 + rows)
        a = (w[i0:i1] @ w[i0 + 1:].T).abs()
        v = a[torch.ones_like(a, dtype=torch.bool).triu_(0)]
        v = v[(torch.floor((v - lo) * scale) + 1).clamp_(0, bins + 1) == slot]
        count += v.numel()
        if count <= capacity:
            kept.append(v.to(torch.float64))
    values = torch.full((capacity,), float("inf"), dtype=torch.float64, device=bank.device)
    if count <= capacity and count:
        values[:count] = torch.sort(torch.cat(kept)).values
    return values, torch.tensor(count, dtype=torch.int64, device=bank.device)
