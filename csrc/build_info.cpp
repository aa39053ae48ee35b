// etfkern._C module: non-op helpers only (pybind11). Every op kernel registers itself with
// TORCH_LIBRARY_IMPL(etfkern, CPU|CUDA) in its own family file, csrc/<family>/{cpu.cpp,cuda.cu}; the schemas
// live in etfkern/<family>/ops.py. Only pybind11 and torch's version header: torch/extension.h would triple
// this file's compile time for nothing it uses.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef ETFKERN_COMPILER
#define ETFKERN_COMPILER "unknown"
#endif
#ifndef ETFKERN_CUDA_ARCHS
#define ETFKERN_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = ETFKERN_COMPILER;
#ifdef ETFKERN_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = ETFKERN_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
  info["torch_abi"] = TORCH_VERSION;
  info["cxx_standard"] = static_cast<long>(__cplusplus);  // 201703 when built as C++17, 202002 as C++20
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "etfkern compiled kernels (ops register through TORCH_LIBRARY_IMPL; this module holds helpers)";
  m.def("build_info", &build_info, "Compiler, CUDA, CUDA archs and OpenMP of this build.");
}
