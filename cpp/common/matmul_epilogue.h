// Steps every matmul kernel shares, in one place so all variants round the same way.
#pragma once
#include <vector>

#include "common/convert.h"
#include "common/kernels.h"

namespace lowbit {

// y = acc * row_scale (+ bias), stored in the output dtype.
inline void store_matmul_out(const MatmulArgs& a, int64_t m, int64_t n, float acc, float row_scale) {
  float y = acc * row_scale;
  if (a.bias) y = y + a.bias[n];
  store_from_f32(a.y, a.y_dtype, m * a.w.h->N + n, y);
}

// The integer panel kernels' zero-point operand for rows [m0, m1): −suma[m][g] (times sg[m][g]
// for per-block activations) times the weight's zero_act(), each repeated 4 times to line up with
// the panel's [G][4] zero-point scales (s·z, or s where z is one constant; see PackedLinear).
inline std::vector<float> neg_suma(const MatmulArgs& a, int64_t m0, int64_t m1) {
  const int64_t G = a.w.h->G;
  const float zx = a.w.zero_act();
  std::vector<float> ns(size_t((m1 - m0) * G * 4));
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float v = -float(a.x.suma[m * G + g]) * (a.x.sg ? a.x.sg[m * G + g] : 1.f) * zx;
      for (int r = 0; r < 4; ++r) ns[size_t(((m - m0) * G + g) * 4 + r)] = v;
    }
  return ns;
}

}  // namespace lowbit
