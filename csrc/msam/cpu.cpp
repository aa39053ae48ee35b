// Momentum-SAM fused optimizer passes on CPU (OpenMP through at::parallel_for), over whole tensor lists.
//
// Work is split into fixed chunks of kChunk elements of each tensor (independent of the thread count); the
// squared norms are summed per chunk in double and the chunk partials added in list order afterwards, so
// results are deterministic and identical for any number of threads. Element math is done in the state
// type T (double for float64 parameters, float otherwise: bf16/fp16/fp32 parameters keep fp32 state), in the
// same operation order as etfkern/reference/msam.py, so float64 results match the reference bitwise (AdamW: the
// moments bitwise, the parameters to an ulp, since std::pow and torch.pow may round the bias correction differently).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include <algorithm>
#include <cstring>

#define ETFKERN_MSAM_NS base
#include "msam/cpu_kernels.h"
#undef ETFKERN_MSAM_NS

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ETFKERN_MSAM_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")  // no "fma": contraction would change the rounding
#define ETFKERN_MSAM_NS avx2
#include "msam/cpu_kernels.h"
#undef ETFKERN_MSAM_NS
#pragma GCC pop_options
#endif

namespace etfkern {
namespace {

constexpr int64_t kChunk = 1 << 15;

struct Work {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Work> make_work(at::TensorList ts) {
  std::vector<Work> work;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) {
    const int64_t n = ts[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) work.push_back({i, b, std::min(n, b + kChunk)});
  }
  return work;
}

double read_scalar(const std::optional<at::Tensor>& t, double fallback) {
  if (!t.has_value() || !t->defined()) return fallback;
  TORCH_CHECK_VALUE(t->numel() == 1, "etfkern msam: scalar tensors (scale, grad_scale, found_inf, step) must have "
                    "one element, got shape ", t->sizes());
  return t->to(at::kDouble).reshape({}).item<double>();  // CPU tensor: a load, not a device sync
}

at::ScalarType state_type(at::ScalarType param) {
  return param == at::kDouble ? at::kDouble : at::kFloat;
}

void check_lists(const char* op, at::TensorList params, at::TensorList grads, at::TensorList bufs,
                 std::optional<at::TensorList> bufs2, size_t nhyper) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && bufs.size() == n && (!bufs2 || bufs2->size() == n) && nhyper == n,
                    op, ": params, grads, state lists and per-tensor hyperparameter lists must have the same length");
  for (size_t i = 0; i < n; ++i) {
    const auto pt = params[i].scalar_type();
    TORCH_CHECK_VALUE(pt == at::kFloat || pt == at::kDouble || pt == at::kBFloat16 || pt == at::kHalf, op,
                      ": params[", i, "] must be float64/float32/bfloat16/float16, got ", pt);
    TORCH_CHECK_VALUE(grads[i].scalar_type() == pt, op, ": grads[", i, "] must have the dtype of params[", i, "]");
    TORCH_CHECK_VALUE(bufs[i].scalar_type() == state_type(pt), op, ": state[", i, "] must be ", state_type(pt),
                      " for ", pt, " parameters, got ", bufs[i].scalar_type());
    TORCH_CHECK_VALUE(grads[i].sizes() == params[i].sizes() && bufs[i].sizes() == params[i].sizes(), op,
                      ": grads[", i, "] and state[", i, "] must have the shape of params[", i, "] ", params[i].sizes());
    TORCH_CHECK_VALUE(params[i].is_contiguous() && bufs[i].is_contiguous(), op, ": params[", i,
                      "] and its state must be contiguous (grads may be strided)");
    if (bufs2) {
      TORCH_CHECK_VALUE((*bufs2)[i].scalar_type() == state_type(pt) && (*bufs2)[i].sizes() == params[i].sizes() &&
                            (*bufs2)[i].is_contiguous(),
                        op, ": exp_avg_sqs[", i, "] must be a contiguous ", state_type(pt), " tensor shaped like params");
    }
  }
}

at::Tensor out_norm(at::TensorList bufs, double value) {
  bool f64 = false;
  for (const auto& b : bufs) f64 = f64 || b.scalar_type() == at::kDouble;
  return at::scalar_tensor(value, at::TensorOptions().dtype(f64 ? at::kDouble : at::kFloat));
}

bool use_avx2() {
#ifdef ETFKERN_MSAM_AVX2
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

// Address of the AVX2 or the baseline instantiation of an element-loop template (same signature).
#ifdef ETFKERN_MSAM_AVX2
#define ETFKERN_MSAM_PICK(...) (use_avx2() ? &msam_cpu::avx2::__VA_ARGS__ : &msam_cpu::base::__VA_ARGS__)
#else
#define ETFKERN_MSAM_PICK(...) (&msam_cpu::base::__VA_ARGS__)
#endif

double sum_partials(const std::vector<double>& partial) {
  double total = 0.0;
  for (double x : partial) total += x;
  return total;
}

// Calls f(std::true_type) or f(std::false_type): runtime flags become compile-time so the element loops
// carry no branches and vectorise.
template <typename F>
inline void with_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// Dispatch on the parameter dtype: P the stored type, T the state / math type.
template <typename F>
void dispatch_param(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kDouble: f(double{}, double{}); break;
    case at::kFloat: f(float{}, float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case at::kHalf: f(c10::Half{}, float{}); break;
    default: TORCH_CHECK_VALUE(false, "etfkern msam: unsupported parameter dtype ", st);
  }
}

// Runs fn(work item, P tag, T tag) -> double for every chunk of every tensor (in parallel); returns the chunk
// results added in list order (deterministic for any thread count).
template <typename F>
double for_chunks(at::TensorList params, F&& fn) {
  const auto work = make_work(params);
  std::vector<double> partial(work.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t wb, int64_t we) {
    for (int64_t k = wb; k < we; ++k) {
      dispatch_param(params[work[k].tensor].scalar_type(),
                     [&](auto p_tag, auto t_tag) { partial[k] = fn(work[k], p_tag, t_tag); });
    }
  });
  return sum_partials(partial);
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// What every pass reads besides the tensor lists: contiguous grads and the host copies of the 0-dim scalars.
struct PassInputs {
  std::vector<at::Tensor> grads;
  double scale_old, scale_new, grad_scale;
  bool has_grad_scale;
};

PassInputs pass_inputs(at::TensorList grads_in, const std::optional<at::Tensor>& scale_old,
                       const std::optional<at::Tensor>& scale_new, const std::optional<at::Tensor>& grad_scale) {
  return {contiguous(grads_in), read_scalar(scale_old, 0.0), read_scalar(scale_new, 0.0),
          read_scalar(grad_scale, 1.0), grad_scale.has_value() && grad_scale->defined()};
}

// The step was skipped (found_inf): the state is unchanged, report its squared norm.
at::Tensor unchanged_norm(at::TensorList bufs) {
  double total = 0.0;
  for (const auto& b : bufs) total += b.to(at::kDouble).pow(2).sum().item<double>();
  return out_norm(bufs, total);
}

// ---------------------------------------------------------------------------------------------------------
// Pass 1: sum_i || mu v + (c g + wd (p + s v)) ||^2
// ---------------------------------------------------------------------------------------------------------
at::Tensor msam_sq_norm_cpu(at::TensorList params, at::TensorList grads_in, at::TensorList bufs,
                            const at::Tensor& scale, c10::ArrayRef<double> momentum,
                            c10::ArrayRef<double> grad_coef, c10::ArrayRef<double> weight_decay,
                            const std::optional<at::Tensor>& grad_scale) {
  check_lists("msam_sq_norm", params, grads_in, bufs, std::nullopt, momentum.size());
  TORCH_CHECK_VALUE(grad_coef.size() == params.size() && weight_decay.size() == params.size(),
                    "msam_sq_norm: grad_coef and weight_decay need one entry per tensor");
  const auto in = pass_inputs(grads_in, scale, std::nullopt, grad_scale);
  const auto& grads = in.grads;
  const double s = in.scale_old, gs = in.grad_scale;
  const bool has_gs = in.has_grad_scale;
  const double total = for_chunks(params, [&](const Work& w, auto p_tag, auto t_tag) {
    using P = decltype(p_tag);
    using T = decltype(t_tag);
    const int64_t j = w.tensor;
    const P* p = params[j].data_ptr<P>();
    const P* g = grads[j].data_ptr<P>();
    const T* v = bufs[j].data_ptr<T>();
    const T mu = static_cast<T>(momentum[j]), c = static_cast<T>(grad_coef[j]), wd = static_cast<T>(weight_decay[j]);
    double out = 0.0;
    with_bool(has_gs, [&](auto GS) { with_bool(weight_decay[j] != 0.0, [&](auto WD) {
      constexpr bool kGS = decltype(GS)::value, kWD = decltype(WD)::value;
      out = ETFKERN_MSAM_PICK(norm_chunk<P, T, kGS, kWD>)(p, g, v, w.begin, w.end, mu, c, wd, static_cast<T>(s),
                                                          static_cast<T>(gs));
    }); });
    return out;
  });
  return out_norm(bufs, total);
}

// ---------------------------------------------------------------------------------------------------------
// Pass 2 (SGD momentum): undo, update, perturb; returns sum ||v'||^2
// ---------------------------------------------------------------------------------------------------------
at::Tensor msam_sgd_step_cpu(at::TensorList params, at::TensorList grads_in, at::TensorList bufs,
                             const at::Tensor& scale_old, const at::Tensor& scale_new, c10::ArrayRef<double> lr,
                             c10::ArrayRef<double> momentum, c10::ArrayRef<double> weight_decay,
                             c10::List<bool> nesterov, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  check_lists("msam_sgd_step", params, grads_in, bufs, std::nullopt, lr.size());
  TORCH_CHECK_VALUE(momentum.size() == params.size() && weight_decay.size() == params.size() &&
                        nesterov.size() == params.size(),
                    "msam_sgd_step: momentum, weight_decay and nesterov need one entry per tensor");
  if (read_scalar(found_inf, 0.0) != 0.0) return unchanged_norm(bufs);  // GradScaler: skip the whole step
  const auto in = pass_inputs(grads_in, scale_old, scale_new, grad_scale);
  const auto& grads = in.grads;
  const double so = in.scale_old, sn = in.scale_new, gs = in.grad_scale;
  const bool has_gs = in.has_grad_scale;
  const double total = for_chunks(params, [&](const Work& w, auto p_tag, auto t_tag) {
    using P = decltype(p_tag);
    using T = decltype(t_tag);
    const int64_t j = w.tensor;
    P* p = params[j].data_ptr<P>();
    const P* g = grads[j].data_ptr<P>();
    T* v = bufs[j].data_ptr<T>();
    double out = 0.0;
    with_bool(has_gs, [&](auto GS) { with_bool(weight_decay[j] != 0.0, [&](auto WD) {
      with_bool(nesterov.get(j), [&](auto NES) {
        constexpr bool kGS = decltype(GS)::value, kWD = decltype(WD)::value, kN = decltype(NES)::value;
        out = ETFKERN_MSAM_PICK(sgd_chunk<P, T, kGS, kWD, kN>)(
            p, g, v, w.begin, w.end, static_cast<T>(lr[j]), static_cast<T>(momentum[j]),
            static_cast<T>(weight_decay[j]), static_cast<T>(so), static_cast<T>(sn), static_cast<T>(gs));
      });
    }); });
    return out;
  });
  return out_norm(bufs, total);
}

// ---------------------------------------------------------------------------------------------------------
// Pass 2 (AdamW): undo, decoupled decay, Adam update, perturb along -m'; returns sum ||m'||^2
// ---------------------------------------------------------------------------------------------------------
at::Tensor msam_adamw_step_cpu(at::TensorList params, at::TensorList grads_in, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, const at::Tensor& scale_old, const at::Tensor& scale_new,
                               const at::Tensor& step, c10::ArrayRef<double> lr, c10::ArrayRef<double> beta1,
                               c10::ArrayRef<double> beta2, c10::ArrayRef<double> eps,
                               c10::ArrayRef<double> weight_decay, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
  check_lists("msam_adamw_step", params, grads_in, exp_avgs, exp_avg_sqs, lr.size());
  const size_t n = params.size();
  TORCH_CHECK_VALUE(beta1.size() == n && beta2.size() == n && eps.size() == n && weight_decay.size() == n,
                    "msam_adamw_step: beta1, beta2, eps and weight_decay need one entry per tensor");
  if (read_scalar(found_inf, 0.0) != 0.0) return unchanged_norm(exp_avgs);
  const double t = read_scalar(step, 1.0);
  const auto in = pass_inputs(grads_in, scale_old, scale_new, grad_scale);
  const auto& grads = in.grads;
  const double so = in.scale_old, sn = in.scale_new, gs = in.grad_scale;
  const bool has_gs = in.has_grad_scale;
  const double total = for_chunks(params, [&](const Work& w, auto p_tag, auto t_tag) {
    using P = decltype(p_tag);
    using T = decltype(t_tag);
    const int64_t j = w.tensor;
    const msam_cpu::AdamCoef coef{beta1[j], beta2[j], 1.0 - beta1[j], 1.0 - beta2[j],
                                  1.0 - lr[j] * weight_decay[j], lr[j] / (1.0 - std::pow(beta1[j], t)),
                                  std::sqrt(1.0 - std::pow(beta2[j], t)), eps[j], so, sn, gs};
    P* p = params[j].data_ptr<P>();
    const P* g = grads[j].data_ptr<P>();
    T* m = exp_avgs[j].data_ptr<T>();
    T* q = exp_avg_sqs[j].data_ptr<T>();
    double out = 0.0;
    with_bool(has_gs, [&](auto GS) {
      out = ETFKERN_MSAM_PICK(adamw_chunk<P, T, decltype(GS)::value>)(p, g, m, q, w.begin, w.end, coef);
    });
    return out;
  });
  return out_norm(exp_avgs, total);
}

}  // namespace

TORCH_LIBRARY_IMPL(etfkern, CPU, m) {
  m.impl("msam_sq_norm_native", &msam_sq_norm_cpu);
  m.impl("msam_sgd_step_native", &msam_sgd_step_cpu);
  m.impl("msam_adamw_step_native", &msam_adamw_step_cpu);
}

}  // namespace etfkern
