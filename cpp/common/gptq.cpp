// GPTQ's column loop (see python/lowbit/algorithms/gptq.py): round one weight column after the
// other onto its group grid and push each column's rounding error onto the block's later columns.
// It is a chain of small steps (a few hundred per lazy block), too short for a framework call
// each, so it runs here. The rounding is lowbit's own (params_given + code_of + value_of, as in
// quantize/dequantize). Rows of W are independent, so threads split them.
#include <atomic>
#include <cmath>
#include <string>

#include "common/dispatch.h"
#include "common/format.h"

namespace lowbit {

static void require_gptq(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

void gptq_columns(const GptqColumnsCall& c) {
  require_gptq(c.B > 0 && c.N > 0, "gptq_columns: the block is empty");
  require_gptq(0 <= c.begin && c.begin < c.end && c.end <= c.B,
               "gptq_columns: columns [" + std::to_string(c.begin) + ", " + std::to_string(c.end) +
                   ") are not inside the block of " + std::to_string(c.B));
  require_gptq(c.w && c.q && c.err && c.u && c.scales, "gptq_columns: null pointer");
  require_gptq(c.fmt.bits == 2 || c.fmt.bits == 3 || c.fmt.bits == 4 || c.fmt.bits == 8,
               "gptq_columns: bits must be 2, 3, 4 or 8");
  require_gptq(c.fmt.scheme != Scheme::nf4 || c.fmt.bits == 4, "gptq_columns: nf4 has 4-bit codes");
  const bool asym = c.fmt.scheme == Scheme::asymmetric;
  require_gptq(!asym || c.zeros, "gptq_columns: an asymmetric format needs zeros");
  const int qmax = (1 << c.fmt.bits) - 1;
  const int64_t n_params = (c.param_stride ? c.end - c.begin : 1) * c.N;
  for (int64_t i = 0; i < n_params; ++i) {
    if (!(std::isfinite(c.scales[i]) && c.scales[i] >= 0.f))
      require_gptq(false, "gptq_columns: scales must be finite and >= 0");
    if (asym && c.zeros[i] > qmax) require_gptq(false, "gptq_columns: zeros out of range");
  }
  for (int64_t i = c.begin; i < c.end; ++i)
    require_gptq(std::isfinite(c.u[i * c.B + i]) && c.u[i * c.B + i] > 0.f,
                 "gptq_columns: the Cholesky factor's diagonal must be positive");

  std::atomic<bool> non_finite{false};
  parallel_for(c.N, 256, [&](int64_t n0, int64_t n1) {
    bool bad = false;
    for (int64_t i = c.begin; i < c.end; ++i) {
      const int64_t p = (c.param_stride ? i - c.begin : 0) * c.N;
      float* wi = c.w + i * c.N;
      float* qi = c.q + i * c.N;
      float* ei = c.err + i * c.N;
      const float d = c.u[i * c.B + i];
      for (int64_t n = n0; n < n1; ++n) {
        const GroupParams gp = params_given(c.fmt, c.scales[p + n], c.zeros ? c.zeros[p + n] : 0);
        const float x = wi[n];
        bad |= !std::isfinite(x);
        const float v = value_of(c.fmt, code_of(c.fmt, gp, x), gp);
        qi[n] = v;
        ei[n] = (x - v) / d;
      }
      for (int64_t j = i + 1; j < c.B; ++j) {  // rank-1 update of the block's later columns
        const float uij = c.u[i * c.B + j];
        float* wj = c.w + j * c.N;
        for (int64_t n = n0; n < n1; ++n) wj[n] -= uij * ei[n];
      }
    }
    if (bad) non_finite = true;
  });
  require_gptq(!non_finite.load(),
               "gptq_columns: the weights became NaN or Inf (an ill-conditioned Hessian? raise percdamp)");
}

}  // namespace lowbit
