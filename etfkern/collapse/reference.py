"""Float64 references for the collapse family, written straight from the definitions in docs/metrics.md.

Two kinds of functions live here:
  * the ``reference`` backend of each op (``collapse_update``, ``collapse_pair_stats``, ``collapse_ncc``): dense,
    float64, no tiling, every intermediate materialised (a K x K or N x C matrix is fine here);
  * the test oracle for the whole metric pipeline (:func:`two_pass_stats`, :func:`dense_metrics`): two passes over
    the data, C x C pair matrices, ``torch.linalg.pinv(hermitian=True)``.
Every function accepts any float dtype, computes in float64 and returns float64 statistics (the statistics are
accumulators, never cast back to the input's low precision).
"""
from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------------------------------------
# Op references
# ----------------------------------------------------------------------------------------------------------
def collapse_update(features: torch.Tensor, inv: torch.Tensor, m_old: torch.Tensor,
                    n_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch merged into K classes' running statistics (Chan's merge), the textbook way.

    features (N, d) any float dtype; inv (N,) int64 compact class ids in [0, K); m_old (K, d) float64 running
    means (ignored where n_old == 0); n_old (K,) int64 running counts.
    Returns (m_new (K, d), m2_delta (K,), sw_delta (d, d)), all float64:
      m_new      merged means;
      m2_delta   the increase of each class's sum of squared deviations sum_i |h_i - mu_c|^2;
      sw_delta   the increase of the pooled within-class scatter sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
                 = S_batch + sum_c n_o n_b / (n_o + n_b) (m_b - m_o)(m_b - m_o)^T.
    """
    x = features.to(torch.float64)
    k = m_old.shape[0]
    n_b = torch.bincount(inv, minlength=k).to(torch.float64)
    n_o = n_old.to(torch.float64)
    m_b = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, inv, x)
    m_b = m_b / n_b.clamp_min(1.0)[:, None]
    centred = x - m_b[inv]
    s_batch = centred.T @ centred
    q_batch = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, inv, (centred * centred).sum(1))
    m_o = torch.where((n_o > 0)[:, None], m_old.to(torch.float64), m_b)
    n = n_o + n_b
    w = torch.where(n > 0, n_o * n_b / n.clamp_min(1.0), torch.zeros_like(n))
    delta = m_b - m_o
    m_new = torch.where((n > 0)[:, None], (n_o[:, None] * m_o + n_b[:, None] * m_b) / n.clamp_min(1.0)[:, None], m_o)
    sw = s_batch + (delta * w[:, None]).T @ delta
    m2 = q_batch + w * (delta * delta).sum(1)
    return m_new, m2, sw


def pair_terms(mt: torch.Tensor, s: torch.Tensor, shift: float) -> dict[str, torch.Tensor]:
    """Dense K x K float64 pair quantities over c < c' (for the oracle and the pair-op reference)."""
    mt = mt.to(torch.float64)
    s = s.to(torch.float64)
    k = mt.shape[0]
    iu = torch.triu_indices(k, k, offset=1, device=mt.device)
    exact = "donot_use_mm_for_euclid_dist"  # direct differences: coincident rows give exactly 0
    dist2 = torch.cdist(mt, mt, compute_mode=exact).pow(2)
    u = mt / mt.norm(dim=1, keepdim=True)
    cos = u @ u.T
    cdnv = (s[:, None] + s[None, :]) / (2.0 * dist2)
    log_inv = -torch.log(torch.cdist(u, u, compute_mode=exact))
    maxangle = (cos + 1.0 / (k - 1)).abs()
    return {"cdnv": cdnv[iu[0], iu[1]], "log_inv": log_inv[iu[0], iu[1]] - shift,
            "maxangle": maxangle[iu[0], iu[1]]}


def collapse_pair_stats(mt: torch.Tensor, s: torch.Tensor, shift: float) -> torch.Tensor:
    """Pair sums over c < c' of the K centred means ``mt`` (K, d) and per-class variances ``s`` (K,).

    Returns float64 (6,): [sum (s_c + s_c') / (2 |mu_c - mu_c'|^2),  sum (g - shift),  sum (g - shift)^2,
    sum |cos(mt_c, mt_c') + 1/(K-1)|, #pairs without a CDNV term, #pairs without a GNC2 term] with
    g = log(1 / |u_c - u_c'|), u the unit rows of mt. ``shift`` is subtracted before squaring so the variance does
    not cancel. A pair whose means coincide (mt_c == mt_c') has no CDNV term; one whose directions coincide
    (u_c == u_c') or with a zero row has no GNC2 term; a pair with a zero row has no max-angle term. Such pairs
    are left out of the sums (the first two kinds counted in the last two entries).
    """
    t = pair_terms(mt, s, shift)
    cd, g, ma = t["cdnv"], t["log_inv"], t["maxangle"]
    cd_ok, g_ok, ma_ok = torch.isfinite(cd), torch.isfinite(g), torch.isfinite(ma)
    cd, g, ma = cd[cd_ok], g[g_ok], ma[ma_ok]
    return torch.stack([cd.sum(), g.sum(), g.pow(2).sum(), ma.sum(), (~cd_ok).sum().to(cd.dtype),
                        (~g_ok).sum().to(cd.dtype)])


def collapse_ncc(features: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: argmax_c (w_c . h + b_c) over the C classifier rows, argmin_k |h - mu_k| over the K means.

    features (N, d), means (K, d), weights (C, d), bias (C,) or None. Returns two int64 (N,) index vectors."""
    x = features.to(torch.float64)
    logits = x @ weights.to(torch.float64).T
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    dist = torch.cdist(x, means.to(torch.float64), compute_mode="donot_use_mm_for_euclid_dist")  # no |x|^2 terms
    return logits.argmax(1), dist.argmin(1)


# ----------------------------------------------------------------------------------------------------------
# Whole-pipeline oracle
# ----------------------------------------------------------------------------------------------------------
def two_pass_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Two passes over all data in float64: (counts (C,), means (C, d) NaN where unseen, Sigma_W (d, d),
    s (C,) per-class mean squared deviation)."""
    x = features.to(torch.float64)
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    means = sums / counts[:, None].to(torch.float64)
    centred = x - means[labels]
    sigma_w = centred.T @ centred / x.shape[0]
    s = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, (centred ** 2).sum(1))
    s = s / counts.to(torch.float64)
    return counts, means, sigma_w, s


def dense_metrics(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, global_mean: str = "class",
                  weights: torch.Tensor | None = None, ignore_index: int | None = None,
                  min_count: int = 1) -> dict[str, float]:
    """Every metric of docs/metrics.md from the raw data, the dense way (C x C matrices, pinv of Sigma_B).

    Rows labelled ``ignore_index`` are dropped first. Classes with fewer than ``min_count`` samples are left out
    of everything built from class means (mu_G, M~, Sigma_B, NC2, CDNV, GNC2, NC3); Sigma_W stays the pooled
    within-class covariance of every sample kept (docs/metrics.md, "min_count"). Pairs of coincident means have
    no CDNV term, pairs of coincident or undefined directions no GNC2 (or max-angle) term: those averages run over
    the other pairs, counted in num_pairs_excluded_cdnv / _gnc2 when not 0 (docs/metrics.md)."""
    if ignore_index is not None:
        keep = labels != ignore_index
        features, labels = features[keep], labels[keep]
    counts, means, sigma_w, s = two_pass_stats(features, labels, num_classes)
    seen = counts > 0
    used = counts >= max(min_count, 1)
    mu = means[used]
    k = mu.shape[0]
    if global_mean == "class":
        mu_g = mu.mean(0)
    else:
        mu_g = features.to(torch.float64)[used[labels]].mean(0)
    mt = mu - mu_g
    sigma_b = mt.T @ mt / k
    out: dict[str, float] = {"num_classes_seen": int(seen.sum())}
    if min_count > 1:
        excluded = seen & ~used
        out["num_classes_excluded"] = int(excluded.sum())
        out["num_samples_excluded"] = int(counts[excluded].sum())
    out["nc1"] = float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / k)
    out["nc1_quotient"] = float(torch.trace(sigma_w) / torch.trace(sigma_b))
    iu = torch.triu_indices(k, k, offset=1)
    off = ~torch.eye(k, dtype=torch.bool)
    norms = mt.norm(dim=1)
    out["nc2_equinorm"] = float(norms.std(unbiased=False) / norms.mean())
    u = mt / norms[:, None]
    cos = u @ u.T
    out["nc2_equiangular"] = float(cos[off].std(unbiased=False))
    maxangle = (cos[off] + 1.0 / (k - 1)).abs()
    out["nc2_maxangle"] = float(maxangle[torch.isfinite(maxangle)].mean())
    g = mt @ mt.T
    etf = (torch.eye(k, dtype=torch.float64) - 1.0 / k) / math.sqrt(k - 1)
    out["nc2_etf_error"] = float((g / g.norm() - etf).norm())
    exact = "donot_use_mm_for_euclid_dist"  # direct differences: coincident rows give exactly 0
    log_inv = -torch.log(torch.cdist(u, u, compute_mode=exact))[iu[0], iu[1]]
    g_ok = torch.isfinite(log_inv)
    out["gnc2"] = float(log_inv[g_ok].var(unbiased=False))
    out["gnc2_mean"] = float(log_inv[g_ok].mean())
    ss = s[used]
    dist2 = torch.cdist(mu, mu, compute_mode=exact).pow(2)
    cdnv = ((ss[:, None] + ss[None, :]) / (2 * dist2))[iu[0], iu[1]]
    cd_ok = torch.isfinite(cdnv)
    out["cdnv"] = float(cdnv[cd_ok].mean())
    if not bool(cd_ok.all() and g_ok.all()):
        out["num_pairs_excluded_cdnv"] = int((~cd_ok).sum())
        out["num_pairs_excluded_gnc2"] = int((~g_ok).sum())
    if weights is not None:
        w = weights.to(torch.float64)[used]
        out["nc3"] = float((w / w.norm() - mt / mt.norm()).norm().pow(2))
        cw = torch.nn.functional.cosine_similarity(w, mt, dim=1)
        out["unc3"] = float(cw.std(unbiased=False))
        out["nc3_cos_mean"] = float(cw.mean())
    return out


def dense_ncc_mismatch(features: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
                       bias: torch.Tensor | None = None) -> float:
    """NC4 the dense way: rows of ``means`` with a NaN are classes never seen and are never the nearest mean."""
    x = features.to(torch.float64)
    logits = x @ weights.to(torch.float64).T
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    m = means.to(torch.float64)
    dist = torch.cdist(x, torch.nan_to_num(m, nan=0.0), compute_mode="donot_use_mm_for_euclid_dist")
    dist[:, torch.isnan(m).any(1)] = float("inf")
    return float((logits.argmax(1) != dist.argmin(1)).double().mean())
