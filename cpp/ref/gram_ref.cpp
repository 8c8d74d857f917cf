// Reference Gram tile (kernels.h, GramTileFn): plain loops over a 4 × 16 tile, for checking the
// vector tiles and for CPUs without AVX2.
#include "common/kernels.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {

void gram_tile(const float* panel, int64_t kc, int64_t i0, int64_t j0, float* c, int64_t ldc) {
  constexpr int MR = 4, NR = 16;
  float acc[MR][NR] = {};
  const float* b = panel + (j0 / kGramStrip) * kc * kGramStrip;
  for (int64_t t = 0; t < kc; ++t)
    for (int r = 0; r < MR; ++r) {
      const int64_t i = i0 + r;
      const float a = panel[(i / kGramStrip) * kc * kGramStrip + t * kGramStrip + i % kGramStrip];
      for (int q = 0; q < NR; ++q) acc[r][q] += a * b[t * kGramStrip + q];
    }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NR; ++q) c[r * ldc + q] += acc[r][q];
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
