// AVX-512 weight-only matmul (float activations × int4 / nf4 / int8 codes) on layout panel4_k32.
// Codes are widened straight from memory (16 bytes -> 16 int32 lanes): for int4 one load holds
// two rows' codes (lo | hi << 4): each nibble is one vpermps over a 16-entry float table held in a
// zmm (0..15 for int4, the NF4 codebook; AVX2 needs two permutes and a blend). MR = 4 activation
// rows share each decoded weight register; 16 zmm accumulators per tile. Per group the 4 rows'
// sums are scaled by the reference's float steps (acc += sw·dot − swz·sumx); decode (MR = 1)
// scales each row's vector of sums per group instead and sums horizontally once per panel, and
// prefetches the panel 2 KiB ahead as the integer kernel does.
#include "avx512/intrin.h"
#include "common/format.h"
#include "common/matmul_epilogue.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// The codebook of 4-bit codes, as floats: NF4's values, or 0..15 for int4 — one vpermps decodes
// a lane from its low 4 bits, so neither the low-nibble mask nor an int->float conversion is needed.
alignas(64) constexpr float kInt4Values[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

template <int MR, int BITS, bool NF4>
void float_tile(const MatmulArgs& a, int64_t m, int64_t p) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const uint8_t* panel = w.panel(p);
  const __m512 lut = _mm512_loadu_ps(NF4 ? kNF4Values : kInt4Values);
  __m128 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm_setzero_ps();
  __m512 rows1[4];  // MR = 1: each row's scaled sums stay vectors; one horizontal sum per panel
  for (int r = 0; r < 4; ++r) rows1[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < G; ++g) {
    __m512 f[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < 4; ++r) f[i][r] = _mm512_setzero_ps();
    for (const int64_t e = w.group_end(g); k < e; k += kBlockK) {
      const int64_t b = k / kBlockK;
      for (int q = 0; q < 2; ++q) {
        __m512 xv[MR];
        for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(a.x.xf + (m + i) * a.x.ld + k + 16 * q);
        if constexpr (BITS == 4) {
          const uint8_t* src = panel + b * sizeof(W4Block);
          if (MR == 1 && q == 0) _mm_prefetch(reinterpret_cast<const char*>(src + 2048), _MM_HINT_T0);
          for (int h = 0; h < 2; ++h) {
            __m512i v = lb_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32 * h + 16 * q)));
            __m512 wa = _mm512_permutexvar_ps(v, lut);
            __m512 wb = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            for (int i = 0; i < MR; ++i) {
              f[i][2 * h] = _mm512_fmadd_ps(wa, xv[i], f[i][2 * h]);
              f[i][2 * h + 1] = _mm512_fmadd_ps(wb, xv[i], f[i][2 * h + 1]);
            }
          }
        } else {
          const uint8_t* src = panel + b * sizeof(W8Block);
          if (MR == 1 && q == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(src + 2048), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(src + 2048 + 64), _MM_HINT_T0);
          }
          for (int r = 0; r < 4; ++r) {
            __m512 wr = _mm512_cvtepi32_ps(
                lb_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32 * r + 16 * q))));
            for (int i = 0; i < MR; ++i) f[i][r] = _mm512_fmadd_ps(wr, xv[i], f[i][r]);
          }
        }
      }
    }
    const __m128 sw = _mm_loadu_ps(w.sw + (p * G + g) * 4), swz = _mm_loadu_ps(w.swz + (p * G + g) * 4);
    if constexpr (MR == 1) {  // decode: no horizontal sum per group
      for (int r = 0; r < 4; ++r) rows1[r] = _mm512_fmadd_ps(f[0][r], _mm512_set1_ps(w.sw[(p * G + g) * 4 + r]), rows1[r]);
      acc[0] = _mm_fnmadd_ps(swz, _mm_set1_ps(a.x.sumx[m * G + g]), acc[0]);
      continue;
    }
    for (int i = 0; i < MR; ++i) {
      __m128 dot = hsum4(f[i][0], f[i][1], f[i][2], f[i][3]);
      __m128 t2 = _mm_mul_ps(swz, _mm_set1_ps(a.x.sumx[(m + i) * G + g]));
      acc[i] = _mm_add_ps(acc[i], _mm_sub_ps(_mm_mul_ps(sw, dot), t2));
    }
  }
  if constexpr (MR == 1) acc[0] = _mm_add_ps(acc[0], hsum4(rows1[0], rows1[1], rows1[2], rows1[3]));
  for (int i = 0; i < MR; ++i) {
    alignas(16) float out[4];
    _mm_store_ps(out, acc[i]);
    for (int r = 0; r < kPanelRows; ++r) {
      const int64_t n = p * kPanelRows + r;
      if (n < w.h->N) store_matmul_out(a, m + i, n, out[r], 1.0f);
    }
  }
}

template <int BITS, bool NF4>
void walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) float_tile<4, BITS, NF4>(a, m, p);
    for (; m < m1; ++m) float_tile<1, BITS, NF4>(a, m, p);
  }
}

}  // namespace

void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (a.w.h->bits == 8) walk<8, false>(a, m0, m1, p0, p1);
  else if (a.w.h->scheme == int(Scheme::nf4)) walk<4, true>(a, m0, m1, p0, p1);
  else walk<4, false>(a, m0, m1, p0, p1);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
