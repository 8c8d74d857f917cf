// Per-group clip-ratio search (dispatch.h, ClipSearchCall): one pass over a group's values per
// candidate ratio, with the group in L1, instead of a quantize and a dequantize call per ratio
// from Python. The round trip is lowbit's rule — params_from_range, rint(w·inv) + zero clamped to
// the code range, (q − zero)·scale — so the chosen parameters quantize exactly as lowbit.quantize
// with them does.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "common/dispatch.h"
#include "common/format.h"

namespace lowbit {

static void require_clip(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// Σ c_k (x_k − ŵ_k)² over one group for one parameter set, as 8 interleaved partial sums (a fixed
// order, so every clone returns the same value). Adding and subtracting 1.5·2^23 rounds a float of
// magnitude < 2^22 to the nearest integer, ties to even, as rint does; larger magnitudes are
// clamped to the code range either way.
template <bool WEIGHTED>
LOWBIT_ROW_CLONES static float round_trip_error(const float* x, const float* c, int64_t n, float inv,
                                                float scale, float zero, float qmin, float qmax) {
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto term = [&](int64_t k) {
    float q = ((x[k] * inv + kRound) - kRound) + zero;
    q = q < qmin ? qmin : q;
    q = q > qmax ? qmax : q;
    const float d = x[k] - (q - zero) * scale;
    return WEIGHTED ? c[k] * (d * d) : d * d;
  };
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) p[j] = p[j] + term(k + j);
  for (int j = 0; k < n; ++k, ++j) p[j] = p[j] + term(k);
  return ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
}

void clip_search(const ClipSearchCall& c) {
  const QuantFormat& f = c.fmt;
  require_clip(c.rows > 0 && c.K > 0, "clip_search: w is empty");
  require_clip(c.n_ratios > 0, "clip_search: no clip ratios given");
  require_clip(f.scheme != Scheme::nf4, "clip_search: uniform formats only (not nf4)");
  require_clip(f.bits >= 2 && f.bits <= 8, "clip_search: bits must be 2..8");
  require_clip(f.group_size > 0, "clip_search: group_size must be positive");
  require_clip(f.scheme != Scheme::asymmetric || c.zeros, "clip_search: an asymmetric format needs zeros");
  for (int64_t i = 0; i < c.n_ratios; ++i)
    require_clip(c.ratios[i] > 0.f && c.ratios[i] <= 1.f, "clip_search: clip ratios must be in (0, 1]");
  if (c.col_weight)
    for (int64_t k = 0; k < c.K; ++k)
      require_clip(std::isfinite(c.col_weight[k]) && c.col_weight[k] >= 0.f,
                   "clip_search: column weights must be finite and >= 0");
  const int64_t G = num_groups(c.K, f.group_size);
  const float qmin = qmin_of(f), qmax = qmax_of(f);
  std::atomic<int64_t> bad{-1};
  parallel_for(c.rows, std::max<int64_t>(1, 4096 / c.K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = c.w + r * c.K;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * f.group_size, n = std::min(c.K, k0 + f.group_size) - k0;
        float lo = INFINITY, hi = -INFINITY, amax = 0.f;
        bool finite = true;
        for (int64_t k = k0; k < k0 + n; ++k) {
          finite = finite && std::isfinite(row[k]);
          lo = std::min(lo, row[k]);
          hi = std::max(hi, row[k]);
          amax = std::max(amax, std::fabs(row[k]));
        }
        if (!finite) { bad = r; break; }
        float best = INFINITY;
        for (int64_t i = 0; i < c.n_ratios; ++i) {
          QuantFormat fc = f;
          fc.clip_ratio = c.ratios[i];
          const GroupParams p = params_from_range(fc, lo, hi, amax);
          const float e = c.col_weight
              ? round_trip_error<true>(row + k0, c.col_weight + k0, n, p.inv_scale, p.scale, p.zero, qmin, qmax)
              : round_trip_error<false>(row + k0, nullptr, n, p.inv_scale, p.scale, p.zero, qmin, qmax);
          if (i == 0 || e < best) {
            best = e;
            c.scales[r * G + g] = p.scale;
            if (c.zeros) c.zeros[r * G + g] = uint8_t(p.zero);
            c.best_ratio[r * G + g] = c.ratios[i];
          }
        }
      }
    }
  });
  require_clip(bad.load() < 0, "clip_search: w contains NaN or Inf (row " + std::to_string(bad.load()) + ")");
}

}  // namespace lowbit
