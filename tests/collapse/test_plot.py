"""etfkern.collapse.plot_metrics: steps placed by value, log axes over decades, NaN marked, the Figure returned."""
from __future__ import annotations

import math
import sys

import pytest
import torch

pytest.importorskip("matplotlib")

import etfkern.collapse as col  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(points: int = 3) -> list[dict[str, float]]:
    """CollapseMeter.compute dicts of a growing clustered sample (5 classes, d=6)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(20)
    feats = 3 * torch.randn(5, 6, generator=g, dtype=torch.float64)[labels] + torch.randn(100, 6, generator=g,
                                                                                          dtype=torch.float64)
    out = []
    for n in torch.linspace(40, 100, points).long().tolist():
        meter = col.CollapseMeter(5, 6)
        meter.update(feats[:n], labels[:n])
        out.append(meter.compute(torch.randn(5, 6, generator=g)))
    return out


def _data_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_marker() == "o"]


def test_writes_png_and_returns_the_figure(tmp_path):
    history = _history()
    fig = col.plot_metrics(history, tmp_path / "nc.png", x=["ck1", "ck2", "ck3"], title="test")
    assert isinstance(fig, Figure)
    assert (tmp_path / "nc.png").read_bytes()[:8] == PNG_MAGIC
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.axison]
    assert titles[:3] == ["nc1", "nc1_quotient", "cdnv"] and "num_classes_seen" not in titles
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["ck1", "ck2", "ck3"]  # non-numeric steps: evenly spaced labels
    fig2 = col.plot_metrics({"nc1": [3.0, 2.0], "gnc2_mean": [-0.1, -0.2]}, str(tmp_path / "layers.png"),
                            xlabel="layer")
    assert (tmp_path / "layers.png").stat().st_size > 1000
    assert [ax.get_xlabel() for ax in fig2.axes] == ["layer", "layer"]
    with pytest.raises(ValueError, match="keys must name metrics"):
        col.plot_metrics(history, tmp_path / "x.png", keys=["nope"])
    assert not (tmp_path / "x.png").exists()


def test_path_none_returns_the_figure_without_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig = col.plot_metrics({"nc1": [3.0, 2.0]}, None)
    assert isinstance(fig, Figure) and list(tmp_path.iterdir()) == []


def test_numeric_steps_are_placed_by_value(tmp_path):
    fig = col.plot_metrics({"nc1": [4.0, 3.0, 2.5, 2.4]}, None, x=[0, 1, 5, 6])
    ax = fig.axes[0]
    assert list(_data_lines(ax)[0].get_xdata()) == [0.0, 1.0, 5.0, 6.0]
    assert ax.get_xscale() == "linear"
    # steps spanning decades (a log-spaced checkpoint schedule) get a log x-axis
    fig = col.plot_metrics({"nc1": [4.0, 3.0, 2.5, 2.4]}, None, x=[10, 100, 1000, 10000])
    assert fig.axes[0].get_xscale() == "log"
    assert list(_data_lines(fig.axes[0])[0].get_xdata()) == [10.0, 100.0, 1000.0, 10000.0]
    # a zero step cannot go on a log axis; one decade is not enough for the x-axis
    assert col.plot_metrics({"nc1": [1.0, 2.0]}, None, x=[0, 1000]).axes[0].get_xscale() == "linear"
    assert col.plot_metrics({"nc1": [1.0, 2.0]}, None, x=[1, 10]).axes[0].get_xscale() == "linear"
    with pytest.raises(ValueError, match="x must have 2 entries, got 3"):
        col.plot_metrics({"nc1": [1.0, 2.0]}, None, x=[1, 2, 3])
    with pytest.raises(ValueError, match="same number of points"):
        col.plot_metrics({"nc1": [1.0, 2.0], "cdnv": [1.0]}, None)


@pytest.mark.parametrize("values, scale", [
    ([1.0, 0.1, 0.01], "log"),     # falls two decades
    ([1.0, 0.1], "log"),           # exactly one decade
    ([1.0, 0.5, 0.2], "linear"),   # less than a decade
    ([1.0, -0.5, 0.01], "linear"),  # a negative value
    ([0.0, 1.0, 100.0], "linear"),  # a zero
])
def test_y_axis_is_logarithmic_when_values_span_a_decade(values, scale):
    assert col.plot_metrics({"cdnv": values}, None).axes[0].get_yscale() == scale


def test_non_finite_points_are_marked_not_dropped(tmp_path):
    fig = col.plot_metrics({"nc1": [1.0, math.nan, 0.5, math.inf], "cdnv": [2.0, 1.0, 0.5, 0.2]},
                           tmp_path / "nan.png", x=[1, 2, 3, 4])
    assert (tmp_path / "nan.png").read_bytes()[:8] == PNG_MAGIC
    ax_nc1, ax_cdnv = fig.axes[:2]
    marks = [line for line in ax_nc1.get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [2, 4] and marks[0].get_color() == "red"
    notes = sorted(t.get_text() for t in ax_nc1.texts)
    assert notes == ["inf", "nan"]
    legend = ax_nc1.get_legend()
    assert legend is not None and "2 non-finite points" in legend.get_texts()[0].get_text()
    # the finite points are still drawn, the line breaks at the gaps
    ys = list(_data_lines(ax_nc1)[0].get_ydata())
    assert ys[0] == 1.0 and ys[2] == 0.5 and math.isnan(ys[1]) and math.isnan(ys[3])
    # a panel without non-finite values has no marks and no legend
    assert not [line for line in ax_cdnv.get_lines() if line.get_marker() == "x"]
    assert ax_cdnv.get_legend() is None and ax_cdnv.get_yscale() == "log"


def test_all_nan_panel_still_draws(tmp_path):
    fig = col.plot_metrics({"nc3": [math.nan, math.nan]}, tmp_path / "all_nan.png")
    assert (tmp_path / "all_nan.png").stat().st_size > 1000
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["nan", "nan"]


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        col.plot_metrics({"nc1": [3.0, 2.0]}, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_leaves_pyplot_backend_and_figures_alone(tmp_path):
    # plot_metrics used to call matplotlib.use("Agg"): a user's interactive (here: svg) backend was switched
    # under them, so a later plt.show() showed nothing
    import matplotlib

    import matplotlib.pyplot as plt

    original = matplotlib.get_backend()
    try:
        plt.switch_backend("svg")
        fig = plt.figure()
        col.plot_metrics({"nc1": [3.0, 2.0]}, tmp_path / "p.png")
        assert matplotlib.get_backend().lower() == "svg"
        assert plt.get_fignums() == [fig.number]
        plt.close(fig)
    finally:
        plt.switch_backend(original)
    assert (tmp_path / "p.png").stat().st_size > 1000
