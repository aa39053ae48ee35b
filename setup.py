"""Build etfkern._C: the C++ (CPU) kernels always, the CUDA kernels when a CUDA torch and nvcc are present.

Environment:
  ETFKERN_SKIP_CUDA_BUILD=1   never build the CUDA sources
  ETFKERN_SKIP_C_BUILD=1      build no extension at all (pure-Python install; the package falls back)
  TORCH_CUDA_ARCH_LIST        override the default arch list "8.0;9.0a"
  MAX_JOBS                    parallel compile jobs (default: min(4, cores), so small machines do not swap)
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _want_cuda(torch_mod) -> bool:
    if os.environ.get("ETFKERN_SKIP_CUDA_BUILD", "0") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return torch_mod.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None


def _compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        return subprocess.check_output([cxx, "--version"], text=True).splitlines()[0].replace('"', "'")
    except Exception:  # noqa: BLE001 - informational only
        return cxx


def _extensions():
    if os.environ.get("ETFKERN_SKIP_C_BUILD", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp"))
    with_cuda = _want_cuda(torch)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS) if with_cuda else ""
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/*/*.cu"))
    macros = [
        ("ETFKERN_COMPILER", f'"{_compiler_version()}"'),
        ("ETFKERN_CUDA_ARCHS", f'"{archs}"'),
    ]
    # No errno: std::sqrt vectorises. The C++ standard is torch's choice (-std=c++17 up to torch 2.12, c++20 from
    # 2.13): torch 2.13's own headers use C++20 (bit-field initialisers in c10/core/AutogradState.h) that compilers
    # accept under -std=c++17 only as an extension, so forcing c++17 here would build against headers outside their
    # standard. Our sources are C++17 either way: tests/test_cuda_build.py compiles each of them as C++17.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        macros.append(("ETFKERN_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    ext = ext_cls(
        name="etfkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["etfkern", "etfkern.*"]) + ["etfkern.triton_kernels"],
    # Our Triton kernels ship as etfkern.triton_kernels; a top-level `triton_kernels` would clash with
    # OpenAI's package of that name, so the folder is mapped, never installed at top level.
    package_dir={"etfkern.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
