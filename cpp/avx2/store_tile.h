// What the panel kernels share (AVX2 and AVX-512; SSE instructions only): one row of X's outputs
// for one panel (4 rows of W) in a 128-bit register, and a group's four s·z.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "common/matmul_epilogue.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

// s·z of one group's 4 rows from their int8 z (layout zq) and scales s: the float products
// PackedLinear::swz_at forms
inline __m128 group_zero_scales(const int8_t* z4, __m128 s) {
  int32_t z;
  std::memcpy(&z, z4, 4);
  return _mm_mul_ps(s, _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(z))));
}

// s·z of group g of panel p (one constant z where zq is not stored)
inline __m128 group_zero_scales(const PackedLinear& w, int64_t p, int64_t g, __m128 s) {
  const int64_t i = (p * w.h->G + g) * kPanelRows;
  return w.zq ? group_zero_scales(w.zq + i, s) : _mm_mul_ps(s, _mm_set1_ps(w.h->zero));
}

// acc = [y_r0..y_r3] of row m of X against panel p, before row_scale (and bias). A whole float32
// panel is one vector store (a scalar store per output was ~7% of a small-K decode in L2/L3).
inline void store_tile(const MatmulArgs& a, int64_t m, int64_t p, __m128 acc, float row_scale) {
  const int64_t n0 = p * kPanelRows, N = a.w.h->N;
  if (a.y_dtype == DType::f32 && n0 + kPanelRows <= N) {  // the common case, rounded as store_matmul_out
    __m128 y = _mm_mul_ps(acc, _mm_set1_ps(row_scale));
    if (a.bias) y = _mm_add_ps(y, _mm_loadu_ps(a.bias + n0));
    _mm_storeu_ps(static_cast<float*>(a.y) + m * N + n0, y);
    return;
  }
  alignas(16) float out[4];
  _mm_store_ps(out, acc);
  for (int r = 0; r < kPanelRows; ++r) {
    const int64_t n = n0 + r;
    if (n < N) store_matmul_out(a, m, n, out[r], row_scale);
  }
}

}  // namespace
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
