// Reference (scalar) matmul kernels on layout panel4_k32 — the oracle every SIMD variant is tested
// against. Per output (m, n) and group g, in this exact order of float operations:
//   integer mode: dot_g = Σ_k code'·xq (int32, exact);  acc += sw·float(dot_g) − swz·float(suma_g)
//                 (per-block activations: that difference times sg[m][g]);  y = acc · sa[m] (+ bias)
//   float mode  : dot_g = Σ_k d(code)·xf (float, k ascending);  acc += sw·dot_g − swz·sumx_g
//                 y = acc (+ bias)
// The SIMD kernels compute the same integer dots exactly but scale and sum them in their own
// float order (lane-wise per group), so they match this reference to float rounding.
#include "common/format.h"
#include "common/matmul_epilogue.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {

namespace {
// The stored code of (panel-row r, k) as the integer the kernels multiply: u for int4/nf4
// (unsigned nibble), w' for int8.
inline int code_at(const PackedLinear& w, int64_t p, int r, int64_t k) {
  const uint8_t* panel = w.panel(p);
  int64_t b = k / kBlockK, j = k % kBlockK;
  if (w.h->bits == 4) {
    const W4Block* blk = reinterpret_cast<const W4Block*>(panel) + b;
    uint8_t v = blk->half[r / 2][j];
    return (r & 1) ? (v >> 4) : (v & 15);
  }
  const W8Block* blk = reinterpret_cast<const W8Block*>(panel) + b;
  return blk->row[r][j];
}
}  // namespace

void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  for (int64_t p = p0; p < p1; ++p)
    for (int r = 0; r < kPanelRows; ++r) {
      const int64_t n = p * kPanelRows + r;
      if (n >= w.h->N) break;
      for (int64_t m = m0; m < m1; ++m) {
        const int8_t* xq = a.x.xq + m * a.x.ld;
        float acc = 0.f;
        for (int64_t g = 0, k = 0; g < G; ++g) {
          int32_t dot = 0;
          for (int64_t e = w.group_end(g); k < e; ++k) dot += code_at(w, p, r, k) * int32_t(xq[k]);
          const int64_t s = (p * G + g) * kPanelRows + r;
          float t1 = w.sw[s] * float(dot), t2 = w.swz_at(s) * float(a.x.suma[m * G + g]);
          acc = acc + (a.x.sg ? (t1 - t2) * a.x.sg[m * G + g] : t1 - t2);
        }
        store_matmul_out(a, m, n, acc, a.x.sa[m]);
      }
    }
}

void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const bool nf4 = w.h->scheme == int(Scheme::nf4);
  for (int64_t p = p0; p < p1; ++p)
    for (int r = 0; r < kPanelRows; ++r) {
      const int64_t n = p * kPanelRows + r;
      if (n >= w.h->N) break;
      for (int64_t m = m0; m < m1; ++m) {
        const float* xf = a.x.xf + m * a.x.ld;
        float acc = 0.f;
        for (int64_t g = 0, k = 0; g < G; ++g) {
          float dot = 0.f;
          for (int64_t e = w.group_end(g); k < e; ++k) {
            int c = code_at(w, p, r, k);
            dot = dot + (nf4 ? kNF4Values[c] : float(c)) * xf[k];
          }
          const int64_t s = (p * G + g) * kPanelRows + r;
          acc = acc + (w.sw[s] * dot - w.swz_at(s) * a.x.sumx[m * G + g]);
        }
        store_matmul_out(a, m, n, acc, 1.0f);
      }
    }
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
