"""Packaging, loader and backend-selection contract (issue: foundation)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import etfkern
from etfkern._core import backend as _backend
from etfkern.cli import main as cli_main


def test_import_never_creates_top_level_triton_kernels():
    code = ("import sys, etfkern, etfkern.triton_kernels as tk; "
            "assert 'triton_kernels' not in sys.modules, sorted(m for m in sys.modules if 'triton_kernels' in m); "
            "print(tk.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "etfkern.triton_kernels"


def test_compiled_library_loaded_and_reports_build():
    # The test command builds the extension; a silent fallback here would hide a broken build.
    assert etfkern._C is not None, etfkern._C_ERROR
    info = etfkern.build_info()
    for key in ("compiler", "cuda", "cuda_archs", "openmp", "torch"):
        assert key in info
    assert info["openmp"] is True
    assert isinstance(info["cuda"], bool)
    if torch.version.cuda is None:  # a CPU torch can never have produced the CUDA kernels
        assert info["cuda"] is False and info["cuda_archs"] == ""


def _import_blocker(tmp_path):
    """A sitecustomize.py in tmp_path whose import hook makes ``etfkern._C`` and ``triton`` fail to import (a failed
    build and a missing triton); put tmp_path on PYTHONPATH of a child interpreter."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name in ('etfkern._C', 'triton') or name.startswith('triton.'):\n"
        "            raise ImportError('blocked for test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n")
    return blocker


def test_import_works_without_compiled_library_and_triton(tmp_path):
    # Simulate a failed build and a missing triton: the package must import, warn once, and fall back.
    blocker = _import_blocker(tmp_path)
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import etfkern\n"
            "from etfkern._core import backend as _backend\n"
            "assert etfkern._C is None and 'blocked' in etfkern._C_ERROR\n"
            "a = _backend.availability('cpu')\n"
            "assert a['cpu'] is None and a['reference'] is None and 'triton' in a['triton']\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "compiled kernels unavailable" in out.stderr


def test_backend_env_and_override(monkeypatch):
    monkeypatch.setenv("ETFKERN_BACKEND", "reference")
    assert _backend.requested() == "reference"
    with etfkern.use_backend("cpu"):
        assert _backend.requested() == "cpu"
    assert _backend.requested() == "reference"
    monkeypatch.setenv("ETFKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ETFKERN_BACKEND"):
        _backend.requested()
    with pytest.raises(ValueError, match="backend must be one of"):
        with etfkern.use_backend("fastest"):
            pass


def test_empty_backend_env_means_auto(monkeypatch):
    # `ETFKERN_BACKEND= make test` (set but empty) is the same as unset, not a ValueError on every op
    monkeypatch.setenv("ETFKERN_BACKEND", "")
    assert _backend.requested() == "auto"
    monkeypatch.setenv("ETFKERN_BACKEND", "  ")
    assert _backend.requested() == "auto"


def test_unavailable_backend_raises_clear_error():
    _backend.register("_test_only_op", "reference", lambda x: x)
    with etfkern.use_backend("cuda"):
        with pytest.raises(etfkern.BackendUnavailableError, match="cuda.*CUDA tensors only"):
            _backend.choose("_test_only_op", "cpu")
    with etfkern.use_backend("cpu"):
        with pytest.raises(etfkern.BackendUnavailableError, match="no CPU kernel"):
            _backend.choose("_test_only_op", "cpu")
    assert _backend.choose("_test_only_op", "cpu") == "reference"  # auto falls back to the reference


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = _backend.why_unavailable("triton", "cpu")
    assert why is not None and "TRITON_INTERPRET" in why


@pytest.mark.parametrize("value", ["true", "On", "1"])
def test_triton_interpret_read_as_triton_reads_it(monkeypatch, value):
    # Triton interprets for TRITON_INTERPRET=true/on/1 (its getenv_bool); the backend check must agree, else the
    # triton backend is refused on CPU tensors although the kernels would run in the interpreter
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    if hasattr(triton, "knobs"):
        assert triton.knobs.runtime.interpret is True
    assert _backend.triton_interpret() is True
    assert _backend.why_unavailable("triton", "cpu", "spherical_nearest") is None


def test_public_functions_and_info_without_compiled_library_and_triton(tmp_path):
    # A failed build and a missing triton: one warning, the public functions on CPU, and `python -m etfkern info`.
    blocker = _import_blocker(tmp_path)
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import etfkern, etfkern.distributed\n"
            "    x = torch.randn(6, 8, requires_grad=True); bank = etfkern.simplex_etf(9, 8)\n"
            "    t = torch.tensor([0, 3, 8, -100, 2, 5])\n"
            "    etfkern.spherical_cross_entropy(x, bank, t, label_smoothing=0.1).backward()\n"
            "    with etfkern.use_backend('reference'):\n"
            "        ref = etfkern.nearest(x, bank, k=2)[1]\n"
            "    assert torch.equal(etfkern.nearest(x, bank, k=2)[1], ref)\n"
            "    etfkern.bank_stats(bank)\n"
            "    m = etfkern.CollapseMeter(9, 8); m.update(x.detach(), t.clamp_min(0)); m.compute()\n"
            "    p = torch.nn.Parameter(torch.randn(4)); opt = etfkern.optim.MSAM([p], lr=0.1)\n"
            "    p.sum().backward(); opt.step()\n"
            "mine = [w for w in caught if 'etfkern' in str(w.message)]\n"
            "assert len(mine) == 1 and 'compiled kernels unavailable' in str(mine[0].message), "
            "[str(w.message) for w in mine]\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    info = subprocess.run([sys.executable, "-m", "etfkern", "info", "--json"], capture_output=True, text=True,
                          env=env)
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["build"]["compiled"] is False and "blocked" in report["build"]["compiled_error"]
    assert report["build"]["triton"] is None
    assert report["backends"]["cpu"]["cpu"] is None and report["backends"]["cpu"]["reference"] is None
    assert "triton" in report["backends"]["cpu"]["triton"]
    assert info.stderr.count("compiled kernels unavailable") == 1


def test_info_command(capsys):
    assert cli_main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["build"]["etfkern"] == etfkern.__version__
    assert report["backends"]["cpu"]["cpu"] is None
    assert cli_main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends for cpu tensors" in text and "reference" in text


def test_cli_without_command_is_usage_error(capsys):
    assert cli_main([]) == 2


def test_install_deps_keeps_a_preinstalled_torch_only_when_asked():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tools"))
    try:
        import install_deps
    finally:
        sys.path.pop(0)
    have = torch.__version__.split("+")[0]
    other = "1.0.0" if have != "1.0.0" else "1.0.1"
    assert install_deps.missing([f"torch=={have}"]) == []
    assert install_deps.missing([f"torch=={other}"]) == [f"torch=={other}"]
    assert install_deps.missing([f"torch=={other}"], any_torch=True) == []
    assert install_deps.missing(["surely-not-an-installed-package-xyz"]) == ["surely-not-an-installed-package-xyz"]


def test_cpu_peak_mib_counts_one_call_not_one_time_state():
    # fn keeps a 32 MiB buffer after its first call (one-time state, like a library's workspace) and allocates a
    # 32 MiB of temporaries per call: the measured extra peak is the temporaries', not 64 MiB (and not 16 MiB: heap
    # pages the first call freed count again when the second call reuses them).
    from etfkern._core.measure import peak_mib

    cache = {}

    def fn():
        if "buf" not in cache:
            cache["buf"] = torch.ones(32 * 2**18)
        tmp = torch.ones(16 * 2**18)
        small = [torch.ones(2**16) for _ in range(64)]  # 16 MiB more in 256 KiB pieces (malloc's heap, not mmap)
        return float(tmp[0]) + float(small[-1][0])

    got = peak_mib(fn, "cpu")
    assert 30.0 <= got <= 38.0, got


# What the GPU image has (bench/results/h200-2026-12-04/README.md; no package registry there).
GPU_IMAGE_VERSIONS = {"torch": "2.11.0+cu130", "triton": "3.6.0", "setuptools": "81.0.0", "wheel": "0.45.1",
                      "numpy": "2.5.2", "safetensors": "0.8.0", "tqdm": "4.67.1", "matplotlib": "3.10.0",
                      "ninja": "1.13.0", "pytest": "9.0.1", "pytest-benchmark": "5.2.3", "pytest-xdist": "3.8.0",
                      "pytest-timeout": "2.4.0"}


def _fake_site(tmp_path, versions: dict[str, str]) -> str:
    """A folder of bare *.dist-info records that, first on PYTHONPATH, shadow this interpreter's packages."""
    site = tmp_path / "site"
    for name, version in versions.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return str(site)


def _no_registry_env(site: str, tmp_path) -> dict[str, str]:
    """The environment of the GPU machine's interpreter: the fake site first, and a pip that reaches no package
    (no index, no find-links, no config) and, should it ever install, installs into tmp_path, not this venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PYTHONPATH=site, PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_TARGET=str(tmp_path / "pip-target"))
    return env


def _install_deps(args: list[str], site: str, tmp_path, requirements: str | None = None) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "tools", "install_deps.py"),
                           requirements or os.path.join(root, "requirements-dev.txt"), *args],
                          capture_output=True, text=True, env=_no_registry_env(site, tmp_path), timeout=120)


def test_install_deps_accepts_the_gpu_image_as_it_is(tmp_path):
    """`make test PYTHON=python3` on the GPU image: every requirement is there (torch 2.11, setuptools 81), so the
    deps step installs nothing; the venv's pin (torch==2.13.0) is what --any-torch waives, and nothing else."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements-dev.txt")) as f:
        from packaging.requirements import Requirement

        names = {Requirement(line.split("#")[0].strip()).name for line in f if line.split("#")[0].strip()}
    assert names <= set(GPU_IMAGE_VERSIONS), f"add the GPU image's version of {names - set(GPU_IMAGE_VERSIONS)}"
    site = _fake_site(tmp_path, GPU_IMAGE_VERSIONS)
    out = _install_deps(["--any-torch"], site, tmp_path)
    assert out.returncode == 0 and "dependencies: all present" in out.stdout, out.stdout + out.stderr
    out = _install_deps(["--check"], site, tmp_path)
    assert out.returncode == 1 and out.stdout.split() == ["missing:", "torch==2.13.0"], out.stdout + out.stderr
    # without a registry a real attempt fails with a sentence saying what to do, not only pip's error
    out = _install_deps([], site, tmp_path)
    assert out.returncode != 0 and "pip could not install torch==2.13.0" in out.stderr
    assert not (tmp_path / "pip-target").exists()


def test_install_deps_still_installs_what_is_too_old_or_absent(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("setuptools>=77  # editable installs of PEP 639 metadata\ntorch==2.13.0\n"
                            "surely-not-an-installed-package-xyz\n\n")
    site = _fake_site(tmp_path, dict(GPU_IMAGE_VERSIONS, setuptools="76.1.0"))
    out = _install_deps(["--any-torch", "--check"], site, tmp_path, str(requirements))
    assert out.returncode == 1, out.stdout + out.stderr
    assert set(out.stdout.split()[1:]) == {"setuptools>=77", "surely-not-an-installed-package-xyz"}, out.stdout
    out = _install_deps(["--bogus"], site, tmp_path, str(requirements))
    assert out.returncode == 2 and "unknown option" in out.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_deps_with_preinstalled_interpreter_installs_nothing(tmp_path):
    """The Makefile's deps step itself, as `make test PYTHON=python3` runs it on the GPU image."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = _no_registry_env(_fake_site(tmp_path, GPU_IMAGE_VERSIONS), tmp_path)
    out = subprocess.run(["make", "-C", root, "-B", "deps", f"PYTHON={sys.executable}",
                          f"STAMP_DIR={tmp_path / 'stamps'}"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--any-torch" in out.stdout and "dependencies: all present" in out.stdout
    assert (tmp_path / "stamps" / ".etfkern-deps").exists()


def _tools_module(name: str):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_summary_counts_tests_and_quotes_ratios_against_peers(tmp_path):
    summary = _tools_module("gpu_summary")
    (tmp_path / "stages.tsv").write_text("build\t0\t41\t\ntests\t124\t130\ttime box of 130s\n"
                                         "bench-banks\tskipped\t0\tbudget spent\n")
    (tmp_path / "junit_gpu.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.spherical.test_spherical" name="test_a[cuda-cos]"/>'
        '<testcase classname="tests.banks.test_banks" name="test_b[cuda]"><failure message="x">boom</failure></testcase>'
        '<testcase classname="t" name="test_c"><skipped message="no gpu"/></testcase>'
        '<testcase classname="t" name="test_d"><error message="e"/></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "bench").mkdir()
    rows = [{"op": "ce_fwd_bwd", "shape": [8, 4, 16], "dtype": "bfloat16", "impl": impl, "ms": ms}
            for impl, ms in (("etfkern", 6.0), ("etfkern_mm", 4.0), ("eager", 3.0), ("liger", 12.0))]
    rows.append({"op": "ce_fwd_bwd", "shape": [8, 4, 16], "dtype": "bfloat16", "impl": "cut_cross_entropy",
                 "skipped": "not installed"})
    (tmp_path / "bench" / "spherical.json").write_text(json.dumps(
        {"environment": {}, "families": {"spherical": {"rows": rows, "seconds": 90.0}}}))
    (tmp_path / "bench" / "msam.json").write_text(json.dumps(
        {"environment": {}, "families": {"msam": {"rows": [], "error": "interrupted after 60 s (time limit or Ctrl-C)",
                                                  "seconds": 60.0}}}))
    assert summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.txt").read_text()
    assert "GPU tests: 1 passed, 1 failed, 1 errors, 1 skipped (of 4)" in text
    assert "FAILED tests.banks.test_banks::test_b[cuda]" in text and "t::test_d (error)" in text
    assert "tests                  TIMED OUT" in text and "bench-banks            skipped" in text
    assert "ce_fwd_bwd 8x4x16 bfloat16: etfkern 6 ms = 2.00x eager, 0.50x liger" in text
    assert "etfkern_mm 4 ms = 1.33x eager, 0.33x liger" in text  # our variants are not each other's peers
    assert "msam: " in text and "interrupted after 60 s" in text


def test_gpu_check_stops_at_a_failed_build_and_still_packs_its_archive(tmp_path):
    """The fail-fast path of tools/gpu_check.sh, on CPU (GPU_CHECK_DRY_RUN=1) with a build command that fails."""
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_CHECK_OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               GPU_CHECK_BUILD_CMD="echo 'csrc/x.cpp:1: error: bit_cast is not a member of std'; false",
               TMPDIR=str(tmp_path))
    out = subprocess.run(["bash", os.path.join(root, "tools", "gpu_check.sh")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    tail = out.stdout[out.stdout.index("GPU CHECK SUMMARY"):]
    assert "build                  FAILED" in tail and "| csrc/x.cpp:1: error: bit_cast" in tail
    assert "GPU tests: no junit file" in tail and "== tests" not in out.stdout  # stopped before the tests
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"gpu_check/gpu_check.log", "gpu_check/environment.txt", "gpu_check/stages.tsv",
            "gpu_check/summary.txt"} <= names
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.tar.gz", "summary.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("etfkern-gpu-check.")]  # its scratch is removed
