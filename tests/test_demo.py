"""`make demo` / `python -m etfkern demo` (etfkern/demo.py): the run shows neural collapse, reads it out, and plots."""
from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest

from etfkern.cli import main as cli_main
from etfkern.demo import DemoConfig, plot_history, read_result, run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The committed record of the real `make demo` run that the README quotes.
DEMO_RECORD = os.path.join(ROOT, "bench", "results", "demo-amd-epyc-x2-2026-12-04.json")


def _tiny(tmp_path, **kw) -> DemoConfig:
    """A config that reaches the terminal phase in a few seconds (16 classes in 16-d, tiny loss comparison)."""
    base = dict(classes=16, dim=16, in_dim=32, hidden=64, samples_per_class=16, test_per_class=4, epochs=12,
                batch_size=32, lr=0.2, out=str(tmp_path / "demo"), compare_classes=64, compare_dim=16,
                compare_rows=64)
    base.update(kw)
    return DemoConfig(**base)


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli_main(["demo", "--quick", "--out", str(out), "--no-progress", "--samples-per-class", "12", "--dim", "64",
                   "--epochs", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "NC1" in printed and "fused vs eager" in printed and "reading" in printed
    result = json.loads((out / "metrics.json").read_text())
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # epoch 0: the initialisation
    for h in history:
        for key in ("loss", "train_acc", "test_acc", "nc1", "cdnv", "nc2_etf_error", "nc3", "ncc_mismatch"):
            assert key in h and h[key] == h[key], key  # present and not NaN
    assert history[-1]["loss"] < history[0]["loss"]  # training makes progress
    assert result["loss_comparison"]["fused_ms"] > 0 and result["loss_comparison"]["eager_ms"] > 0
    assert result["loss_comparison"]["classes"] == 2048 and result["loss_comparison"]["rows"] == 512  # --quick
    # 256 classes in d=64: no simplex exists, and the reading says so instead of promising one
    assert result["summary"]["simplex_possible"] is False and "no simplex exists" in printed
    for name in ("metrics.png", "collapse_metrics.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def test_demo_reaches_collapse_and_says_so(tmp_path):
    lines: list[str] = []
    result = run_demo(_tiny(tmp_path), progress=False, log=lines.append)
    history, summary = result["history"], result["summary"]
    first, last = history[0], history[-1]
    assert summary["fit_epoch"] is not None and last["train_acc"] == 1.0
    assert last["nc1"] * 10 <= first["nc1"] and last["cdnv"] * 10 <= first["cdnv"]  # an order of magnitude
    assert last["nc2_etf_error"] < 0.5 * first["nc2_etf_error"]  # toward the simplex (16 classes in 16-d)
    assert last["nc3"] < first["nc3"] and last["ncc_mismatch"] <= 0.01
    assert summary["collapsed"] is True and summary["simplex_possible"] is True
    assert result["bank_floor"]["nc2_etf_error"] < 1e-5  # orthonormal bank: centred, an exact simplex
    printed = "\n".join(lines)
    assert "=> neural collapse" in printed and "terminal phase" in printed
    assert f"{summary['nc1_factor']:.3g}x smaller" in printed
    assert set(result["files"]) == {os.path.join(tmp_path / "demo", n)
                                    for n in ("metrics.json", "metrics.png", "collapse_metrics.png")}
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary)) and saved["reading"] == result["reading"]


def test_demo_is_deterministic(tmp_path):
    a = run_demo(_tiny(tmp_path, epochs=2, out=str(tmp_path / "a")), progress=False, plots=False, log=lambda s: None)
    b = run_demo(_tiny(tmp_path, epochs=2, out=str(tmp_path / "b")), progress=False, plots=False, log=lambda s: None)
    assert a["files"] == [os.path.join(tmp_path / "a", "metrics.json")]  # plots=False: no PNG
    for ha, hb in zip(a["history"], b["history"]):
        assert {k: v for k, v in ha.items() if k != "seconds"} == {k: v for k, v in hb.items() if k != "seconds"}


def test_demo_without_training_reports_no_collapse(tmp_path):
    lines: list[str] = []
    result = run_demo(_tiny(tmp_path, lr=0.0, epochs=2), progress=False, plots=False, log=lines.append)
    assert result["summary"]["collapsed"] is False and result["summary"]["fit_epoch"] is None
    printed = "\n".join(lines)
    assert "never fit" in printed and "no clear collapse" in printed and "=> neural collapse" not in printed


def test_read_result_on_a_known_history():
    def row(epoch, acc, nc1, cdnv, etf):
        return {"epoch": epoch, "train_acc": acc, "test_acc": acc, "nc1": nc1, "cdnv": cdnv, "nc2_etf_error": etf,
                "nc3": 1.0, "ncc_mismatch": 0.0}

    history = [row(0, 0.01, 50.0, 0.2, 1.2), row(1, 0.9, 5.0, 0.1, 0.9), row(2, 1.0, 1.0, 0.05, 0.5),
               row(3, 1.0, 0.5, 0.02, 0.2)]
    floor = {"nc2_etf_error": 0.0}
    summary, lines = read_result(history, floor, DemoConfig(classes=10, dim=16))
    assert summary["fit_epoch"] == 2 and summary["terminal_epochs"] == 1
    assert summary["nc1_factor"] == pytest.approx(100.0) and summary["cdnv_factor"] == pytest.approx(10.0)
    assert summary["collapsed"] is True
    # CDNV 9.9x is not an order of magnitude
    history[-1]["cdnv"] = 0.2 / 9.9
    summary, lines = read_result(history, floor, DemoConfig(classes=10, dim=16))
    assert summary["collapsed"] is False and "no clear collapse" in lines[-1]
    # C > d + 1: the reading names the bank's NC2 as the floor, not a simplex
    summary, lines = read_result(history, {"nc2_etf_error": 1.3}, DemoConfig(classes=100, dim=16))
    assert summary["simplex_possible"] is False and any("no simplex exists" in s and "1.3000" in s for s in lines)
    # a NaN metric is no collapse, never a crash
    history[-1]["nc1"] = math.nan
    summary, _ = read_result(history, floor, DemoConfig(classes=10, dim=16))
    assert summary["collapsed"] is False and math.isnan(summary["nc1_factor"])


def test_plot_history_marks_nan_and_uses_log_axes(tmp_path):
    pytest.importorskip("matplotlib")
    keys = ("loss", "train_acc", "test_acc", "nc1", "cdnv", "nc2_etf_error", "nc2_equinorm", "nc2_equiangular",
            "nc2_maxangle", "nc3", "unc3", "ncc_mismatch")
    history = [{"epoch": e, **{k: 10.0 ** -e for k in keys}} for e in range(4)]
    for h in history:
        h["train_acc"] = 0.5 if h["epoch"] == 0 else 1.0  # fit from epoch 1
    history[2]["nc1"] = math.nan
    comparison = {"fused_ms": 200.0, "eager_ms": 500.0, "fused_peak_mib": 27.0, "eager_peak_mib": 630.0,
                  "logits_mib": 156.0, "rows": 4096, "classes": 10000, "dim": 256}
    fig = plot_history(history, str(tmp_path / "m.png"), floor={"nc2_etf_error": 0.0}, comparison=comparison,
                       title="t")
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG_MAGIC
    loss_ax, acc_ax, nc1_ax, nc2_ax, nc3_ax, cmp_ax = fig.axes
    assert nc1_ax.get_yscale() == "log" and loss_ax.get_yscale() == "log"
    assert cmp_ax.get_yscale() == "linear" and cmp_ax.get_ylim()[0] == 0  # bars from 0: lengths are the ratios
    marks = [line for line in nc1_ax.get_lines() if line.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [2]
    assert not [line for line in nc2_ax.get_lines() if line.get_marker() == "x"]  # no NaN there, no mark
    assert [t.get_text() for t in cmp_ax.get_xticklabels()] == ["fwd+bwd time (ms)", "extra peak memory (MiB)"]
    assert "C=10000" in cmp_ax.get_title()
    assert any("100% train accuracy (epoch 1)" in t.get_text() for t in nc1_ax.get_legend().get_texts())


def test_demo_without_matplotlib_says_how_to_get_the_plots(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines: list[str] = []
    result = run_demo(_tiny(tmp_path, epochs=1), progress=False, log=lines.append)
    assert any("matplotlib is not installed" in s and "pip install matplotlib" in s for s in lines)
    assert result["files"] == [os.path.join(tmp_path / "demo", "metrics.json")]
    assert not (tmp_path / "demo" / "metrics.png").exists() and (tmp_path / "demo" / "metrics.json").exists()


def test_quick_config():
    q = DemoConfig().quick()
    assert (q.classes, q.epochs, q.batch_size, q.compare_classes, q.compare_rows) == (128, 2, 128, 2048, 512)
    big = DemoConfig(classes=5000, epochs=50, batch_size=1024).quick()
    assert (big.classes, big.epochs, big.batch_size) == (500, 2, 256)


def test_readme_quotes_the_committed_demo_run():
    """The README's `make demo` numbers are the committed record's (bench/results/demo-*.json), rounded."""
    with open(DEMO_RECORD) as f:
        record = json.load(f)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = " ".join(f.read().split())  # line breaks of the prose do not matter
    h0, h1, s, c = record["history"][0], record["history"][-1], record["summary"], record["loss_comparison"]
    assert s["collapsed"] is True and record["config"] == json.loads(json.dumps(vars(DemoConfig())))  # the default
    expected = [
        f"NC1 {h0['nc1']:.3g} -> {h1['nc1']:.3g}",
        f"CDNV {h0['cdnv']:.3g} -> {h1['cdnv']:.3g}",
        f"NC2 ETF error {h0['nc2_etf_error']:.3f} -> {h1['nc2_etf_error']:.3f}",
        f"NC3 {h0['nc3']:.3f} -> {h1['nc3']:.4f}",
        f"100% train accuracy from epoch {s['fit_epoch']}",
        f"test accuracy {h1['test_acc']:.2%}",
        f"{c['fused_ms']:.0f} ms, {c['fused_peak_mib']:.1f} MiB extra",
        f"eager {c['eager_ms']:.0f} ms ({c['speedup']:.2f}x slower), {c['eager_peak_mib']:.0f} MiB",
        f"the logits alone are {c['logits_mib']:.0f} MiB",
    ]
    for text in expected:
        assert text in readme, text
    seconds = re.search(r"`time make demo`: (\d+)m(\d+)s", readme)
    assert seconds is not None and int(seconds[1]) * 60 + int(seconds[2]) >= record["seconds"]
