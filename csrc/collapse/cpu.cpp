// CPU kernel of etfkern::collapse_update_native: one batch merged into K classes' running statistics.
//
// Contract (same as etfkern/reference/collapse.py::collapse_update):
//   features (N, d) float16/bfloat16/float32/float64, inv (N,) int64 in [0, K), m_old (K, d) float64,
//   n_old (K,) int64  ->  m_new (K, d) float64, m2_delta (K,) float64, sw_delta (d, d) float64 where
//   sw_delta = sum_r (x_r - m_old[y_r]) (x_r - m_new[y_r])^T   (Chan's merge summed over classes)
//   m2_delta[k] = sum_{r in k} (x_r - m_old[k]) . (x_r - m_new[k]).
// A class new to the meter (n_old == 0) is centred on its batch mean (m_old is ignored there).
//
// One symmetric operand. With the batch class mean m_b, u = m_b - m_old, w = n_old n_b / (n_old + n_b), Chan's
// term is S_b + w u u^T (S_b the batch scatter about m_b). Centring class c's rows on the shifted point
//   p_c = m_b - t u,   t = sqrt(n_old / (n_old + n_b))
// gives sum_r (x_r - p_c)(x_r - p_c)^T = S_b + n_b t^2 u u^T = S_b + w u u^T exactly (the cross term is
// sum_r (x_r - m_b) = 0). So sw_delta = A^T A with the single centred operand A = X - P[Y] (N x d, float64):
// no second operand, no correction rows, a sum of PSD outer products (no cancellation however far the
// features sit from the origin), and m2_delta[c] = sum_{r in c} |a_r|^2.
//
// Pass 1 (OpenMP over classes, rows bucketed by a stable counting sort): float64 class sums -> m_b, p, m_new.
// Pass 2 (row chunks of the class-sorted order, bounded buffer): A rows in parallel with their squared norms,
// then A^T A on the upper block triangle only (BLAS GEMMs on row panels), mirrored at the end. m2 sums the
// stored row norms per class in a fixed order: deterministic for any thread count.
//
// Precision: A is formed in float64 (x - p_c, so no cancellation however far the features sit from the
// origin) and m2 uses it as is. The products A^T A run in float64 for float64 features and in float32 for
// float16/bfloat16/float32 features (A rounded to float32 after centring, as the GPU kernels do), each chunk's
// product added to the float64 sw_delta: a relative error ~1e-7 on centred data, at half the GEMM time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "collapse/checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// Per-thread scratch reused across calls (centring points, the centred row chunk, the float32 partial
// product, the row order). Fresh multi-MiB buffers each batch are returned to the OS by malloc between calls
// and page-faulted back in: at (K=1800, d=256) that was ~2500 faults, ~2/3 of the call on one thread. Buffers
// stay cached only up to kCacheBytes in all; larger ones are allocated per call (their GEMM dwarfs the faults).
constexpr int64_t kCacheBytes = int64_t{64} << 20;
struct Workspace {
  Tensor p, a, part;
  std::vector<int64_t> perm, seg;
  std::vector<double> rowsq;
};
thread_local Workspace workspace;

// A (rows, cols) tensor of dtype backed by `slot` (grown when too small) while the cache budget allows.
Tensor scratch(Tensor& slot, int64_t rows, int64_t cols, const at::TensorOptions& opt, int64_t& budget) {
  const int64_t numel = rows * cols;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opt.dtype())));
  if (bytes > budget) return at::empty({rows, cols}, opt);
  budget -= bytes;
  // A slot allocated under torch.inference_mode() is an inference tensor: outside that mode the in-place ops
  // below (part.zero_(), addmm_ into part) refuse it ("Inplace update to inference tensor outside
  // InferenceMode"), so such a slot is replaced by a normal tensor (normal tensors work in both modes).
  if (!slot.defined() || slot.numel() < numel || slot.dtype() != opt.dtype() ||
      (slot.is_inference() && !c10::InferenceMode::is_enabled())) {
    slot = at::empty({numel}, opt);
  }
  return slot.narrow(0, 0, numel).view({rows, cols});
}

// Per class: batch mean m_b, the centring point p (see the header comment) and the merged mean m_new.
template <typename scalar_t>
void class_pass(const scalar_t* x, int64_t d, const int64_t* perm, const int64_t* seg, const double* m_old,
                const int64_t* n_old, double* m_new, double* p_out, int64_t k) {
  at::parallel_for(0, k, 1, [&](int64_t k0, int64_t k1) {
    std::vector<double> acc(d);
    for (int64_t c = k0; c < k1; ++c) {
      const int64_t start = seg[c], end = seg[c + 1];
      const double nb = static_cast<double>(end - start);
      const double no = static_cast<double>(n_old[c]);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t q = start; q < end; ++q) {
        const scalar_t* row = x + perm[q] * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(row[j]);
      }
      double* mn = m_new + c * d;
      double* pc = p_out + c * d;
      const double* mold = m_old + c * d;
      if (nb == 0) {  // not in this batch (cannot happen with compact ids, kept total): nothing changes
        for (int64_t j = 0; j < d; ++j) mn[j] = mold[j];
        continue;
      }
      const double frac = nb / (no + nb);
      const double t = std::sqrt(no / (no + nb));
      for (int64_t j = 0; j < d; ++j) {
        const double mb = acc[j] / nb;
        const double u = no > 0 ? mb - mold[j] : 0.0;
        const double o = no > 0 ? mold[j] : mb;
        mn[j] = o + (mb - o) * frac;
        pc[j] = mb - t * u;
      }
    }
  });
}

// A[i] = x[perm[q0 + i]] - p[y[perm[q0 + i]]] (computed in float64, stored as acc_t) and
// rowsq[q0 + i] = |A[i]|^2 in float64, for i < rows.
template <typename scalar_t, typename acc_t>
void centre_chunk(const scalar_t* x, int64_t d, const int64_t* perm, const int64_t* y, int64_t q0, int64_t rows,
                  const double* p, acc_t* a, double* rowsq) {
  constexpr int kLanes = 8;  // independent partial sums: the squared norm is not one serial add chain
  at::parallel_for(0, rows, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = perm[q0 + i];
      const scalar_t* row = x + r * d;
      const double* pc = p + y[r] * d;
      acc_t* ai = a + i * d;
      double part[kLanes] = {0.0};
      int64_t j = 0;
      for (; j + kLanes <= d; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double v = static_cast<double>(row[j + l]) - pc[j + l];
          ai[j + l] = static_cast<acc_t>(v);
          part[l] += v * v;
        }
      }
      for (; j < d; ++j) {
        const double v = static_cast<double>(row[j]) - pc[j];
        ai[j] = static_cast<acc_t>(v);
        part[0] += v * v;
      }
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += part[l];
      rowsq[q0 + i] = s;
    }
  });
}

// sw[i0:i0+ib, i0:] += A[:, i0:i0+ib]^T A[:, i0:] for each row panel: the upper block triangle of A^T A
// ((nb+1)/(2 nb) of the full product's flops), one GEMM per panel so the GEMMs stay wide.
void syrk_upper(Tensor& sw, const Tensor& a, int64_t bs) {
  const int64_t d = sw.size(0);
  for (int64_t i0 = 0; i0 < d; i0 += bs) {
    const int64_t ib = std::min(bs, d - i0);
    sw.narrow(0, i0, ib).narrow(1, i0, d - i0).addmm_(a.narrow(1, i0, ib).t(), a.narrow(1, i0, d - i0));
  }
}

// sw += part on the upper block triangle that syrk_upper wrote (float32 -> float64).
void add_upper(Tensor& sw, const Tensor& part, int64_t bs) {
  const int64_t d = sw.size(0);
  for (int64_t i0 = 0; i0 < d; i0 += bs) {
    const int64_t ib = std::min(bs, d - i0);
    sw.narrow(0, i0, ib).narrow(1, i0, d - i0).add_(part.narrow(0, i0, ib).narrow(1, i0, d - i0));
  }
}

// Fill the lower block triangle from the upper one; average each diagonal block with its transpose.
void mirror_upper(Tensor& sw, int64_t bs) {
  const int64_t d = sw.size(0);
  for (int64_t i0 = 0; i0 < d; i0 += bs) {
    const int64_t ib = std::min(bs, d - i0);
    Tensor diag = sw.narrow(0, i0, ib).narrow(1, i0, ib);
    diag.copy_(diag.add(diag.t()).mul_(0.5));
    if (i0 + ib < d) {
      sw.narrow(0, i0 + ib, d - i0 - ib).narrow(1, i0, ib).copy_(sw.narrow(0, i0, ib).narrow(1, i0 + ib, d - i0 - ib).t());
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> collapse_update_cpu(const Tensor& features, const Tensor& inv,
                                                       const Tensor& m_old, const Tensor& n_old) {
  etfkern::check_collapse_update_args(features, inv, m_old, n_old);
  const int64_t n = features.size(0), d = features.size(1), k = m_old.size(0);
  const auto f64 = features.options().dtype(at::kDouble);
  Tensor x = features.contiguous();
  Tensor lab = inv.to(at::kLong).contiguous();
  Tensor mold = m_old.to(at::kDouble).contiguous();
  Tensor nold = n_old.to(at::kLong).contiguous();
  Tensor m_new = at::empty({k, d}, f64);
  Tensor m2 = at::zeros({k}, f64);
  Tensor sw = at::zeros({d, d}, f64);
  if (k == 0 || d == 0) return {m_new, m2, sw};
  Workspace& ws = workspace;
  int64_t budget = kCacheBytes;
  Tensor p = scratch(ws.p, k, d, f64, budget);

  // stable counting sort of rows by class
  const int64_t* y = lab.data_ptr<int64_t>();
  std::vector<int64_t>& seg = ws.seg;
  std::vector<int64_t>& perm = ws.perm;
  seg.assign(k + 1, 0);
  perm.resize(n);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK_VALUE(y[r] >= 0 && y[r] < k, "inv must lie in [0, ", k, "), got ", y[r]);
    ++seg[y[r] + 1];
  }
  for (int64_t c = 0; c < k; ++c) seg[c + 1] += seg[c];
  {
    std::vector<int64_t> fill(seg.begin(), seg.end() - 1);
    for (int64_t r = 0; r < n; ++r) perm[fill[y[r]]++] = r;
  }

  // row panels of the symmetric product: >= 64 wide, at most 8 (d = 256: 4 panels, 5/8 of the full flops)
  const int64_t npanels = std::max<int64_t>(1, std::min<int64_t>(8, d / 64));
  const int64_t bs = (d + npanels - 1) / npanels;
  // row chunks of A: whole batch up to 32 MiB of float64 operand (deep GEMMs), never fewer than 256 rows
  const int64_t step = std::min<int64_t>(n, std::max<int64_t>(256, (int64_t{1} << 22) / d));
  std::vector<double>& rowsq = ws.rowsq;
  rowsq.resize(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "collapse_update_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    class_pass<scalar_t>(xp, d, perm.data(), seg.data(), mold.data_ptr<double>(), nold.data_ptr<int64_t>(),
                         m_new.data_ptr<double>(), p.data_ptr<double>(), k);
    if constexpr (std::is_same_v<scalar_t, double>) {
      Tensor a = scratch(ws.a, step, d, f64, budget);
      for (int64_t q0 = 0; q0 < n; q0 += step) {
        const int64_t rows = std::min(step, n - q0);
        centre_chunk<scalar_t, double>(xp, d, perm.data(), y, q0, rows, p.data_ptr<double>(),
                                       a.data_ptr<double>(), rowsq.data());
        syrk_upper(sw, a.narrow(0, 0, rows), bs);
      }
    } else {  // float32 products, each chunk's (upper) product added to the float64 sum
      const auto f32 = features.options().dtype(at::kFloat);
      Tensor a = scratch(ws.a, step, d, f32, budget);
      Tensor part = scratch(ws.part, d, d, f32, budget);
      for (int64_t q0 = 0; q0 < n; q0 += step) {
        const int64_t rows = std::min(step, n - q0);
        centre_chunk<scalar_t, float>(xp, d, perm.data(), y, q0, rows, p.data_ptr<double>(), a.data_ptr<float>(),
                                      rowsq.data());
        part.zero_();
        syrk_upper(part, a.narrow(0, 0, rows), bs);
        add_upper(sw, part, bs);
      }
    }
  });
  mirror_upper(sw, bs);
  double* m2p = m2.data_ptr<double>();
  at::parallel_for(0, k, 256, [&](int64_t k0, int64_t k1) {
    for (int64_t c = k0; c < k1; ++c) {
      double s = 0.0;
      for (int64_t q = seg[c]; q < seg[c + 1]; ++q) s += rowsq[q];
      m2p[c] = s;
    }
  });
  if (static_cast<int64_t>(perm.capacity() + rowsq.capacity() + seg.capacity()) * 8 > kCacheBytes) {
    std::vector<int64_t>().swap(perm);  // per-row vectors of a huge batch: not kept
    std::vector<int64_t>().swap(seg);
    std::vector<double>().swap(rowsq);
  }
  return {m_new, m2, sw};
}

}  // namespace

TORCH_LIBRARY_IMPL(etfkern, CPU, m) { m.impl("collapse_update_native", &collapse_update_cpu); }
