// AVX-512 VNNI integer matmul (W4A8 / W8A8) on layout panel4_k32 (see common/layout_panel4.h).
// One zmm load is one whole W4Block (4 rows × 32 k):
//   int4: v & 15 = [row0 k0..31 | row2 k0..31], v >> 4 & 15 = [row1 | row3], unsigned u in
//         [0, 15] — exactly vpdpbusd's u8 operand; the 32 int8 activations are broadcast to both
//         256-bit halves as the s8 operand. 2 vpdpbusd per block and activation row.
//   int8: each zmm holds 2 rows of signed w'; vpdpbusd wants u8 × s8, so feed |w'| (<= 128) and
//         x negated where w' < 0 (mask from vpmovb2m) — the AVX-512 form of the vpsignb trick.
// Per group the int32 lanes are reduced to [row0..row3] and scaled with the reference's exact
// float steps, so results are bit-exact with cpp/ref. Weight-only float activations reuse the
// AVX2 kernel (see table.cpp). MR = 4 activation rows share each decoded weight register.
// Compiled natively with AVX-512 flags, and as the avx512_emulated test variant through SIMDe.
#include "avx512/intrin.h"
#include "common/format.h"
#include "common/matmul_epilogue.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

// [Σ row0, Σ row1, Σ row2, Σ row3] from two accumulators whose 256-bit halves hold rows
// (a: row0 | row2, b: row1 | row3).
inline __m128i reduce_rows(__m512i a, __m512i b) {
  alignas(64) int32_t ta[16], tb[16];
  _mm512_store_si512(ta, a);
  _mm512_store_si512(tb, b);
  int32_t s[4] = {0, 0, 0, 0};
  for (int i = 0; i < 8; ++i) { s[0] += ta[i]; s[2] += ta[8 + i]; s[1] += tb[i]; s[3] += tb[8 + i]; }
  return _mm_setr_epi32(s[0], s[1], s[2], s[3]);
}

inline __m512i broadcast32(const int8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int MR, int BITS>
void int_tile(const MatmulArgs& a, int64_t m, int64_t p) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const uint8_t* panel = w.panel(p);
  const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  __m128 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < G; ++g) {
    __m512i d0[MR], d1[MR];  // int4: (row0|row2), (row1|row3); int8: (row0|row1), (row2|row3)
    for (int i = 0; i < MR; ++i) d0[i] = d1[i] = _mm512_setzero_si512();
    for (const int64_t e = w.group_end(g); k < e; k += kBlockK) {
      const int64_t b = k / kBlockK;
      if constexpr (BITS == 4) {
        __m512i v = _mm512_loadu_si512(panel + b * sizeof(W4Block));
        __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int i = 0; i < MR; ++i) {
          __m512i xv = broadcast32(a.x.xq + (m + i) * a.x.ld + k);
          d0[i] = _mm512_dpbusd_epi32(d0[i], lo, xv);
          d1[i] = _mm512_dpbusd_epi32(d1[i], hi, xv);
        }
      } else {
        const uint8_t* src = panel + b * sizeof(W8Block);
        __m512i v0 = _mm512_loadu_si512(src), v1 = _mm512_loadu_si512(src + 64);
        __mmask64 n0 = _mm512_movepi8_mask(v0), n1 = _mm512_movepi8_mask(v1);  // w' < 0
        __m512i a0 = _mm512_abs_epi8(v0), a1 = _mm512_abs_epi8(v1);
        for (int i = 0; i < MR; ++i) {
          __m512i xv = broadcast32(a.x.xq + (m + i) * a.x.ld + k);
          d0[i] = _mm512_dpbusd_epi32(d0[i], a0, _mm512_mask_sub_epi8(xv, n0, zero, xv));
          d1[i] = _mm512_dpbusd_epi32(d1[i], a1, _mm512_mask_sub_epi8(xv, n1, zero, xv));
        }
      }
    }
    const __m128 sw = _mm_loadu_ps(w.sw + (p * G + g) * 4), swz = _mm_loadu_ps(w.swz + (p * G + g) * 4);
    for (int i = 0; i < MR; ++i) {
      __m128i dots;
      if constexpr (BITS == 4) {
        dots = reduce_rows(d0[i], d1[i]);
      } else {  // d0 = row0 | row1, d1 = row2 | row3: reorder to the a/b convention
        __m512i ra = _mm512_inserti64x4(d0[i], _mm512_castsi512_si256(d1[i]), 1);   // row0 | row2
        __m512i rb = _mm512_inserti64x4(d1[i], _mm512_extracti64x4_epi64(d0[i], 1), 0);  // row1 | row3
        dots = reduce_rows(ra, rb);
      }
      __m128 t1 = _mm_mul_ps(sw, _mm_cvtepi32_ps(dots));
      __m128 t2 = _mm_mul_ps(swz, _mm_set1_ps(float(a.x.suma[(m + i) * G + g])));
      acc[i] = _mm_add_ps(acc[i], _mm_sub_ps(t1, t2));
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(16) float out[4];
    _mm_store_ps(out, acc[i]);
    for (int r = 0; r < kPanelRows; ++r) {
      const int64_t n = p * kPanelRows + r;
      if (n < w.h->N) store_matmul_out(a, m + i, n, out[r], a.x.sa[m + i]);
    }
  }
}

template <int BITS>
void walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) int_tile<4, BITS>(a, m, p);
    for (; m < m1; ++m) int_tile<1, BITS>(a, m, p);
  }
}

}  // namespace

void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (a.w.h->bits == 4) walk<4>(a, m0, m1, p0, p1);
  else walk<8>(a, m0, m1, p0, p1);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
