// The last step every matmul kernel shares, in one place so all variants round the same way:
// y = acc * row_scale (+ bias), stored in the output dtype.
#pragma once
#include "common/convert.h"
#include "common/kernels.h"

namespace lowbit {

inline void store_matmul_out(const MatmulArgs& a, int64_t m, int64_t n, float acc, float row_scale) {
  float y = acc * row_scale;
  if (a.bias) y = y + a.bias[n];
  store_from_f32(a.y, a.y_dtype, m * a.w.h->N + n, y);
}

}  // namespace lowbit
