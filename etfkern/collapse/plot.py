"""Plots of collapse metrics across checkpoints, epochs or layers: :func:`plot_metrics`.

Draws on a standalone :class:`matplotlib.figure.Figure` (Agg canvas, :func:`etfkern._core.plot.agg_figure`), so
pyplot's backend and open figures are left alone. Numeric steps are placed by value, axes turn logarithmic when
their values span decades, and non-finite values are marked on the axis instead of being dropped silently.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping, Sequence

__all__ = ["plot_metrics", "draw_series", "log_scale_fits", "MATPLOTLIB_HINT"]

MATPLOTLIB_HINT = "pip install matplotlib  (or: pip install 'etfkern[plot]')"

# A log axis is used when the positive values span at least this many decades (max / min >= 10**decades).
_X_LOG_DECADES = 2.0  # steps such as 1, 10, 100, 1000
_Y_LOG_DECADES = 1.0  # metrics such as NC1 falling from 1 to 0.05


def figure(rows: int, cols: int, *, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(Figure, (rows, cols) axes) on an Agg canvas; ImportError that says how to install matplotlib."""
    from etfkern._core.plot import agg_figure

    try:
        return agg_figure(rows, cols, figsize=figsize)
    except ImportError as exc:
        raise ImportError(f"plotting needs matplotlib, which is not installed ({exc}); {MATPLOTLIB_HINT}") from None


def log_scale_fits(values: Sequence[float], decades: float) -> bool:
    """True when every finite value is > 0 and they span at least ``decades`` decades (max/min >= 10**decades)."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    if not finite or min(finite) <= 0.0:
        return False
    return math.log10(max(finite) / min(finite)) >= decades - 1e-12


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def draw_series(ax: Any, xs: Sequence[float], ys: Sequence[float], *, label: str | None = None,
                **style: Any) -> int:
    """Plot ys against xs on ax; points whose y is NaN/inf are marked at the bottom of the axis with a red x and
    their value, and the line breaks there. Returns the number of such points."""
    ys = [float(v) for v in ys]
    finite = [math.isfinite(v) for v in ys]
    line_ys = [v if ok else math.nan for v, ok in zip(ys, finite)]  # matplotlib breaks the line at NaN
    style.setdefault("marker", "o")
    style.setdefault("markersize", 4)
    (line,) = ax.plot(xs, line_ys, label=label, **style)
    bad = [(x, v) for x, v, ok in zip(xs, ys, finite) if not ok]
    if bad:
        on_axis = ax.get_xaxis_transform()  # x in data units, y in axes units (0 = bottom)
        what = label or "value"
        ax.plot([x for x, _ in bad], [0.03] * len(bad), linestyle="none", marker="x", markersize=8,
                markeredgewidth=2, color="red", transform=on_axis, clip_on=False,
                label=f"{what}: {len(bad)} non-finite point{'s' if len(bad) > 1 else ''}")
        for x, v in bad:
            ax.annotate(str(v), (x, 0.03), xycoords=on_axis, xytext=(0, 6), textcoords="offset points",
                        ha="center", fontsize=7, color="red")
    return len(bad)


def plot_metrics(history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]],
                 path: str | os.PathLike | None, *, x: Sequence[Any] | None = None,
                 keys: Sequence[str] | None = None, xlabel: str = "checkpoint", title: str | None = None,
                 dpi: int = 100) -> Any:
    """Plot metrics across checkpoints, epochs or layers; writes a PNG to ``path`` (unless None) and returns the
    :class:`matplotlib.figure.Figure`.

    history: a list of :meth:`CollapseMeter.compute` dicts (one per checkpoint/layer) or a dict metric -> values
    (every metric the same length n). x: the n steps (default 0..n-1); numbers are placed by value (log x-axis
    when they are positive and span two decades or more), anything else is drawn as evenly spaced labels.
    keys: which metrics (default every key present except num_classes_seen), one panel each; a panel's y-axis is
    logarithmic when its positive values span a decade or more. NaN/inf values are marked with a red x at the
    bottom of their panel (and counted in its legend), never dropped silently.
    Raises ValueError for unknown keys / mismatched lengths, ImportError (saying how to install it) without
    matplotlib. What every metric means, with its formula and paper: docs/metrics.md.
    """
    from etfkern.collapse import METRIC_KEYS

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
    keys = list(keys)
    missing = [k for k in keys if k not in series]
    if missing or not keys:
        raise ValueError(f"keys must name metrics present in history; missing {missing}, have {sorted(series)}")
    lengths = {len(series[k]) for k in keys}
    if len(lengths) != 1:
        raise ValueError(f"every metric in history must have the same number of points, got {sorted(lengths)}")
    npts = lengths.pop()
    steps = list(range(npts)) if x is None else list(x)
    if len(steps) != npts:
        raise ValueError(f"x must have {npts} entries, got {len(steps)}")
    numeric = all(_is_number(v) for v in steps)
    positions = [float(v) for v in steps] if numeric else list(range(npts))
    log_x = numeric and log_scale_fits(positions, _X_LOG_DECADES)

    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = figure(rows, cols, figsize=(3.4 * cols, 2.8 * rows))
    for ax, key in zip(axes.flat, keys):
        values = series[key]
        marked = draw_series(ax, positions, values)
        if log_scale_fits(values, _Y_LOG_DECADES):
            ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(positions)
            ax.set_xticklabels([str(v) for v in steps], fontsize=7, rotation=45)
        ax.tick_params(which="both", labelsize=7)  # log axes label minor ticks too
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        if marked:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig
