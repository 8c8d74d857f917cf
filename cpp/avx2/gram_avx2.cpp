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
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t o = 0; o < strip; o += kGramStrip) {
    const __m256 b0 = _mm256_loadu_ps(b + o), b1 = _mm256_loadu_ps(b + o + 8);
#pragma GCC unroll 6  // unrolled before register allocation: acc stays in 12 registers
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_set1_ps(a[r][o]);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    _mm256_storeu_ps(cr, _mm256_add_ps(_mm256_loadu_ps(cr), acc[r][0]));
    _mm256_storeu_ps(cr + 8, _mm256_add_ps(_mm256_loadu_ps(cr + 8), acc[r][1]));
  }
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
