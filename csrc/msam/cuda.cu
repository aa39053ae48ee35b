// Momentum-SAM fused optimizer passes on CUDA: multi-tensor kernels (torch's multi_tensor_apply pattern).
//
// Tensors are cut into chunks of kChunk elements; one CUDA block per chunk. Addresses, sizes and the
// block -> (tensor, chunk) map travel as a kernel argument (< 4 KB), so one launch covers up to kMaxTensors
// tensors / kMaxBlocks chunks with no host-to-device copy and no host synchronisation. Consecutive tensors
// sharing dtype and hyperparameters (normally one param group) form a run; a run needs one launch per
// kMaxBlocks chunks. Device scalars (scales, grad_scale, found_inf, Adam bias corrections) are read through
// pointers. Squared norms: per-block tree reduction in a fixed order, one partial per block, summed by
// at::sum: deterministic. Division and square root use the _rn intrinsics so --use_fast_math does not change
// the optimizer's arithmetic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace etfkern {
namespace {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

template <int N>
struct Meta {
  void* addr[N][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char tensor[kMaxBlocks];
  int chunk[kMaxBlocks];
};
static_assert(sizeof(Meta<4>) <= 4000, "kernel argument too large");

__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

template <typename T>
__device__ __forceinline__ void block_sum_store(T acc, T* out) {
  __shared__ T shm[kThreads];
  shm[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {  // fixed tree: deterministic
    if (threadIdx.x < s) shm[threadIdx.x] += shm[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = shm[0];
}

struct Range {
  int t;
  int64_t begin, end;
};

template <int N>
__device__ __forceinline__ Range block_range(const Meta<N>& meta) {
  const int t = meta.tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.numel[t], begin + kChunk);
  return {t, begin, end};
}

// ---------------------------------------------------------------------------------------------------------
// kernels
// ---------------------------------------------------------------------------------------------------------
template <typename P, typename T>
__global__ void __launch_bounds__(kThreads) sq_norm_kernel(Meta<3> meta, T* partial, const T* scale,
                                                           const T* grad_scale, T mu, T c, T wd, bool use_wd) {
  const Range r = block_range(meta);
  const P* p = static_cast<const P*>(meta.addr[0][r.t]);
  const P* g = static_cast<const P*>(meta.addr[1][r.t]);
  const T* v = static_cast<const T*>(meta.addr[2][r.t]);
  const T s = *scale;
  const T gs = grad_scale ? *grad_scale : T(1);
  T acc = 0;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) {
    T gi = static_cast<T>(g[i]);
    if (grad_scale) gi = div_rn(gi, gs);
    T d = c * gi;
    if (use_wd) d = d + wd * (static_cast<T>(p[i]) + s * v[i]);
    const T vn = mu * v[i] + d;
    acc += vn * vn;
  }
  block_sum_store(acc, partial + blockIdx.x);
}

template <typename P, typename T>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Meta<3> meta, T* partial, const T* scale_old,
                                                       const T* scale_new, const T* grad_scale, const float* found_inf,
                                                       T lr, T mu, T wd, bool use_wd, bool nesterov) {
  const Range r = block_range(meta);
  P* p = static_cast<P*>(meta.addr[0][r.t]);
  const P* g = static_cast<const P*>(meta.addr[1][r.t]);
  T* v = static_cast<T*>(meta.addr[2][r.t]);
  const bool skip = found_inf != nullptr && *found_inf != 0.f;
  const T so = *scale_old, sn = *scale_new;
  const T gs = grad_scale ? *grad_scale : T(1);
  T acc = 0;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) {
    const T vi = v[i];
    if (skip) {  // GradScaler found inf/NaN: keep every bit
      acc += vi * vi;
      continue;
    }
    T gi = static_cast<T>(g[i]);
    if (grad_scale) gi = div_rn(gi, gs);
    T x = static_cast<T>(p[i]) + so * vi;
    const T d = use_wd ? gi + wd * x : gi;
    const T vn = mu * vi + d;
    const T u = nesterov ? d + mu * vn : vn;
    x = x - lr * u;
    p[i] = static_cast<P>(x - sn * vn);
    v[i] = vn;
    acc += vn * vn;
  }
  block_sum_store(acc, partial + blockIdx.x);
}

template <typename P, typename T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(Meta<4> meta, T* partial, const T* scale_old,
                                                         const T* scale_new, const T* grad_scale,
                                                         const float* found_inf, const T* step_size,
                                                         const T* bc2_sqrt, T b1, T b2, T c1, T c2, T eps, T decay) {
  const Range r = block_range(meta);
  P* p = static_cast<P*>(meta.addr[0][r.t]);
  const P* g = static_cast<const P*>(meta.addr[1][r.t]);
  T* m = static_cast<T*>(meta.addr[2][r.t]);
  T* q = static_cast<T*>(meta.addr[3][r.t]);
  const bool skip = found_inf != nullptr && *found_inf != 0.f;
  const T so = *scale_old, sn = *scale_new, ss = *step_size, bc2 = *bc2_sqrt;
  const T gs = grad_scale ? *grad_scale : T(1);
  T acc = 0;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) {
    const T mi = m[i];
    if (skip) {
      acc += mi * mi;
      continue;
    }
    T gi = static_cast<T>(g[i]);
    if (grad_scale) gi = div_rn(gi, gs);
    T x = static_cast<T>(p[i]) + so * mi;
    x = x * decay;
    const T mn = b1 * mi + c1 * gi;
    const T qn = b2 * q[i] + c2 * (gi * gi);
    const T denom = div_rn(sqrt_rn(qn), bc2) + eps;
    x = x - ss * div_rn(mn, denom);
    p[i] = static_cast<P>(x - sn * mn);
    m[i] = mn;
    q[i] = qn;
    acc += mn * mn;
  }
  block_sum_store(acc, partial + blockIdx.x);
}

// ---------------------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------------------
at::ScalarType state_type(at::ScalarType param) { return param == at::kDouble ? at::kDouble : at::kFloat; }

int64_t count_chunks(at::TensorList ts, size_t a, size_t b) {
  int64_t n = 0;
  for (size_t i = a; i < b; ++i) n += (ts[i].numel() + kChunk - 1) / kChunk;
  return n;
}

// Calls launch(meta, nblocks, first_block) for consecutive groups of chunks of lists[*][a:b].
template <int N, typename Launch>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, size_t a, size_t b, Launch&& launch) {
  Meta<N> meta;
  int nt = 0, nb = 0;
  int64_t base = 0;
  for (size_t t = a; t < b; ++t) {
    const int64_t numel = lists[0][t].numel();
    bool added = false;
    for (int64_t c = 0; c * kChunk < numel; ++c) {
      if (!added) {
        if (nt == kMaxTensors) {
          launch(meta, nb, base);
          base += nb;
          nt = nb = 0;
        }
        for (int k = 0; k < N; ++k) meta.addr[k][nt] = lists[k][t].data_ptr();
        meta.numel[nt] = numel;
        ++nt;
        added = true;
      }
      meta.tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.chunk[nb] = static_cast<int>(c);
      if (++nb == kMaxBlocks) {
        launch(meta, nb, base);
        base += nb;
        nt = nb = 0;
        added = false;  // the next chunk of tensor t (if any) re-enters as entry 0
      }
    }
  }
  if (nb > 0) launch(meta, nb, base);
}

// [a, b) ranges of consecutive tensors sharing dtype and the given per-tensor values
std::vector<std::pair<size_t, size_t>> runs(at::TensorList params, const std::vector<std::vector<double>>& hyper) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t i = 0; i < params.size(); ++i) {
    bool same = !out.empty() && params[i].scalar_type() == params[i - 1].scalar_type();
    for (const auto& h : hyper) same = same && h[i] == h[i - 1];
    if (same) out.back().second = i + 1;
    else out.emplace_back(i, i + 1);
  }
  return out;
}

void check(const char* op, at::TensorList params, at::TensorList grads, at::TensorList s1, at::TensorList* s2,
           size_t nhyper) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && s1.size() == n && (!s2 || s2->size() == n) && nhyper == n, op,
                    ": all lists must have one entry per parameter");
  for (size_t i = 0; i < n; ++i) {
    const auto pt = params[i].scalar_type();
    TORCH_CHECK_VALUE(pt == at::kFloat || pt == at::kDouble || pt == at::kBFloat16 || pt == at::kHalf, op,
                      ": params[", i, "] must be float64/float32/bfloat16/float16, got ", pt);
    TORCH_CHECK_VALUE(params[i].is_cuda() && params[i].is_contiguous(), op, ": params[", i,
                      "] must be a contiguous CUDA tensor");
    TORCH_CHECK_VALUE(params[i].device() == params[0].device(), op, ": params[", i, "] is on ", params[i].device(),
                      " but params[0] on ", params[0].device(), " (one launch covers one device)");
    TORCH_CHECK_VALUE(grads[i].scalar_type() == pt && grads[i].sizes() == params[i].sizes() &&
                          grads[i].device() == params[i].device(),
                      op, ": grads[", i, "] must match params[", i, "] in dtype, shape and device");
    TORCH_CHECK_VALUE(s1[i].scalar_type() == state_type(pt) && s1[i].sizes() == params[i].sizes() &&
                          s1[i].is_contiguous() && s1[i].device() == params[i].device(),
                      op, ": state[", i, "] must be a contiguous ", state_type(pt), " tensor like params[", i, "]");
    if (s2) {
      TORCH_CHECK_VALUE((*s2)[i].scalar_type() == state_type(pt) && (*s2)[i].sizes() == params[i].sizes() &&
                            (*s2)[i].is_contiguous() && (*s2)[i].device() == params[i].device(),
                        op, ": exp_avg_sqs[", i, "] must be a contiguous ", state_type(pt), " tensor like params");
    }
  }
}

std::vector<at::Tensor> contig(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

at::Tensor as_scalar(const at::Tensor& t, at::ScalarType dt) {
  TORCH_CHECK_VALUE(t.numel() == 1, "etfkern msam: device scalars must have one element, got shape ", t.sizes());
  // the kernels dereference these pointers on the device: a CPU (or other-GPU) scalar would be read through a
  // host / foreign pointer (illegal address), so every scalar must live on the current (guarded) CUDA device
  TORCH_CHECK_VALUE(t.is_cuda() && t.device().index() == c10::cuda::current_device(),
                    "etfkern msam: scalar tensors (scale, grad_scale, found_inf, step) must be on the parameters' "
                    "CUDA device cuda:", static_cast<int>(c10::cuda::current_device()), ", got ", t.device());
  return t.to(dt).contiguous().reshape({1});
}

at::Tensor finish(std::vector<at::Tensor>& partials, at::TensorList bufs, const at::Tensor& like) {
  bool f64 = false;
  for (const auto& b : bufs) f64 = f64 || b.scalar_type() == at::kDouble;
  at::Tensor total = at::zeros({}, like.options().dtype(at::kDouble));
  for (auto& p : partials) total = total.add(p.sum(at::kDouble));
  return total.to(f64 ? at::kDouble : at::kFloat);
}

std::optional<at::Tensor> opt_scalar(const std::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return as_scalar(*t, dt);
}

// For each run of tensors sharing dtype and hyperparameters: allocate one partial per chunk and call
// body(a, b, state dtype, partial); returns the summed squared norm (0-dim, on the device).
template <typename F>
at::Tensor over_runs(at::TensorList params, const std::vector<std::vector<double>>& hyper, at::TensorList bufs,
                     const at::Tensor& like, F&& body) {
  std::vector<at::Tensor> partials;
  for (const auto& [a, b] : runs(params, hyper)) {
    const int64_t nchunks = count_chunks(params, a, b);
    if (nchunks == 0) continue;
    const auto st = state_type(params[a].scalar_type());
    at::Tensor partial = at::empty({nchunks}, like.options().dtype(st));
    body(a, b, st, partial);
    partials.push_back(partial);
  }
  return finish(partials, bufs, like);
}

template <typename F>
void dispatch(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kDouble: f(double{}, double{}); break;
    case at::kFloat: f(float{}, float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case at::kHalf: f(c10::Half{}, float{}); break;
    default: TORCH_CHECK_VALUE(false, "etfkern msam: unsupported dtype ", st);
  }
}

at::Tensor msam_sq_norm_cuda(at::TensorList params, at::TensorList grads_in, at::TensorList bufs,
                             const at::Tensor& scale, c10::ArrayRef<double> momentum, c10::ArrayRef<double> grad_coef,
                             c10::ArrayRef<double> weight_decay, const std::optional<at::Tensor>& grad_scale) {
  check("msam_sq_norm", params, grads_in, bufs, nullptr, momentum.size());
  TORCH_CHECK_VALUE(grad_coef.size() == params.size() && weight_decay.size() == params.size(),
                    "msam_sq_norm: grad_coef and weight_decay need one entry per tensor");
  const c10::cuda::CUDAGuard guard(params.empty() ? scale.device() : params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<std::vector<at::Tensor>> lists = {params.vec(), contig(grads_in), bufs.vec()};
  const std::vector<std::vector<double>> hyper = {momentum.vec(), grad_coef.vec(), weight_decay.vec()};
  return over_runs(params, hyper, bufs, scale, [&](size_t a, size_t b, at::ScalarType st, at::Tensor& partial) {
    const at::Tensor s = as_scalar(scale, st);
    const auto gs = opt_scalar(grad_scale, st);
    dispatch(params[a].scalar_type(), [&](auto p_tag, auto t_tag) {
      using P = decltype(p_tag);
      using T = decltype(t_tag);
      multi_tensor_apply<3>(lists, a, b, [&](const Meta<3>& meta, int nb, int64_t base) {
        sq_norm_kernel<P, T><<<nb, kThreads, 0, stream>>>(
            meta, partial.data_ptr<T>() + base, s.data_ptr<T>(), gs ? gs->data_ptr<T>() : nullptr,
            static_cast<T>(momentum[a]), static_cast<T>(grad_coef[a]), static_cast<T>(weight_decay[a]),
            weight_decay[a] != 0.0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor msam_sgd_step_cuda(at::TensorList params, at::TensorList grads_in, at::TensorList bufs,
                              const at::Tensor& scale_old, const at::Tensor& scale_new, c10::ArrayRef<double> lr,
                              c10::ArrayRef<double> momentum, c10::ArrayRef<double> weight_decay,
                              c10::List<bool> nesterov, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  check("msam_sgd_step", params, grads_in, bufs, nullptr, lr.size());
  TORCH_CHECK_VALUE(momentum.size() == params.size() && weight_decay.size() == params.size() &&
                        nesterov.size() == params.size(),
                    "msam_sgd_step: momentum, weight_decay and nesterov need one entry per tensor");
  const c10::cuda::CUDAGuard guard(params.empty() ? scale_old.device() : params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<std::vector<at::Tensor>> lists = {params.vec(), contig(grads_in), bufs.vec()};
  std::vector<double> nest(params.size());
  for (size_t i = 0; i < params.size(); ++i) nest[i] = nesterov.get(i) ? 1.0 : 0.0;
  const std::vector<std::vector<double>> hyper = {lr.vec(), momentum.vec(), weight_decay.vec(), nest};
  const auto fi = opt_scalar(found_inf, at::kFloat);
  return over_runs(params, hyper, bufs, scale_old, [&](size_t a, size_t b, at::ScalarType st, at::Tensor& partial) {
    const at::Tensor so = as_scalar(scale_old, st), sn = as_scalar(scale_new, st);
    const auto gs = opt_scalar(grad_scale, st);
    dispatch(params[a].scalar_type(), [&](auto p_tag, auto t_tag) {
      using P = decltype(p_tag);
      using T = decltype(t_tag);
      multi_tensor_apply<3>(lists, a, b, [&](const Meta<3>& meta, int nb, int64_t base) {
        sgd_kernel<P, T><<<nb, kThreads, 0, stream>>>(
            meta, partial.data_ptr<T>() + base, so.data_ptr<T>(), sn.data_ptr<T>(),
            gs ? gs->data_ptr<T>() : nullptr, fi ? fi->data_ptr<float>() : nullptr, static_cast<T>(lr[a]),
            static_cast<T>(momentum[a]), static_cast<T>(weight_decay[a]), weight_decay[a] != 0.0, nest[a] != 0.0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

at::Tensor msam_adamw_step_cuda(at::TensorList params, at::TensorList grads_in, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, const at::Tensor& scale_old, const at::Tensor& scale_new,
                                const at::Tensor& step, c10::ArrayRef<double> lr, c10::ArrayRef<double> beta1,
                                c10::ArrayRef<double> beta2, c10::ArrayRef<double> eps,
                                c10::ArrayRef<double> weight_decay, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf) {
  check("msam_adamw_step", params, grads_in, exp_avgs, &exp_avg_sqs, lr.size());
  const size_t n = params.size();
  TORCH_CHECK_VALUE(beta1.size() == n && beta2.size() == n && eps.size() == n && weight_decay.size() == n,
                    "msam_adamw_step: beta1, beta2, eps and weight_decay need one entry per tensor");
  const c10::cuda::CUDAGuard guard(params.empty() ? scale_old.device() : params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<std::vector<at::Tensor>> lists = {params.vec(), contig(grads_in), exp_avgs.vec(),
                                                      exp_avg_sqs.vec()};
  const std::vector<std::vector<double>> hyper = {lr.vec(), beta1.vec(), beta2.vec(), eps.vec(), weight_decay.vec()};
  const auto fi = opt_scalar(found_inf, at::kFloat);
  const at::Tensor t64 = as_scalar(step, at::kDouble);
  return over_runs(params, hyper, exp_avgs, scale_old, [&](size_t a, size_t b, at::ScalarType st,
                                                           at::Tensor& partial) {
    const at::Tensor so = as_scalar(scale_old, st), sn = as_scalar(scale_new, st);
    const auto gs = opt_scalar(grad_scale, st);
    // bias corrections on the device (no host read of the step count)
    const at::Tensor step_size = at::pow(c10::Scalar(beta1[a]), t64).neg().add(1.0).reciprocal().mul(lr[a]).to(st);
    const at::Tensor bc2_sqrt = at::pow(c10::Scalar(beta2[a]), t64).neg().add(1.0).sqrt().to(st);
    dispatch(params[a].scalar_type(), [&](auto p_tag, auto t_tag) {
      using P = decltype(p_tag);
      using T = decltype(t_tag);
      multi_tensor_apply<4>(lists, a, b, [&](const Meta<4>& meta, int nb, int64_t base) {
        adamw_kernel<P, T><<<nb, kThreads, 0, stream>>>(
            meta, partial.data_ptr<T>() + base, so.data_ptr<T>(), sn.data_ptr<T>(),
            gs ? gs->data_ptr<T>() : nullptr, fi ? fi->data_ptr<float>() : nullptr, step_size.data_ptr<T>(),
            bc2_sqrt.data_ptr<T>(), static_cast<T>(beta1[a]), static_cast<T>(beta2[a]),
            static_cast<T>(1.0 - beta1[a]), static_cast<T>(1.0 - beta2[a]), static_cast<T>(eps[a]),
            static_cast<T>(1.0 - lr[a] * weight_decay[a]));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(etfkern, CUDA, m) {
  m.impl("msam_sq_norm_native", &msam_sq_norm_cuda);
  m.impl("msam_sgd_step_native", &msam_sgd_step_cuda);
  m.impl("msam_adamw_step_native", &msam_adamw_step_cuda);
}

}  // namespace etfkern
