"""Every C++ and CUDA source compiles as C++17, even on CPU-only machines, so no build rots unseen.

The GPU machine's torch (2.11) compiles extensions with -std=c++17 while CI's torch (2.13) uses C++20, so a
C++20 construct (``std::bit_cast``, designated initialisers, ...) builds here and breaks there. These tests
compile every ``csrc/**/*.cpp`` with the host compiler (-std=c++17 -pedantic-errors, torch's headers as
system headers so that only our code is held to C++17) and every ``csrc/*/*.cu`` with nvcc -std=c++17.
Nothing compiled here runs here; the GPU suite runs the kernels. CUDA files include torch/library.h and
ATen/c10 headers only (not torch/extension.h, which costs minutes per file under nvcc).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))
CXX_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "c++"))
# A C++20-only construct per line: each must be rejected by the flags below (the tests' own check).
CXX20_SNIPPETS = {
    "bit_cast": "#include <bit>\n#include <cstdint>\nfloat f(std::uint32_t u) { return std::bit_cast<float>(u); }\n",
    "designated_initialiser": "struct P { int a; int b; };\nP p{.a = 1, .b = 2};\n",
}


def _cxx17_command(source: str) -> list[str]:
    """Host-compiler syntax check of ``source`` as C++17, torch and Python headers as system headers."""
    from torch.utils.cpp_extension import include_paths

    system = [flag for p in [*include_paths(), sysconfig.get_paths()["include"]] for flag in ("-isystem", p)]
    return [CXX, "-std=c++17", "-pedantic-errors", "-fsyntax-only", "-fopenmp", "-DTORCH_EXTENSION_NAME=_C",
            "-I", os.path.join(ROOT, "csrc"), *system, source]


@pytest.fixture(scope="module")
def cxx17_results():
    """Compile every C++ source at once (one process each: 4 files take ~30 s on 2 cores instead of ~60 s)."""
    procs = {s: subprocess.Popen(_cxx17_command(s), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for s in CXX_SOURCES}
    return {s: (p.wait(timeout=600), p.stdout.read()) for s, p in procs.items()}


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("source", CXX_SOURCES, ids=[os.path.relpath(s, ROOT) for s in CXX_SOURCES])
def test_cpp_source_compiles_as_cxx17(source, cxx17_results):
    returncode, output = cxx17_results[source]
    assert returncode == 0, output[-4000:]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("name", sorted(CXX20_SNIPPETS))
def test_cxx17_check_rejects_cxx20(name, tmp_path):
    source = tmp_path / f"{name}.cpp"
    source.write_text(CXX20_SNIPPETS[name])
    out = subprocess.run(_cxx17_command(str(source)), capture_output=True, text=True)
    assert out.returncode != 0, f"the C++17 check accepted C++20 code ({name})"


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[os.path.relpath(s, ROOT) for s in CUDA_SOURCES])
def test_cuda_source_compiles(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    shim = os.path.join(ROOT, "tests", "cuda_shim")
    includes = [f"-I{p}" for p in [os.path.join(ROOT, "csrc"), *include_paths(), shim,
                                   sysconfig.get_paths()["include"]]]
    cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_90a", "-DETFKERN_WITH_CUDA=1", "-w", *includes,
           "-c", source, "-o", str(tmp_path / "out.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


def test_sources_exist_or_none_expected():
    # Guards the globs above: a renamed folder must not silently turn this file into zero tests.
    assert {os.path.relpath(s, ROOT) for s in CUDA_SOURCES} >= {"csrc/collapse/cuda.cu", "csrc/msam/cuda.cu"}
    assert {os.path.relpath(s, ROOT) for s in CXX_SOURCES} >= {
        "csrc/build_info.cpp", "csrc/spherical/cpu.cpp", "csrc/collapse/cpu.cpp", "csrc/msam/cpu.cpp"}
