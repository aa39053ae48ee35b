"""Figures for etfkern's PNG plots (demo, collapse.plot_metrics, bench charts).

A standalone :class:`matplotlib.figure.Figure` on an Agg canvas: no pyplot, so a caller's matplotlib backend
and open figures are left alone (``matplotlib.use("Agg")`` would switch the whole session's backend).
"""
from __future__ import annotations

from typing import Any


def agg_figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, (rows, cols) array of axes). Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)
