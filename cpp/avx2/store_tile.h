// One row of X's outputs for one panel (4 rows of W) in a 128-bit register: the store the panel
// kernels share (AVX2 and AVX-512; SSE instructions only).
#pragma once
#include <immintrin.h>

#include "common/matmul_epilogue.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

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
