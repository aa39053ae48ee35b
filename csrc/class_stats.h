// Shared by csrc/cpu/class_stats.cpp and csrc/cuda/class_stats.cu: the argument contract of
// etfkern::collapse_update_native (see etfkern/reference/collapse.py::collapse_update).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace etfkern {

inline void check_collapse_update_args(const at::Tensor& features, const at::Tensor& inv, const at::Tensor& m_old,
                                       const at::Tensor& n_old) {
  TORCH_CHECK(features.dim() == 2, "features must be (N, d), got ", features.sizes());
  TORCH_CHECK(m_old.dim() == 2 && m_old.size(1) == features.size(1), "m_old must be (K, d), got ", m_old.sizes());
  TORCH_CHECK(inv.dim() == 1 && inv.size(0) == features.size(0), "inv must be (N,), got ", inv.sizes());
  TORCH_CHECK(n_old.dim() == 1 && n_old.size(0) == m_old.size(0), "n_old must be (K,), got ", n_old.sizes());
}

}  // namespace etfkern
