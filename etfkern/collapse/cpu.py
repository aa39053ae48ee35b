"""The CPU path of the collapse ops (chunked torch, float64 accumulation): what the ``cpu`` backend runs when the
compiled kernel (``etfkern._C``, csrc/collapse/cpu.cpp) is absent, and the float64 fallbacks of the pair and NC4
ops. Same contracts as :mod:`etfkern.collapse.reference`; registered with the backend in
:mod:`etfkern.collapse.ops`."""
from __future__ import annotations

import torch


def _row_chunk(d: int, budget: int = 1 << 22) -> int:
    return max(1, budget // max(d, 1))


def _product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-batch scatter products: float64 for float64 features, else float32 (the centred
    operand is formed in float64 first; sums across chunks and batches are float64). The GPU kernels do the
    same with tensor-core operands."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _update_cpu(features: torch.Tensor, inv: torch.Tensor, m_old: torch.Tensor,
                n_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's merge with one symmetric float64 operand, rows in chunks (bounded float64 copies).

    Class c's rows are centred on p_c = m_b - sqrt(n_o / (n_o + n_b)) (m_b - m_o): then
    sum_r (x_r - p_c)(x_r - p_c)^T = S_b + n_o n_b / (n_o + n_b) u u^T, exactly the term
    (X - M_old[Y])^T (X - M_new[Y]) adds (see csrc/collapse/cpu.cpp), as one A^T A."""
    n, d = features.shape
    k = m_old.shape[0]
    step = _row_chunk(d)
    n_b = torch.bincount(inv, minlength=k).to(torch.float64)
    sums = torch.zeros(k, d, dtype=torch.float64)
    for r0 in range(0, n, step):
        sums.index_add_(0, inv[r0:r0 + step], features[r0:r0 + step].to(torch.float64))
    n_o = n_old.to(torch.float64)
    n_tot = (n_o + n_b).clamp_min(1.0)
    m_b = sums / n_b.clamp_min(1.0)[:, None]
    m_o = torch.where((n_o > 0)[:, None], m_old.to(torch.float64), m_b)
    u = m_b - m_o
    m_new = m_o + u * (n_b / n_tot)[:, None]
    p = m_b - u * (n_o / n_tot).sqrt()[:, None]
    sw = torch.zeros(d, d, dtype=torch.float64)
    m2 = torch.zeros(k, dtype=torch.float64)
    prod_dtype = _product_dtype(features.dtype)
    for r0 in range(0, n, step):
        lab = inv[r0:r0 + step]
        a = features[r0:r0 + step].to(torch.float64) - p[lab]
        m2.index_add_(0, lab, (a * a).sum(1))
        a = a.to(prod_dtype)
        sw += (a.T @ a).to(torch.float64)
    return m_new, m2, 0.5 * (sw + sw.T)


def _pair_sums(dot: torch.Tensor, nsq_i: torch.Tensor, nsq_j: torch.Tensor, s_i: torch.Tensor,
               s_j: torch.Tensor, inv_km1: float, shift: float, mask: torch.Tensor | None) -> torch.Tensor:
    dist2 = (nsq_i[:, None] + nsq_j[None, :] - 2.0 * dot).clamp_min_(0.0)
    cos = (dot / torch.sqrt(nsq_i[:, None] * nsq_j[None, :])).clamp_(-1.0, 1.0)
    cd = (s_i[:, None] + s_j[None, :]) / (2.0 * dist2)
    g = torch.log(2.0 - 2.0 * cos).mul_(-0.5).sub_(shift)
    ma = (cos + inv_km1).abs_()
    if mask is not None:
        cd, g, ma = cd[mask], g[mask], ma[mask]
    return torch.stack([cd.sum(), g.sum(), (g * g).sum(), ma.sum()])


def _pair_stats_cpu(mt: torch.Tensor, s: torch.Tensor, shift: float) -> torch.Tensor:
    """Row blocks against the columns to their right (upper triangle only), float64, (sum, sum^2) per block:
    only the diagonal blocks are masked, the rectangles right of them are all valid pairs."""
    k, d = mt.shape
    mt = mt.to(torch.float64)
    s = s.to(torch.float64)
    out = torch.zeros(4, dtype=torch.float64)
    if k < 2:
        return out
    nsq = (mt * mt).sum(1)
    inv_km1 = 1.0 / (k - 1)
    block = max(16, min(1024, (1 << 22) // max(k, 1)))
    for i0 in range(0, k, block):
        i1 = min(k, i0 + block)
        rows = slice(i0, i1)
        diag = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool).triu_(1)
        out += _pair_sums(mt[rows] @ mt[rows].T, nsq[rows], nsq[rows], s[rows], s[rows], inv_km1, shift, diag)
        if i1 < k:
            right = slice(i1, k)
            out += _pair_sums(mt[rows] @ mt[right].T, nsq[rows], nsq[right], s[rows], s[right], inv_km1, shift,
                              None)
    return out


def _ncc_cpu(features: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row chunks so that a chunk's scores (rows x classes, float64) stay within a fixed budget.

    Nearest mean as argmin_k |m_k|^2 + 2 o.m_k - 2 h.m_k, m_k = mu_k - o, o the mean of the means: the same
    argmin as |h - mu_k|^2, without |mu_k|^2-sized terms that swamp the class gaps far from the origin."""
    n = features.shape[0]
    w = weights.to(torch.float64)
    mu = means.to(torch.float64)
    centre = mu.mean(0)
    mu = mu - centre
    musq = (mu * mu).sum(1) + 2.0 * (mu @ centre)
    b = bias.to(torch.float64) if bias is not None else None
    step = _row_chunk(max(w.shape[0], mu.shape[0], 1))
    cls = torch.empty(n, dtype=torch.int64)
    ncc = torch.empty(n, dtype=torch.int64)
    for r0 in range(0, n, step):
        x = features[r0:r0 + step].to(torch.float64)
        z = x @ w.T
        if b is not None:
            z += b
        cls[r0:r0 + step] = z.argmax(1)
        ncc[r0:r0 + step] = (musq - 2.0 * (x @ mu.T)).argmin(1)
    return cls, ncc
