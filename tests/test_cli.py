"""The command line and the end-to-end demo (issue 7)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from etfkern.cli import main as cli_main


# the demo's end-to-end run: tests/test_demo.py


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
    files = []
    for path in sorted(glob.glob(os.path.join(root, "bench", "results", "**", "*.json"), recursive=True)):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "environment" in data:  # a benchmark result (not the demo's record, ...)
            files.append((path, data))
    names = {os.path.relpath(p, os.path.join(root, "bench", "results")) for p, _ in files}
    assert {"amd-epyc-x2-2026-11-23-quick.json", "h200-2026-12-04/run_all.json",
            "spherical_ce-amd-epyc-x2-2026-11-23.json"} <= names
    for path, data in files:
        report = tmp_path / (path.replace(os.sep, "_") + ".md")
        rc = run_all.main(["--report-only", path, "--report", str(report)])
        assert rc == (1 if any(f.get("error") for f in data.get("families", {}).values()) else 0), path
        text = report.read_text()
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


@pytest.mark.parametrize("device", ["mps", "xla", "xpu:0"])
@pytest.mark.parametrize("command", [["bank", "--classes", "10", "--dim", "4"], ["demo", "--quick"], ["bench", "--quick"],
                                     ["collapse", "--features", "f.pt", "--labels", "y.pt"]])
def test_unsupported_device_types_are_one_line_errors(command, device, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main([*command, "--device", device]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"etfkern {command[0]}: error: --device {device}: etfkern runs on cpu and cuda devices only"]
    assert captured.out == ""


def _result(**families):
    return {"environment": {"device": "test cpu", "device_type": "cpu", "torch": "x", "triton": None,
                            "etfkern": "0", "git_sha": "abc", "date": "2026-01-01T00:00:00"},
            "quick": True, "families": families}


def test_run_all_report_says_what_each_ratio_column_is(tmp_path):
    run_all, _ = _run_all()
    rows = [{"op": "step", "shape": "1M", "impl": "sgd_fused", "ms": 2.0, "x_sgd_fused": 1.0},
            {"op": "step", "shape": "1M", "impl": "msam_exact", "ms": 3.0, "x_sgd_fused": 1.5, "ratio_to_etfkern": 1.0}]
    report = tmp_path / "R.md"
    run_all.render_report(_result(msam={"rows": rows}), str(report), str(tmp_path / "charts"))
    text = report.read_text()
    assert "peer time / etfkern time" not in text  # the old header, wrong for row / column ratios
    assert "- `x_sgd_fused`: this row's ms / sgd_fused's ms for the same shape (> 1: this row is slower" in text
    assert "- `ratio_to_etfkern`: this row's ms / etfkern's ms" in text
    assert text.count("- `") == 2  # only the ratio columns the report shows


def test_run_all_prints_the_result_tables(tmp_path, capsys):
    run_all, _ = _run_all()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_result(
        demo={"rows": [{"op": "fwd", "shape": [4, 8], "impl": "etfkern", "ms": 1.5, "note": "not a ratio"},
                       {"op": "fwd", "shape": [4, 8], "impl": "eager", "ms": 3.0, "ratio_to_etfkern": 2.0}],
              "seconds": 12.0},
        broken={"rows": [], "error": "RuntimeError: boom"})))
    assert run_all.main(["--report-only", str(path), "--report", str(tmp_path / "R.md")]) == 1  # a family failed
    out = capsys.readouterr().out.splitlines()
    at = out.index("== demo (12 s)")
    assert out[at + 1].split() == ["op", "shape", "impl", "ms", "ratio_to_etfkern"]
    assert out[at + 3].split() == ["fwd", "4x8", "eager", "3", "2"]
    assert "failed: RuntimeError: boom" in out


def test_run_all_merge_and_interrupted_family(tmp_path, capsys):
    run_all, _ = _run_all()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result(msam={"rows": [{"op": "s", "shape": "1", "impl": "sgd_fused", "ms": 1.0}]})))
    cut = _result(banks={"rows": [], "error": "interrupted after 60 s (time limit or Ctrl-C)"})
    cut["interrupted"] = "banks"
    b.write_text(json.dumps(cut))
    out = tmp_path / "all.json"
    assert run_all.main(["--merge", str(a), str(b), "--out", str(out), "--report", str(tmp_path / "R.md")]) == 130
    merged = json.loads(out.read_text())
    assert set(merged["families"]) == {"msam", "banks"} and merged["interrupted"] == "banks"
    assert "interrupted during `banks`" in (tmp_path / "R.md").read_text()
    assert run_all.main(["--merge", str(tmp_path / "missing.json"), "--report", str(tmp_path / "R.md")]) == 2
    assert "--merge: cannot read" in capsys.readouterr().err


def test_run_all_interrupt_keeps_finished_families(tmp_path, monkeypatch):
    """A time box's SIGINT during one family: the families before it are saved, that one is marked, none after."""
    run_all, _ = _run_all()

    class Family:
        def __init__(self, behaviour):
            self.behaviour = behaviour

        def run(self, quick, device):
            if self.behaviour == "interrupt":
                run_all._common.emit_row({"op": "x", "shape": "2", "impl": "etfkern", "ms": 2.0})
                raise KeyboardInterrupt
            return [{"op": "x", "shape": "1", "impl": "etfkern", "ms": 1.0}]

    behaviours = {"banks": "ok", "collapse": "interrupt", "msam": "ok", "spherical": "ok"}
    monkeypatch.setattr(run_all, "_load", lambda name, path: Family(behaviours[name]))
    saved = tmp_path / "r.json"
    result = run_all.run(None, True, "cpu", save_to=str(saved))
    on_disk = json.loads(saved.read_text())
    assert list(on_disk["families"]) == ["banks", "collapse"] and on_disk["interrupted"] == "collapse"
    assert on_disk["families"]["banks"]["rows"] and "interrupted after" in on_disk["families"]["collapse"]["error"]
    assert result["interrupted"] == "collapse"
    # the row the cut family emitted before the interrupt is kept, and the report shows it under the failure line
    assert on_disk["families"]["collapse"]["rows"] == [{"op": "x", "shape": "2", "impl": "etfkern", "ms": 2.0}]
    assert "1 rows measured before" in on_disk["families"]["collapse"]["error"]
    report = tmp_path / "R.md"
    run_all.render_report(result, str(report), str(tmp_path / "charts"))
    text = report.read_text()
    assert "Failed: `interrupted after" in text and "| x | 2 | etfkern | 2 |" in text


def test_run_all_charts_have_no_empty_panels_and_a_linear_axis_from_zero(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run_all, _ = _run_all()
    figures = []
    from matplotlib.figure import Figure

    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    rows = [{"op": op, "shape": shape, "impl": impl, "ms": ms}
            for op, impls in (("ce_fwd_bwd", {"etfkern": 190.0, "eager": 250.0, "torch.compile": 200.0}),
                              ("nearest", {"etfkern": 5.0, "eager": 9.0}))
            for shape in ("a", "b", "c") for impl, ms in impls.items()]
    rows.append({"op": "ce_fwd_bwd", "shape": "a", "impl": "liger", "skipped": "GPU only"})
    charts = run_all.render_report(_result(spherical={"rows": rows}), str(tmp_path / "R.md"), str(tmp_path / "c"))
    assert len(charts) == 1 and len(figures) == 1
    axes = figures[0].axes
    assert len(axes) == 6  # 3 shapes x 2 ops, no blank seventh/eighth panel
    for ax in axes:
        assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0
        assert ax.get_legend() is None  # labels on the bars instead of a legend
    first = [t.get_text() for t in axes[0].get_yticklabels()]
    assert sorted(first) == sorted(["etfkern", "eager", "torch.compile", "liger"])
    assert any("not run: GPU only" in t.get_text() for t in axes[0].texts)


def test_bench_command_prints_the_result_table(tmp_path, capsys, monkeypatch):
    """`python -m etfkern bench` runs bench/run_all.py, which prints each family's table (not only file paths).
    The subprocess is replaced by run_all in this process, with a family that returns fixed rows."""
    import subprocess

    run_all, _ = _run_all()
    rows = [{"op": "step", "shape": "1M", "impl": "sgd_fused", "ms": 2.0, "x_sgd_fused": 1.0},
            {"op": "step", "shape": "1M", "impl": "msam_exact", "ms": 3.0, "x_sgd_fused": 1.5}]
    monkeypatch.setattr(run_all, "_load", lambda name, path: type("Family", (), {"run": lambda self, quick, device: rows})())
    calls = []

    def fake_call(cmd, *a, **k):
        calls.append(cmd)
        assert cmd[1].endswith(os.path.join("bench", "run_all.py"))
        return run_all.main(cmd[2:])

    monkeypatch.setattr(subprocess, "call", fake_call)
    argv = ["bench", "msam", "--quick", "--device", "cpu", "--out", str(tmp_path / "r.json"),
            "--report", str(tmp_path / "R.md")]
    assert cli_main(argv) == 0
    assert calls and calls[0][2:] == ["--quick", "--only", "msam", "--device", "cpu", "--out", str(tmp_path / "r.json"),
                                      "--report", str(tmp_path / "R.md")]
    out = capsys.readouterr().out.splitlines()
    header = out.index(next(line for line in out if line.startswith("op ")))
    assert out[header].split() == ["op", "shape", "impl", "ms", "x_sgd_fused"]
    assert out[header + 2].split() == ["step", "1M", "msam_exact", "3", "1.5"]
    assert any(line.startswith("results: ") for line in out) and any(line.startswith("report: ") for line in out)


def test_run_all_loads_families_under_names_a_spawned_child_can_import():
    """bench/spherical.py measures CPU peak memory in a SPAWNED child, which unpickles the target function by its
    module name: run_all must register each family under a name importable from bench/ (the bench_<family> names
    of the old file layout made every such child fail with ModuleNotFoundError and the memory column NaN)."""
    import importlib.util
    import sys

    run_all, root = _run_all()
    bench = os.path.join(root, "bench")
    for name, path in run_all.families().items():
        module = run_all._load(name, path)
        sys.path.insert(0, bench)
        try:
            spec = importlib.util.find_spec(module.__name__)
        finally:
            sys.path.remove(bench)
            sys.modules.pop(module.__name__, None)  # leave no bench module registered in this test process
        assert spec is not None and os.path.samefile(spec.origin, path), (name, module.__name__)
