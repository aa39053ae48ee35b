// CUDA kernel of etfkern::collapse_update_native (the "cuda" backend; Triton is the default GPU path).
//
// Same contract as etfkern/reference/collapse.py::collapse_update:
//   features (N, d) float16/bfloat16/float32/float64, inv (N,) int64 in [0, K), m_old (K, d) float64,
//   n_old (K,) int64  ->  m_new (K, d) float64, m2_delta (K,) float64, sw_delta (d, d) float64.
// Steps: rows sorted by class (stable sort, so every class's rows are summed in a fixed order: deterministic);
// segment_stats_kernel: one block per (class, 128 columns), one read of the class's rows: float64 shifted sums
// and squares -> merged means and the class's sum of squared deviations (fixed-order block reduction);
// centre_kernel: A = X - M_old[Y], B = X - M_new[Y] (subtracted in float64, stored in the GEMM operand type:
// 16-bit inputs -> 16-bit operands, float32 output from cuBLAS; 32/64-bit inputs -> float64 operands, exact);
// one GEMM A^T B per row chunk, summed in float64.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "collapse/checks.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace {

using at::Tensor;

constexpr int kThreads = 128;

// Input element -> double: 16-bit types go through float (their only conversion), float/double are exact.
template <typename T>
__device__ __forceinline__ double as_double(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return static_cast<double>(static_cast<float>(v));
  }
}

template <typename T>
__global__ void segment_stats_kernel(const T* __restrict__ x, int64_t sxn, int64_t sxd, const int64_t* perm,
                                     const int64_t* seg, const double* m_old, const int64_t* n_old, double* m_new,
                                     double* m_eff, double* m2p, int64_t d, int64_t nbd) {
  __shared__ double red[kThreads];
  const int64_t k = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = col < d;
  const int64_t start = seg[k], end = seg[k + 1];
  const double nb = static_cast<double>(end - start);
  const double no = static_cast<double>(n_old[k]);
  double q = 0.0;
  if (active && end > start) {
    // One read of the class's rows, shifted by r = the old mean, or for a class new to the meter its first row
    // in the batch (near the data: no cancellation from a far common offset).
    const double ref = no > 0 ? m_old[k * d + col] : as_double(x[perm[start] * sxn + col * sxd]);
    double s = 0.0, sq = 0.0;
    for (int64_t p = start; p < end; ++p) {
      const double y = as_double(x[perm[p] * sxn + col * sxd]) - ref;
      s += y;
      sq += y * y;
    }
    const double n = no + nb;
    const double ybar = s / nb;  // batch mean - r
    const double mn = ref + ybar * (nb / n);
    m_new[k * d + col] = mn;
    m_eff[k * d + col] = no > 0 ? ref : mn;  // a new class: both operands centred on its batch mean
    // sum_rows (x - m_old)(x - m_new) for this column = sum y^2 - (n_b^2 / n) ybar^2 (Chan merge, shifted by r)
    q = sq - (nb * nb / n) * ybar * ybar;
  } else if (active) {  // a class without rows (not produced by the router; kept well defined)
    m_new[k * d + col] = m_old[k * d + col];
    m_eff[k * d + col] = m_old[k * d + col];
  }
  red[threadIdx.x] = q;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {  // fixed tree: deterministic
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) m2p[k * nbd + blockIdx.y] = red[0];
}

template <typename O>
__device__ __forceinline__ O to_operand(double v) {
  return static_cast<O>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_operand<double>(double v) {
  return v;
}

template <typename T, typename O>
__global__ void centre_kernel(const T* __restrict__ x, int64_t sxn, int64_t sxd, const int64_t* inv,
                              const double* m_eff, const double* m_new, O* a, O* b, int64_t r0, int64_t rows,
                              int64_t d) {
  const int64_t total = rows * d;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = r0 + i / d, c = i % d;
    const int64_t y = inv[r];
    const double v = as_double(x[r * sxn + c * sxd]);
    a[i] = to_operand<O>(v - m_eff[y * d + c]);
    b[i] = to_operand<O>(v - m_new[y * d + c]);
  }
}

template <typename T, typename O>
void run(const Tensor& x, const Tensor& inv, const Tensor& perm, const Tensor& seg, const Tensor& mold,
         const Tensor& nold, Tensor& m_new, Tensor& m_eff, Tensor& m2p, Tensor& sw, at::ScalarType op_type) {
  const int64_t n = x.size(0), d = x.size(1), k = mold.size(0);
  const int64_t nbd = (d + kThreads - 1) / kThreads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  segment_stats_kernel<T><<<dim3(static_cast<unsigned>(k), static_cast<unsigned>(nbd)), kThreads, 0, stream>>>(
      xp, x.stride(0), x.stride(1), perm.const_data_ptr<int64_t>(), seg.const_data_ptr<int64_t>(),
      mold.const_data_ptr<double>(), nold.const_data_ptr<int64_t>(), m_new.data_ptr<double>(),
      m_eff.data_ptr<double>(), m2p.data_ptr<double>(), d, nbd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(n, (int64_t{1} << 26) / std::max<int64_t>(d, 1)));
  Tensor a = at::empty({step, d}, x.options().dtype(op_type));
  Tensor b = at::empty({step, d}, x.options().dtype(op_type));
  const bool half = op_type == at::kHalf || op_type == at::kBFloat16;
  for (int64_t r0 = 0; r0 < n; r0 += step) {
    const int64_t rows = std::min(step, n - r0);
    const int64_t blocks = std::min<int64_t>((rows * d + 255) / 256, 65535);
    centre_kernel<T, O><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        xp, x.stride(0), x.stride(1), inv.const_data_ptr<int64_t>(), m_eff.const_data_ptr<double>(),
        m_new.const_data_ptr<double>(), reinterpret_cast<O*>(a.data_ptr()), reinterpret_cast<O*>(b.data_ptr()), r0,
        rows, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor at_ = a.narrow(0, 0, rows).t();
    Tensor bt_ = b.narrow(0, 0, rows);
    Tensor part = half ? at::mm(at_, bt_, at::kFloat) : at::mm(at_, bt_);
    sw.add_(part.to(at::kDouble));
  }
}

std::tuple<Tensor, Tensor, Tensor> collapse_update_cuda(const Tensor& features, const Tensor& inv,
                                                        const Tensor& m_old, const Tensor& n_old) {
  etfkern::check_collapse_update_args(features, inv, m_old, n_old);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), d = features.size(1), k = m_old.size(0);
  const auto f64 = features.options().dtype(at::kDouble);
  Tensor mold = m_old.to(at::kDouble).contiguous();
  Tensor nold = n_old.to(at::kLong).contiguous();
  Tensor m2 = at::zeros({k}, f64);
  Tensor sw = at::zeros({d, d}, f64);
  if (n == 0 || k == 0 || d == 0) return {mold.clone(), m2, sw};
  Tensor lab = inv.to(at::kLong).contiguous();
  Tensor perm = std::get<1>(at::sort(lab, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  Tensor seg = at::zeros({k + 1}, lab.options());
  seg.narrow(0, 1, k).copy_(at::cumsum(at::bincount(lab, {}, k), 0));
  Tensor m_new = at::empty({k, d}, f64);
  Tensor m_eff = at::empty({k, d}, f64);
  const int64_t nbd = (d + kThreads - 1) / kThreads;
  Tensor m2p = at::empty({k, nbd}, f64);
  switch (features.scalar_type()) {
    case at::kHalf:
      run<c10::Half, c10::Half>(features, lab, perm, seg, mold, nold, m_new, m_eff, m2p, sw, at::kHalf);
      break;
    case at::kBFloat16:
      run<c10::BFloat16, c10::BFloat16>(features, lab, perm, seg, mold, nold, m_new, m_eff, m2p, sw, at::kBFloat16);
      break;
    case at::kFloat:
      run<float, double>(features, lab, perm, seg, mold, nold, m_new, m_eff, m2p, sw, at::kDouble);
      break;
    case at::kDouble:
      run<double, double>(features, lab, perm, seg, mold, nold, m_new, m_eff, m2p, sw, at::kDouble);
      break;
    default:
      TORCH_CHECK(false, "features must be float16/bfloat16/float32/float64, got ", features.scalar_type());
  }
  m2 = m2p.sum(1);
  sw = sw.add(sw.t()).mul_(0.5);
  return {m_new, m2, sw};
}

}  // namespace

TORCH_LIBRARY_IMPL(etfkern, CUDA, m) { m.impl("collapse_update_native", &collapse_update_cuda); }
