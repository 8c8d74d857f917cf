// AVX-512 VNNI integer matmul (W4A8 / W8A8) on layout panel4_k32 (see common/layout_panel4.h).
// One zmm load is one whole W4Block (4 rows × 32 k):
//   int4: v & 15 = [row0 k0..31 | row2 k0..31], v >> 4 & 15 = [row1 | row3], unsigned u in
//         [0, 15] — exactly vpdpbusd's u8 operand; the 32 int8 activations are broadcast to both
//         256-bit halves as the s8 operand. 2 vpdpbusd per block and activation row.
//   int8: each zmm holds 2 rows of signed w'; vpdpbusd wants u8 × s8, so feed |w'| (<= 128) and
//         x negated where w' < 0 (mask from vpmovb2m) — the AVX-512 form of the vpsignb trick.
// Per group the int32 lanes are reduced to [row0..row3] and scaled with the reference's exact
// float steps, so results are bit-exact with cpp/ref. Weight-only float activations: matmul_float_avx512.cpp.
// MR = 4 activation rows share each decoded weight register.
// Compiled natively with AVX-512 flags, and as the avx512_emulated test variant through SIMDe.
#include <algorithm>
#include <vector>

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

// Decode (a few rows of X), the AVX2 GEMV's structure at 512 bits: per block one (int4) or two
// (int8) zmm loads and 2 vpdpbusd into d0, d1; per group the pair is folded (unpack + add) to
// int4: [r0 r1 r0 r1 ×2 | r2 r3 r2 r3 ×2], int8: [r0 r2 .. | r1 r3 ..], converted and scaled by
// sw permuted to the same lane order in one FMA. One horizontal sum per panel; the zero-point
// term Σ_g swz·suma is a dot over the panel's [G][4] swz against nsuma4 = −suma[g] ×4.
inline void prefetch_weights(const uint8_t* line) {
  _mm_prefetch(reinterpret_cast<const char*>(line + 2048), _MM_HINT_T0);
}

template <int BITS>
inline __m128 int_gemv_panel(const PackedLinear& w, const int8_t* x, const float* nsuma4, int64_t p) {
  const int64_t G = w.h->G;
  const uint8_t* wp = w.panel(p);
  const float* sw = w.sw + p * G * 4;
  const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const __m512i sidx = BITS == 4 ? _mm512_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3)
                                 : _mm512_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2, 1, 3, 1, 3, 1, 3, 1, 3);
  const int64_t nb = std::min(w.h->group_size, w.h->Kp) / kBlockK;
  __m512 f = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = g + 1 < G ? nb : (w.h->Kp - g * w.h->group_size) / kBlockK;
    __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
    for (int64_t b = 0; b < n; ++b, x += kBlockK) {
      const __m512i xv = broadcast32(x);
      if constexpr (BITS == 4) {
        prefetch_weights(wp);
        __m512i v = _mm512_loadu_si512(wp);
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(v, low4), xv);
        d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xv);
        wp += sizeof(W4Block);
      } else {
        prefetch_weights(wp);
        prefetch_weights(wp + 64);
        __m512i v0 = _mm512_loadu_si512(wp), v1 = _mm512_loadu_si512(wp + 64);
        d0 = _mm512_dpbusd_epi32(d0, _mm512_abs_epi8(v0), _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(v0), zero, xv));
        d1 = _mm512_dpbusd_epi32(d1, _mm512_abs_epi8(v1), _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(v1), zero, xv));
        wp += sizeof(W8Block);
      }
    }
    const __m512i d = _mm512_add_epi32(_mm512_unpacklo_epi32(d0, d1), _mm512_unpackhi_epi32(d0, d1));
    const __m512 s = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_loadu_ps(sw + g * 4)));
    f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, f);
  }
  // lanes: int4 [a b a b ..| c d c d ..] = rows (0 1 | 2 3), int8 rows (0 2 | 1 3)
  const __m128 lo = _mm_add_ps(_mm512_castps512_ps128(f), _mm512_extractf32x4_ps(f, 1));   // [a b a b]
  const __m128 hi = _mm_add_ps(_mm512_extractf32x4_ps(f, 2), _mm512_extractf32x4_ps(f, 3));  // [c d c d]
  const __m128 lo2 = _mm_add_ps(lo, _mm_movehl_ps(lo, lo)), hi2 = _mm_add_ps(hi, _mm_movehl_ps(hi, hi));
  __m128 t = BITS == 4 ? _mm_movelh_ps(lo2, hi2) : _mm_unpacklo_ps(lo2, hi2);
  const float* swz = w.swz + p * G * 4;
  __m512 z = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) z = _mm512_fmadd_ps(_mm512_loadu_ps(swz + g * 4), _mm512_loadu_ps(nsuma4 + g * 4), z);
  for (; g < G; ++g) t = _mm_fmadd_ps(_mm_loadu_ps(swz + g * 4), _mm_loadu_ps(nsuma4 + g * 4), t);
  const __m256 z8 = _mm256_add_ps(_mm512_castps512_ps256(z), _mm512_extractf32x8_ps(z, 1));
  return _mm_add_ps(t, _mm_add_ps(_mm256_castps256_ps128(z8), _mm256_extractf128_ps(z8, 1)));
}

template <int BITS>
void int_gemv(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t G = a.w.h->G;
  std::vector<float> nsuma4(size_t((m1 - m0) * G * 4));
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t g = 0; g < G; ++g)
      _mm_storeu_ps(&nsuma4[((m - m0) * G + g) * 4], _mm_set1_ps(-float(a.x.suma[m * G + g])));
  for (int64_t p = p0; p < p1; ++p)  // the panel stays in L1 for the next rows
    for (int64_t m = m0; m < m1; ++m) {
      alignas(16) float out[4];
      _mm_store_ps(out, int_gemv_panel<BITS>(a.w, a.x.xq + m * a.x.ld, &nsuma4[(m - m0) * G * 4], p));
      for (int r = 0; r < kPanelRows; ++r) {
        const int64_t n = p * kPanelRows + r;
        if (n < a.w.h->N) store_matmul_out(a, m, n, out[r], a.x.sa[m]);
      }
    }
}

// Rows of X up to which the decode kernel (weights read once, decoded per row) is used.
constexpr int64_t kGemvMaxRows = 4;

template <int BITS>
void walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m1 - m0 <= kGemvMaxRows) return int_gemv<BITS>(a, m0, m1, p0, p1);
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
