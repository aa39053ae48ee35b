// CPU kernel of etfkern::collapse_update_native: one batch merged into K classes' running statistics.
//
// Contract (same as etfkern/reference/collapse.py::collapse_update):
//   features (N, d) float16/bfloat16/float32/float64, inv (N,) int64 in [0, K), m_old (K, d) float64,
//   n_old (K,) int64  ->  m_new (K, d) float64, m2_delta (K,) float64, sw_delta (d, d) float64 where
//   sw_delta = sum_r (x_r - m_old[y_r]) (x_r - m_new[y_r])^T   (Chan's merge summed over classes)
//   m2_delta[k] = sum_{r in k} (x_r - m_old[k]) . (x_r - m_new[k]).
// A class new to the meter (n_old == 0) is centred on its batch mean (m_old is ignored there).
//
// Pass 1 (OpenMP over classes, rows bucketed by a stable counting sort): float64 class sums, merged means and
// m2 in a fixed order per class (deterministic). Pass 2 (row chunks): the centred float64 operands
// A = X - M_old[Y], B = X - M_new[Y] built in parallel, then BLAS GEMMs on the upper block triangle only (the
// exact sum is symmetric), mirrored at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "class_stats.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

template <typename scalar_t>
void class_pass(const scalar_t* x, int64_t d, const int64_t* perm, const int64_t* seg, const double* m_old,
                const int64_t* n_old, double* m_new, double* m_eff, double* m2, int64_t k) {
  at::parallel_for(0, k, 1, [&](int64_t k0, int64_t k1) {
    std::vector<double> acc(d);
    for (int64_t c = k0; c < k1; ++c) {
      const int64_t start = seg[c], end = seg[c + 1];
      const double nb = static_cast<double>(end - start);
      const double no = static_cast<double>(n_old[c]);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t p = start; p < end; ++p) {
        const scalar_t* row = x + perm[p] * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(row[j]);
      }
      double* mn = m_new + c * d;
      double* mo = m_eff + c * d;
      const double* mold = m_old + c * d;
      const double frac = (no + nb) > 0 ? nb / (no + nb) : 0.0;
      for (int64_t j = 0; j < d; ++j) {
        const double mb = nb > 0 ? acc[j] / nb : 0.0;
        const double o = no > 0 ? mold[j] : mb;
        mo[j] = o;
        mn[j] = o + (mb - o) * frac;
      }
      std::fill(acc.begin(), acc.end(), 0.0);  // reused: per-column partial m2 (vectorisable, fixed order)
      for (int64_t p = start; p < end; ++p) {
        const scalar_t* row = x + perm[p] * d;
        for (int64_t j = 0; j < d; ++j) {
          const double v = static_cast<double>(row[j]);
          acc[j] += (v - mo[j]) * (v - mn[j]);
        }
      }
      double q = 0.0;
      for (int64_t j = 0; j < d; ++j) q += acc[j];
      m2[c] = q;
    }
  });
}

template <typename scalar_t>
void centre_chunk(const scalar_t* x, int64_t d, const int64_t* inv, int64_t r0, int64_t rows, const double* m_eff,
                  const double* m_new, double* a, double* b) {
  at::parallel_for(0, rows, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = r0 + i;
      const scalar_t* row = x + r * d;
      const double* mo = m_eff + inv[r] * d;
      const double* mn = m_new + inv[r] * d;
      double* ai = a + i * d;
      double* bi = b + i * d;
      for (int64_t j = 0; j < d; ++j) {
        const double v = static_cast<double>(row[j]);
        ai[j] = v - mo[j];
        bi[j] = v - mn[j];
      }
    }
  });
}

// sw += A^T B on the upper block triangle only (BLAS GEMMs on column blocks: ~(nb+1)/(2 nb) of the flops);
// valid because the exact sum over all rows is symmetric.
void gemm_upper(Tensor& sw, const Tensor& a, const Tensor& b, int64_t bs) {
  const int64_t d = sw.size(0);
  for (int64_t i0 = 0; i0 < d; i0 += bs) {
    const int64_t ib = std::min(bs, d - i0);
    for (int64_t j0 = i0; j0 < d; j0 += bs) {
      const int64_t jb = std::min(bs, d - j0);
      sw.narrow(0, i0, ib).narrow(1, j0, jb).addmm_(a.narrow(1, i0, ib).t(), b.narrow(1, j0, jb));
    }
  }
}

// Fill the lower block triangle from the upper one; average each diagonal block with its transpose.
void mirror_upper(Tensor& sw, int64_t bs) {
  const int64_t d = sw.size(0);
  for (int64_t i0 = 0; i0 < d; i0 += bs) {
    const int64_t ib = std::min(bs, d - i0);
    Tensor diag = sw.narrow(0, i0, ib).narrow(1, i0, ib);
    diag.copy_(diag.add(diag.t()).mul_(0.5));
    for (int64_t j0 = i0 + bs; j0 < d; j0 += bs) {
      const int64_t jb = std::min(bs, d - j0);
      sw.narrow(0, j0, jb).narrow(1, i0, ib).copy_(sw.narrow(0, i0, ib).narrow(1, j0, jb).t());
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
  Tensor m_eff = at::empty({k, d}, f64);
  Tensor m2 = at::zeros({k}, f64);
  Tensor sw = at::zeros({d, d}, f64);
  if (k == 0 || d == 0) return {m_new, m2, sw};

  // stable counting sort of rows by class
  const int64_t* y = lab.data_ptr<int64_t>();
  std::vector<int64_t> seg(k + 1, 0), perm(n);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(y[r] >= 0 && y[r] < k, "inv must lie in [0, ", k, "), got ", y[r]);
    ++seg[y[r] + 1];
  }
  for (int64_t c = 0; c < k; ++c) seg[c + 1] += seg[c];
  {
    std::vector<int64_t> fill(seg.begin(), seg.end() - 1);
    for (int64_t r = 0; r < n; ++r) perm[fill[y[r]]++] = r;
  }

  // column blocks for the symmetric product: at most 4 (GEMMs stay large), at least 128 wide
  const int64_t nblocks = std::max<int64_t>(1, std::min<int64_t>(4, d / 128));
  const int64_t bs = (d + nblocks - 1) / nblocks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "collapse_update_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    class_pass<scalar_t>(xp, d, perm.data(), seg.data(), mold.data_ptr<double>(), nold.data_ptr<int64_t>(),
                         m_new.data_ptr<double>(), m_eff.data_ptr<double>(), m2.data_ptr<double>(), k);
    // small row chunks: the two operand buffers stay cache-sized (and cheap to allocate), GEMMs stay >= 256 deep
    const int64_t step = std::min<int64_t>(n, std::max<int64_t>(256, (int64_t{1} << 17) / std::max<int64_t>(d, 1)));
    Tensor a = at::empty({step, d}, f64);
    Tensor b = at::empty({step, d}, f64);
    for (int64_t r0 = 0; r0 < n; r0 += step) {
      const int64_t rows = std::min(step, n - r0);
      centre_chunk<scalar_t>(xp, d, y, r0, rows, m_eff.data_ptr<double>(), m_new.data_ptr<double>(),
                             a.data_ptr<double>(), b.data_ptr<double>());
      gemm_upper(sw, a.narrow(0, 0, rows), b.narrow(0, 0, rows), bs);
    }
  });
  mirror_upper(sw, bs);
  return {m_new, m2, sw};
}

}  // namespace

TORCH_LIBRARY_IMPL(etfkern, CPU, m) { m.impl("collapse_update_native", &collapse_update_cpu); }
