// Gram update h += xᵀx on and above the diagonal (dispatch.h, GramCall): the calibration Hessian
// Σ xᵀx of GPTQ, after the model's own forward the largest cost of calibrating a model.
//
// Only tiles on or right of the diagonal are computed (about half of a full xᵀx). Rows of x are
// taken kGramRows at a time and packed into strips of 16 columns (kernels.h): x has a row stride
// of K floats, so reading one of its columns down the rows would touch a cache line per row; a
// strip is one contiguous run that a tile kernel streams while its accumulators stay in registers.
// Each tile is added to h once per chunk; tiles crossing the edge of h go through a small buffer.
// Threads take pairs of tile columns (jt, JT−1−jt), which hold equal numbers of tiles.
#include <algorithm>
#include <string>
#include <vector>

#include "common/dispatch.h"

namespace lowbit {
namespace {

constexpr int64_t kGramRows = 256;   // x rows per packed chunk: a 16-column strip is 16 KiB
constexpr int64_t kGramBlockRows = 96;  // rows of h per block (their packed strips: 96 KiB)
constexpr int kMaxTile = 16 * 64;    // the largest mr × nr of any variant's tile kernel

void require_gram(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("gram_update: " + msg);
}

// panel[s][t][q] = x[t0 + t][16·s + q], zero past column K (the last strip is all zeros)
void pack_strips(const GramCall& c, int64_t t0, int64_t kc, int64_t strips, float* panel) {
  parallel_for(strips, 4, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t col0 = s * kGramStrip;
      const int64_t n = std::clamp<int64_t>(c.K - col0, 0, kGramStrip);
      float* d = panel + s * kc * kGramStrip;
      for (int64_t t = 0; t < kc; ++t, d += kGramStrip) {
        const float* src = c.x + (t0 + t) * c.ld_x + col0;
        std::copy(src, src + n, d);
        std::fill(d + n, d + kGramStrip, 0.f);
      }
    }
  });
}

}  // namespace

void gram_update(const GramCall& c) {
  require_gram(c.K > 0 && c.m >= 0, "x must be [m, K] with K > 0");
  if (c.m == 0) return;   // no rows (an empty x may have no data pointer)
  require_gram(c.x && c.h, "null pointer");
  require_gram(c.ld_x >= c.K && c.ld_h >= c.K, "row strides must be at least K");
  const GramKernel g = active().gram.tile ? active().gram : reference().gram;
  require_gram(g.mr > 0 && g.mr <= 16 && g.nr > 0 && g.nr % kGramStrip == 0 && g.mr * g.nr <= kMaxTile,
               "the tile kernel's shape is not supported");
  // one strip past the last (all zeros): a tile that crosses column K reads at most that far
  const int64_t strips = (c.K + kGramStrip - 1) / kGramStrip + 1;
  std::vector<float> panel(size_t(strips * std::min(c.m, kGramRows) * kGramStrip));
  const int64_t JT = (c.K + g.nr - 1) / g.nr;
  const int64_t rows_per_block = std::max<int64_t>(1, kGramBlockRows / g.mr) * g.mr;  // whole tiles
  for (int64_t t0 = 0; t0 < c.m; t0 += kGramRows) {
    const int64_t kc = std::min(kGramRows, c.m - t0);
    pack_strips(c, t0, kc, strips, panel.data());
    // the tiles of tile column jt in rows [r0, r1) on or above the diagonal, added to h
    auto tiles = [&](int64_t jt, int64_t r0, int64_t r1, float* edge) {
      const int64_t j0 = jt * g.nr, j1 = std::min(j0 + g.nr, c.K);
      for (int64_t i0 = r0; i0 < std::min(r1, j1); i0 += g.mr) {
        const int64_t i1 = std::min(i0 + g.mr, c.K);
        if (i1 - i0 == g.mr && j1 - j0 == g.nr) {
          g.tile(panel.data(), kc, i0, j0, c.h + i0 * c.ld_h + j0, c.ld_h);
          continue;
        }
        std::fill(edge, edge + g.mr * g.nr, 0.f);
        g.tile(panel.data(), kc, i0, j0, edge, g.nr);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j) c.h[i * c.ld_h + j] += edge[(i - i0) * g.nr + (j - j0)];
      }
    };
    parallel_for((JT + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
      float edge[kMaxTile];
      std::vector<int64_t> cols;
      for (int64_t p = p0; p < p1; ++p) {
        cols.push_back(p);
        if (JT - 1 - p != p) cols.push_back(JT - 1 - p);
      }
      // row blocks outermost: a block's strips (read a few floats per cache line by the
      // broadcasts) stay in L2 across this thread's columns, whose strips stream once per block
      for (int64_t r0 = 0; r0 < c.K; r0 += rows_per_block)
        for (int64_t jt : cols) tiles(jt, r0, r0 + rows_per_block, edge);
    });
  }
}

}  // namespace lowbit
