// GPTQ's column loop (see python/lowbit/algorithms/gptq.py): round one weight column after the
// other onto its group grid and push each column's rounding error onto the block's later columns.
// It is a chain of small steps (a few hundred per lazy block), too short for a framework call
// each, so it runs here. The rounding is lowbit's own (params_given + code_of + value_of, as in
// quantize/dequantize). Rows of W are independent, so threads split them.
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "common/format.h"

namespace lowbit {

static void require_gptq(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// One column's rounding for n in [n0, n1), by lowbit's uniform rule as code_of / value_of apply
// it: q = (clamp(rint(x·inv) + zero) − zero)·scale and err = (x − q)/d. rint is adding and
// subtracting 1.5·2^23 (ties to even, exact for |v| < 2^22; a larger v lands outside the code range
// and is clamped either way), so every clone vectorizes it with the same result. Returns whether
// some x was NaN or Inf (its err is then NaN or Inf).
LOWBIT_ROW_CLONES static bool round_uniform(const float* x, const float* scale, const float* inv,
                                            const float* zero, float qmin, float qmax, float d,
                                            int64_t n0, int64_t n1, float* q, float* err) {
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23
  uint32_t exp_all_ones = 0;
  for (int64_t n = n0; n < n1; ++n) {
    float c = ((x[n] * inv[n] + kRound) - kRound) + zero[n];
    c = c < qmin ? qmin : c;
    c = c > qmax ? qmax : c;
    const float v = (c - zero[n]) * scale[n];
    const float e = (x[n] - v) / d;
    q[n] = v;
    err[n] = e;
    uint32_t bits;
    std::memcpy(&bits, &e, 4);
    exp_all_ones |= uint32_t((bits & 0x7f800000u) == 0x7f800000u);
  }
  return exp_all_ones != 0;
}

// w[n] −= u·e[n] for n in [n0, n1) (a multiply and a subtract: -ffp-contract=off keeps every clone
// from fusing them, so all give the same bits).
LOWBIT_ROW_CLONES static void subtract_scaled(float* w, float u, const float* e, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) w[n] -= u * e[n];
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
  const int zero_max = (1 << c.fmt.bits) - 1;
  const int64_t n_params = (c.param_stride ? c.end - c.begin : 1) * c.N;
  for (int64_t i = 0; i < n_params; ++i) {
    if (!(std::isfinite(c.scales[i]) && c.scales[i] >= 0.f))
      require_gptq(false, "gptq_columns: scales must be finite and >= 0");
    if (asym && c.zeros[i] > zero_max) require_gptq(false, "gptq_columns: zeros out of range");
  }
  for (int64_t i = c.begin; i < c.end; ++i)
    require_gptq(std::isfinite(c.u[i * c.B + i]) && c.u[i * c.B + i] > 0.f,
                 "gptq_columns: the Cholesky factor's diagonal must be positive");

  // uniform formats: the per-column parameters once as arrays (scale, 1/scale, zero), so the
  // rounding loop below has no division and vectorizes
  const bool uniform = c.fmt.scheme != Scheme::nf4;
  std::vector<float> inv, zero;
  if (uniform) {
    inv.resize(size_t(n_params));
    zero.resize(size_t(n_params));
    for (int64_t i = 0; i < n_params; ++i) {
      const GroupParams gp = params_given(c.fmt, c.scales[i], c.zeros ? c.zeros[i] : 0);
      inv[size_t(i)] = gp.inv_scale;
      zero[size_t(i)] = gp.zero;
    }
  }
  const float qmin = qmin_of(c.fmt), qmax = qmax_of(c.fmt);
  std::atomic<bool> non_finite{false};
  parallel_for(c.N, 256, [&](int64_t n0, int64_t n1) {
    bool bad = false;
    for (int64_t i = c.begin; i < c.end; ++i) {
      const int64_t p = (c.param_stride ? i - c.begin : 0) * c.N;
      float* wi = c.w + i * c.N;
      float* qi = c.q + i * c.N;
      float* ei = c.err + i * c.N;
      const float d = c.u[i * c.B + i];
      if (uniform) {
        bad |= round_uniform(wi, c.scales + p, inv.data() + p, zero.data() + p, qmin, qmax, d, n0, n1, qi, ei);
      } else {
        for (int64_t n = n0; n < n1; ++n) {
          const GroupParams gp = params_given(c.fmt, c.scales[p + n], 0);
          const float x = wi[n];
          bad |= !std::isfinite(x);
          const float v = value_of(c.fmt, code_of(c.fmt, gp, x), gp);
          qi[n] = v;
          ei[n] = (x - v) / d;
        }
      }
      for (int64_t j = i + 1; j < c.B; ++j)  // rank-1 update of the block's later columns
        subtract_scaled(c.w + j * c.N, c.u[i * c.B + j], ei, n0, n1);
    }
    if (bad) non_finite = true;
  });
  require_gptq(!non_finite.load(),
               "gptq_columns: the weights became NaN or Inf (an ill-conditioned Hessian? raise percdamp)");
}

}  // namespace lowbit
