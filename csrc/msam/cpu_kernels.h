// Element loops of the MSAM CPU kernels (csrc/msam/cpu.cpp). Included twice by cpu.cpp: once
// compiled for AVX2 (namespace avx2) and once for the baseline ISA (namespace base); the .cpp picks one at
// run time. No FMA contraction in either (only IEEE add/mul/div/sqrt), so float64 results stay bitwise equal
// to the plain-torch reference. Each function handles [begin, end) of one tensor and returns the sum of
// squares of the new momentum / first moment, accumulated in 16 double lanes (fixed order: deterministic).
// P is the stored parameter type, T the state / math type (float, or double for float64 parameters).
#ifndef ETFKERN_MSAM_NS
#error "define ETFKERN_MSAM_NS before including cpu_kernels.h"
#endif

namespace etfkern {
namespace msam_cpu {

#ifndef ETFKERN_MSAM_ADAM_COEF
#define ETFKERN_MSAM_ADAM_COEF
struct AdamCoef {  // per-tensor AdamW coefficients, computed in double on the host
  double b1, b2, c1, c2, decay, step_size, bc2_sqrt, eps, so, sn, gs;
};
#endif

namespace ETFKERN_MSAM_NS {

template <typename P, typename T>
inline T load(const P* x, int64_t i) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(x[i].x) << 16;  // exact widening, vectorises
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return static_cast<T>(x[i]);
  }
}

template <typename P, typename T>
inline void store(P* x, int64_t i, T value) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {  // round to nearest even, as c10::BFloat16(float)
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    const uint16_t rounded = static_cast<uint16_t>((bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16);
    x[i].x = value != value ? static_cast<uint16_t>(0x7FC0) : rounded;
  } else {
    x[i] = static_cast<P>(value);
  }
}

template <typename F>
inline double lanes_sum(int64_t begin, int64_t end, F&& f) {
  // f(i) does element i's writes and returns its new momentum value; blocks of 16 elements are computed into
  // a small array first (a plain elementwise loop the compiler vectorises), then squared into 16 double lanes
  constexpr int kLanes = 16;
  using V = decltype(f(begin));
  double acc[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    V tmp[kLanes];
    for (int j = 0; j < kLanes; ++j) tmp[j] = f(i + j);
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(tmp[j]) * static_cast<double>(tmp[j]);
  }
  double tail = 0.0;
  for (; i < end; ++i) {
    const double x = static_cast<double>(f(i));
    tail += x * x;
  }
  for (int j = 0; j < kLanes; ++j) tail += acc[j];
  return tail;
}

// || mu v + (c g + wd (p + s v)) ||^2 over the range
template <typename P, typename T, bool GS, bool WD>
double norm_chunk(const P* p, const P* g, const T* v, int64_t begin, int64_t end, T mu, T c, T wd, T s, T gs) {
  return lanes_sum(begin, end, [&](int64_t i) {
    T gi = load<P, T>(g, i);
    if constexpr (GS) gi = gi / gs;
    T d = c * gi;
    if constexpr (WD) d = d + wd * (load<P, T>(p, i) + s * v[i]);
    return mu * v[i] + d;
  });
}

// undo, SGD-momentum update, perturb; returns ||v'||^2 over the range
template <typename P, typename T, bool GS, bool WD, bool NES>
double sgd_chunk(P* p, const P* g, T* v, int64_t begin, int64_t end, T lr, T mu, T wd, T so, T sn, T gs) {
  return lanes_sum(begin, end, [&](int64_t i) {
    T gi = load<P, T>(g, i);
    if constexpr (GS) gi = gi / gs;
    T x = load<P, T>(p, i) + so * v[i];
    T d = gi;
    if constexpr (WD) d = gi + wd * x;
    const T vn = mu * v[i] + d;
    T u = vn;
    if constexpr (NES) u = d + mu * vn;
    x = x - lr * u;
    store<P, T>(p, i, x - sn * vn);
    v[i] = vn;
    return vn;
  });
}

// undo, decoupled decay, Adam update, perturb along -m'; returns ||m'||^2 over the range. One vectorised sweep
// (std::sqrt vectorises: the extension is built with -fno-math-errno).
template <typename P, typename T, bool GS>
double adamw_chunk(P* p, const P* g, T* m, T* q, int64_t begin, int64_t end, const AdamCoef& k) {
  const T b1 = static_cast<T>(k.b1), b2 = static_cast<T>(k.b2), c1 = static_cast<T>(k.c1);
  const T c2 = static_cast<T>(k.c2), decay = static_cast<T>(k.decay), step_size = static_cast<T>(k.step_size);
  const T bc2_sqrt = static_cast<T>(k.bc2_sqrt), eps = static_cast<T>(k.eps), so = static_cast<T>(k.so);
  const T sn = static_cast<T>(k.sn), gs = static_cast<T>(k.gs);
  return lanes_sum(begin, end, [&](int64_t i) {
    T gi = load<P, T>(g, i);
    if constexpr (GS) gi = gi / gs;
    const T mi = m[i];
    const T x = (load<P, T>(p, i) + so * mi) * decay;
    const T mn = b1 * mi + c1 * gi;
    const T qn = b2 * q[i] + c2 * (gi * gi);
    m[i] = mn;
    q[i] = qn;
    const T denom = std::sqrt(qn) / bc2_sqrt + eps;
    store<P, T>(p, i, (x - step_size * (mn / denom)) - sn * mn);
    return mn;
  });
}

}  // namespace ETFKERN_MSAM_NS
}  // namespace msam_cpu
}  // namespace etfkern
