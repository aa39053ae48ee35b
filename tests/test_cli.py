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
    (["demo", "--classes", "1"], "--classes must be at least 2"),
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


def _tensors(tmp_path):
    torch.save(torch.randn(40, 4), tmp_path / "f.pt")
    torch.save(torch.arange(4).repeat(10), tmp_path / "y.pt")
    return ["--features", str(tmp_path / "f.pt"), "--labels", str(tmp_path / "y.pt")]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")


@pytest.mark.parametrize("extra, message", [
    (["--device", "bogus"], "--device 'bogus' is not a torch device"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA device", marks=NO_CUDA),
    pytest.param(["--device", "cuda:0"], "--device cuda:0: no CUDA device", marks=NO_CUDA),
    (["--json", "missing_dir/m.json"], "--json: directory of 'missing_dir/m.json' does not exist"),
    (["--json", "."], "--json '.' is a directory"),
    (["--num-classes", "0"], "--num-classes must be at least 2, got 0"),
])
def test_collapse_bad_options_exit_2_without_traceback(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["collapse", *_tensors(tmp_path), *extra]
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # rejected before any work, not after printing the metrics


def test_collapse_unreadable_file_names_the_error(tmp_path, capsys):
    (tmp_path / "f.pt").write_text("not a tensor file")
    torch.save(torch.arange(4), tmp_path / "y.pt")
    assert cli_main(["collapse", "--features", str(tmp_path / "f.pt"), "--labels", str(tmp_path / "y.pt")]) == 2
    err = capsys.readouterr().err
    assert "cannot read features file" in err and "Error" in err  # the exception's type, not a bare "101"


@pytest.mark.parametrize("argv, message", [
    (["demo", "--device", "bogus"], "--device 'bogus' is not a torch device"),
    pytest.param(["demo", "--device", "cuda:0"], "--device cuda:0: no CUDA device", marks=NO_CUDA),
    (["demo", "--lr", "-1"], "--lr must be a finite number >= 0"),
    (["demo", "--lr", "nan"], "--lr must be a finite number >= 0"),
    (["demo", "--rho", "-0.5"], "--rho must be a finite number >= 0"),
    (["demo", "--out", "a_file"], "--out 'a_file' is a file"),
    (["bank", "--inspect", "b.safetensors", "--device", "bogus"], "--device 'bogus' is not a torch device"),
    pytest.param(["bank", "--inspect", "b.safetensors", "--device", "cuda"], "--device cuda: no CUDA device",
                 marks=NO_CUDA),
    (["bank", "--inspect", "."], "is a directory"),
    (["bank", "--classes", "10", "--dim", "4", "--device", "meta"], "meta device holds no data"),
    (["bench", "--device", "bogus"], "--device 'bogus' is not a torch device"),
    pytest.param(["bench", "--device", "cuda"], "--device cuda: no CUDA device", marks=NO_CUDA),
])
def test_bad_devices_and_numbers_exit_2_without_traceback(argv, message, tmp_path, capsys, monkeypatch):
    from etfkern.banks import save_bank, simplex_etf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    save_bank(str(tmp_path / "b.safetensors"), simplex_etf(5, 4), kind="simplex")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bank_stats_line_when_welch_bound_is_zero(capsys):
    assert cli_main(["bank", "--classes", "4", "--dim", "8", "--kind", "simplex"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "Welch bound 0" in out


def _run_all():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("run_all", os.path.join(root, "bench", "run_all.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, root


def test_run_all_report_only_renders_every_committed_result(tmp_path):
    """run_all's own files and the per-family files bench/<family>.py writes both render (no KeyError)."""
    import glob

    run_all, root = _run_all()
    files = sorted(glob.glob(os.path.join(root, "bench", "results", "*.json")))
    assert files
    for path in files:
        report = tmp_path / (os.path.basename(path) + ".md")
        assert run_all.main(["--report-only", path, "--report", str(report)]) == 0, path
        text = report.read_text()
        with open(path) as f:
            data = json.load(f)
        for family in data.get("families", {data.get("family")}):
            assert f"## {family}" in text, (path, family)
        assert "| op |" in text or "| shape |" in text, path


def test_run_all_bad_inputs_exit_2(tmp_path, capsys):
    run_all, _ = _run_all()
    (tmp_path / "bad.json").write_text("not json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    report = str(tmp_path / "R.md")
    cases = [(["--report-only", str(tmp_path / "missing.json"), "--report", report], "cannot read"),
             (["--report-only", str(tmp_path / "bad.json"), "--report", report], "is not JSON"),
             (["--report-only", str(tmp_path / "other.json"), "--report", report], "is not a benchmark result"),
             (["--report-only", str(tmp_path / "other.json"), "--report", str(tmp_path)], "is a directory"),
             (["--quick", "--only", "msam", "--device", "bogus", "--out", str(tmp_path / "x.json"), "--report", report],
              "is not a torch device")]
    for argv, message in cases:
        assert run_all.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not os.path.exists(tmp_path / "x.json")


def test_family_quick_results_do_not_overwrite_full_ones(tmp_path, monkeypatch):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "bench"))
    spec = importlib.util.spec_from_file_location("_bench_common", os.path.join(root, "bench", "_common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    rows = [{"op": "x", "shape": "1", "impl": "etfkern", "ms": 1.0}]
    full = common.write_results("demo", rows, "cpu", extra={"quick": False})
    quick = common.write_results("demo", rows, "cpu", extra={"quick": True})
    assert full != quick and quick.endswith("-quick.json") and os.path.exists(full)
    assert json.loads(open(full).read())["quick"] is False


def test_bad_backend_environment_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ETFKERN_BACKEND", "bogus")
    assert cli_main(["info"]) == 2  # still prints the report, then says what is wrong
    captured = capsys.readouterr()
    assert "backends for cpu tensors" in captured.out and "ETFKERN_BACKEND must be one of" in captured.err
    assert cli_main(["bank", "--classes", "10", "--dim", "4"]) == 2
    assert "ETFKERN_BACKEND must be one of" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend cannot run CPU tensors")
def test_unavailable_backend_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ETFKERN_BACKEND", "cuda")
    assert cli_main(["collapse", *_tensors(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "backend 'cuda' cannot run" in err and "Traceback" not in err
