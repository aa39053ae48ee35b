"""Streaming neural-collapse statistics at vocabulary scale: :class:`CollapseMeter`, :func:`ncc_mismatch`, and
helpers to collect features from a Hugging Face-style causal LM (:mod:`etfkern.collapse.lm`) and to plot metrics
across checkpoints/layers. What every metric means, with its formula and paper: docs/metrics.md.

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
from typing import Any, Iterable, Mapping

import torch

from etfkern.collapse import ops as _ops
from etfkern.collapse.lm import collect_lm_features

__all__ = ["CollapseMeter", "ncc_mismatch", "collect_lm_features", "plot_metrics", "METRIC_KEYS"]

METRIC_KEYS = ("nc1", "nc1_quotient", "cdnv", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "nc2_etf_error",
               "gnc2", "gnc2_mean", "nc3", "unc3", "nc3_cos_mean", "num_classes_seen")
_PAIR_KEYS = ("cdnv", "gnc2", "gnc2_mean", "nc2_maxangle")  # from the O(C'^2 d) pair kernel
_CLASSIFIER_KEYS = ("nc3", "unc3", "nc3_cos_mean")  # need the classifier weights
_EXCLUSION_KEYS = ("num_classes_excluded", "num_samples_excluded")  # compute() adds them when min_count > 1
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


def _int_arg(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers too, bool never), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int{'' if minimum is None else f' >= {minimum}'}, got "
                         f"{type(value).__name__} {value!r}")
    if minimum is not None and int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {int(value)}")
    return int(value)


def _global_mean_arg(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in ("class", "sample"):
        raise ValueError(f"{name} must be 'class' or 'sample', got {value!r}")
    return value


def _device_arg(device: Any) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a torch.device or a string such as 'cpu' or 'cuda', got "
                         f"{type(device).__name__} {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None


def _fmt(shape: tuple[int | None, ...]) -> str:
    items = ["?" if s is None else str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


# ----------------------------------------------------------------------------------------------------------
# The meter
# ----------------------------------------------------------------------------------------------------------
class CollapseMeter:
    """Streaming per-class statistics and the neural-collapse metrics defined in docs/metrics.md.

    Args:
        num_classes: C, labels must lie in [0, C) or equal ``ignore_index``.
        dim: d, the feature dimension.
        global_mean: "class" (mu_G = mean of the class means, Wu & Papyan) or "sample" (mean of the samples,
            Papyan et al.).
        device: where the accumulators live (default CPU); batches are moved there. :meth:`to` moves them later.
        ignore_index: rows whose label equals it are skipped (torch's convention, default -100: a language
            model's padding/prompt labels). Their features are not looked at.
        min_count: classes with fewer samples are left out of the metrics (rare tokens); :meth:`compute` reports
            how many classes and samples that excluded, :meth:`excluded_classes` which.

    An :meth:`update`, :meth:`merge` or :meth:`load_state_dict` either applies whole or, whatever raises inside
    it, leaves the meter unchanged. A meter created under ``torch.inference_mode()`` can be updated outside it.

    State (all on ``device``): counts (C,) int64; means (C, d) float64; per-class sums of squared deviations (C,)
    float64; pooled within-class scatter (d, d) float64. Memory: 8 (C d + d^2 + 2C) bytes.
    """

    def __init__(self, num_classes: int, dim: int, *, global_mean: str = "class",
                 device: torch.device | str | None = None, ignore_index: int = -100, min_count: int = 1) -> None:
        self.num_classes = _int_arg("num_classes", num_classes, minimum=1)
        self.dim = _int_arg("dim", dim, minimum=1)
        self.global_mean = _global_mean_arg("global_mean", global_mean)
        self.ignore_index = _int_arg("ignore_index", ignore_index)
        self.min_count = _int_arg("min_count", min_count, minimum=1)
        self.device = _device_arg(device)
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
        """Samples seen so far (rows labelled ``ignore_index`` excluded)."""
        return int(self._counts.sum())

    def excluded_classes(self) -> torch.Tensor:
        """int64 ids of the classes seen but fewer than ``min_count`` times, left out of :meth:`compute`."""
        return torch.nonzero((self._counts > 0) & (self._counts < self.min_count)).flatten()

    def to(self, device: torch.device | str) -> "CollapseMeter":
        """Move the accumulators to ``device`` and return the meter (as ``nn.Module.to``); later batches are moved
        there too. A device that cannot hold them raises ValueError with the meter unchanged."""
        dev = _device_arg(device)
        try:
            moved = tuple(t.to(dev) for t in (self._counts, self._means, self._m2, self._sw))
        except (RuntimeError, AssertionError) as exc:  # e.g. "cuda" on a machine without a CUDA build
            raise ValueError(f"device {str(dev)!r} cannot hold the meter here: {exc}") from None
        self._counts, self._means, self._m2, self._sw = moved
        self.device = dev
        return self

    # -- accumulation -----------------------------------------------------------------------------------
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge one batch. features (N, d) (or (..., d) with labels (...)) float16/bfloat16/float32/float64;
        labels (N,) integer in [0, C) or equal to ``ignore_index`` (those rows are skipped). Raises ValueError
        naming the argument, with the meter unchanged, on a bad shape, dtype, out-of-range label or non-finite
        feature; any other failure inside also leaves the meter unchanged."""
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
        ignored = labels == self.ignore_index
        if bool(ignored.any()):
            kept = ~ignored
            features, labels = features[kept], labels[kept]
            if labels.numel() == 0:
                return
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
            raise ValueError(f"labels must lie in [0, {self.num_classes}) or equal ignore_index={self.ignore_index}, "
                             f"got values in [{int(lo)}, {int(hi)}]")
        if not math.isfinite(probe) and not all(bool(torch.isfinite(t).all()) for t in (m_new, m2_delta, sw_delta)):
            if not bool(torch.isfinite(features).all()):
                raise ValueError("features contains NaN or inf")
            if features.dtype != torch.float64:  # float32 products overflowed: redo this batch in float64
                m_new, m2_delta, sw_delta = _ops.collapse_update(features.to(torch.float64), inv, m_old, n_old)
            if not (bool(torch.isfinite(m2_delta).all()) and bool(torch.isfinite(sw_delta).all())):
                raise ValueError("features are too large: the within-class scatter overflows float64")
        # Nothing above mutated the meter: commit all at once.
        m2_old = self._m2.index_select(0, uniq)
        self._commit(uniq, (n_old + cnt, m_new, m2_old + m2_delta), (n_old, m_old, m2_old), sw_delta)

    def _commit(self, rows: torch.Tensor, new_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                old_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], sw_delta: torch.Tensor) -> None:
        """Write ``rows`` of (counts, means, m2) and add ``sw_delta`` to the scatter: all of it, or nothing.

        ``old_rows`` are those rows as they are now (the callers gathered them anyway). Everything was computed
        before; a write that raises part-way (any exception, KeyboardInterrupt included) has the rows already
        written restored, so a retry never counts a batch twice."""
        state = (self._counts, self._means, self._m2)
        if not torch.is_inference_mode_enabled() and any(t.is_inference() for t in state + (self._sw,)):
            # Created under torch.inference_mode(): in-place writes are refused outside it. Out-of-place results
            # are normal tensors, so the meter leaves inference mode behind once (one copy of the state).
            counts, means, m2 = (t.index_copy(0, rows, r.to(t.dtype)) for t, r in zip(state, new_rows))
            self._counts, self._means, self._m2, self._sw = counts, means, m2, self._sw + sw_delta
            return
        written = []
        try:
            for t, r in zip(state, new_rows):
                t.index_copy_(0, rows, r)  # not t[rows] = r: index_put allocates a K x d index
                written.append(t)
            self._sw.add_(sw_delta)  # last: an in-place op checks its arguments before it writes
        except BaseException:
            for t, old in zip(written, old_rows):
                t.index_copy_(0, rows, old)
            raise

    def _merge_stats(self, n_b: torch.Tensor, m_b: torch.Tensor, m2_b: torch.Tensor, sw_b: torch.Tensor) -> None:
        """Chan's merge of another set of statistics over all C classes (rows with n_b == 0 are no-ops)."""
        idx = torch.nonzero(n_b > 0).flatten()
        old_rows = (self._counts[idx], self._means[idx], self._m2[idx])
        nb = n_b[idx].to(torch.float64)
        no = old_rows[0].to(torch.float64)
        mb = m_b[idx]
        mo = torch.where((no > 0)[:, None], old_rows[1], mb)
        n = no + nb
        delta = mb - mo
        w = no * nb / n
        new_means = mo + delta * (nb / n)[:, None]
        new_m2 = old_rows[2] + m2_b[idx] + w * (delta * delta).sum(1)
        sw_delta = sw_b + (delta * w[:, None]).T @ delta
        self._commit(idx, (old_rows[0] + n_b[idx], new_means, new_m2), old_rows, sw_delta)

    def merge(self, other: "CollapseMeter") -> None:
        """Add everything ``other`` has seen (exact, as if one meter saw both). ``other`` must have the same
        num_classes, dim, global_mean, ignore_index and min_count (else the merged metrics would silently follow
        this meter's settings): ValueError otherwise, with the meter unchanged."""
        if not isinstance(other, CollapseMeter):
            raise ValueError(f"other must be a CollapseMeter, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(f"other must have num_classes={self.num_classes}, dim={self.dim}; got "
                             f"num_classes={other.num_classes}, dim={other.dim}")
        for name in ("global_mean", "ignore_index", "min_count"):
            if getattr(other, name) != getattr(self, name):
                raise ValueError(f"other must have {name}={getattr(self, name)!r} as this meter, got "
                                 f"{getattr(other, name)!r}")
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
        mine = torch.tensor([self.num_classes, self.dim, ("class", "sample").index(self.global_mean),
                             self.ignore_index, self.min_count], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        gathered = [[int(v) for v in t] for t in gathered]
        shapes = [tuple(g[:2]) for g in gathered]
        if any(sh != shapes[0] for sh in shapes):
            raise ValueError("all_reduce needs meters of the same num_classes and dim on every rank, got "
                             f"(num_classes, dim) = {shapes} (rank order)")
        for col, name in ((2, "global_mean"), (3, "ignore_index"), (4, "min_count")):
            if any(g[col] != gathered[0][col] for g in gathered):
                values = [("class", "sample")[g[col]] if name == "global_mean" else g[col] for g in gathered]
                raise ValueError(f"all_reduce needs meters of the same {name} on every rank, got {values} "
                                 "(rank order)")
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
                "ignore_index": self.ignore_index, "min_count": self.min_count,
                "counts": self._counts.clone(), "means": self._means.clone(), "m2": self._m2.clone(),
                "sw": self._sw.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are moved to this meter's device; global_mean, ignore_index
        and min_count are taken from the state when it has them). ValueError, with the meter unchanged, on
        whatever is cheap to check: a state that is not a mapping, a missing key, a mismatch of num_classes/dim
        or of tensor shapes, wrong types, non-integer or negative counts, NaN/inf statistics, a negative m2, a
        scatter sw that is not symmetric or has a negative diagonal (a corrupted checkpoint would otherwise
        surface later as NaN or nonsense metrics)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping from CollapseMeter.state_dict(), got {type(state).__name__}")
        for key in ("num_classes", "dim", "counts", "means", "m2", "sw"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        for key in ("num_classes", "dim"):
            _int_arg(f"state[{key!r}]", state[key], minimum=1)
        settings = {"global_mean": _global_mean_arg("state['global_mean']", state.get("global_mean", self.global_mean)),
                    "ignore_index": _int_arg("state['ignore_index']", state.get("ignore_index", self.ignore_index)),
                    "min_count": _int_arg("state['min_count']", state.get("min_count", self.min_count), minimum=1)}
        if (state["num_classes"], state["dim"]) != (self.num_classes, self.dim):
            raise ValueError(f"state has num_classes={state['num_classes']}, dim={state['dim']}; this meter "
                             f"has num_classes={self.num_classes}, dim={self.dim}")
        c, d = self.num_classes, self.dim
        for key, shape in (("counts", (c,)), ("means", (c, d)), ("m2", (c,)), ("sw", (d, d))):
            if not isinstance(state[key], torch.Tensor):
                raise ValueError(f"state[{key!r}] must be a tensor of shape {shape}, got {type(state[key]).__name__}")
            if tuple(state[key].shape) != shape:
                raise ValueError(f"state[{key!r}] must have shape {shape}, got {tuple(state[key].shape)}")
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
        sw = state["sw"].to(torch.float64)
        diag = sw.diagonal()
        if bool((diag < 0).any()):
            raise ValueError("state['sw'] (the within-class scatter) must have a diagonal >= 0, got a negative entry")
        # Updates leave sw exactly symmetric and merges to rounding (|S_ij| <= max diagonal): 1e-9 of it is slack.
        asym = float((sw - sw.T).abs().max())
        if asym > 1e-9 * float(diag.max()):
            raise ValueError("state['sw'] (the within-class scatter) must be symmetric, got |sw - sw^T| up to "
                             f"{asym:.3g}")
        dtypes = (("counts", torch.int64), ("means", torch.float64), ("m2", torch.float64), ("sw", torch.float64))
        loaded = tuple(state[key].to(self.device, dtype).clone() for key, dtype in dtypes)
        # every check passed and every copy exists: only assignments from here on
        self._counts, self._means, self._m2, self._sw = loaded
        self.global_mean, self.ignore_index, self.min_count = (settings["global_mean"], settings["ignore_index"],
                                                               settings["min_count"])

    # -- metrics ----------------------------------------------------------------------------------------
    def compute(self, weights: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                pinv_rtol: float | None = None, pair_metrics: bool = True,
                metrics: Iterable[str] | None = None) -> dict[str, float]:
        """The metrics defined in docs/metrics.md over the C' classes seen at least ``min_count`` times (C' >= 2
        needed), as Python floats; ``num_classes_seen`` counts every class seen, and with ``min_count`` > 1
        ``num_classes_excluded`` / ``num_samples_excluded`` say what was left out.

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
        seen = self._counts >= self.min_count  # the C' classes of the metrics (min_count >= 1: all seen)
        k = int(seen.sum())
        if k < 2:
            extra = "" if self.min_count == 1 else f" (at least min_count={self.min_count} each)"
            raise ValueError(f"compute needs at least 2 classes with samples{extra}, got {k}")
        n = self._counts[seen].to(torch.float64)
        total = n.sum()
        mu = self._means if k == c else self._means[seen]  # no (C', d) copy when every class was seen
        mu_g = mu.mean(0) if self.global_mean == "class" else (n[:, None] * mu).sum(0) / total
        mt = mu - mu_g
        out: dict[str, float] = {"num_classes_seen": int((self._counts > 0).sum())}
        if self.min_count > 1:
            excluded = (self._counts > 0) & ~seen
            out["num_classes_excluded"] = int(excluded.sum())
            out["num_samples_excluded"] = int(self._counts[excluded].sum())
        # Sigma_W pools every sample kept, excluded classes included: their scatter is not separable from S_W
        sigma_w = (0.5 * (self._sw + self._sw.T) / self._counts.sum().to(torch.float64)
                   if want & {"nc1", "nc1_quotient"} else None)
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
            npairs = pairs // 2
            # Pairs with coincident means have no CDNV term, pairs with coincident (or, for a zero M~_c, undefined)
            # directions no GNC2 term, pairs with a zero M~_c no max-angle term: each metric averages over the
            # pairs that have its term (the op counts the first two kinds; zero rows are counted here).
            no_cd, no_g = int(ps[4]), int(ps[5])
            zero = int((norms == 0).sum())
            no_dir = zero * (k - zero) + zero * (zero - 1) // 2
            g_mean = ps[1] / (npairs - no_g)
            pair_values = {"cdnv": ps[0] / (npairs - no_cd),
                           "gnc2": (ps[2] / (npairs - no_g) - g_mean ** 2).clamp_min(0.0),
                           "gnc2_mean": g_mean + shift, "nc2_maxangle": ps[3] / (npairs - no_dir)}
            out.update({key: float(v) for key, v in pair_values.items() if key in want})
            if no_cd or no_g:
                import warnings

                out["num_pairs_excluded_cdnv"], out["num_pairs_excluded_gnc2"] = no_cd, no_g
                warnings.warn(f"compute: {no_cd} of {npairs} class pairs have coincident means (no CDNV term) and "
                              f"{no_g} coincident or undefined directions (no GNC2 term); cdnv, gnc2 and gnc2_mean "
                              "average over the other pairs (see num_pairs_excluded_cdnv / _gnc2)", RuntimeWarning,
                              stacklevel=2)
        if want & set(_CLASSIFIER_KEYS):
            w = weights.to(self.device, torch.float64)[seen]
            wn = w.norm(dim=1)
            if not bool((wn > 0).all()):
                raise ValueError("weights has an all-zero row for a seen class: cos(w_c, M~_c) is undefined")
            cw = (w * mt).sum(1) / (wn * norms)
            values = {"nc3": lambda: (w / w.norm() - mt / mt.norm()).pow(2).sum(),
                      "unc3": lambda: cw.std(unbiased=False), "nc3_cos_mean": cw.mean}
            out.update({key: float(fn()) for key, fn in values.items() if key in want})
        pair_exclusions = ("num_pairs_excluded_cdnv", "num_pairs_excluded_gnc2")  # added when nonzero
        return {key: out[key] for key in METRIC_KEYS + _EXCLUSION_KEYS + pair_exclusions if key in out}

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
        """NC4 (docs/metrics.md) against this meter's class means: classes never seen, or seen fewer than
        ``min_count`` times, are never the nearest mean."""
        means = self.means
        means[self._counts < self.min_count] = float("nan")
        return ncc_mismatch(features, means, weights, bias)

    def __repr__(self) -> str:
        return (f"CollapseMeter(num_classes={self.num_classes}, dim={self.dim}, global_mean={self.global_mean!r}, "
                f"device={str(self.device)!r}, ignore_index={self.ignore_index}, min_count={self.min_count}, "
                f"samples={self.num_samples})")


def ncc_mismatch(features: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
                 bias: torch.Tensor | None = None) -> float:
    """NC4: the fraction of samples whose classifier prediction argmax_c (w_c . h + b_c) differs from the
    nearest class mean argmin_c |h - mu_c| (docs/metrics.md; ``ncc_mismatch`` is NC4's one name in etfkern).

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


# plot_metrics lives in etfkern/collapse/plot.py (collect_lm_features in lm.py); re-exported here.
from etfkern.collapse.plot import plot_metrics  # noqa: E402
