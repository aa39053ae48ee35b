"""Streaming neural-collapse statistics at vocabulary scale: :class:`CollapseMeter`, :func:`ncc_mismatch`, and
helpers to collect features from a Hugging Face-style causal LM and to plot metrics across checkpoints/layers.

Accumulation is exact in one pass. Per class c the meter keeps the count n_c (int64), the running mean mu_c and
the sum of squared deviations sum_i |h_i - mu_c|^2 (float64); for all classes together the pooled within-class
scatter S_W = sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T (d x d, float64). A batch is merged with Chan's update,
S_W += (X - M_old[Y])^T (X - M_new[Y]) (summed over classes this is S_batch + sum_c n_o n_b/(n_o+n_b) dd^T, d the
batch-minus-old mean difference), which never forms raw second moments, so a large common offset costs nothing.
What is never stored: per-sample features, a C x C matrix, an N x C matrix, or per-batch C x d buffers (each
batch touches only the K <= N classes it contains). The CPU paths evaluate the merge as one symmetric product
A^T A, A = X - P[Y] centred on p_c = m_b - sqrt(n_o/(n_o+n_b)) d (exact: the cross term vanishes).

Precision: counts are integers; means, per-class deviations and the running S_W are float64. The per-batch
scatter products run in float64 for float64 features and in float32 for float16/bfloat16/float32 features
(the centred operand is formed in float64 and rounded once; GPU kernels use tensor-core operands the same
way), added to the float64 S_W batch by batch: relative error ~1e-7 on S_W, no cancellation, at half the GEMM
time. Pass float64 features for float64 products. A batch whose float32 products would overflow is redone in
float64 automatically.

Ops (``torch.ops.etfkern.*``, routed by :mod:`etfkern._core.backend`): ``collapse_update`` (batch merge),
``collapse_pair_stats`` (tiled pair kernel over c < c' for CDNV, GNC2, max-angle) and ``collapse_ncc`` (NC4
argmax/argmin). None is differentiable: they measure, they are not trained through.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable, Mapping, Sequence

import torch

from etfkern.collapse import ops as _ops

__all__ = ["CollapseMeter", "ncc_mismatch", "collect_lm_features", "plot_metrics", "METRIC_KEYS"]

METRIC_KEYS = ("nc1", "nc1_quotient", "cdnv", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc2_etf_error",
               "gnc2", "gnc2_mean", "nc3", "unc3", "nc3_cos_mean", "num_classes_seen")
_PAIR_KEYS = ("cdnv", "gnc2", "gnc2_mean", "nc2_maxangle")  # from the O(C'^2 d) pair kernel
_CLASSIFIER_KEYS = ("nc3", "unc3", "nc3_cos_mean")  # need the classifier weights
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# Helpers of the meter (the ops' CPU path lives in etfkern/collapse/cpu.py, registered in ops.py)
# ----------------------------------------------------------------------------------------------------------
# Largest message of CollapseMeter.all_reduce (rows of the (C, d) means and the (d, d) scatter per collective).
_ALL_REDUCE_CHUNK_BYTES = 256 << 20


def _chunk_rows(d: int) -> int:
    return max(1, _ALL_REDUCE_CHUNK_BYTES // (8 * max(d, 1)))


def _small_gram(a: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of a (n, m): a^T a (m x m) when n > m, else a a^T (n x n), exactly symmetric.

    Only the upper block triangle is multiplied (one GEMM per row panel, ~(p+1)/(2p) of the
    flops for p panels of >= 64 columns), then mirrored."""
    if a.shape[0] <= a.shape[1]:
        a = a.T
    m = a.shape[1]
    panels = max(1, min(8, m // 64))
    if panels == 1:
        g = a.T @ a
        return 0.5 * (g + g.T)
    bs = -(-m // panels)
    g = torch.zeros(m, m, dtype=a.dtype, device=a.device)
    for i0 in range(0, m, bs):
        g[i0:i0 + bs, i0:].addmm_(a[:, i0:i0 + bs].T, a[:, i0:])
    g = g.triu_()
    return g + g.triu(1).T


# ----------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------
def _check_float(name: str, t: Any, shape: tuple[int | None, ...], *, finite: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {_fmt(shape)}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(t.shape)}")
    if finite and t.numel() and not _all_finite(t):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    # One float64 sum is cheaper than isfinite().all(): any NaN/inf makes it non-finite, and 16/32-bit values
    # cannot overflow a float64 sum; only a non-finite sum (or float64 overflow) needs the elementwise check.
    return math.isfinite(float(t.sum(dtype=torch.float64))) or bool(torch.isfinite(t).all())


def _fmt(shape: tuple[int | None, ...]) -> str:
    items = ["?" if s is None else str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


# ----------------------------------------------------------------------------------------------------------
# The meter
# ----------------------------------------------------------------------------------------------------------
class CollapseMeter:
    """Streaming per-class statistics and the neural-collapse metrics of DESIGN.md.

    Args:
        num_classes: C, labels must lie in [0, C).
        dim: d, the feature dimension.
        global_mean: "class" (mu_G = mean of the seen class means, Wu & Papyan) or "sample" (mean of all
            samples, Papyan et al.).
        device: where the accumulators live (default CPU); batches are moved there.

    State (all on ``device``): counts (C,) int64; means (C, d) float64; per-class sums of squared deviations (C,)
    float64; pooled within-class scatter (d, d) float64. Memory: 8 (C d + d^2 + 2C) bytes.
    """

    def __init__(self, num_classes: int, dim: int, *, global_mean: str = "class",
                 device: torch.device | str | None = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if global_mean not in ("class", "sample"):
            raise ValueError(f"global_mean must be 'class' or 'sample', got {global_mean!r}")
        self.num_classes = num_classes
        self.dim = dim
        self.global_mean = global_mean
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        f64 = dict(dtype=torch.float64, device=self.device)
        self._counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        self._means = torch.zeros(self.num_classes, self.dim, **f64)
        self._m2 = torch.zeros(self.num_classes, **f64)
        self._sw = torch.zeros(self.dim, self.dim, **f64)

    # -- properties -------------------------------------------------------------------------------------
    @property
    def counts(self) -> torch.Tensor:
        """(C,) int64 samples seen per class (a copy)."""
        return self._counts.clone()

    @property
    def means(self) -> torch.Tensor:
        """(C, d) float64 class means (a copy); rows of classes never seen are NaN."""
        out = self._means.clone()
        out[self._counts == 0] = float("nan")
        return out

    @property
    def num_samples(self) -> int:
        return int(self._counts.sum())

    # -- accumulation -----------------------------------------------------------------------------------
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge one batch. features (N, d) (or (..., d) with labels (...)) float16/bfloat16/float32/float64;
        labels (N,) integer in [0, C). Raises ValueError naming the argument, with the meter unchanged, on a
        bad shape, dtype, out-of-range label or non-finite feature."""
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
        if isinstance(features, torch.Tensor) and features.dim() > 2 and labels.shape == features.shape[:-1]:
            features = features.reshape(-1, features.shape[-1])
            labels = labels.reshape(-1)
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
        _check_float("features", features, (labels.shape[0], self.dim), finite=False)
        if labels.dtype not in _INT_DTYPES:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        for name, t in (("features", features), ("labels", labels)):
            if t.device.type == "meta":
                raise ValueError(f"{name} must hold data (a CPU or CUDA tensor), got a tensor on device 'meta'")
        if labels.numel() == 0:
            return
        features = features.to(self.device)
        labels = labels.to(self.device, torch.int64)
        uniq, inv, cnt = torch.unique(labels, return_inverse=True, return_counts=True)
        safe = uniq.clamp(0, self.num_classes - 1)  # gathers stay in bounds until the range is checked below
        n_old = self._counts.index_select(0, safe)  # index_select: ~4x faster than advanced indexing on CPU
        m_old = self._means.index_select(0, safe)
        m_new, m2_delta, sw_delta = _ops.collapse_update(features, inv, m_old, n_old)
        # One host sync, after the merge: the label range (uniq is sorted, its ends are the extremes) and a
        # finiteness probe: a NaN/inf feature makes its class's new mean non-finite; finite features whose
        # float32 scatter products overflow (deviations beyond ~1e19) make the trace of sw_delta non-finite (an
        # off-diagonal sum overflows only with a diagonal one). Sums are cheaper than isfinite().all(); a
        # non-finite probe is then sorted out exactly.
        lo, hi, probe = torch.stack([uniq[0].to(torch.float64), uniq[-1].to(torch.float64),
                                     m_new.sum() + m2_delta.sum() + sw_delta.diagonal().sum()]).tolist()
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got values in [{int(lo)}, {int(hi)}]")
        if not math.isfinite(probe) and not all(bool(torch.isfinite(t).all()) for t in (m_new, m2_delta, sw_delta)):
            if not bool(torch.isfinite(features).all()):
                raise ValueError("features contains NaN or inf")
            if features.dtype != torch.float64:  # float32 products overflowed: redo this batch in float64
                m_new, m2_delta, sw_delta = _ops.collapse_update(features.to(torch.float64), inv, m_old, n_old)
            if not (bool(torch.isfinite(m2_delta).all()) and bool(torch.isfinite(sw_delta).all())):
                raise ValueError("features are too large: the within-class scatter overflows float64")
        # Nothing above mutated the meter: commit all at once.
        self._counts.index_add_(0, uniq, cnt)
        self._means.index_copy_(0, uniq, m_new)  # not means[uniq] = ...: index_put allocates a K x d index
        self._m2.index_add_(0, uniq, m2_delta)
        self._sw += sw_delta

    def _merge_stats(self, n_b: torch.Tensor, m_b: torch.Tensor, m2_b: torch.Tensor, sw_b: torch.Tensor) -> None:
        """Chan's merge of another set of statistics over all C classes (rows with n_b == 0 are no-ops)."""
        idx = torch.nonzero(n_b > 0).flatten()
        nb = n_b[idx].to(torch.float64)
        no = self._counts[idx].to(torch.float64)
        mb = m_b[idx]
        mo = torch.where((no > 0)[:, None], self._means[idx], mb)
        n = no + nb
        delta = mb - mo
        w = no * nb / n
        new_means = mo + delta * (nb / n)[:, None]
        new_m2 = self._m2[idx] + m2_b[idx] + w * (delta * delta).sum(1)
        new_sw = self._sw + sw_b + (delta * w[:, None]).T @ delta
        self._counts[idx] += n_b[idx]
        self._means[idx] = new_means
        self._m2[idx] = new_m2
        self._sw = new_sw

    def merge(self, other: "CollapseMeter") -> None:
        """Add everything ``other`` has seen (same num_classes and dim; exact, as if one meter saw both)."""
        if not isinstance(other, CollapseMeter):
            raise ValueError(f"other must be a CollapseMeter, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(f"other must have num_classes={self.num_classes}, dim={self.dim}; got "
                             f"num_classes={other.num_classes}, dim={other.dim}")
        dev = self.device
        self._merge_stats(other._counts.to(dev), other._means.to(dev), other._m2.to(dev), other._sw.to(dev))

    def all_reduce(self, group: Any = None) -> None:
        """Exact merge across the ranks of ``group`` (torch.distributed); afterwards every rank holds the
        statistics of all data. All-reduces of the counts and weighted means, then of the within-class terms plus
        each rank's between-rank correction sum_c n_rc (mu_rc - mu_c)(mu_rc - mu_c)^T. The (C, d) means and the
        (d, d) scatter travel in row chunks of at most 256 MiB, so the extra memory is one chunk, not a (C, d) copy.
        Ranks may have seen disjoint or overlapping class sets."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("all_reduce needs an initialised torch.distributed process group")
        # Every collective below is sized by (num_classes, dim): meters of different shapes would make gloo abort
        # the process or hang (seen on gloo, also with equal C*d). One small all-gather first, so that every
        # rank raises the same ValueError, with the meter unchanged.
        mine = torch.tensor([self.num_classes, self.dim], dtype=torch.int64, device=self.device)
        shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shapes, mine, group=group)
        shapes = [tuple(int(v) for v in t) for t in shapes]
        if any(sh != shapes[0] for sh in shapes):
            raise ValueError("all_reduce needs meters of the same num_classes and dim on every rank, got "
                             f"(num_classes, dim) = {shapes} (rank order)")
        n_r = self._counts.clone()
        counts = self._counts.clone()
        dist.all_reduce(counts, group=group)
        w = n_r.to(torch.float64)
        total = counts.clamp_min(1).to(torch.float64)
        seen_here = n_r > 0
        means = torch.empty_like(self._means)
        m2 = self._m2.clone()
        sw = self._sw.clone()
        # class rows in chunks: bounded messages and bounded extra memory (one chunk of weighted sums and
        # deltas) instead of a full (C, d) float64 copy in one collective
        rows = _chunk_rows(self.dim)
        for r0 in range(0, self.num_classes, rows):
            sl = slice(r0, r0 + rows)
            chunk = self._means[sl] * w[sl, None]
            dist.all_reduce(chunk, group=group)
            chunk /= total[sl, None]
            means[sl] = chunk
            delta = torch.where(seen_here[sl, None], self._means[sl] - chunk, 0.0)
            m2[sl] += w[sl] * (delta * delta).sum(1)
            sw += (delta * w[sl, None]).T @ delta
        dist.all_reduce(m2, group=group)
        for r0 in range(0, self.dim, rows):  # sw rows are contiguous views: reduced in place
            dist.all_reduce(sw[r0:r0 + rows], group=group)
        self._counts, self._means, self._m2, self._sw = counts, means, m2, sw

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: a later :meth:`load_state_dict` + more updates == never interrupted."""
        return {"num_classes": self.num_classes, "dim": self.dim, "global_mean": self.global_mean,
                "counts": self._counts.clone(), "means": self._means.clone(), "m2": self._m2.clone(),
                "sw": self._sw.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are moved to this meter's device). ValueError on a
        mismatch of num_classes/dim or tensor shapes, non-integer or negative counts, NaN/inf statistics or a
        negative m2 (a corrupted checkpoint would otherwise surface later as NaN metrics), with the meter
        unchanged."""
        for key in ("num_classes", "dim", "counts", "means", "m2", "sw"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        if (state["num_classes"], state["dim"]) != (self.num_classes, self.dim):
            raise ValueError(f"state has num_classes={state['num_classes']}, dim={state['dim']}; this meter "
                             f"has num_classes={self.num_classes}, dim={self.dim}")
        c, d = self.num_classes, self.dim
        for key, shape in (("counts", (c,)), ("means", (c, d)), ("m2", (c,)), ("sw", (d, d))):
            if not isinstance(state[key], torch.Tensor):
                raise ValueError(f"state[{key!r}] must be a tensor of shape {shape}, got {type(state[key]).__name__}")
            if tuple(state[key].shape) != shape:
                raise ValueError(f"state[{key!r}] must have shape {shape}, got {tuple(state[key].shape)}")
        if state.get("global_mean", self.global_mean) not in ("class", "sample"):
            raise ValueError(f"state['global_mean'] must be 'class' or 'sample', got {state['global_mean']!r}")
        counts = state["counts"]
        if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
            raise ValueError(f"state['counts'] must be an integer tensor, got {counts.dtype}")
        if counts.numel() and int(counts.min()) < 0:
            raise ValueError("state['counts'] must be >= 0, got a negative count")
        for key in ("means", "m2", "sw"):
            t = state[key]
            if not (t.dtype.is_floating_point and bool(torch.isfinite(t).all())):
                raise ValueError(f"state[{key!r}] must be a finite float tensor, got {t.dtype}"
                                 + (" with NaN or inf" if t.dtype.is_floating_point else ""))
        if bool((state["m2"] < 0).any()):
            raise ValueError("state['m2'] (sums of squared deviations) must be >= 0, got a negative entry")
        self.global_mean = state.get("global_mean", self.global_mean)
        self._counts = state["counts"].to(self.device, torch.int64).clone()
        self._means = state["means"].to(self.device, torch.float64).clone()
        self._m2 = state["m2"].to(self.device, torch.float64).clone()
        self._sw = state["sw"].to(self.device, torch.float64).clone()

    # -- metrics ----------------------------------------------------------------------------------------
    def compute(self, weights: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                pinv_rtol: float | None = None, pair_metrics: bool = True,
                metrics: Iterable[str] | None = None) -> dict[str, float]:
        """The metrics of DESIGN.md over the C' classes seen so far (C' >= 2 needed), as Python floats.

        weights (C, d) classifier rows (adds nc3, unc3, nc3_cos_mean, using the rows of seen classes); bias (C,)
        is accepted for symmetry with :func:`ncc_mismatch` and shape-checked, none of these metrics uses it.
        pinv_rtol (finite, >= 0): eigenvalues of Sigma_B below pinv_rtol * largest are treated as zero in nc1 (default
        d * eps(float64), torch.linalg.pinv's default on the d x d Sigma_B). NC1 is evaluated in the smaller
        space: d x d when C' > d, else C' x C' through tr(Sigma_W Sigma_B^+) = C' tr((G^+)^2 M~ Sigma_W M~^T),
        G = M~ M~^T. No C' x C' matrix is formed when C' > d; pair metrics come from ``collapse_pair_stats``.
        pair_metrics=False skips the O(C'^2 d) pair kernel (cdnv, gnc2, gnc2_mean, nc2_maxangle are then absent).
        metrics: compute only these keys of :data:`METRIC_KEYS` (``num_classes_seen`` is always returned), and only
        the work they need: e.g. ``metrics=["nc1"]`` costs one (C' x d) Gram and one eigendecomposition, while
        nc2_equiangular needs a second Gram (of the unit class means) and nc3/unc3/nc3_cos_mean need ``weights``.
        """
        c, d = self.num_classes, self.dim
        if pinv_rtol is not None:
            ok = isinstance(pinv_rtol, numbers.Real) and not isinstance(pinv_rtol, bool)  # numpy scalars too
            if not ok or not (math.isfinite(float(pinv_rtol)) and float(pinv_rtol) >= 0.0):
                raise ValueError(f"pinv_rtol must be None or a finite number >= 0, got {pinv_rtol!r}")
        if weights is not None:
            _check_float("weights", weights, (c, d))
        if bias is not None:
            _check_float("bias", bias, (c,))
        want = self._wanted_metrics(metrics, pair_metrics, weights is not None)
        seen = self._counts > 0
        k = int(seen.sum())
        if k < 2:
            raise ValueError(f"compute needs at least 2 classes with samples, got {k}")
        n = self._counts[seen].to(torch.float64)
        total = n.sum()
        mu = self._means if k == c else self._means[seen]  # no (C', d) copy when every class was seen
        mu_g = mu.mean(0) if self.global_mean == "class" else (n[:, None] * mu).sum(0) / total
        mt = mu - mu_g
        out: dict[str, float] = {"num_classes_seen": k}
        sigma_w = 0.5 * (self._sw + self._sw.T) / total if want & {"nc1", "nc1_quotient"} else None
        gram_m = _small_gram(mt) if want & {"nc1", "nc2_etf_error"} else None  # d x d or C' x C', the smaller
        if "nc1" in want:
            rtol = d * torch.finfo(torch.float64).eps if pinv_rtol is None else float(pinv_rtol)
            if k > d:
                lam, vec = torch.linalg.eigh(gram_m / k)  # Sigma_B, d x d
                keep = lam > rtol * lam.max().clamp_min(0.0)
                v = vec[:, keep]
                out["nc1"] = float(((v.T @ sigma_w) * v.T).sum(1).div(lam[keep]).sum() / k)
            else:
                lam, vec = torch.linalg.eigh(gram_m)  # G, C' x C'; Sigma_B's eigenvalues are lam / C'
                keep = lam > rtol * lam.max().clamp_min(0.0)
                t = vec[:, keep].T @ mt  # (r, d)
                out["nc1"] = float(((t @ sigma_w) * t).sum(1).div(lam[keep] ** 2).sum())
        norms = torch.linalg.vector_norm(mt, dim=1)
        sum_sq = norms.square().sum()  # sum_c |mt_c|^2, without an elementwise (C', d) product
        if "nc1_quotient" in want:
            out["nc1_quotient"] = float(torch.trace(sigma_w) / (sum_sq / k))
        if "nc2_equinorm" in want:
            out["nc2_equinorm"] = float(norms.std(unbiased=False) / norms.mean())
        pairs = k * (k - 1)
        if "nc2_equiangular" in want:
            u = mt * norms.reciprocal()[:, None]  # one division per row: a broadcast divide is ~4x slower
            gram_u = _small_gram(u)  # same Frobenius norm as the C' x C' cosine matrix, the smaller one
            mean_cos = (u.sum(0).pow(2).sum() - k) / pairs
            mean_cos2 = (gram_u.pow(2).sum() - k) / pairs
            out["nc2_equiangular"] = float((mean_cos2 - mean_cos ** 2).clamp_min(0.0).sqrt())
        if "nc2_etf_error" in want:
            g_dot_b = (sum_sq - mt.sum(0).pow(2).sum() / k) / math.sqrt(k - 1)  # <G, (I - J/C')/sqrt(C'-1)>
            out["nc2_etf_error"] = float((2.0 - 2.0 * g_dot_b / gram_m.norm()).clamp_min(0.0).sqrt())
        if want & set(_PAIR_KEYS):
            shift = -0.5 * math.log(2.0 * k / (k - 1))  # log(1/|u_c - u_c'|) of a simplex ETF
            s = self._m2[seen] / n
            ps = _ops.collapse_pair_stats(mt, s, shift).to(torch.float64).cpu()
            npairs = pairs / 2
            g_mean = ps[1] / npairs
            pair_values = {"cdnv": ps[0] / npairs, "gnc2": (ps[2] / npairs - g_mean ** 2).clamp_min(0.0),
                           "gnc2_mean": g_mean + shift, "nc2_maxangle": ps[3] / npairs}
            out.update({key: float(v) for key, v in pair_values.items() if key in want})
        if want & set(_CLASSIFIER_KEYS):
            w = weights.to(self.device, torch.float64)[seen]
            wn = w.norm(dim=1)
            if not bool((wn > 0).all()):
                raise ValueError("weights has an all-zero row for a seen class: cos(w_c, M~_c) is undefined")
            cw = (w * mt).sum(1) / (wn * norms)
            values = {"nc3": lambda: (w / w.norm() - mt / mt.norm()).pow(2).sum(),
                      "unc3": lambda: cw.std(unbiased=False), "nc3_cos_mean": cw.mean}
            out.update({key: float(fn()) for key, fn in values.items() if key in want})
        return {key: out[key] for key in METRIC_KEYS if key in out}

    @staticmethod
    def _wanted_metrics(metrics: Iterable[str] | None, pair_metrics: bool, have_weights: bool) -> set[str]:
        if metrics is None:
            want = set(METRIC_KEYS) - {"num_classes_seen"}
            if not pair_metrics:
                want -= set(_PAIR_KEYS)
            if not have_weights:
                want -= set(_CLASSIFIER_KEYS)
            return want
        if isinstance(metrics, str):
            metrics = [metrics]
        want = set(metrics) - {"num_classes_seen"}
        unknown = sorted(want - set(METRIC_KEYS))
        if unknown:
            raise ValueError(f"metrics has unknown keys {unknown}; choose from {list(METRIC_KEYS)}")
        if not pair_metrics and want & set(_PAIR_KEYS):
            raise ValueError(f"metrics asks for pair metrics {sorted(want & set(_PAIR_KEYS))} with pair_metrics=False")
        if not have_weights and want & set(_CLASSIFIER_KEYS):
            raise ValueError(f"metrics {sorted(want & set(_CLASSIFIER_KEYS))} need the classifier: pass weights")
        return want

    def ncc_mismatch(self, features: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """NC4 against this meter's class means (classes never seen are never the nearest mean)."""
        return ncc_mismatch(features, self.means, weights, bias)

    def __repr__(self) -> str:
        return (f"CollapseMeter(num_classes={self.num_classes}, dim={self.dim}, global_mean={self.global_mean!r}, "
                f"device={str(self.device)!r}, samples={self.num_samples})")


def ncc_mismatch(features: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
                 bias: torch.Tensor | None = None) -> float:
    """NC4: the fraction of samples whose classifier prediction argmax_c (w_c . h + b_c) differs from the
    nearest class mean argmin_c |h - mu_c|.

    features (N, d); means (C, d) (rows containing NaN, e.g. :attr:`CollapseMeter.means` of classes never seen,
    are excluded from the argmin); weights (C, d); bias (C,) or None. Fused per sample: no N x C buffer."""
    if not isinstance(means, torch.Tensor) or means.dim() != 2:
        raise ValueError(f"means must be a (C, d) tensor, got {getattr(means, 'shape', type(means).__name__)}")
    c, d = means.shape
    if means.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"means must be a float tensor, got {means.dtype}")
    _check_float("features", features, (None, d))
    _check_float("weights", weights, (c, d))
    if bias is not None:
        _check_float("bias", bias, (c,))
    if features.shape[0] == 0:
        raise ValueError("features must have at least one row, got shape (0, d)")
    ok = ~torch.isnan(means).any(1)
    idx = torch.nonzero(ok).flatten()
    if idx.numel() == 0:
        raise ValueError("means has no row without NaN (no class was seen)")
    sub = means[idx]
    if not bool(torch.isfinite(sub).all()):
        raise ValueError("means contains inf")
    dev = features.device
    cls, ncc = _ops.collapse_ncc(features, sub.to(dev), weights.to(dev), None if bias is None else bias.to(dev))
    return float((cls != idx.to(dev)[ncc]).to(torch.float64).mean())


# ----------------------------------------------------------------------------------------------------------
# Hugging Face-style feature collection and plotting
# ----------------------------------------------------------------------------------------------------------
def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _model_device(model: Any) -> torch.device | None:
    """Where the model's inputs must live: ``model.device`` (Hugging Face models), else its first parameter's
    device, else None (leave inputs where they are)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return None


def collect_lm_features(model: Any, batches: Iterable[Any], meter: CollapseMeter | None = None, *,
                        layer: int = -1, ignore_index: int = -100, progress: bool = True,
                        total: int | None = None, global_mean: str = "class") -> CollapseMeter:
    """Stream a causal LM's hidden states into a :class:`CollapseMeter`, labels = next tokens.

    model: called as ``model(input_ids=..., attention_mask=..., output_hidden_states=True)`` under no_grad; its
    output has ``hidden_states`` (a sequence of (B, T, d) tensors; ``layer`` picks one, -1 the last). The caller
    puts the model in eval mode. batches: dicts (or objects) with ``input_ids`` (B, T), optional
    ``attention_mask`` (B, T) and optional ``labels`` (B, T; default input_ids); input_ids and attention_mask are
    moved to the model's device (``model.device`` or its first parameter's). The feature at position t is paired
    with token t+1; it is dropped when token t+1 is ``ignore_index`` or either position is padding.
    meter: accumulate into it; if None one is created from ``model.config.vocab_size`` and the hidden size, on the
    hidden states' device. Shows a tqdm progress bar unless ``progress=False``. Returns the meter.
    """
    from tqdm.auto import tqdm

    device = _model_device(model)
    bar = tqdm(batches, total=total, disable=not progress, desc="collapse stats", unit="batch")
    tokens = 0
    for batch in bar:
        ids = batch if isinstance(batch, torch.Tensor) else _field(batch, "input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("each batch must carry input_ids of shape (B, T)")
        mask = None if isinstance(batch, torch.Tensor) else _field(batch, "attention_mask")
        labels = None if isinstance(batch, torch.Tensor) else _field(batch, "labels")
        model_ids, model_mask = ids, mask
        if device is not None:  # a CPU data loader feeding a model on the GPU
            model_ids = ids.to(device)
            model_mask = mask.to(device) if isinstance(mask, torch.Tensor) else mask
        with torch.no_grad():
            out = model(input_ids=model_ids, attention_mask=model_mask, output_hidden_states=True)
        hidden = _field(out, "hidden_states")
        if hidden is None:
            raise ValueError("model output has no hidden_states (was output_hidden_states=True honoured?)")
        h = hidden[layer]
        if h.dim() != 3 or h.shape[:2] != ids.shape:
            raise ValueError(f"hidden_states[{layer}] must have shape {tuple(ids.shape) + ('d',)}, "
                             f"got {tuple(h.shape)}")
        if meter is None:
            config = _field(model, "config")
            vocab = _field(config, "vocab_size") if config is not None else None
            if vocab is None:
                raise ValueError("meter is None and model.config.vocab_size is missing: pass a meter")
            meter = CollapseMeter(int(vocab), int(h.shape[-1]), global_mean=global_mean, device=h.device)
        target = (labels if labels is not None else ids)[:, 1:].to(h.device)
        keep = target != ignore_index
        if mask is not None:
            m = mask.to(h.device).bool()
            keep &= m[:, 1:] & m[:, :-1]
        feats = h[:, :-1][keep]
        meter.update(feats, target[keep])
        tokens += int(keep.sum())
        bar.set_postfix(tokens=tokens)
    if meter is None:
        raise ValueError("batches was empty and no meter was given")
    return meter


def plot_metrics(history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]], path: str | os.PathLike,
                 *, x: Sequence[Any] | None = None, keys: Sequence[str] | None = None, xlabel: str = "checkpoint",
                 title: str | None = None) -> str:
    """Plot metrics across checkpoints or layers to a PNG file and return its path.

    history: a list of :meth:`CollapseMeter.compute` dicts (one per checkpoint/layer) or a dict
    metric -> values. x: the x positions/labels (default 0..n-1). keys: which metrics (default every key
    present except num_classes_seen). One panel per metric; log y-axis when all values are positive.
    Draws on a standalone :class:`matplotlib.figure.Figure` (Agg canvas): pyplot's backend and open figures are
    left alone."""
    from etfkern._core.plot import agg_figure

    if isinstance(history, Mapping):
        series = {k: [float(v) for v in vals] for k, vals in history.items()}
    else:
        series = {}
        for rec in history:
            for k, v in rec.items():
                series.setdefault(k, []).append(float(v))
    if keys is None:
        keys = [k for k in METRIC_KEYS if k in series and k != "num_classes_seen"]
        keys += [k for k in series if k not in keys and k != "num_classes_seen"]
    missing = [k for k in keys if k not in series]
    if missing or not keys:
        raise ValueError(f"keys must name metrics present in history; missing {missing}, have {sorted(series)}")
    lengths = {len(series[k]) for k in keys}
    if len(lengths) != 1:
        raise ValueError(f"every metric in history must have the same number of points, got {sorted(lengths)}")
    npts = lengths.pop()
    xs = list(range(npts)) if x is None else list(x)
    if len(xs) != npts:
        raise ValueError(f"x must have {npts} entries, got {len(xs)}")
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = agg_figure(rows, cols, figsize=(3.2 * cols, 2.6 * rows))
    pos = list(range(npts))
    for ax, key in zip(axes.flat, keys):
        vals = series[key]
        ax.plot(pos, vals, marker="o")
        if all(v > 0 for v in vals):
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xticks(pos)
        ax.set_xticklabels([str(v) for v in xs], fontsize=7, rotation=45)
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=100)
    return path
