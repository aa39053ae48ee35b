"""The command line and the end-to-end demo (issue 7)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from etfkern.cli import main as cli_main


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli_main(["demo", "--quick", "--out", str(out), "--no-progress", "--samples-per-class", "12", "--dim", "64",
                   "--epochs", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "NC1" in printed and "fused vs eager" in printed
    result = json.loads((out / "metrics.json").read_text())
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        for key in ("loss", "train_acc", "test_acc", "nc1", "cdnv", "nc2_etf_error", "nc4_ncc_mismatch"):
            assert key in h and h[key] == h[key], key  # present and not NaN
    assert history[-1]["loss"] < history[0]["loss"]  # training makes progress
    assert result["loss_comparison"]["fused_ms"] > 0 and result["loss_comparison"]["eager_ms"] > 0
    png = out / "metrics.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collapse_command_matches_meter(tmp_path, capsys):
    from etfkern.collapse import CollapseMeter

    feats = torch.randn(300, 8, dtype=torch.float64) + torch.randn(5, 8, dtype=torch.float64).repeat(60, 1) * 3
    labels = torch.arange(5).repeat(60)
    torch.save(feats, tmp_path / "f.pt")
    torch.save(labels, tmp_path / "y.pt")
    rc = cli_main(["collapse", "--features", str(tmp_path / "f.pt"), "--labels", str(tmp_path / "y.pt"),
                   "--batch-size", "64", "--device", "cpu", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    got = json.loads((tmp_path / "m.json").read_text())
    meter = CollapseMeter(5, 8)
    meter.update(feats, labels)
    want = meter.compute()
    assert got["nc1"] == pytest.approx(want["nc1"], rel=1e-9)
    assert got["cdnv"] == pytest.approx(want["cdnv"], rel=1e-9)
    # a subset: only those keys (and the class count), the same values
    rc = cli_main(["collapse", "--features", str(tmp_path / "f.pt"), "--labels", str(tmp_path / "y.pt"),
                   "--device", "cpu", "--metrics", "nc1,nc2_equiangular", "--json", str(tmp_path / "s.json")])
    assert rc == 0
    sub = json.loads((tmp_path / "s.json").read_text())
    assert set(sub) == {"nc1", "nc2_equiangular", "num_classes_seen"}
    assert sub["nc1"] == pytest.approx(want["nc1"], rel=1e-9)
    capsys.readouterr()
    for bad, message in (("nc1,nc9", "unknown keys ['nc9']"), ("unc3", "pass weights"),
                         ("ncc_mismatch", "needs --weights")):
        rc = cli_main(["collapse", "--features", str(tmp_path / "f.pt"), "--labels", str(tmp_path / "y.pt"),
                       "--device", "cpu", "--metrics", bad])
        assert rc == 2 and message in capsys.readouterr().err, bad


@pytest.mark.parametrize("argv, message", [
    (["collapse", "--features", "nope.pt", "--labels", "nope.pt"], "features file not found"),
    (["demo", "--classes", "1"], "--classes must be positive"),
    (["bench", "no_such_family", "--quick"], None),
    (["bank", "--classes", "10", "--dim", "4", "-o", "."], "is a directory"),
    (["bank", "--classes", "10", "--dim", "4", "-o", "missing_dir/b.safetensors"], "does not exist"),
])
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    if message:
        assert message in capsys.readouterr().err


def test_collapse_command_rejects_mismatched_labels(tmp_path, capsys):
    torch.save(torch.randn(10, 4), tmp_path / "f.pt")
    torch.save(torch.arange(9), tmp_path / "y.pt")
    rc = cli_main(["collapse", "--features", str(tmp_path / "f.pt"), "--labels", str(tmp_path / "y.pt")])
    assert rc == 2
    assert "--labels must be (10,)" in capsys.readouterr().err


def test_run_all_renders_report_from_results(tmp_path):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("run_all", os.path.join(root, "bench", "run_all.py"))
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    result = {"environment": {"device": "test cpu", "device_type": "cpu", "torch": "x", "triton": None,
                              "etfkern": "0", "git_sha": "abc", "date": "2026-01-01T00:00:00"},
              "quick": True,
              "families": {"demo": {"rows": [{"op": "fwd", "shape": [4, 8], "impl": "etfkern", "ms": 1.5},
                                             {"op": "fwd", "shape": [4, 8], "impl": "eager", "ms": 3.0,
                                              "ratio": 2.0}]},
                           "broken": {"rows": [], "error": "RuntimeError: boom"}}}
    report = tmp_path / "REPORT.md"
    charts = run_all.render_report(result, str(report), str(tmp_path / "charts"))
    text = report.read_text()
    assert "| op | shape | impl | ms | ratio |" in text and "| fwd | 4x8 | eager | 3 | 2 |" in text
    assert "Failed: `RuntimeError: boom`" in text
    assert len(charts) == 1 and os.path.exists(charts[0])
