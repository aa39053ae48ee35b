// CPU kernels of the spherical family (etfkern/spherical.py is the caller; etfkern/reference/spherical.py the oracle).
//
//   etfkern::spherical_cos_tiles_native(xs (N, d), bank (C, d), tau, need_grad, tile_rows, tile_classes)
//       -> (lse (N,), a_sum (N, d) | (0, d))    "cos" class loop with the fixed shift 0 (|z| <= 40, see
//       spherical.fixed_shift): xs = x̂ / tau in the GEMM dtype, z = xs W^T, lse_i = log sum_c exp(z_ic),
//       a_sum_i = sum_c exp(z_ic) w_c / (tau sum_c exp(z_ic)).
//   etfkern::spherical_nearest_native(x (N, d), bank (C, d), k) -> (top-k cosines (N, k), int64 indices (N, k)).
//
// Both walk (tile_rows x tile_classes) tiles of the logits: one buffer, written by a BLAS GEMM (at::mm_out) and
// then read ONCE by a fused epilogue while it is still in cache (exp + row sum in place for the loss, a running
// top-k merge for nearest). The N x C logits are never stored; extra memory is one tile plus the outputs.
// Accumulation in float32 (float64 for float64 inputs); GEMMs in the input dtype (bf16/fp16 GEMMs accumulate in
// fp32). Deterministic: every row sum runs over its classes in a fixed order, no atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace {

using at::Tensor;

constexpr double kNormEps = 1e-12;  // reference/spherical.py NORM_EPS

// exp(x) for float32 in one vectorisable expression (Cephes expf: |rel err| < 2 ulp on the clamped range).
// std::exp does not vectorise without -ffast-math; this loop body does, under the target clones below.
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float fx = x * 1.44269504088896341f;
  const float n = (fx + 12582912.0f) - 12582912.0f;  // round to nearest (|fx| < 2^22; no -ffast-math here)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n as IEEE bits (C++17: memcpy, not bit_cast)
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// e <- exp(e) over one row of length n; returns the row sum. Cloned per ISA (runtime dispatch through ifunc).
__attribute__((target_clones("avx512f", "avx2", "default")))
float exp_row_sum_f32(float* e, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) {
    const float v = exp_f32(e[c]);
    e[c] = v;
    s += v;
  }
  return s;
}

double exp_row_sum_f64(double* e, int64_t n) {
  double s = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    e[c] = std::exp(e[c]);
    s += e[c];
  }
  return s;
}

// Rows [0, rows) of a contiguous (rows x cols) tile: exp in place, l[r] = (first ? 0 : l[r]) + row sum.
template <typename T>
void exp_rows(T* tile, int64_t rows, int64_t cols, T* l, bool first) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T s;
      if constexpr (std::is_same_v<T, float>) {
        s = exp_row_sum_f32(tile + r * cols, cols);
      } else {
        s = exp_row_sum_f64(tile + r * cols, cols);
      }
      l[r] = first ? s : l[r] + s;
    }
  });
}

// tile (rows x cols, acc dtype) <- src_rows @ bank_cols^T, via a GEMM straight into the tile when dtypes agree.
void gemm_tile(Tensor& tile, const Tensor& rows, const Tensor& cols) {
  if (rows.scalar_type() == tile.scalar_type()) {
    at::mm_out(tile, rows, cols.t());
  } else {
    tile.copy_(at::mm(rows, cols.t()));
  }
}

std::tuple<Tensor, Tensor> cos_tiles(const Tensor& xs_in, const Tensor& bank, double tau, bool need_grad,
                                     int64_t tile_rows, int64_t tile_classes) {
  TORCH_CHECK(xs_in.dim() == 2 && bank.dim() == 2 && xs_in.size(1) == bank.size(1),
              "spherical_cos_tiles: xs (N, d) and bank (C, d) expected");
  TORCH_CHECK(xs_in.scalar_type() == bank.scalar_type(), "spherical_cos_tiles: xs and bank dtypes differ");
  TORCH_CHECK(tile_rows >= 1 && tile_classes >= 1, "spherical_cos_tiles: tile sizes must be >= 1");
  const auto acc = xs_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = xs_in.size(0), d = xs_in.size(1), n_cls = bank.size(0);
  const auto opts = xs_in.options().dtype(acc);
  Tensor lse = at::empty({n}, opts);
  Tensor a_sum = at::empty({need_grad ? n : 0, d}, opts);
  if (n == 0 || n_cls == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    a_sum.zero_();
    return {lse, a_sum};
  }
  const Tensor xs = xs_in.contiguous();
  const Tensor w = bank.contiguous();
  const bool same = xs.scalar_type() == acc;
  const int64_t rows = std::min(tile_rows, n), k = std::min(tile_classes, n_cls);
  Tensor buf = at::empty({rows * k}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "spherical_cos_tiles", [&] {
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t r1 = std::min(n, r0 + rows);
      const Tensor xr = xs.narrow(0, r0, r1 - r0);
      Tensor l = lse.narrow(0, r0, r1 - r0);
      Tensor a = need_grad ? a_sum.narrow(0, r0, r1 - r0) : Tensor();
      for (int64_t c0 = 0; c0 < n_cls; c0 += k) {
        const int64_t c1 = std::min(n_cls, c0 + k);
        const Tensor wt = w.narrow(0, c0, c1 - c0);
        Tensor e = buf.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
        gemm_tile(e, xr, wt);
        exp_rows<scalar_t>(e.data_ptr<scalar_t>(), r1 - r0, c1 - c0, l.data_ptr<scalar_t>(), c0 == 0);
        if (!need_grad) continue;
        if (!same) {
          // float16: exp(z) reaches e^40 and would overflow (65504) in a cast to float16: a float32 GEMM instead
          Tensor pw = xs.scalar_type() == at::kHalf ? at::mm(e, wt.to(acc))
                                                    : at::mm(e.to(xs.scalar_type()), wt).to(acc);
          c0 == 0 ? a.copy_(pw) : a.add_(pw);
        } else if (c0 == 0) {
          at::mm_out(a, e, wt);
        } else {
          a.addmm_(e, wt);
        }
      }
      if (need_grad) a.div_(l.unsqueeze(1) * tau);
      l.log_();
    }
  });
  return {lse, a_sum};
}

// Merge one row of a logits tile (n values, class offset c0) into that row's running top-k (sorted descending).
// Strict ">" keeps the lowest index among equal values; NaN cosines are never selected.
template <typename T>
void topk_merge(const T* v, int64_t n, int64_t c0, T* vals, int64_t* idx, int64_t k) {
  if (k == 1) {
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < n; ++c) m = std::max(m, v[c]);
    if (m > vals[0]) {
      for (int64_t c = 0; c < n; ++c) {
        if (v[c] == m) {
          vals[0] = m;
          idx[0] = c0 + c;
          break;
        }
      }
    }
    return;
  }
  T thr = vals[k - 1];
  for (int64_t c = 0; c < n; ++c) {
    const T x = v[c];
    if (!(x > thr)) continue;
    int64_t p = k - 1;
    while (p > 0 && x > vals[p - 1]) {
      vals[p] = vals[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    vals[p] = x;
    idx[p] = c0 + c;
    thr = vals[k - 1];
  }
}

std::tuple<Tensor, Tensor> nearest(const Tensor& x, const Tensor& bank, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && bank.dim() == 2 && x.size(1) == bank.size(1),
              "spherical_nearest: x (N, d) and bank (C, d) expected");
  TORCH_CHECK(k >= 1 && k <= bank.size(0), "spherical_nearest: k must be in [1, C]");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = x.size(0), n_cls = bank.size(0);
  Tensor vals = at::empty({n, k}, x.options().dtype(acc));
  Tensor idx = at::empty({n, k}, x.options().dtype(at::kLong));
  if (n == 0) return {vals, idx};
  const Tensor xf = x.to(acc);
  const Tensor xh = (xf / xf.norm(2, {1}, true).clamp_min(kNormEps)).to(bank.scalar_type()).contiguous();
  const Tensor w = bank.contiguous();
  // 256 x 1024 fp32 = 1 MiB per tile: the merge reads it back from L2 right after the GEMM wrote it.
  const int64_t rows = std::min<int64_t>(256, n), cols = std::min<int64_t>(1024, n_cls);
  Tensor buf = at::empty({rows * cols}, x.options().dtype(acc));
  vals.fill_(-std::numeric_limits<double>::infinity());
  idx.fill_(0);
  AT_DISPATCH_FLOATING_TYPES(acc, "spherical_nearest", [&] {
    scalar_t* vp = vals.data_ptr<scalar_t>();
    int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t r1 = std::min(n, r0 + rows);
      const Tensor xr = xh.narrow(0, r0, r1 - r0);
      for (int64_t c0 = 0; c0 < n_cls; c0 += cols) {
        const int64_t c1 = std::min(n_cls, c0 + cols);
        Tensor e = buf.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
        gemm_tile(e, xr, w.narrow(0, c0, c1 - c0));
        const scalar_t* ep = e.data_ptr<scalar_t>();
        const int64_t width = c1 - c0;
        at::parallel_for(r0, r1, std::max<int64_t>(1, 16384 / width), [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) {
            topk_merge<scalar_t>(ep + (r - r0) * width, width, c0, vp + r * k, ip + r * k, k);
          }
        });
      }
    }
  });
  return {vals, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(etfkern, CPU, m) {
  m.impl("spherical_cos_tiles_native", &cos_tiles);
  m.impl("spherical_nearest_native", &nearest);
}
