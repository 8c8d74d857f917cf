// AVX-512 VNNI integer matmul (W4A8 / W8A8) on layout panel4_k32 (see common/layout_panel4.h),
// the structure of the AVX2 kernel (cpp/avx2/matmul_avx2.cpp) at 512 bits.
// One zmm load is one whole W4Block (4 rows × 32 k):
//   int4: v & 15 = [row0 k0..31 | row2 k0..31], v >> 4 & 15 = [row1 | row3], unsigned u in
//         [0, 15] — exactly vpdpbusd's u8 operand; the 32 int8 activations are broadcast to both
//         256-bit halves as the s8 operand. 2 vpdpbusd per block and activation row.
//   int8: each zmm holds 2 rows of signed w'; vpdpbusd wants u8 × s8. Passes of 3-4 rows of X
//         (in calls of 4 to int8_panel_rows(K) - 1 rows, which prepare PreparedAct::xu) feed x + 128
//         as the unsigned operand against the stored w' and take
//         the exact 128·Σw' (the layout's wsum) back out of each group's int32 dot. Fewer rows flip
//         the sign bit of w' instead (u = w' + 128, 1 op per 64 bytes and pass) against x and take
//         128·Σx back out: they read no wsum, one stream less from DRAM, which decode felt (per
//         channel, K = N = 4096, M = 1: 572-594 -> 607-628 µs with wsum). Per channel, 1 thread,
//         weights in L3, alternating builds, min ms, the flip -> x + 128: M = 4 / 8 / 16 / 32 / 48
//         0.39 / 0.78 / 1.50 / 2.97 / 4.38 -> 0.38 / 0.73 / 1.41 / 2.80 / 4.13; weights from DRAM
//         M = 12 1.25 -> 1.16, int8 g128 M = 8 / 12 1.18-1.20 / 1.69 -> 1.09 / 1.57-1.59.
//         Symmetric weights only (the layout stores wsum for no others): the partial dots stay per
//         lane in float until the panel's end, and each carries 128·Σw' over its lane's k, which
//         only the float sum of the lanes cancels; asymmetric w' = q − 128 runs near z − 128 along
//         a row, so with z far from 128 that cancellation lost up to 3e-3 of max |y| (K = 4128).
// MR (1 to 4) rows of X per panel; per group each row's pair of accumulators is folded (unpack +
// add) to int4: [r0 r1 r0 r1 ×2 | r2 r3 r2 r3 ×2], int8: [r0 r2 .. | r1 r3 ..], converted and
// scaled by sw permuted to the same lane order in one FMA; one horizontal sum per panel. The
// zero-point term Σ_g swz·suma is a dot over the panel's [G][4] s·z (s where z is one constant)
// against −suma ×4.
// Decode (M = 1) streams the panels from DRAM with a T0 software prefetch 2 KiB ahead on Intel,
// none on AMD, where the hardware prefetcher alone does better. K = N = 4096, 1 thread, GB/s
// with -> without: Zen 4 (weights from DRAM) int4 g128 22-26 -> 26-27, int8 24-26 -> 28-29
// (4-12 KiB ahead, T0 or T1, no better); the Xeon (AMX) VM, 134 MB of rotated weights: int4
// g128 9.0-11.0 -> 7.0-7.7, int8 11.3-12.4 -> 9.7-10.6.
// Two to four rows of X (MR > 1) read a panel once, and consume it slowly enough that without
// help DRAM and compute take turns: a T1 prefetch (into L2, so it does not evict X's rows from
// L1) 8 KiB ahead, on every CPU (measured on Zen 4 only). K = N = 4096, weights from DRAM, 1
// thread, ms, none -> T0 2 KiB -> T1 8 KiB: int4 g128 M = 4 1.03 -> 0.71 -> 0.52, int8 M = 4
// 1.62 -> 1.57 -> 0.74 (T0 4-32 KiB ahead: 1.41-1.47). Not per-channel int8 with 2 rows: its
// work per byte is light enough to stream like decode (M = 2, 4 alternating builds, min / median
// ms: with 0.87 / 0.94, without 0.61 / 0.63; from 3 rows the prefetch wins: M = 4 0.87-0.89
// against 1.25-1.27). So does int4 decode on AMD when panels
// are short (K < 1536), where the per-panel epilogue comes often: 1 thread, weights from DRAM,
// min µs over 5 alternating builds, none -> T1 8 KiB: g64 K = 576, N = 1536 35.7 -> 31.0, N =
// 576 12.7 -> 11.9; g32 36.5 -> 35.6; g128 K = 1024, N = 2048 66.1 -> 65.3 (earlier, slower
// hours: 45 -> 37, 17.6 -> 14.0, 41 -> 39, 90 -> 73). int8 went either way (K = 576: 49 -> 55,
// and 64 -> 50 in another hour); K = 1536 no better, K = 4096 g32 slower (640 -> 780).
// Many rows of X (int_k4_walk): the k4 scratch of avx2/k4_scratch.h instead, one zmm per 4-k step
// of 16 rows of W, so vpdpbusd leaves each row of W's dot in its own lane and a group ends with a
// convert and an FMA per row of X, not a fold (the fold was ~40% of the g128 GEMM, ~70% at g32).
// Weight-only float activations: matmul_float_avx512.cpp.
// Compiled natively with AVX-512 flags, and as the avx512_emulated test variant through SIMDe.
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

inline __m512i broadcast32(const int8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}


// Rows x[0..MR) of X (U8X: x + 128; suma: each row's Σ_group x [G]; nsuma:
// −suma, [G][4] floats, already times sg when per block; sg: each row's per-block activation
// scales [G], or nullptr per token) against
// panel p:
// [y_r0..y_r3] per row, before the per-token activation scale. NB > 0: every group is exactly NB
// int4 blocks (unrolled at compile time).
// Where int_panel prefetches the panel (see the top): into L2 `ahead` bytes ahead, T0 2 KiB
// ahead (Intel decode), or not at all (AMD decode). Whether it prefetches at all and whether x
// has per-block scales are template parameters of int_panel: as branches GCC left them in the
// block and group loops (int4 g32, M = 1, K = 4096, N = 1024 in L3, 1 thread: 68.8 -> 66.2 µs).
struct PanelPrefetch {
  bool any, to_l2;
  int64_t ahead;
  template <int BITS, int MR>
  static PanelPrefetch of(const PackedLinear& w, bool passes) {
    static const bool intel = !cpu_features().amd;
    const bool to_l2 = passes || (MR > 1 && !(MR == 2 && BITS == 8 && w.h->G == 1)) || (BITS == 4 && !intel && w.panel_bytes() < 3072);
    return {to_l2 || intel, to_l2, to_l2 ? (passes ? w.panel_bytes() + 8192 : 8192) : 2048};
  }
};

template <int BITS, int MR, int NB, bool U8X, bool PF, bool SG>  // U8X (int8): x + 128 against w', else w' + 128 against x
inline void int_panel(const PackedLinear& w, const int8_t* const* x, const int32_t* const* suma,
                      const float* const* nsuma, const float* const* sg, int64_t p, const PanelPrefetch& pf, __m128* out) {
  const int64_t G = w.h->G;
  const uint8_t* wp = w.panel(p);
  const float* sw = w.sw + p * G * 4;
  const int32_t* wsum = U8X ? w.wsum + p * G * 4 : nullptr;
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(int8_t(0xF0)), c80 = _mm512_set1_epi8(int8_t(0x80));
  // whole int4 groups of up to 4 blocks: a lane's dot fits int16 (<= 4·4·15·127), so a group's
  // two accumulators fold by a saturating pack and vpmaddwd (2 ops) instead of 2 unpacks and an add
  constexpr bool PACK = BITS == 4 && NB > 0;
  const __m512i sidx = PACK        ? _mm512_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3)
                       : BITS == 4 ? _mm512_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3)
                                   : _mm512_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2, 1, 3, 1, 3, 1, 3, 1, 3);
  const __m512i ones16 = _mm512_set1_epi16(1);
  const int64_t nb = std::min(w.h->group_size, w.h->Kp) / kBlockK;
  // Both lambdas always inlined: GCC left `group` a call for int4 g32 with 2 rows of X and int8
  // with 3, its accumulators passing through memory every group (int4 g32, K = 4096, M = 2, 1
  // thread: N = 1024 in L2 219 -> 115 µs, N = 4096 from DRAM 1.05 -> 0.66 ms); and a `prefetch`
  // left a call has no visible effect, so GCC deletes the calls (all of them, when only `group`
  // was forced inline).
  auto prefetch = [&](const uint8_t* line) __attribute__((always_inline)) {
    if constexpr (PF) {
      if (pf.to_l2) _mm_prefetch(reinterpret_cast<const char*>(line + pf.ahead), _MM_HINT_T1);
      else _mm_prefetch(reinterpret_cast<const char*>(line + pf.ahead), _MM_HINT_T0);
    }
  };
  __m512 f[MR], f1[MR];
  for (int i = 0; i < MR; ++i) f[i] = f1[i] = _mm512_setzero_ps();
  int64_t k = 0;
  // group g's dots, folded to one int32 vector per row of X (lanes in sidx's order)
  auto dots = [&](int64_t g, __m512i* d) __attribute__((always_inline)) {
    const int64_t n = NB > 0 ? NB : g + 1 < G ? nb : (w.h->Kp - k) / kBlockK;
    __m512i d0[MR], d1[MR];
    for (int i = 0; i < MR; ++i) d0[i] = d1[i] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int64_t b = 0; b < n; ++b, k += kBlockK) {
      if constexpr (BITS == 4) {
        prefetch(wp);
        const __m512i v = _mm512_loadu_si512(wp);
        // one row of X: the high nibbles in place, 16·u, and the dot 16 times too (<= 4·240·128 a
        // lane), one shift per group instead of one per block (per row of X and group with more)
        const __m512i lo = _mm512_and_si512(v, low4),
                      hi = MR == 1 ? _mm512_and_si512(v, high4) : _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int i = 0; i < MR; ++i) {
          const __m512i xv = broadcast32(x[i] + k);
          d0[i] = _mm512_dpbusd_epi32(d0[i], lo, xv);
          d1[i] = _mm512_dpbusd_epi32(d1[i], hi, xv);
        }
        wp += sizeof(W4Block);
      } else {
        prefetch(wp);
        prefetch(wp + 64);
        // Σ (x + 128)·w' = Σ x·w' + 128·Σw', or Σ (w' + 128)·x = Σ x·w' + 128·Σx: the 128·Σ taken
        // back out per group below
        const __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 64);
        const __m512i u0 = U8X ? w0 : _mm512_xor_si512(w0, c80), u1 = U8X ? w1 : _mm512_xor_si512(w1, c80);
        for (int i = 0; i < MR; ++i) {
          const __m512i xv = broadcast32(x[i] + k);
          d0[i] = U8X ? _mm512_dpbusd_epi32(d0[i], xv, u0) : _mm512_dpbusd_epi32(d0[i], u0, xv);
          d1[i] = U8X ? _mm512_dpbusd_epi32(d1[i], xv, u1) : _mm512_dpbusd_epi32(d1[i], u1, xv);
        }
        wp += sizeof(W8Block);
      }
    }
    // int8: the 128·Σ out of one lane of each row of W (lanes 0, 8: rows 0, 1 | 2, 3)
    __m512i off0, off1;  // U8X: 128·Σw' of those rows, for every row of X
    if constexpr (U8X) {
      const __m512i ws = _mm512_castsi128_si512(_mm_slli_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wsum + g * 4)), 7));
      off0 = _mm512_maskz_permutexvar_epi32(0x0101, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0), ws);
      off1 = _mm512_maskz_permutexvar_epi32(0x0101, _mm512_setr_epi32(2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0), ws);
    }
    for (int i = 0; i < MR; ++i) {
      if constexpr (BITS == 4 && MR == 1) d1[i] = _mm512_srai_epi32(d1[i], 4);  // exact: 16 × an integer
      if constexpr (U8X) {
        d0[i] = _mm512_sub_epi32(d0[i], off0);
        d1[i] = _mm512_sub_epi32(d1[i], off1);
      } else if constexpr (BITS == 8) {  // 128·Σx
        const __m512i off = _mm512_set1_epi32(128 * suma[i][g]);
        d0[i] = _mm512_mask_sub_epi32(d0[i], 0x0101, d0[i], off);
        d1[i] = _mm512_mask_sub_epi32(d1[i], 0x0101, d1[i], off);
      }
      d[i] = PACK ? _mm512_madd_epi16(_mm512_packs_epi32(d0[i], d1[i]), ones16)
                  : _mm512_add_epi32(_mm512_unpacklo_epi32(d0[i], d1[i]), _mm512_unpackhi_epi32(d0[i], d1[i]));
    }
  };
  auto group = [&](int64_t g, __m512* acc) __attribute__((always_inline)) {
    const __m512 s = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_loadu_ps(sw + g * 4)));
    __m512i d[MR];
    dots(g, d);
    for (int i = 0; i < MR; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i]), SG ? _mm512_mul_ps(s, _mm512_set1_ps(sg[i][g])) : s, acc[i]);
  };
  // Groups of one block (g32): two groups' folded dots fold once more, |lane| <= 4·4·15·127 still
  // fits int16, to [g r0, g r1, g+1 r0, g+1 r1 ×2 | the same of rows 2, 3], so the pair takes one
  // convert, scale permute and FMA (lanes as the unpacked int4 fold orders them; see the end).
  // The second of the pair zero past the last group.
  constexpr bool PAIR = BITS == 4 && NB == 1 && MR <= 2;
  auto pair = [&](int64_t g, bool two, __m512* acc) __attribute__((always_inline)) {
    const __m512 s = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5, 2, 3, 6, 7, 2, 3, 6, 7),
                                           two ? _mm512_castps256_ps512(_mm256_loadu_ps(sw + g * 4))
                                               : _mm512_insertf32x4(_mm512_setzero_ps(), _mm_loadu_ps(sw + g * 4), 0));
    __m512i da[MR], db[MR];
    dots(g, da);
    if (two) dots(g + 1, db);
    else
      for (int i = 0; i < MR; ++i) db[i] = _mm512_setzero_si512();
    for (int i = 0; i < MR; ++i) {
      const __m512i d = _mm512_madd_epi16(_mm512_packs_epi32(da[i], db[i]), ones16);
      const __m512 si = SG ? _mm512_mul_ps(s, _mm512_mask_blend_ps(0xCCCC, _mm512_set1_ps(sg[i][g]), _mm512_set1_ps(two ? sg[i][g + 1] : 0.f))) : s;
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), si, acc[i]);
    }
  };
  int64_t g2 = 0;
  if constexpr (PAIR) {
    for (; g2 + 2 <= G; g2 += 2) pair(g2, true, f);
    if (g2 < G) pair(g2, false, f1);
  } else {
    for (; g2 + 2 <= G; g2 += 2) {  // even / odd groups in two chains: small groups do not wait on the FMA latency
      group(g2, f);
      group(g2 + 1, f1);
    }
    for (; g2 < G; ++g2) group(g2, f);
  }
  // the zero-point term's scales: s·z of each group and row, or s where z is one constant (nsuma
  // carries zero_act())
  const int8_t* zq = w.zq ? w.zq + p * G * 4 : nullptr;
  auto zs16 = [&](int64_t g) __attribute__((always_inline)) {
    const __m512 s = _mm512_loadu_ps(sw + g * 4);
    if (!zq) return s;
    const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zq + g * 4));
    return _mm512_mul_ps(s, _mm512_cvtepi32_ps(lb_cvtepi8_epi32(z)));
  };
  auto zs4 = [&](int64_t g) __attribute__((always_inline)) {
    const __m128 s = _mm_loadu_ps(sw + g * 4);
    return zq ? group_zero_scales(zq + g * 4, s) : s;
  };
  const int64_t gz = w.has_zero() ? G : 0;
  for (int i = 0; i < MR; ++i) {
    f[i] = _mm512_add_ps(f[i], f1[i]);
    // lanes: int4 [a b a b ..| c d c d ..] = rows (0 1 | 2 3) (PACK but not PAIR: [a a b b ..| c c d d ..]),
    // int8 rows (0 2 | 1 3)
    const __m128 lo = _mm_add_ps(_mm512_castps512_ps128(f[i]), _mm512_extractf32x4_ps(f[i], 1));
    const __m128 hi = _mm_add_ps(_mm512_extractf32x4_ps(f[i], 2), _mm512_extractf32x4_ps(f[i], 3));
    const __m128 lo2 = _mm_add_ps(lo, _mm_movehl_ps(lo, lo)), hi2 = _mm_add_ps(hi, _mm_movehl_ps(hi, hi));
    __m128 t = PACK && !PAIR ? _mm_hadd_ps(lo, hi) : BITS == 4 ? _mm_movelh_ps(lo2, hi2) : _mm_unpacklo_ps(lo2, hi2);
    __m512 z = _mm512_setzero_ps(), z1 = _mm512_setzero_ps();  // two chains (G/4 FMAs is long for 32-wide groups)
    int64_t g = 0;
    for (; g + 8 <= gz; g += 8) {
      z = _mm512_fmadd_ps(zs16(g), _mm512_loadu_ps(nsuma[i] + g * 4), z);
      z1 = _mm512_fmadd_ps(zs16(g + 4), _mm512_loadu_ps(nsuma[i] + g * 4 + 16), z1);
    }
    z = _mm512_add_ps(z, z1);
    for (; g + 4 <= gz; g += 4) z = _mm512_fmadd_ps(zs16(g), _mm512_loadu_ps(nsuma[i] + g * 4), z);
    for (; g < gz; ++g) t = _mm_fmadd_ps(zs4(g), _mm_loadu_ps(nsuma[i] + g * 4), t);
    const __m256 z8 = _mm256_add_ps(_mm512_castps512_ps256(z), _mm512_extractf32x8_ps(z, 1));
    out[i] = _mm_add_ps(t, _mm_add_ps(_mm256_castps256_ps128(z8), _mm256_extractf128_ps(z8, 1)));
  }
}

template <int BITS, int MR, int NB>
inline void int_rows(const MatmulArgs& a, int64_t m, int64_t m0, const std::vector<float>& nsuma, int64_t p, bool passes) {
  const int64_t G = a.w.h->G;
  const int8_t* x[MR];
  const int32_t* sa[MR];
  const float* ns[MR];
  const float* sg[MR];
  // int8, 3 or 4 rows: x + 128 where the call prepared it (see int_panel)
  const bool u8x = BITS == 8 && MR > 2 && a.x.xu && a.w.wsum;
  const int8_t* xs = u8x ? reinterpret_cast<const int8_t*>(a.x.xu) : a.x.xq;
  for (int i = 0; i < MR; ++i) {
    x[i] = xs + (m + i) * a.x.ld;
    sa[i] = a.x.suma + (m + i) * G;
    ns[i] = &nsuma[(m + i - m0) * G * 4];
    sg[i] = a.x.sg + (m + i) * G;
  }
  __m128 out[MR];
  const PanelPrefetch pf = PanelPrefetch::of<BITS, MR>(a.w, passes);
  auto run = [&](auto u8x_, auto sg_) {
    constexpr bool U8X = decltype(u8x_)::value, SG = decltype(sg_)::value;
    if (pf.any) int_panel<BITS, MR, NB, U8X, true, SG>(a.w, x, sa, ns, sg, p, pf, out);
    else int_panel<BITS, MR, NB, U8X, false, SG>(a.w, x, sa, ns, sg, p, pf, out);
  };
  using U8X = std::bool_constant<(BITS == 8 && MR > 2)>;
  if (u8x && a.x.sg) run(U8X(), std::true_type());
  else if (u8x) run(U8X(), std::false_type());
  else if (a.x.sg) run(std::false_type(), std::true_type());
  else run(std::false_type(), std::false_type());
  for (int i = 0; i < MR; ++i) store_tile(a, m + i, p, out[i], a.x.sa[m + i]);
}

// Rows [m0, m1) × panels [p0, p1): per panel, the rows in fours, then the rest in one pass (the
// panel stays in L1 after the first; for decode it is read from DRAM once). With more than one
// pass a panel, every pass prefetches one panel further ahead, so DRAM keeps streaming through
// the passes that work from L1 (int8 per channel, K = N = 4096, from DRAM, 1 thread, builds
// alternating 3×, min ms: M = 5 1.14 -> 0.69, M = 6 1.24 -> 0.71, M = 8 1.24 -> 0.89, M = 12 1.62
// -> 1.24; int4 g128 unchanged, its passes being slower than DRAM).
// int8 with 3 or 4 rows: M - 1 rows, then the last in a pass of its own. One pass of them over a
// panel streaming from DRAM waits on memory although its prefetches run as far ahead as with two
// passes (prefetching the next panel once more after each panel helps as much, so some of the
// first pass's prefetches are likely dropped). K = N = 4096, 1 thread, weights from DRAM, 3-5
// alternations, min ms, one pass -> split: per channel M = 3 0.78-0.81 -> 0.49-0.61 (1 + 1 + 1:
// 0.65), M = 4 0.86-0.91 -> 0.50-0.60 (2 + 2: 0.56-0.60); g128 M = 3 0.74-0.76 -> 0.61-0.66, M = 4
// 0.72 -> 0.69-0.70; 2 threads, per channel M = 4 0.46 -> 0.29. The cost: weights resident in L3
// (the same 16 MB layer called over and over) pay for the extra pass, M = 3 / 4 342 / 370 -> 432
// / 485 µs. int4 is better in one pass (g128 M = 3 0.39 -> 0.43 split, g32 M = 4 1.04 -> 1.12).
template <int BITS, int NB>
void walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const std::vector<float> nsuma = neg_suma(a, m0, m1);
  const bool split = BITS == 8 && (m1 - m0 == 3 || m1 - m0 == 4);
  const bool passes = m1 - m0 > 4 || split;
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m = m0;
    if (split) {
      if (m1 - m0 == 4) int_rows<BITS, 3, NB>(a, m, m0, nsuma, p, true);
      else int_rows<BITS, 2, NB>(a, m, m0, nsuma, p, true);
      int_rows<BITS, 1, NB>(a, m1 - 1, m0, nsuma, p, true);
      continue;
    }
    for (; m + 4 <= m1; m += 4) int_rows<BITS, 4, NB>(a, m, m0, nsuma, p, passes);
    switch (m1 - m) {
      case 3: int_rows<BITS, 3, NB>(a, m, m0, nsuma, p, passes); break;
      case 2: int_rows<BITS, 2, NB>(a, m, m0, nsuma, p, passes); break;
      case 1: int_rows<BITS, 1, NB>(a, m, m0, nsuma, p, passes); break;
    }
  }
}

// Integer GEMM on the k4 scratch. A step (4 k) is one zmm: 16 rows of W × 4 codes. Per-token
// int4 (SIGNED): the codes as s8 u − z (SignedInt4) against x + 128 (PreparedAct::xu) as the u8
// operand, Σ(x + 128)(u − z) = Σx(u − z) + 128·Σ(u − z): the second sum does not depend on x, so
// the zero point costs no FMA per group and row of X (int4 g32, K = N = 4096, M = 512, 1 thread,
// alternating builds: 55.5-56.1 -> 50.7-51.1 ms; from 48 rows and for groups of up to 64, see
// kU8xMinRows). Each group's int32 dots take their 128·Σ(u − z) back out before they turn float,
// so they are exactly Σx(u − z) (one float constant per set, subtracted after all groups' sums,
// kept only 1.5e-4 of max |y|, K = 4096, Gaussian data: the sums it cancelled grow with K). Else
// (int8, per-block x) the codes unsigned (int4 u in
// [0, 15]; int8 u = w' + 128, see unpack_k4) against the int8 x, and the zero-point FMA where a
// group ends inside the range. A group ends with a convert and an FMA per row of X and set
// (k4_rows). A share's int32 dot stays exact in float: chunks of 1024 k (int4, |d| <= 1024·15·255)
// or 512 (int8, 512·255·127) < 2^24; int8 per channel carries its dot over the chunks in int32
// (k4_rows' CARRY) and rounds it once, where it passes 2^24.
constexpr int64_t kK4ChunkK4 = 1024, kK4ChunkK8 = 512;

// The k4 int4 set (codes u) as s8 u − z, z = swz / sw per row and group (an integer: the stored
// offset), and each group's −128·Σ(u − z) as int32 in place of its swz (sc[g·32 + 16..31], which
// the signed GEMM does not read as floats).
struct SignedInt4 {
  static int64_t bytes(int64_t Kp) { return Kp / 4 * kK4Step; }
  static void run(const PackedLinear& w, const uint8_t* k4, float* sc, uint8_t* out) {
    const int64_t G = w.h->G, gs = w.h->group_size;
    const __m512i ones = _mm512_set1_epi8(1), bytes4 = _mm512_set1_epi32(0x01010101);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 sw = _mm512_loadu_ps(sc + g * 32), swz = _mm512_loadu_ps(sc + g * 32 + 16);
      const __mmask16 nz = _mm512_cmp_ps_mask(sw, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      __m512i z = _mm512_cvtps_epi32(_mm512_maskz_div_ps(nz, swz, sw));  // sw = 0: the group is 0, z too
      z = _mm512_min_epi32(_mm512_max_epi32(z, _mm512_setzero_si512()), _mm512_set1_epi32(15));
      const __m512i zv = _mm512_mullo_epi32(z, bytes4);  // z in each byte of its row's lane
      __m512i c = _mm512_setzero_si512();
      for (int64_t k = g * gs, e = w.group_end(g); k < e; k += 4) {
        const __m512i v = _mm512_sub_epi8(_mm512_loadu_si512(k4 + k / 4 * kK4Step), zv);
        _mm512_storeu_si512(out + k / 4 * kK4Step, v);
        c = _mm512_dpbusd_epi32(c, ones, v);
      }
      _mm512_storeu_si512(sc + g * 32 + 16, _mm512_mullo_epi32(c, _mm512_set1_epi32(-128)));
    }
  }
};

// MR rows of X against NS sets (16·NS rows of W): each step loads NS weight vectors and
// broadcasts MR activation dwords for MR·NS vpdpbusd, MR·NS independent dot chains; pf: the
// byte offset from a row's activations to those to prefetch (k4_walk_sets' next pass); STREAM
// (int8 weights): a step of the stream per k-block; CARRY (int8 per channel: one group over
// every chunk): the int32 dots carried in y from chunk to chunk and scaled once after the last,
// not converted and scaled per chunk (1 thread, in cache, alternating builds, min ms: 576×1536
// M = 128 0.630 -> 0.617, 4096² M = 512 42.5 -> 42.2; the same per-row errors against a float64
// product of the rounded x, 1e-7-6e-7 of max |y|, rows of mean 0.3-1 σ; int4 per channel, whose
// chunks of 1024 rarely split K, was 2-3% slower with it).
template <int MR, int NS, bool SG, bool SIGNED, bool STREAM, bool CARRY>
inline void k4_rows(const MatmulArgs& a, const uint8_t* const* wk, const float* const* sc, const float* ns, int64_t m,
                    int64_t g0, int64_t k0, int64_t k1, int64_t pf, PanelStream* stream, float (*const* y)[16]) {
  static_assert(!(SG && SIGNED), "per-block activations take the unsigned codes");
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G, ld = a.x.ld;
  const int8_t* x = SIGNED ? reinterpret_cast<const int8_t*>(a.x.xu) + m * ld : a.x.xq + m * ld;
  __m512 f[MR][NS];
  for (int i = 0; i < MR; ++i)
    for (int s = 0; s < NS; ++s) f[i][s] = CARRY ? _mm512_setzero_ps() : _mm512_loadu_ps(y[s][i]);
  for (int64_t k = k0, g = g0; k < k1; ++g) {
    const int64_t e = std::min(w.group_end(g), k1);
    __m512i d[MR][NS];
    for (int i = 0; i < MR; ++i)
      for (int s = 0; s < NS; ++s) d[i][s] = CARRY ? _mm512_loadu_si512(y[s][i]) : _mm512_setzero_si512();
    for (; k < e; k += kBlockK) {
      for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(x + i * ld + k + pf), _MM_HINT_T0);
      if constexpr (STREAM) stream->step();
#pragma GCC unroll 8
      for (int j = 0; j < kBlockK / 4; ++j) {
        __m512i wv[NS];
        for (int s = 0; s < NS; ++s) wv[s] = _mm512_loadu_si512(wk[s] + (k >> 2) * kK4Step + j * kK4Step);
        for (int i = 0; i < MR; ++i) {
          int32_t v;
          std::memcpy(&v, x + i * ld + k + 4 * j, 4);
          const __m512i xv = _mm512_set1_epi32(v);
          for (int s = 0; s < NS; ++s)
            d[i][s] = SIGNED ? _mm512_dpbusd_epi32(d[i][s], xv, wv[s]) : _mm512_dpbusd_epi32(d[i][s], wv[s], xv);
        }
      }
    }
    if (CARRY && e < w.group_end(g)) {  // the group goes on in the next chunk
      for (int i = 0; i < MR; ++i)
        for (int s = 0; s < NS; ++s) _mm512_storeu_si512(y[s][i], d[i][s]);
      return;
    }
    for (int s = 0; s < NS; ++s) {
      const __m512 sw = _mm512_loadu_ps(sc[s] + g * 32);
      if constexpr (SIGNED) {  // whole groups (see int_k4_walk): −128·Σ(u − z) out exactly
        const __m512i c = _mm512_loadu_si512(sc[s] + g * 32 + 16);
        for (int i = 0; i < MR; ++i) d[i][s] = _mm512_add_epi32(d[i][s], c);
      }
      for (int i = 0; i < MR; ++i)
        f[i][s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][s]), SG ? _mm512_mul_ps(sw, _mm512_set1_ps(a.x.sg[(m + i) * G + g])) : sw, f[i][s]);
      if (!SIGNED && e == w.group_end(g)) {
        const __m512 sz = _mm512_loadu_ps(sc[s] + g * 32 + 16);
        for (int i = 0; i < MR; ++i) f[i][s] = _mm512_fmadd_ps(sz, _mm512_set1_ps(ns[i * G + g]), f[i][s]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int s = 0; s < NS; ++s) _mm512_storeu_ps(y[s][i], f[i][s]);
}

// W4A8 / W8A8 GEMM on the k4 scratch, two sets of four panels at a time: k in chunks (whole
// groups where they are narrower), so the chunk's scratch and activations stay in L1 while the
// rows pass over them. Six rows of X against two sets (row_passes) instead of eight against one:
// K = N = 4096, M = 512, 1 thread, alternating builds, ms: int8 45.1-45.3 -> 42.7-43.1, int4
// g128 46.5-46.8 -> 44.8-45.2, g32 50.3-50.7 -> 47.7-47.9 (with the prefetch of the next pass's
// activations).
template <int BITS, bool SIGNED>
void int_k4_walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t G = a.w.h->G, Kp = a.w.h->Kp, rows = m1 - m0, ld = a.x.ld;
  thread_local std::conditional_t<SIGNED, K4Sets<4, false, SignedInt4>, K4Sets<BITS, BITS == 8>> sets;
  thread_local std::vector<float> ns;
  if (!SIGNED) k4_neg_sums(a, m0, m1, true, ns);
  PanelStream stream;
  k4_walk_sets<2>(a, m0, m1, p0, p1, sets, BITS == 8 ? kK4ChunkK8 : kK4ChunkK4, a.x.sa,
                  [&](int n, const uint8_t* const* wk, const float* const* sc, int64_t g0, int64_t k0, int64_t k1,
                      float (*const* y)[16]) __attribute__((always_inline)) {
    auto pass = [&](auto mr, auto nsets, int64_t i) {
      constexpr int MR = decltype(mr)::value, NS = decltype(nsets)::value;
      const float* nsi = SIGNED ? nullptr : ns.data() + i * G;
      // the next pass's activations: the next rows, or the first rows' next chunk (or the next
      // sets' first). +1.5% int8, +4% g32 at M = 512.
      const int64_t pf = i + MR < rows ? MR * ld : -i * ld + (k1 < Kp ? k1 - k0 : -k0);
      float (*yi[2])[16] = {y[0] + i, n > 1 ? y[1] + i : nullptr};
      if constexpr (SIGNED) k4_rows<MR, NS, false, true, false, false>(a, wk, sc, nsi, m0 + i, g0, k0, k1, pf, nullptr, yi);
      else if (a.x.sg) k4_rows<MR, NS, true, false, BITS == 8, false>(a, wk, sc, nsi, m0 + i, g0, k0, k1, pf, &stream, yi);
      else if (BITS == 8 && G == 1) k4_rows<MR, NS, false, false, true, true>(a, wk, sc, nsi, m0 + i, g0, k0, k1, pf, &stream, yi);
      else k4_rows<MR, NS, false, false, BITS == 8, false>(a, wk, sc, nsi, m0 + i, g0, k0, k1, pf, &stream, yi);
    };
    row_passes(rows, n, pass);
  }, BITS == 8 ? &stream : nullptr, (rows + 5) / 6 * (Kp / kBlockK));  // passes of 6 rows, a step per k-block
}

}  // namespace

void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  // The k4 scratch from 16 rows of X (8 for int4 in groups of 32, whose panel kernel folds the
  // most; int8, whose panel kernel takes x + 128 and so does no per-pass work on the weights: 32
  // in groups, per channel int8_panel_rows(K), whose panel kernel folds once per panel), for a
  // range or a whole call of that many rows (a tail of 16 rows or more then finds the sets its
  // first tile unpacked); fewer run the panel kernel (no scratch to build; it takes rows in fours, then the
  // rest in one pass, and prefetches the weights). K = N = 4096, 1 thread, weights rotated from
  // DRAM, ms, panel -> k4: int4 g128 M = 6 0.77-0.82 -> 1.23-1.25, M = 16 2.01-2.13 -> 2.14-2.18,
  // M = 24 3.06-3.24 -> 2.86; g64 M = 12 1.90-1.92 -> 2.02-2.04, M = 16 2.50-2.59 -> 2.38-2.45;
  // g32 M = 8 1.93-2.07 -> 1.87-2.00, M = 10 2.45-2.78 -> 2.13; int8 g128 M = 16 / 24 / 32 / 48
  // 1.99 / 2.95 / 3.93 / 5.89 -> 2.46 / 3.22 / 3.96 / 5.30; int8 per channel M = 64 / 128 / 192 /
  // 256 5.55 / 11.05 / 16.37 / 21.79 -> 6.17 / 11.38 / 16.52 / 21.62 (2 threads alike).
  const int64_t k4_rows = a.w.h->bits == 8 ? (a.w.h->G == 1 ? int8_panel_rows(a.w.h->K) : 32) : a.w.h->group_size <= 32 ? 8 : 16;
  if (m1 - m0 >= k4_rows || (a.x.M >= k4_rows && m1 - m0 >= 16)) {
    if (a.w.h->bits == 8) return int_k4_walk<8, false>(a, m0, m1, p0, p1);
    // x + 128 prepared (see PreparedAct::xu)
    if (a.x.xu) return int_k4_walk<4, true>(a, m0, m1, p0, p1);
    return int_k4_walk<4, false>(a, m0, m1, p0, p1);
  }
  if (a.w.h->bits == 8) return walk<8, 0>(a, m0, m1, p0, p1);
  const int64_t gs = a.w.h->group_size, G = a.w.h->G;
  if (G > 1 && a.w.h->K == G * gs) {  // every group whole: unrolled group bodies
    if (gs == 32) return walk<4, 1>(a, m0, m1, p0, p1);
    if (gs == 64) return walk<4, 2>(a, m0, m1, p0, p1);
    if (gs == 128) return walk<4, 4>(a, m0, m1, p0, p1);
  }
  walk<4, 0>(a, m0, m1, p0, p1);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
