// Shared by csrc/collapse/cpu.cpp and csrc/collapse/cuda.cu: the argument contract of
// etfkern::collapse_update_native (see etfkern/reference/collapse.py::collapse_update).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace etfkern {

inline void check_collapse_update_args(const at::Tensor& features, const at::Tensor& inv, const at::Tensor& m_old,
                                       const at::Tensor& n_old) {
  // ValueError (TORCH_CHECK_VALUE) naming the argument, as every bad input of the public API (DESIGN.md)
  TORCH_CHECK_VALUE(features.dim() == 2, "features must be (N, d), got ", features.sizes());
  TORCH_CHECK_VALUE(m_old.dim() == 2 && m_old.size(1) == features.size(1), "m_old must be (K, d), got ",
                    m_old.sizes());
  TORCH_CHECK_VALUE(inv.dim() == 1 && inv.size(0) == features.size(0), "inv must be (N,), got ", inv.sizes());
  TORCH_CHECK_VALUE(n_old.dim() == 1 && n_old.size(0) == m_old.size(0), "n_old must be (K,), got ", n_old.sizes());
  TORCH_CHECK_VALUE(!c10::isFloatingType(inv.scalar_type()) && !c10::isComplexType(inv.scalar_type()),
                    "inv must be an integer tensor, got ", inv.scalar_type());
  TORCH_CHECK_VALUE(m_old.size(0) > 0 || features.size(0) == 0, "inv must lie in [0, K) but K = 0 (m_old is ",
                    m_old.sizes(), ") for ", features.size(0), " rows");
  TORCH_CHECK_VALUE(features.device() == inv.device() && features.device() == m_old.device() &&
                        features.device() == n_old.device(),
                    "features, inv, m_old and n_old must be on one device, got ", features.device(), ", ",
                    inv.device(), ", ", m_old.device(), ", ", n_old.device());
}

}  // namespace etfkern
