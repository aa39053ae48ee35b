"""The CPU path of the collapse ops (chunked torch, float64 accumulation): what the ``cpu`` backend runs when the
compiled kernel (``etfkern._C``, csrc/collapse/cpu.cpp) is absent, and the float64 fallbacks of the pair and NC4
ops. Same contracts as :mod:`etfkern.collapse.reference`; registered with the backend in
:mod:`etfkern.collapse.ops`."""
from __future__ import annotations

import torch

from etfkern._core.dtypes import acc_dtype


def _row_chunk(d: int, budget: int = 1 << 22) -> int:
    return max(1, budget // max(d, 1))


def _product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-batch scatter products: float64 for float64 features, else float32 (the centred
    operand is formed in float64 first; sums across chunks and batches are float64). The GPU kernels do the
    same with tensor-core operands."""
    return acc_dtype(dtype)


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


# Pairs closer than this (|mu_c - mu_c'|^2 < PAIR_RECHECK (|mu_c|^2 + |mu_c'|^2), or cos > 1 - PAIR_RECHECK) get
# their terms from direct float64 differences instead of the Gram identities, which cancel there.
PAIR_RECHECK = 0.125


def _near_pair_terms(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, inv_km1: float,
                     shift: float) -> torch.Tensor:
    """(6,) float64 sums for the pairs (a_r, b_r) (rows of two (M, d) float64 tensors), from direct differences:
    |a - b|^2 and |a/|a| - b/|b||^2 never cancel. A pair with a == b has no CDNV term, one with a/|a| == b/|b| no
    GNC2 term (both counted in entries 4 and 5); a pair with a zero row has no direction: no GNC2 (counted) and
    no max-angle term (the caller counts those from the norms)."""
    out = torch.zeros(6, dtype=torch.float64, device=a.device)
    step = max(1, (1 << 22) // max(a.shape[1], 1))
    for r0 in range(0, a.shape[0], step):
        x, y = a[r0:r0 + step], b[r0:r0 + step]
        dist2 = (x - y).pow_(2).sum(1)
        nx, ny = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1)
        has_dir = (nx > 0) & (ny > 0)
        du2 = (x / nx.clamp_min(1e-300)[:, None] - y / ny.clamp_min(1e-300)[:, None]).pow_(2).sum(1)
        cos = 1.0 - 0.5 * du2
        cd_ok = dist2 > 0
        g_ok = has_dir & (du2 > 0)
        cd = torch.where(cd_ok, (sa[r0:r0 + step] + sb[r0:r0 + step]) / (2.0 * torch.where(cd_ok, dist2, 1.0)), 0.0)
        g = torch.where(g_ok, -0.5 * torch.log(torch.where(g_ok, du2, 1.0)) - shift, 0.0)
        ma = torch.where(has_dir, (cos + inv_km1).abs(), 0.0)
        out += torch.stack([cd.sum(), g.sum(), (g * g).sum(), ma.sum(), (~cd_ok).sum().to(torch.float64),
                            (~g_ok).sum().to(torch.float64)])
    return out


def pair_block_sums(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, inv_km1: float,
                    shift: float, mask: torch.Tensor | None) -> torch.Tensor:
    """(6,) float64 [sum CDNV terms, sum (g - shift), sum (g - shift)^2, sum max-angle terms, #pairs without a
    CDNV term, #pairs without a GNC2 term] over the pairs (a_i, b_j) of two float64 row blocks where ``mask``
    (None: all). Gram identities for well-separated pairs, direct differences for near ones (any device)."""
    na, nb = (a * a).sum(1), (b * b).sum(1)
    dot = a @ b.T
    bound = na[:, None] + nb[None, :]
    dist2 = bound - 2.0 * dot
    cos = dot.mul_(na.rsqrt()[:, None]).mul_(nb.rsqrt()[None, :])  # in place: dot is not needed any more
    near = dist2 < bound.mul_(PAIR_RECHECK)
    near |= cos > 1.0 - PAIR_RECHECK
    if not (bool(na.all()) and bool(nb.all())):  # a zero row has no direction: its pairs go the exact way
        near[na == 0, :] = True
        near[:, nb == 0] = True
    if mask is not None:
        near &= mask
    ii, jj = torch.nonzero(near, as_tuple=True)
    skip = None
    if ii.numel():
        skip = near if mask is None else near | ~mask
    elif mask is not None:
        skip = ~mask
    cd = (sa[:, None] + sb[None, :]).div_(dist2.mul_(2.0))
    g = (1.0 - cos).mul_(2.0).log_().mul_(-0.5).sub_(shift)
    ma = cos.add_(inv_km1).abs_()
    if skip is not None:  # in place: near and invalid slots (possibly inf or NaN) contribute 0
        for t in (cd, g, ma):
            t.masked_fill_(skip, 0.0)
    gf = g.view(-1)
    zero = cd.new_zeros(())
    out = torch.stack([cd.sum(), gf.sum(), torch.dot(gf, gf), ma.sum(), zero, zero])
    if ii.numel():
        out += _near_pair_terms(a[ii], b[jj], sa[ii], sb[jj], inv_km1, shift)
    return out


def _pair_stats_cpu(mt: torch.Tensor, s: torch.Tensor, shift: float) -> torch.Tensor:
    """Row blocks against the columns to their right (upper triangle only), float64, (sum, sum^2) per block:
    only the diagonal blocks are masked, the rectangles right of them are all valid pairs."""
    k, d = mt.shape
    mt = mt.to(torch.float64)
    s = s.to(torch.float64)
    out = torch.zeros(6, dtype=torch.float64, device=mt.device)
    if k < 2:
        return out
    inv_km1 = 1.0 / (k - 1)
    block = max(16, min(1024, (1 << 22) // max(k, 1)))
    for i0 in range(0, k, block):
        i1 = min(k, i0 + block)
        rows = slice(i0, i1)
        diag = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=mt.device).triu_(1)
        out += pair_block_sums(mt[rows], mt[rows], s[rows], s[rows], inv_km1, shift, diag)
        if i1 < k:
            out += pair_block_sums(mt[rows], mt[i1:], s[rows], s[i1:], inv_km1, shift, None)
    return out


def finish_pair_partials(mt: torch.Tensor, s: torch.Tensor, shift: float, tiles: torch.Tensor, part: torch.Tensor,
                         block: int) -> torch.Tensor:
    """The (6,) float64 result of ``collapse_pair_stats`` from a kernel's per-tile partials (tiles (T, 2) block
    pairs, part (T, 5): four sums over the tile's settled pairs and its number of unsettled pairs): tiles with an
    unsettled pair are recomputed whole in float64 (:func:`pair_block_sums`), the others summed in float64 in a
    fixed order."""
    k = mt.shape[0]
    out = torch.zeros(6, dtype=torch.float64, device=mt.device)
    if k < 2:
        return out
    redo = part[:, 4] > 0
    out[:4] = part[~redo, :4].to(torch.float64).sum(0)
    mt64, s64 = mt.to(torch.float64), s.to(torch.float64)
    inv_km1 = 1.0 / (k - 1)
    for bi, bj in tiles[redo].tolist():
        ri, rj = slice(bi * block, min(k, (bi + 1) * block)), slice(bj * block, min(k, (bj + 1) * block))
        mask = None
        if bi == bj:
            n = ri.stop - ri.start
            mask = torch.ones(n, n, dtype=torch.bool, device=mt.device).triu_(1)
        out += pair_block_sums(mt64[ri], mt64[rj], s64[ri], s64[rj], inv_km1, shift, mask)
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
