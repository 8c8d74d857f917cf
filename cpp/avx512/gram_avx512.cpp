// AVX-512 Gram tile (kernels.h, GramTileFn): 12 rows × 32 columns of h (two 16-column strips) in
// 24 zmm accumulators. Per row t of the packed chunk: two strip loads, twelve broadcasts of the
// row values (folded into the FMAs as memory operands), 24 FMAs.
#include "avx512/intrin.h"
#include "common/kernels.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {

void gram_tile(const float* panel, int64_t kc, int64_t i0, int64_t j0, float* c, int64_t ldc) {
  constexpr int MR = 12;
  const int64_t strip = kc * kGramStrip;
  const float* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = panel + ((i0 + r) / kGramStrip) * strip + (i0 + r) % kGramStrip;
  const float* b = panel + (j0 / kGramStrip) * strip;
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t o = 0; o < strip; o += kGramStrip) {
    const __m512 b0 = _mm512_loadu_ps(b + o), b1 = _mm512_loadu_ps(b + strip + o);
#pragma GCC unroll 12  // unrolled before register allocation: acc stays in 24 registers
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r][o]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    _mm512_storeu_ps(cr, _mm512_add_ps(_mm512_loadu_ps(cr), acc[r][0]));
    _mm512_storeu_ps(cr + 16, _mm512_add_ps(_mm512_loadu_ps(cr + 16), acc[r][1]));
  }
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
