// AVX-512 weight-only matmul (float activations × int4 / nf4 / int8 codes) on layout panel4_k32.
// Codes are widened straight from memory (16 bytes -> 16 int32 lanes): for int4 one load holds
// two rows' codes (lo | hi << 4): each nibble is one vpermps over a 16-entry float table held in a
// zmm (0..15 for int4, the NF4 codebook; AVX2 needs two permutes and a blend). MR (up to 4) activation
// rows share each decoded weight register; 4·MR zmm accumulators per tile. With 2 or more rows
// the table is per group and row of W, s·value − s·z (one FMA each): the permute yields the
// dequantized weight, and the sums run over the whole panel with no per-group scaling, zero
// term or horizontal sum (fp32 x, K = N = 4096, weights from DRAM, 1 thread, 3 alternations,
// min ms, per-group horizontal sums -> tables: int4 g32 M = 2 / 4 / 8 1.69 / 2.88 / 5.68 -> 1.18
// / 1.67 / 3.28, g128 M = 4 / 8 / 16 1.62 / 3.22 / 6.39 -> 1.34 / 2.70 / 5.35). One row (decode,
// g32) keeps the fixed table and scales its vector of sums per group (tables: 180 -> 235 µs with
// N = 1024 in L3: the 8 broadcasts per group weigh on one row). int8: acc += sw·dot − swz·sumx
// per group.
// One or two rows against 4-bit codes in groups of 64 or more: int4_tile, which decodes each
// dword lane's codes in place (no widening) against x permuted to match.
// Every pass prefetches the panel 8 KiB ahead into L2 (T1; T0 would evict X's rows from L1):
// the decode of codes is slow enough that the hardware prefetcher alone leaves DRAM and compute
// taking turns. K = N = 4096, weights from DRAM, 1 thread, Zen 4, 3 alternations, min ms, fp32
// x, before (MR = 1 T0 2 KiB ahead, MR = 4 none) -> T1 8 KiB: int4 g128 M = 1 0.69 -> 0.67,
// M = 4 1.89 -> 1.65; int8 M = 1 0.92 -> 0.69, M = 4 2.48 -> 1.66.
// Many rows of X (float_k4_walk): the k4 scratch of avx2/k4_scratch.h, decoded per chunk of k
// into an L1 tile with one zmm per k of 16 rows of W (fp32 codebook values; int8 w'), or, for
// bfloat16 x, one zmm per 2 k of the codes as bf16 pairs (small integers: exact) for vdpbf16ps.
// Each row of W's sum stays in its lane: a group ends with an FMA per row of X, no horizontal sum.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512/intrin.h"
#include "avx2/k4_scratch.h"
#include "avx2/store_tile.h"
#include "common/dispatch.h"
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

// The horizontal end of a panel's row-scaled sums in lanes [r0 ×8 | r2 ×8] and [r1 ×8 | r3 ×8]:
// (r0, r1, r2, r3).
inline __m128 rows_0213(__m512 f02, __m512 f13) {
  const __m512 t = _mm512_add_ps(_mm512_unpacklo_ps(f02, f13), _mm512_unpackhi_ps(f02, f13));
  const __m512 u = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, _MM_SHUFFLE(1, 0, 3, 2)));  // per 128: (ra, rb) ×2
  const __m128 r01 = _mm_add_ps(_mm512_castps512_ps128(u), _mm512_extractf32x4_ps(u, 1));
  const __m128 r23 = _mm_add_ps(_mm512_extractf32x4_ps(u, 2), _mm512_extractf32x4_ps(u, 3));
  return _mm_movelh_ps(r01, r23);
}

// s·z of one panel's groups, asked for in order (g = 0, 1, ...), for float_tile's rows that need
// them per group: formed kChunk groups ahead into a stack buffer, two groups per convert and
// multiply (formed one group at a time, int4 g32 M = 4 ran 5% slower, 1 thread, in cache). Eight
// groups, two lines of s: 64 at once waited on 16 lines from DRAM (g32 M = 2, K = N = 4096: 1.22
// -> 1.33 ms). Its members always inlined: a call in the group loop spills every accumulator
// (40% slower).
class PanelZeroScales {
 public:
  PanelZeroScales(const PackedLinear& w, int64_t p) : w_(w), p_(p) {}
  __attribute__((always_inline)) __m128 at(int64_t g, __m128 sw) {
    if (!w_.zq) return _mm_mul_ps(sw, _mm_set1_ps(w_.h->zero));
    if (g % kChunk == 0) fill(g);
    return _mm_load_ps(buf_ + (g % kChunk) * 4);
  }

 private:
  static constexpr int64_t kChunk = 8;
  __attribute__((always_inline)) void fill(int64_t g0) {
    const int64_t n = std::min(kChunk, w_.h->G - g0), i0 = (p_ * w_.h->G + g0) * kPanelRows;
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      int64_t z;
      std::memcpy(&z, w_.zq + i0 + 4 * j, 8);
      const __m256 s = _mm256_loadu_ps(w_.sw + i0 + 4 * j);
      _mm256_store_ps(buf_ + 4 * j, _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(z)))));
    }
    if (j < n) _mm_store_ps(buf_ + 4 * j, group_zero_scales(w_.zq + i0 + 4 * j, _mm_loadu_ps(w_.sw + i0 + 4 * j)));
  }
  const PackedLinear& w_;
  const int64_t p_;
  alignas(32) float buf_[kChunk * 4];
};

// A group's scales as [s0 ×8 | s2 ×8] and [s1 ×8 | s3 ×8].
struct GroupScales {
  __m512 s02, s13;
  GroupScales(const PackedLinear& w, int64_t p, int64_t g) {
    const __m512 s4 = _mm512_castps128_ps512(_mm_loadu_ps(w.sw + (p * w.h->G + g) * 4));
    s02 = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), s4);
    s13 = _mm512_permutexvar_ps(_mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3), s4);
  }
};

// The zero-point term of panel p for rows m.. m + MR of X, once the groups are done: per row of
// W −Σ_g s_g·(off + z_g)·Σx_g (off: an offset on the codes, z: layout zq or the one constant),
// four groups per step: one z load, convert and multiply for 16 lanes (s·z formed per group cost
// the g32 decode with float / bf16 x 6-9%, 1 thread, in cache).
template <int MR>
inline void zero_terms(const MatmulArgs& a, int64_t m, int64_t p, float off, __m128* out) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const float* sw = w.sw + p * G * 4;
  const int8_t* zq = w.zq ? w.zq + p * G * 4 : nullptr;
  const float c = off + (zq ? 0.f : w.h->zero);
  const __m512i rep = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    __m512 sz = _mm512_set1_ps(c);
    if (zq) {
      const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zq + g * 4));
      sz = _mm512_add_ps(sz, _mm512_cvtepi32_ps(lb_cvtepi8_epi32(z)));
    }
    sz = _mm512_mul_ps(_mm512_loadu_ps(sw + g * 4), sz);
    for (int i = 0; i < MR; ++i) {
      const __m128 sx = _mm_loadu_ps(a.x.sumx + (m + i) * G + g);  // Σx of the four groups
      acc[i] = _mm512_fnmadd_ps(sz, _mm512_permutexvar_ps(rep, _mm512_castps128_ps512(sx)), acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(acc[i]), _mm512_extractf32x8_ps(acc[i], 1));
    out[i] = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  }
  for (; g < G; ++g) {
    __m128 sz = _mm_set1_ps(c);
    if (zq) sz = _mm_add_ps(sz, group_zero_scales(zq + g * 4, _mm_set1_ps(1.f)));  // z exactly
    sz = _mm_mul_ps(_mm_loadu_ps(sw + g * 4), sz);
    for (int i = 0; i < MR; ++i) out[i] = _mm_fnmadd_ps(sz, _mm_set1_ps(a.x.sumx[(m + i) * G + g]), out[i]);
  }
}

// Decode (one or two rows of fp32 x) against 4-bit codes, straight from the panel. A W4Block's
// dword lane i holds codes k = 4i..4i+3 (lanes 0-7: rows 0 | 1, lanes 8-15: rows 2 | 3, low |
// high nibble); vpermps reads only an index's low 4 bits, so v >> 8t decodes rows 0 | 2 at
// k = 4i + t and v >> (8t + 4) rows 1 | 3: one shift and one permute over the codebook table per
// 16 codes, 8 permutes and 7 shifts per 128 (float_tile widens 16 bytes to dwords first: 12
// shuffles). x is permuted to that k order once per call (F32X), and each row of W's sums stay in
// their 8 lanes until the panel ends.
struct F32X {
  std::vector<float> v;  // [row][block][t 4][x_t, x_4+t, .., x_28+t ×2]
  void prepare(const PreparedAct& x, int64_t m0, int64_t m1) {
    const int64_t nb = x.Kp / kBlockK;
    v.resize(size_t((m1 - m0) * nb * 64));
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        const float* src = x.xf + m * x.ld + b * kBlockK;
        const __m512 x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16);
        for (int t = 0; t < 4; ++t) {
          const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28),
                                               _mm512_set1_epi32(t));
          _mm512_storeu_ps(v.data() + ((m - m0) * nb + b) * 64 + 16 * t, _mm512_permutex2var_ps(x0, idx, x1));
        }
      }
  }
};

template <int MR, bool NF4>
void int4_tile(const MatmulArgs& a, int64_t m, int64_t p, const float* const* xp) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const uint8_t* panel = w.panel(p);
  const __m512 lut = _mm512_loadu_ps(NF4 ? kNF4Values : kInt4Values);
  __m512 f[MR][2];  // row-scaled sums, lanes [row 0 | row 2] and [row 1 | row 3]
  for (int i = 0; i < MR; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < G; ++g) {
    __m512 d[MR][4];  // rows 0 | 2 and 1 | 3, even and odd t: two chains each
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) d[i][j] = _mm512_setzero_ps();
    for (const int64_t e = w.group_end(g); k < e; k += kBlockK) {
      const int64_t b = k / kBlockK;
      const uint8_t* src = panel + b * sizeof(W4Block);
      _mm_prefetch(reinterpret_cast<const char*>(src + 8192), _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(src);
      for (int t = 0; t < 4; ++t) {
        const __m512 w02 = _mm512_permutexvar_ps(t ? _mm512_srli_epi32(v, 8 * t) : v, lut);
        const __m512 w13 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * t + 4), lut);
        for (int i = 0; i < MR; ++i) {
          const __m512 xv = _mm512_loadu_ps(xp[i] + b * 64 + 16 * t);
          d[i][2 * (t & 1)] = _mm512_fmadd_ps(w02, xv, d[i][2 * (t & 1)]);
          d[i][2 * (t & 1) + 1] = _mm512_fmadd_ps(w13, xv, d[i][2 * (t & 1) + 1]);
        }
      }
    }
    const GroupScales s(w, p, g);
    for (int i = 0; i < MR; ++i) {
      f[i][0] = _mm512_fmadd_ps(_mm512_add_ps(d[i][0], d[i][2]), s.s02, f[i][0]);
      f[i][1] = _mm512_fmadd_ps(_mm512_add_ps(d[i][1], d[i][3]), s.s13, f[i][1]);
    }
  }
  __m128 z[MR];
  zero_terms<MR>(a, m, p, 0.f, z);
  for (int i = 0; i < MR; ++i) store_tile(a, m + i, p, _mm_add_ps(z[i], rows_0213(f[i][0], f[i][1])), 1.0f);
}

template <int MR, int BITS, bool NF4>
void float_tile(const MatmulArgs& a, int64_t m, int64_t p) {
  // 4-bit codes, several rows of X: the group's tables carry its scale and zero (see the top)
  constexpr bool LUT = BITS == 4 && MR > 1;
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const uint8_t* panel = w.panel(p);
  const __m512 values = _mm512_loadu_ps(NF4 ? kNF4Values : kInt4Values);
  __m512 f[MR][4];  // each row of W's sums: over the panel (LUT), else over the group
  __m128 acc[MR];
  __m512 rows1[4];  // MR = 1: each row's scaled sums stay vectors; one horizontal sum per panel
  for (int i = 0; i < MR; ++i) {
    acc[i] = _mm_setzero_ps();
    for (int r = 0; r < 4; ++r) f[i][r] = rows1[r] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  PanelZeroScales zs(w, p);
  for (int64_t g = 0; g < G; ++g) {
    const __m128 sw = _mm_loadu_ps(w.sw + (p * G + g) * 4);
    const __m128 swz = MR > 1 ? zs.at(g, sw) : sw;  // one row: zero_terms after the groups
    __m512 lut[4];
    if constexpr (LUT) {
      // broadcast in registers: through a stack copy, a group's tables waited on its s·z's
      // convert and multiply and then the store (int4 g32, M = 4, in cache: 7% slower)
      for (int r = 0; r < 4; ++r) {
        const __m512i ri = _mm512_set1_epi32(r);
        lut[r] = _mm512_fmsub_ps(values, _mm512_permutexvar_ps(ri, _mm512_castps128_ps512(sw)),
                                 _mm512_permutexvar_ps(ri, _mm512_castps128_ps512(swz)));
      }
    } else {
      for (int r = 0; r < 4; ++r) lut[r] = values;
      for (int i = 0; i < MR; ++i)
        for (int r = 0; r < 4; ++r) f[i][r] = _mm512_setzero_ps();
    }
    for (const int64_t e = w.group_end(g); k < e; k += kBlockK) {
      const int64_t b = k / kBlockK;
      for (int q = 0; q < 2; ++q) {
        __m512 xv[MR];
        for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(a.x.xf + (m + i) * a.x.ld + k + 16 * q);
        if constexpr (BITS == 4) {
          const uint8_t* src = panel + b * sizeof(W4Block);
          if (q == 0) _mm_prefetch(reinterpret_cast<const char*>(src + 8192), _MM_HINT_T1);
          for (int h = 0; h < 2; ++h) {
            __m512i v = lb_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32 * h + 16 * q)));
            __m512 wa = _mm512_permutexvar_ps(v, lut[2 * h]);
            __m512 wb = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut[2 * h + 1]);
            for (int i = 0; i < MR; ++i) {
              f[i][2 * h] = _mm512_fmadd_ps(wa, xv[i], f[i][2 * h]);
              f[i][2 * h + 1] = _mm512_fmadd_ps(wb, xv[i], f[i][2 * h + 1]);
            }
          }
        } else {
          const uint8_t* src = panel + b * sizeof(W8Block);
          if (q == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(src + 8192), _MM_HINT_T1);
            _mm_prefetch(reinterpret_cast<const char*>(src + 8192 + 64), _MM_HINT_T1);
          }
          for (int r = 0; r < 4; ++r) {
            __m512 wr = _mm512_cvtepi32_ps(
                lb_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32 * r + 16 * q))));
            for (int i = 0; i < MR; ++i) f[i][r] = _mm512_fmadd_ps(wr, xv[i], f[i][r]);
          }
        }
      }
    }
    if constexpr (LUT) continue;
    if constexpr (MR == 1) {  // decode: no horizontal sum per group
      for (int r = 0; r < 4; ++r) rows1[r] = _mm512_fmadd_ps(f[0][r], _mm512_set1_ps(w.sw[(p * G + g) * 4 + r]), rows1[r]);
      continue;
    }
    for (int i = 0; i < MR; ++i) {
      __m128 dot = hsum4(f[i][0], f[i][1], f[i][2], f[i][3]);
      __m128 t2 = _mm_mul_ps(swz, _mm_set1_ps(a.x.sumx[(m + i) * G + g]));
      acc[i] = _mm_add_ps(acc[i], _mm_sub_ps(_mm_mul_ps(sw, dot), t2));
    }
  }
  if constexpr (LUT)
    for (int i = 0; i < MR; ++i) acc[i] = hsum4(f[i][0], f[i][1], f[i][2], f[i][3]);
  if constexpr (MR == 1) {
    zero_terms<1>(a, m, p, 0.f, acc);
    acc[0] = _mm_add_ps(acc[0], hsum4(rows1[0], rows1[1], rows1[2], rows1[3]));
  }
  for (int i = 0; i < MR; ++i) store_tile(a, m + i, p, acc[i], 1.0f);
}

// Per panel, the rows in fours, then the rest in one pass; one or two rows of 4-bit codes in
// groups of 64 or more int4_tile instead (its x, 256 bytes per row and block, outgrows L1 with
// more rows: M = 4 as 2 + 2 was slower; in groups of 32 its per-group scaling costs what its
// decode saves). K = N = 4096, weights from DRAM (huge pages), 5 alternating builds, min µs,
// float_tile -> int4_tile: 1 thread int4 g128 M = 1 / 2 631 / 1030 -> 590 / 993 (in L3, K = 4096,
// N = 1024: 156 / 257 -> 138 / 192), g32 M = 1 758 -> 797; 2 threads g128 M = 1 / 2 319 / 523 ->
// 295 / 500, nf4 g64 M = 1 342 -> 321.
template <int BITS, bool NF4>
void walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (BITS == 4 && m1 - m0 <= 2 && a.w.h->group_size >= 64) {
    thread_local F32X px;
    px.prepare(a.x, m0, m1);
    const float* xp[2] = {px.v.data(), px.v.data() + (m1 - m0 - 1) * (a.x.Kp / kBlockK) * 64};
    for (int64_t p = p0; p < p1; ++p) {
      if (m1 - m0 == 2) int4_tile<2, NF4>(a, m0, p, xp);
      else int4_tile<1, NF4>(a, m0, p, xp);
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) float_tile<4, BITS, NF4>(a, m, p);
    switch (m1 - m) {
      case 3: float_tile<3, BITS, NF4>(a, m, p); break;
      case 2: float_tile<2, BITS, NF4>(a, m, p); break;
      case 1: float_tile<1, BITS, NF4>(a, m, p); break;
    }
  }
}

// Weight-only decode of int4 codes against bfloat16 x (few rows) with vdpbf16ps, straight from
// the panel: a W4Block's nibbles (lo: rows 0 | 2, hi: rows 1 | 3, 16 k per 128-bit lane) become
// bf16 128 + u by one byte unpack against 0x43 (bf16 0x43uu = 128 + u), the dot against x pairs
// permuted to the same k order once per call (BF16X). The offset comes back out with the zero
// point: s·Σ(u − z)·x = s·Σ(128 + u)·x − (128·s + s·z)·Σx. The products are exact; the offset
// makes the fp32 sums ~10x larger than the result, so they carry ~1e-5 relative rounding
// (bf16 output rounds at 4e-3). 4 vdpbf16ps and ~8 other ops per 128 codes, against ~3x that for
// the fp32 decode (float_tile); the 4 byte unpacks bound it (Zen 4 shuffles one zmm a cycle).
// The first rows over a panel prefetch it 8 KiB ahead into L2 (T1), on Zen 4 too: K = N = 4096,
// 1 thread, 134 MB of rotated weights, M = 1: none 0.70-0.73 -> T0 4 KiB ahead 0.53-0.57 ms (fp32
// decode of bf16 x before: 0.71-0.72 ms; in L3 0.63 -> 0.32 ms); T0 4 KiB -> T1 8 KiB, 3
// alternations, min ms: M = 1 0.59 -> 0.37, M = 2 0.86 -> 0.57, M = 4 1.36 -> 1.06.
struct BF16X {
  std::vector<uint16_t> v;  // [row][block][xl 32 | xh 32]
  void prepare(const PreparedAct& x, int64_t m0, int64_t m1) {
    const int64_t nb = x.Kp / kBlockK;
    v.resize(size_t((m1 - m0) * nb * 64));
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        const __m512i k32 = _mm512_loadu_si512(x.xb + m * x.ld + b * kBlockK);  // 128-bit lanes: k 0-7, 8-15, 16-23, 24-31
        uint16_t* out = v.data() + ((m - m0) * nb + b) * 64;
        _mm512_storeu_si512(out, _mm512_shuffle_i32x4(k32, k32, _MM_SHUFFLE(2, 0, 2, 0)));       // k 0-7 | 16-23 (×2)
        _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(k32, k32, _MM_SHUFFLE(3, 1, 3, 1)));  // k 8-15 | 24-31 (×2)
      }
  }
};

template <int MR>
void bf16_tile(const MatmulArgs& a, int64_t m, int64_t p, const uint16_t* const* xp, bool prefetch) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const uint8_t* panel = w.panel(p);
  const __m512i low4 = _mm512_set1_epi8(0x0F), c43 = _mm512_set1_epi8(0x43);
  __m512 f[MR][2];  // row-scaled sums, lanes [row 0 | row 2] and [row 1 | row 3]
  for (int i = 0; i < MR; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; g < G; ++g) {
    __m512 d[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) d[i][j] = _mm512_setzero_ps();
    for (const int64_t e = w.group_end(g); k < e; k += kBlockK) {
      const int64_t b = k / kBlockK;
      const uint8_t* src = panel + b * sizeof(W4Block);
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(src + 8192), _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(src);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __m512i wq[4] = {_mm512_unpacklo_epi8(lo, c43), _mm512_unpackhi_epi8(lo, c43),
                             _mm512_unpacklo_epi8(hi, c43), _mm512_unpackhi_epi8(hi, c43)};
      for (int i = 0; i < MR; ++i) {
        const __m512i xl = _mm512_loadu_si512(xp[i] + b * 64), xh = _mm512_loadu_si512(xp[i] + b * 64 + 32);
        d[i][0] = lb_dpbf16_ps(d[i][0], wq[0], xl);
        d[i][1] = lb_dpbf16_ps(d[i][1], wq[1], xh);
        d[i][2] = lb_dpbf16_ps(d[i][2], wq[2], xl);
        d[i][3] = lb_dpbf16_ps(d[i][3], wq[3], xh);
      }
    }
    const GroupScales s(w, p, g);
    for (int i = 0; i < MR; ++i) {
      f[i][0] = _mm512_fmadd_ps(_mm512_add_ps(d[i][0], d[i][1]), s.s02, f[i][0]);
      f[i][1] = _mm512_fmadd_ps(_mm512_add_ps(d[i][2], d[i][3]), s.s13, f[i][1]);
    }
  }
  __m128 z[MR];  // −(128·s + s·z)·Σx per row of W
  zero_terms<MR>(a, m, p, 128.f, z);
  for (int i = 0; i < MR; ++i) store_tile(a, m + i, p, _mm_add_ps(z[i], rows_0213(f[i][0], f[i][1])), 1.0f);
}

template <int BITS, bool NF4>
void walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1);

// Few rows of bf16 x against int4 codes: bf16_tile per panel, rows in threes (the last four in
// one pass: it spills a few registers, yet unpacks the codes once for all four), then 2, then 1.
// K = N = 4096, weights from DRAM, 1 thread, 3-5 alternations, min ms, pairs -> this: g128 M = 3
// / 4 / 5 / 6 / 8 / 16 0.82 / 0.99 / 1.26 / 1.42 / 1.85 / 3.67 -> 0.70 / 0.89 / 1.16 / 1.34 / 1.81
// / 3.50; g32 M = 3 / 4 / 5 / 16 1.35 / 1.54 / 2.07 / 5.78 -> 1.12 / 1.40 / 1.83 / 4.88.
void bf16_walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  thread_local BF16X px;
  px.prepare(a.x, m0, m1);
  const int64_t nb = a.x.Kp / kBlockK;
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    auto rows = [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      const uint16_t* xp[MR];
      for (int i = 0; i < MR; ++i) xp[i] = px.v.data() + (m + i - m0) * nb * 64;
      bf16_tile<MR>(a, m, p, xp, m == m0);
      m += MR;
    };
    while (m1 - m >= 3) {
      if (m1 - m == 4) rows(std::integral_constant<int, 4>());
      else rows(std::integral_constant<int, 3>());
    }
    while (m1 - m >= 2) rows(std::integral_constant<int, 2>());
    if (m < m1) rows(std::integral_constant<int, 1>());
  }
}

// The chunk [k0, k1) of a k4 set decoded into `out`: per k a zmm of 16 floats d(code) (BF16:
// per 2 k a zmm of 16 bf16 pairs, k in the low half), int4 / nf4 through the codebook table,
// int8 w' sign-extended and converted.
template <int BITS, bool NF4, bool BF16>
inline void decode_chunk(const uint8_t* wk, int64_t k0, int64_t k1, uint8_t* out) {
  const __m512 lut = _mm512_loadu_ps(NF4 ? kNF4Values : kInt4Values);
  const __m512i hi16 = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (int64_t k = k0; k < k1; k += 4) {
    const __m512i v = _mm512_loadu_si512(wk + (k >> 2) * kK4Step);
    __m512 f[4];
    for (int j = 0; j < 4; ++j)  // vpermps reads only the low 4 bits of each shifted dword
      f[j] = BITS == 4 ? _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * j), lut)
                       : _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24));
    if constexpr (BF16) {
      for (int h = 0; h < 2; ++h)  // an exact float's bf16 is its top half
        _mm512_storeu_si512(out + ((k - k0) / 2 + h) * 64,
                            _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(f[2 * h]), 16),
                                            _mm512_and_si512(_mm512_castps_si512(f[2 * h + 1]), hi16)));
    } else {
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(reinterpret_cast<float*>(out + (k - k0 + j) * 64), f[j]);
    }
  }
}

// Rows m .. m+MR-1 of X against NS sets' decoded chunks [k0, k1) (wf[s]): y[s][i][0..15] += each
// group's share s_g · Σ d·x, plus −swz_g · Σ_g x where the group ends in the chunk (ns: −sumx,
// [row][G]).
// fp32 x: k per chunk. The two sets' decoded chunks lie 16 KiB apart, and f4_rows addresses the
// second from the first: with a pointer of its own, GCC spilled a weight vector of the int8 GEMM's
// inner loop to the stack and read it back for every FMA (K = N = 4096 per channel, 1 thread,
// alternating builds, ms: M = 64 / 128 / 512 26.4 / 52.1 / 207 -> 21.3 / 41.5 / 166, now the int4
// GEMM's speed; int4 unchanged).
constexpr int64_t kF32ChunkK = 256;

template <int MR, int NS, bool BF16>
inline void f4_rows(const MatmulArgs& a, const uint8_t* const* wf, const float* const* sc, const float* ns, int64_t m,
                    int64_t g0, int64_t k0, int64_t k1, float (*const* y)[16]) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G, ld = a.x.ld;
  __m512 f[MR][NS];
  for (int i = 0; i < MR; ++i)
    for (int s = 0; s < NS; ++s) f[i][s] = _mm512_loadu_ps(y[s][i]);
  for (int64_t k = k0, g = g0; k < k1; ++g) {
    const int64_t e = std::min(w.group_end(g), k1);
    __m512 d[MR][NS];
    for (int i = 0; i < MR; ++i)
      for (int s = 0; s < NS; ++s) d[i][s] = _mm512_setzero_ps();
    for (; k < e; k += kBlockK) {
      if constexpr (BF16) {
        const uint16_t* x = a.x.xb + m * ld + k;
#pragma GCC unroll 16
        for (int j = 0; j < kBlockK / 2; ++j) {
          __m512i wv[NS];
          for (int s = 0; s < NS; ++s) wv[s] = _mm512_loadu_si512(wf[s] + ((k - k0) / 2 + j) * 64);
          for (int i = 0; i < MR; ++i) {
            int32_t v;
            std::memcpy(&v, x + i * ld + 2 * j, 4);
            const __m512i xv = _mm512_set1_epi32(v);
            for (int s = 0; s < NS; ++s) d[i][s] = lb_dpbf16_ps(d[i][s], wv[s], xv);
          }
        }
      } else {
        const float* x = a.x.xf + m * ld + k;
#pragma GCC unroll 8
        for (int j = 0; j < kBlockK; ++j) {
          __m512 wv[NS];
          for (int s = 0; s < NS; ++s) wv[s] = _mm512_loadu_ps(reinterpret_cast<const float*>(wf[0] + s * kF32ChunkK * 64 + (k - k0 + j) * 64));
          for (int i = 0; i < MR; ++i) {
            const __m512 xv = _mm512_set1_ps(x[i * ld + j]);
            for (int s = 0; s < NS; ++s) d[i][s] = _mm512_fmadd_ps(wv[s], xv, d[i][s]);
          }
        }
      }
    }
    for (int s = 0; s < NS; ++s) {
      const __m512 sw = _mm512_loadu_ps(sc[s] + g * 32);
      for (int i = 0; i < MR; ++i) f[i][s] = _mm512_fmadd_ps(d[i][s], sw, f[i][s]);
      if (e == w.group_end(g)) {
        const __m512 sz = _mm512_loadu_ps(sc[s] + g * 32 + 16);
        for (int i = 0; i < MR; ++i) f[i][s] = _mm512_fmadd_ps(sz, _mm512_set1_ps(ns[i * G + g]), f[i][s]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int s = 0; s < NS; ++s) _mm512_storeu_ps(y[s][i], f[i][s]);
}

// Weight-only GEMM on the k4 scratch, two sets of four panels at a time: per chunk of k (whole
// groups where they are narrower; 16 KiB decoded per set), the decode once, then every row of X
// over it, six rows against both sets (row_passes; against eight rows and one set: K = N = 4096,
// 1 thread, alternating builds, ms: bf16 x int4 g128 M = 512 89.3-90.5 -> 86.2-88.8, int8 87.4
// -> 85.4-86.0; fp32 x int4 g128 M = 256 85.3-85.8 -> 84.5-85.0).
// bf16 x: the whole set decoded once and kept with it (128 KiB per set for K = 4096), not per
// chunk and work item (K = N = 4096, M = 512, alternating builds: 1 thread 90.6-92.4 -> 86.0-88.8
// ms, 2 threads 48.2-49.6 -> 45.7-46.1).
template <int BITS>
struct Bf16Pairs {
  static int64_t bytes(int64_t Kp) { return Kp / 2 * 64; }
  static void run(const PackedLinear& w, const uint8_t* k4, float*, uint8_t* out) {
    decode_chunk<BITS, false, true>(k4, 0, w.h->Kp, out);
  }
};

template <int BITS, bool NF4, bool BF16>
void float_k4_walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t G = a.w.h->G;
  thread_local std::conditional_t<BF16, K4Sets<BITS, false, Bf16Pairs<BITS>>, K4Sets<BITS>> sets;
  thread_local std::vector<float> ns;
  thread_local std::vector<uint8_t> wfv;
  const int64_t ck = BF16 ? 512 : kF32ChunkK;  // k per chunk: 16 KiB of decoded codes per set either way
  if constexpr (!BF16) wfv.resize(size_t(2 * ck * 64 + 64));  // two sets' chunks (bf16: decoded with the set)
  uint8_t* wf = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(wfv.data()) + 63) & ~uintptr_t(63));
  k4_neg_sums(a, m0, m1, false, ns);
  k4_walk_sets<2>(a, m0, m1, p0, p1, sets, ck, nullptr,
                  [&](int n, const uint8_t* const* wk, const float* const* sc, int64_t g0, int64_t k0, int64_t k1,
                      float (*const* y)[16]) __attribute__((always_inline)) {
    const uint8_t* tile[2];
    for (int s = 0; s < n; ++s) {
      if constexpr (BF16) {
        tile[s] = wk[s] + k0 / 2 * 64;  // decoded with the set
      } else {
        tile[s] = wf + s * ck * 64;
        decode_chunk<BITS, NF4, BF16>(wk[s], k0, k1, wf + s * ck * 64);
      }
    }
    row_passes(m1 - m0, n, [&](auto mr, auto nsets, int64_t i) {
      float (*yi[2])[16] = {y[0] + i, n > 1 ? y[1] + i : nullptr};
      f4_rows<decltype(mr)::value, decltype(nsets)::value, BF16>(a, tile, sc, ns.data() + i * G, m0 + i, g0, k0, k1, yi);
    });
  });
}

// The GEMM from this many rows of X; fewer run the panel kernel (no scratch to build, the panel
// decoded on the fly). K = N = 4096, 1 thread, Zen 4, weights from DRAM, min ms, panel -> k4
// (with the panel kernels' prefetch into L2): bf16 x int4 g128 M = 16 / 24: 3.78 -> 4.27 / 6.18
// -> 5.74; int8 M = 12 / 16: 4.91 -> 4.44 / 6.68 -> 5.08; fp32 x int4 g128 M = 24 / 32 / 64:
// 9.85 -> 11.2 / 13.0 -> 14.2 / 26.5 -> 27.1 (N = 1024, in L3: 2.5 -> 3.3 / 3.4 -> 4.4 / 6.8 ->
// 8.1; equal from 96 rows); nf4 g64 M = 12 / 16: 6.02 -> 6.45 / 8.12 -> 7.91. (Before that
// prefetch, int8 fp32 x M = 32 / 64: 10.9 -> 11.7 / 21.1 -> 21.4.)
template <int BITS, bool NF4>
void float_matmul(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  // bf16 x with exact bf16 codes (not nf4's) on a CPU with vdpbf16ps: the bf16 dot
  static const bool has_bf16_dot = !kNativeBf16 || cpu_features().avx512bf16;
  const bool bf16 = !NF4 && a.x.xb && has_bf16_dot;
  const int64_t gemm_rows = bf16 ? (BITS == 8 ? 12 : 20) : NF4 ? 16 : 64;
  if (m1 - m0 < gemm_rows) return bf16 && BITS == 4 ? bf16_walk(a, m0, m1, p0, p1) : walk<BITS, NF4>(a, m0, m1, p0, p1);
  if (bf16) return float_k4_walk<BITS, NF4, true>(a, m0, m1, p0, p1);
  float_k4_walk<BITS, NF4, false>(a, m0, m1, p0, p1);
}

}  // namespace

void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (a.w.h->bits == 8) float_matmul<8, false>(a, m0, m1, p0, p1);
  else if (a.w.h->scheme == int(Scheme::nf4)) float_matmul<4, true>(a, m0, m1, p0, p1);
  else float_matmul<4, false>(a, m0, m1, p0, p1);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
