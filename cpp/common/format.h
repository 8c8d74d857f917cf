// Per-group parameter rules shared by every variant, so the scale/zero of a group is computed by
// one piece of scalar code everywhere (SIMD only finds the group's min/max and rounds the codes).
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <type_traits>

#include "common/kernels.h"

// The scalar rules below are shared with the CUDA kernels (cuda/quantize.cu): under nvcc they are
// __host__ __device__, for plain C++ LOWBIT_HD is empty and nothing changes.
#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__
#else
#define LOWBIT_HD
#endif

namespace lowbit {

struct GroupParams {
  float scale;      // stored
  float inv_scale;  // 1/scale, or 0 when scale is 0 (then every code is the zero point)
  float zero;       // integer-valued zero point (asymmetric), else 0
};

LOWBIT_HD inline float qmin_of(const QuantFormat& f) {
  return f.scheme == Scheme::symmetric ? -float(1 << (f.bits - 1)) : 0.f;
}
LOWBIT_HD inline float qmax_of(const QuantFormat& f) {
  return f.scheme == Scheme::symmetric ? float((1 << (f.bits - 1)) - 1)
                                       : float((1 << f.bits) - 1);
}

// Scales below FLT_MIN would have an infinite inverse: such a group quantizes to its zero point.
LOWBIT_HD inline float inverse_scale(float scale) { return scale >= FLT_MIN ? 1.0f / scale : 0.0f; }

// lo/hi: the group's min and max (asymmetric) — or amax: max |w| (symmetric, nf4).
LOWBIT_HD inline GroupParams params_from_range(const QuantFormat& f, float lo, float hi, float amax) {
  GroupParams p{0.f, 0.f, 0.f};
  if (f.scheme == Scheme::asymmetric) {
    lo = std::min(lo, 0.f) * f.clip_ratio;  // the range always holds 0, so 0 is exact
    hi = std::max(hi, 0.f) * f.clip_ratio;
    p.scale = (hi - lo) / qmax_of(f);
    // hi - lo overflows float32 when the range is wider than FLT_MAX (finite w near +-3e38):
    // divide before subtracting then, so the scale stays finite.
    if (p.scale > FLT_MAX) p.scale = hi / qmax_of(f) - lo / qmax_of(f);
  } else {
    amax = amax * f.clip_ratio;
    p.scale = f.scheme == Scheme::nf4 ? amax : amax / qmax_of(f);
  }
  if (!(p.scale >= FLT_MIN)) p.scale = 0.f;
  p.inv_scale = inverse_scale(p.scale);
  if (f.scheme == Scheme::asymmetric)
    p.zero = std::min(std::max(std::nearbyint(-lo * p.inv_scale), 0.f), qmax_of(f));
  return p;
}

LOWBIT_HD inline GroupParams params_given(const QuantFormat& f, float scale, uint8_t zero) {
  return {scale, inverse_scale(scale), f.scheme == Scheme::asymmetric ? float(zero) : 0.f};
}

// The scalar rounding rule (SIMD variants reproduce it bit for bit), in two halves so device code
// can pass its own copy of the midpoints. v = x * inv_scale.
LOWBIT_HD inline uint8_t nf4_code(float v, const float* midpoints) {
  int q = 0;
  for (int i = 0; i < 15; ++i) q += v > midpoints[i];
  return uint8_t(q);
}
LOWBIT_HD inline uint8_t uniform_code(const QuantFormat& f, const GroupParams& p, float v) {
  float q = std::nearbyint(v) + p.zero;
  q = std::min(std::max(q, qmin_of(f)), qmax_of(f));
  return uint8_t(int8_t(int(q)));  // symmetric codes: two's complement
}
inline uint8_t code_of(const QuantFormat& f, const GroupParams& p, float x) {
  float v = x * p.inv_scale;
  return f.scheme == Scheme::nf4 ? nf4_code(v, kNF4Midpoints) : uniform_code(f, p, v);
}
// The value a code stands for (dequantize's rule); q as code_of returns it (symmetric: int8 bits).
inline float value_of(const QuantFormat& f, uint8_t q, const GroupParams& p) {
  if (f.scheme == Scheme::nf4) return kNF4Values[q] * p.scale;
  if (f.scheme == Scheme::symmetric) return float(int8_t(q)) * p.scale;
  return float(int(q) - int(p.zero)) * p.scale;
}

// Calls fn(integral_constant<DType>, integral_constant<Scheme>) for the run-time pair, so a
// variant writes its kernel once as a template and instantiates every combination here.
template <typename Fn>
inline auto visit_dtype_scheme(DType t, Scheme s, Fn&& fn) {
  auto with_scheme = [&](auto T) {
    switch (s) {
      case Scheme::asymmetric: return fn(T, std::integral_constant<Scheme, Scheme::asymmetric>{});
      case Scheme::symmetric: return fn(T, std::integral_constant<Scheme, Scheme::symmetric>{});
      default: return fn(T, std::integral_constant<Scheme, Scheme::nf4>{});
    }
  };
  switch (t) {
    case DType::f32: return with_scheme(std::integral_constant<DType, DType::f32>{});
    case DType::f16: return with_scheme(std::integral_constant<DType, DType::f16>{});
    default: return with_scheme(std::integral_constant<DType, DType::bf16>{});
  }
}

}  // namespace lowbit
