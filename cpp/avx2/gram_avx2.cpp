// AVX2 Gram tile (kernels.h, GramTileFn): 6 rows × 16 columns of h in 12 ymm accumulators. Per
// row t of the packed chunk: two loads of the column strip, six broadcasts of the row values,
// twelve FMAs (the 6 × 16 shape leaves room for the loads in 16 registers).
#include <immintrin.h>

#include "common/kernels.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {

void gram_tile(const float* panel, int64_t kc, int64_t i0, int64_t j0, float* c, int64_t ldc) {
  constexpr int MR = 6;
  const int64_t strip = kc * kGramStrip;
  const float* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = panel + ((i0 + r) / kGramStrip) * strip + (i0 + r) % kGramStrip;
  const float* b = panel + (j0 / kGramStrip) * strip;
  // twelve named accumulators: as an array GCC keeps them on the stack, storing every step
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t o = 0; o < strip; o += kGramStrip) {
    const __m256 b0 = _mm256_loadu_ps(b + o), b1 = _mm256_loadu_ps(b + o + 8);
    __m256 av = _mm256_broadcast_ss(a[0] + o);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a[1] + o);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a[2] + o);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a[3] + o);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a[4] + o);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a[5] + o);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    _mm256_storeu_ps(cr, _mm256_add_ps(_mm256_loadu_ps(cr), acc[r][0]));
    _mm256_storeu_ps(cr + 8, _mm256_add_ps(_mm256_loadu_ps(cr + 8), acc[r][1]));
  }
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
