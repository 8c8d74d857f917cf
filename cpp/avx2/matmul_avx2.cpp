// AVX2 matmul kernels on layout panel4_k32 (see common/layout_panel4.h).
//   matmul_int  : W4A8 / W8A8 integer dots. One k-block = 32 int8 activations in one ymm.
//     int4: one 32-byte load holds two rows' 32 codes (lo / hi nibble), u in [0, 15] is the
//           unsigned operand of vpmaddubsw, the int8 activation the signed one: pairs stay
//           <= 2·15·127 = 3810, no int16 saturation; vpmaddwd(·, 1) widens to int32.
//     int8: w' is signed, so use the sign trick: maddubs(|w'|, sign(x, w')); |w'| <= 128 and
//           |x| <= 127 (activations are clamped to ±127) keep pairs <= 32512 < 32767.
//     The integer dots are exact; per group they are scaled lane-wise in float (see int_panel),
//     so outputs match cpp/ref to float rounding, not bit for bit.
//     Built as avx2_vnni (LOWBIT_AVX_VNNI), every such dot is one vpdpbusd into int32 lanes in
//     place of vpmaddubsw, the int16 sums and vpmaddwd (see dot_u8s8).
//     Tiling: per panel (4 rows of W), the dispatcher's rows of X in passes of up to 3; decode
//     (M <= 16) streams each panel from DRAM once with software prefetch. 8 or more rows of X
//     (int4 with groups wider than 32: more, see matmul_int): on a k4 scratch instead
//     (int_k4_walk), no per-group fold.
//   matmul_float: weight-only; codes -> float fused with the FMA; the float weight matrix never
//     exists in memory. Up to 7 rows of X (nf4: 3, int8: 9): decoded on the fly per block, two
//     rows at a time (float_tile; int4 codes masked in place and converted, nf4 as vpshufb byte
//     planes, both against permuted activations, see PermutedX and NF4Planes; int8 by
//     vpmovsxbd from memory). More: the k4 scratch, decoded per 256-k chunk into an L1 tile of
//     floats that every row streams over (float_k4_walk; nf4 by the same byte planes).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "avx2/k4_scratch.h"
#include "avx2/store_tile.h"
#include "common/format.h"
#include "common/matmul_epilogue.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

// AVX-VNNI: acc + the u8 × s8 dots of each 4-byte group (vpdpbusd on ymm; LOWBIT_AVX_VNNI=2 is
// its AVX-512VL encoding, the test-only avx2_vnni_emulated build). The same int32 lanes as
// vpmaddubsw then vpmaddwd(·, 1), without their int16 pair sums.
#ifdef LOWBIT_AVX_VNNI
constexpr bool kVnni = true;
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if LOWBIT_AVX_VNNI == 2
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
#else
constexpr bool kVnni = false;
inline __m256i dot_u8s8(__m256i acc, __m256i, __m256i) { return acc; }  // never called
#endif

inline __m128 hsum4_ps(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// The 4 rows' 32 codes of block b as u8 (int4) or s8 (int8) registers.
template <int BITS>
inline void load_block(const uint8_t* panel, int64_t b, __m256i wv[4]) {
  if constexpr (BITS == 4) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const uint8_t* src = panel + b * sizeof(W4Block);
    __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
    wv[0] = _mm256_and_si256(v0, low4);
    wv[1] = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
    wv[2] = _mm256_and_si256(v1, low4);
    wv[3] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
  } else {
    const uint8_t* src = panel + b * sizeof(W8Block);
    for (int r = 0; r < 4; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * r));
  }
}

// Integer kernel: MR (1 to 3) rows of X against one panel, no horizontal sum per block. Per group
// each X row's 4 panel-row sums are folded with vphadd into one register
// [r0 r1 r2 r3 | r0 r1 r2 r3] (the halves hold k mod 32 < 16 and >= 16), converted and scaled by
// [sw | sw] in one FMA; one horizontal add per panel. int4 folds start in int16: a vpmaddubsw
// lane is <= 2·15·127 = 3810, so a lane summed over <= 4 blocks and then pairwise (vphaddw) stays
// <= 30480, and over <= 2 blocks even a second vphaddw fits. The zero-point term
// Σ_g swz[g][r]·suma[g] is a dot over the panel's [G][4] s·z (s where z is one constant) against
// −suma (float, exact below 2^24). The same kernel serves decode (MR = 1, weights streamed from
// DRAM once) and GEMM (the dispatcher's tile of X rows walked in passes of up to 3 while the
// panel stays in L1).
constexpr int64_t kW4Bytes = sizeof(W4Block), kW8Bytes = sizeof(W8Block);

// Software prefetch of every weight line 2 KiB ahead (about one DRAM latency at full bandwidth):
// measured 65% -> 80-90% of the DRAM read rate for M=1, next to the hardware prefetcher alone.
// int8 decode streams best from 1 KiB ahead (K = N = 4096, 1 thread, % of the read probe in
// alternating runs: 512 B 78-80, 768 B 83-85, 1 KiB 83-87, 2 KiB 78-81, 3 KiB 75-78; int4 with
// 1 / 1.5 KiB: 80-81 / 84-86 against 86-91 at 2 KiB; 2 threads: no difference).
// int8 with more rows of X (int_walk) and the weight-only kernel (float_tile) prefetch farther,
// into L2: see w8_group and float_tile.
constexpr int64_t kPrefetchAhead = 2048, kPrefetchAhead8 = 1024, kPrefetchFar = 8192;
inline void prefetch_weights(const uint8_t* line, int64_t ahead = kPrefetchAhead, bool to_l2 = false) {
  if (to_l2) _mm_prefetch(reinterpret_cast<const char*>(line + ahead), _MM_HINT_T1);
  else _mm_prefetch(reinterpret_cast<const char*>(line + ahead), _MM_HINT_T0);
}

// int4: blocks [0, nb) (nb <= 4; NB > 0 fixes it at compile time) of a panel against MR rows of
// X (x[i] at the first block's k), folded per row of X. ahead > 0: prefetch each block's lines
// that far ahead (see int_walk).
template <int MR, int NB>
inline void w4_batch(const uint8_t* wp, const int8_t* const* x, int64_t nb, int64_t ahead, __m256i* out) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i s[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) s[i][r] = _mm256_setzero_si256();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < (NB > 0 ? NB : nb); ++b) {
    if (ahead) prefetch_weights(wp + b * kW4Bytes, ahead);
    __m256i xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + b * kBlockK));
#pragma GCC unroll 2  // unrolled early, GCC keeps s in registers (see w8_group)
    for (int h = 0; h < 2; ++h) {  // one unpacked row at a time keeps MR·4 sums in registers
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + b * kW4Bytes + 32 * h));
      const __m256i lo = _mm256_and_si256(v, low4);
#pragma GCC unroll 2
      for (int i = 0; i < MR; ++i)
        s[i][2 * h] = kVnni ? dot_u8s8(s[i][2 * h], lo, xv[i]) : _mm256_add_epi16(s[i][2 * h], _mm256_maddubs_epi16(lo, xv[i]));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
#pragma GCC unroll 2
      for (int i = 0; i < MR; ++i)
        s[i][2 * h + 1] = kVnni ? dot_u8s8(s[i][2 * h + 1], hi, xv[i])
                                : _mm256_add_epi16(s[i][2 * h + 1], _mm256_maddubs_epi16(hi, xv[i]));
    }
  }
  for (int i = 0; i < MR; ++i) {
    if constexpr (kVnni) {  // int32 sums already
      out[i] = _mm256_hadd_epi32(_mm256_hadd_epi32(s[i][0], s[i][1]), _mm256_hadd_epi32(s[i][2], s[i][3]));
      continue;
    }
    const __m256i h01 = _mm256_hadd_epi16(s[i][0], s[i][1]), h23 = _mm256_hadd_epi16(s[i][2], s[i][3]);
    if (NB == 1 || NB == 2) out[i] = _mm256_madd_epi16(_mm256_hadd_epi16(h01, h23), ones16);
    else out[i] = _mm256_hadd_epi32(_mm256_madd_epi16(h01, ones16), _mm256_madd_epi16(h23, ones16));
  }
}

// int8: nb blocks, widened every block (its pairs reach 32512), folded per row of X. A prefetch
// farther ahead than decode's goes to L2 (T1), where it does not evict X's rows from L1: M = 2-5
// rows consume a panel slowly, and its T0 prefetch 1 KiB ahead left DRAM and compute taking
// turns (K = N = 4096, weights from DRAM, 1 thread, 4 alternations, min / median ms, T0 -> T1:
// M = 2 0.95 / 1.04 -> 0.73 / 0.84, M = 3 1.49 / 1.53 -> 1.05 / 1.11, M = 4 1.74 / 1.76 -> 1.33
// / 1.52, M = 5 1.96 / 2.03 -> 1.65 / 1.68; int4 took T1 no faster, g32 slower: M = 2 0.76 -> 0.93).
template <int MR>
inline void w8_group(const uint8_t* wp, const int8_t* const* x, int64_t nb, int64_t ahead, __m256i* out) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i s[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) s[i][r] = _mm256_setzero_si256();
  // The small loops unrolled early, so GCC keeps s in registers (else it stores and reloads s
  // every block: a memory round trip on each sum's dependency chain).
  for (int64_t b = 0; b < nb; ++b, wp += kW8Bytes) {
    if (ahead) {
      prefetch_weights(wp, ahead, ahead > kPrefetchAhead8);
      prefetch_weights(wp + 64, ahead, ahead > kPrefetchAhead8);
    }
    __m256i xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i] + b * kBlockK));
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m256i wr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * r));
      const __m256i aw = _mm256_abs_epi8(wr);
#pragma GCC unroll 2
      for (int i = 0; i < MR; ++i) {
        const __m256i sx = _mm256_sign_epi8(xv[i], wr);
        s[i][r] = kVnni ? dot_u8s8(s[i][r], aw, sx) : _mm256_add_epi32(s[i][r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones16));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    out[i] = _mm256_hadd_epi32(_mm256_hadd_epi32(s[i][0], s[i][1]), _mm256_hadd_epi32(s[i][2], s[i][3]));
}

// One group of nb blocks (NB > 0: exactly NB int4 blocks), folded per row of X.
template <int BITS, int MR, int NB>
inline void int_group(const uint8_t* wp, const int8_t* const* x, int64_t nb, int64_t ahead, __m256i* out) {
  if constexpr (BITS == 8) {
    w8_group<MR>(wp, x, nb, ahead, out);
  } else if constexpr (NB > 0) {
    w4_batch<MR, NB>(wp, x, NB, ahead, out);
  } else {
    for (int i = 0; i < MR; ++i) out[i] = _mm256_setzero_si256();
    for (int64_t b = 0; b < nb; b += 4) {
      const int8_t* xb[MR];
      for (int i = 0; i < MR; ++i) xb[i] = x[i] + b * kBlockK;
      __m256i d[MR];
      w4_batch<MR, 0>(wp + b * kW4Bytes, xb, std::min<int64_t>(4, nb - b), ahead, d);
      for (int i = 0; i < MR; ++i) out[i] = _mm256_add_epi32(out[i], d[i]);
    }
  }
}

// Rows x[0..MR) of X (nsuma: −suma of each row, [G][4] floats, already times sg when per block;
// sg: each row's per-block activation scales [G], or nullptr per token) against panel p:
// [y_r0..y_r3] per row, before the per-token activation scale. ahead: the weight prefetch distance
// (0: none).
template <int BITS, int MR, int NB>
inline void int_panel(const PackedLinear& w, const int8_t* const* x, const float* const* nsuma,
                      const float* const* sg, int64_t p, int64_t ahead, __m128* out) {
  const int64_t G = w.h->G, gs = w.h->group_size;
  const int64_t nb = std::min(gs, w.h->Kp) / kBlockK;
  const uint8_t* panel = w.panel(p);
  const float* sw = w.sw + p * G * 4;
  const int8_t* zq = w.zq ? w.zq + p * G * 4 : nullptr;  // the zero-point dot's own stream, if stored
  // its scales: s·z of two groups' rows, or s where z is one constant (nsuma carries zero_act())
  auto zs8 = [&](int64_t g) {
    const __m256 s = _mm256_loadu_ps(sw + g * 4);
    if (!zq) return s;
    int64_t z;
    std::memcpy(&z, zq + g * 4, 8);
    return _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(z))));
  };
  const int64_t gz = w.has_zero() ? G : 0;
  // decode: the scales stream from DRAM beside the codes; fetch their lines as far ahead as the
  // codes' prefetch (in groups: ahead / group bytes), zq too (the zero-point dot reads it last)
  const int64_t decode_ahead = BITS == 8 ? kPrefetchAhead8 : kPrefetchAhead;
  const int64_t sdist = std::max<int64_t>(1, ahead / (std::max<int64_t>(nb, 1) * (BITS == 4 ? kW4Bytes : kW8Bytes))) * 4;
  auto group = [&](int64_t g, __m256* f) {
    if (ahead == decode_ahead && (g & 3) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(sw + g * 4 + sdist), _MM_HINT_T0);
      if (zq && (g & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(zq + g * 4 + sdist), _MM_HINT_T0);
    }
    const int64_t k0 = g * gs, n = NB > 0 ? NB : (g + 1 < G ? nb : (w.h->Kp - k0) / kBlockK);
    const int8_t* xg[MR];
    for (int i = 0; i < MR; ++i) xg[i] = x[i] + k0;
    __m256i d[MR];
    int_group<BITS, MR, NB>(panel + k0 / kBlockK * (BITS == 4 ? kW4Bytes : kW8Bytes), xg, n, ahead, d);
    const __m256 s = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(sw + g * 4));
    for (int i = 0; i < MR; ++i)
      f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i]), sg ? _mm256_mul_ps(s, _mm256_set1_ps(sg[i][g])) : s, f[i]);
  };
  __m256 f0[MR], f1[MR];
  for (int i = 0; i < MR; ++i) f0[i] = f1[i] = _mm256_setzero_ps();
  int64_t g2 = 0;
  for (; g2 + 2 <= G; g2 += 2) {  // even / odd groups in two chains: small groups do not wait on the FMA latency
    group(g2, f0);
    group(g2 + 1, f1);
  }
  for (; g2 < G; ++g2) group(g2, f0);
  for (int i = 0; i < MR; ++i) {
    // [swz_g | swz_g+1] · [−suma_g ×4 | −suma_g+1 ×4], in four chains: with 32-wide groups this
    // dot is G/2 = K/64 FMAs per row and panel, as long as a chain as the dot products themselves
    __m256 z[4] = {_mm256_add_ps(f0[i], f1[i]), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t g = 0;
    for (; g + 8 <= gz; g += 8)
      for (int j = 0; j < 4; ++j)
        z[j] = _mm256_fmadd_ps(zs8(g + 2 * j), _mm256_loadu_ps(nsuma[i] + (g + 2 * j) * 4), z[j]);
    for (; g + 2 <= gz; g += 2)
      z[0] = _mm256_fmadd_ps(zs8(g), _mm256_loadu_ps(nsuma[i] + g * 4), z[0]);
    const __m256 zsum = _mm256_add_ps(_mm256_add_ps(z[0], z[1]), _mm256_add_ps(z[2], z[3]));
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(zsum), _mm256_extractf128_ps(zsum, 1));
    if (g < gz) {
      const __m128 s = _mm_loadu_ps(sw + g * 4);
      t = _mm_fmadd_ps(zq ? group_zero_scales(zq + g * 4, s) : s, _mm_loadu_ps(nsuma[i] + g * 4), t);
    }
    out[i] = t;
  }
}

// Rows [m0, m1) × panels [p0, p1): per panel, the rows in passes of 3 (int4, unless 4 rows are
// left: 2 + 2 beats 3 + 1), then 2, then 1 (the panel, <= Kp bytes, stays in L1 while the rows
// stream from L1/L2; for decode the panel is read from DRAM once). The first pass prefetches the
// panel 2 KiB ahead (int8: 1 KiB, 8 KiB into L2 for 2+ rows, see w8_group); the second prefetches
// the next panel (int8: into L2), so DRAM keeps streaming while the
// later passes work from L1 (K = N = 4096, 1 thread, M = 2 / 4 / 7: int4 g128 0.86 / 1.40 /
// 2.23-2.87 -> 0.68 / 1.08 / 1.92-2.68 ms, int8 1.67 / 2.49 / (M = 8) 3.42 -> 1.37 / 2.02 /
// 3.00 ms; M = 1 unchanged). Passes of 3 unpack each int4 block once for 3 rows (weights in L3,
// M = 3 / 6 / 12: g128 0.75 / 1.30 / 2.60 -> 0.65 / 1.24 / 2.47 ms, g64 0.91 / 1.64 / 3.22 ->
// 0.75 / 1.47 / 2.94); int8 gained nothing from them (its 3 · 4 int32 sums spill).
template <int BITS, int NB>
void int_walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t G = a.w.h->G, panel_bytes = a.w.panel_bytes();
  const std::vector<float> nsuma = neg_suma(a, m0, m1);
  for (int64_t p = p0; p < p1; ++p) {
    int pass = 0;  // per panel: the first pass prefetches it, the second the next panel
    auto rows = [&](auto mr, int64_t m) {
      constexpr int MR = decltype(mr)::value;
      const int8_t* x[MR];
      const float* ns[MR];
      const float* sg[MR];
      __m128 out[MR];
      for (int i = 0; i < MR; ++i) {
        x[i] = a.x.xq + (m + i) * a.x.ld;
        ns[i] = &nsuma[(m + i - m0) * G * 4];
        sg[i] = a.x.sg + (m + i) * G;
      }
      const int64_t ahead = pass == 0 ? (BITS == 4 ? kPrefetchAhead : MR > 1 ? kPrefetchFar : kPrefetchAhead8)
                                      : pass == 1 ? panel_bytes : 0;
      int_panel<BITS, MR, NB>(a.w, x, ns, a.x.sg ? sg : nullptr, p, ahead, out);
      ++pass;
      for (int i = 0; i < MR; ++i) store_tile(a, m + i, p, out[i], a.x.sa[m + i]);
    };
    int64_t m = m0;
    for (; BITS == 4 && m1 - m >= 3 && m1 - m != 4; m += 3) rows(std::integral_constant<int, 3>(), m);
    for (; m1 - m >= 2; m += 2) rows(std::integral_constant<int, 2>(), m);
    if (m < m1) rows(std::integral_constant<int, 1>(), m);
  }
}

// Integer GEMM on a k4 scratch (many rows of X). The panel4 blocks keep each row's 32 codes in
// one register, so every group ends with a horizontal fold per (row of X, panel) — three vphaddw
// per group, about a third of the int4 g32 GEMM. Here four panels (16 rows of W) are first
// unpacked into a scratch of 4-k steps: one step is two registers, each 8 rows of W × 4
// consecutive k (int4: u8 codes; int8: the s8 w'), so vpmaddubsw against 4 int8 activations
// broadcast to every lane leaves each row's dot in its own lane, and a group ends with a
// convert and two FMAs per (row of X, 8 rows of W). 4 rows of X × 16 rows of W per step (3 with
// 32-wide groups, whose float sums stay in registers): 8 multiplies per 4 broadcasts and 2 loads.
// The scratch (Kp·16 bytes, L2-resident) is built once per four panels and tile and read by
// every row of X.
// Fewer rows of X: the panel4 kernels (no scratch to build) were as fast or faster, int4 and float
// activations alike; int4 with groups wider than 32 keeps them up to kDecodeRows (see matmul_int).
constexpr int64_t kK4MinRows = 8;
constexpr int64_t kK4ChunkK = 1024;  // k per chunk in the integer GEMM (int_k4_walk)

// One step (4 k) of one row of X against 16 rows of W (w0: rows 0-7, w1: 8-15) into its two sums.
// int4: vpmaddubsw of u in [0, 15] against the activations into int16 sums (a lane <= 8·3810 =
// 30480 over a block). int8: the sign trick, maddubs(|w'|, sign(x, w')) with |w'| <= 128 and
// |x| <= 127 (a lane <= 32512), widened to int32 every step. (Not |x| against sign(w', x):
// w' = −128 has no positive int8.)
template <int BITS>
inline void k4_step(__m256i w0, __m256i w1, __m256i a0, __m256i a1, const int8_t* x, __m256i& s0, __m256i& s1) {
  int32_t v;
  std::memcpy(&v, x, 4);
  const __m256i xb = _mm256_set1_epi32(v);
  if constexpr (kVnni) {  // int32 sums
    s0 = dot_u8s8(s0, a0, BITS == 4 ? xb : _mm256_sign_epi8(xb, w0));
    s1 = dot_u8s8(s1, a1, BITS == 4 ? xb : _mm256_sign_epi8(xb, w1));
  } else if constexpr (BITS == 4) {
    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(w0, xb));
    s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(w1, xb));
  } else {
    const __m256i ones16 = _mm256_set1_epi16(1);
    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, w0)), ones16));
    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, w1)), ones16));
  }
  asm("" : "+x"(s0), "+x"(s1));  // one running sum each: GCC's reassociated add tree spills
}

// One block (8 steps, 32 k) of MR <= 4 rows of X (x: row 0 at the block's k, row stride ld)
// against 16 rows of W; done(i, v, dot) gets row i's int32 dots with rows 8v .. 8v+7 of W.
// The sums are named variables, not an array: GCC kept arrays of them in memory.
template <int BITS, int MR, class Done>
inline void k4_block(const uint8_t* wb, const int8_t* x, int64_t ld, Done&& done) {
  const __m256i z = _mm256_setzero_si256();
  __m256i s0 = z, s1 = z, s2 = z, s3 = z, s4 = z, s5 = z, s6 = z, s7 = z;
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * kK4Step));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * kK4Step + 32));
    const __m256i a0 = BITS == 8 ? _mm256_abs_epi8(w0) : w0, a1 = BITS == 8 ? _mm256_abs_epi8(w1) : w1;
    const int8_t* xj = x + 4 * j;
    k4_step<BITS>(w0, w1, a0, a1, xj, s0, s1);
    if constexpr (MR > 1) k4_step<BITS>(w0, w1, a0, a1, xj + ld, s2, s3);
    if constexpr (MR > 2) k4_step<BITS>(w0, w1, a0, a1, xj + 2 * ld, s4, s5);
    if constexpr (MR > 3) k4_step<BITS>(w0, w1, a0, a1, xj + 3 * ld, s6, s7);
  }
  const __m256i ones16 = _mm256_set1_epi16(1);
  auto widen = [&](__m256i t) { return BITS == 4 && !kVnni ? _mm256_madd_epi16(t, ones16) : t; };
  done(0, 0, widen(s0));
  done(0, 1, widen(s1));
  if constexpr (MR > 1) { done(1, 0, widen(s2)); done(1, 1, widen(s3)); }
  if constexpr (MR > 2) { done(2, 0, widen(s4)); done(2, 1, widen(s5)); }
  if constexpr (MR > 3) { done(3, 0, widen(s6)); done(3, 1, widen(s7)); }
}

// Rows m .. m+MR-1 of X against the unpacked panels, k in [k0, k1) (whole blocks): y[i][0..15]
// (16 rows of W, before the per-token activation scale; ns: −suma, times sg per block,
// [row][G]) += each group's share of the scaled dots, plus its zero-point term where the group
// ends in the range. A share's int32 dot is exact in float: the chunks of int_k4_walk keep it
// under 1024 k (|d| < 1024·127·128 < 2^24). G32 (groups of one block, MR <= 3): each block's
// sums are scaled into float sums held in registers across the range. Wider groups add their
// blocks into int32 dots in memory (the 2·MR sums keep the registers) and scale those into y
// once per group. SG: per-block activation scales (a.x.sg), a template flag so the epilogue has
// no branch per output vector.
template <int BITS, int MR, bool G32, bool SG>
inline void k4_rows(const MatmulArgs& a, const uint8_t* wk, const float* sc, const float* ns,
                    int64_t m, int64_t g0, int64_t k0, int64_t k1, float (*y)[16]) {
  static_assert(!G32 || MR <= 3, "G32 keeps 2·MR float sums beside the 2·MR block sums");
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G, ld = a.x.ld;
  const int8_t* x = a.x.xq + m * ld;
  const float* sg = SG ? a.x.sg + m * G : nullptr;
  // acc + s_g · d (+ swz_g · ns when the group ends here; s_g: the group scale, times sg per block)
  auto scale_add = [&](int64_t g, auto ends, int i, int v, __m256i d, __m256 acc) {
    __m256 s = _mm256_loadu_ps(sc + g * 32 + 8 * v);
    if constexpr (SG) s = _mm256_mul_ps(s, _mm256_broadcast_ss(sg + i * G + g));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc);
    if constexpr (decltype(ends)::value)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(sc + g * 32 + 16 + 8 * v), _mm256_broadcast_ss(ns + i * G + g), acc);
    return acc;
  };
  if constexpr (G32) {
    __m256 f0 = _mm256_load_ps(y[0]), f1 = _mm256_load_ps(y[0] + 8), f2 = f0, f3 = f1, f4 = f0, f5 = f1;
    if constexpr (MR > 1) f2 = _mm256_load_ps(y[1]), f3 = _mm256_load_ps(y[1] + 8);
    if constexpr (MR > 2) f4 = _mm256_load_ps(y[2]), f5 = _mm256_load_ps(y[2] + 8);
    for (int64_t k = k0, g = g0; k < k1; k += kBlockK, ++g)
      k4_block<BITS, MR>(wk + (k >> 2) * kK4Step, x + k, ld, [&](int i, int v, __m256i d) {
        __m256& f = i == 0 ? (v == 0 ? f0 : f1) : i == 1 ? (v == 0 ? f2 : f3) : (v == 0 ? f4 : f5);
        f = scale_add(g, std::true_type(), i, v, d, f);
      });
    _mm256_store_ps(y[0], f0);
    _mm256_store_ps(y[0] + 8, f1);
    if constexpr (MR > 1) _mm256_store_ps(y[1], f2), _mm256_store_ps(y[1] + 8, f3);
    if constexpr (MR > 2) _mm256_store_ps(y[2], f4), _mm256_store_ps(y[2] + 8, f5);
    return;
  }
  alignas(32) __m256i dots[MR][2];
  for (int64_t k = k0, g = g0; k < k1; ++g) {
    const int64_t e = std::min(w.group_end(g), k1);
    for (int i = 0; i < MR; ++i) dots[i][0] = dots[i][1] = _mm256_setzero_si256();
    for (; k < e; k += kBlockK)
      k4_block<BITS, MR>(wk + (k >> 2) * kK4Step, x + k, ld, [&](int i, int v, __m256i d) {
        _mm256_store_si256(&dots[i][v], _mm256_add_epi32(_mm256_load_si256(&dots[i][v]), d));
      });
    auto finish = [&](auto ends) {  // one branch per group, not per output vector
      for (int i = 0; i < MR; ++i)
        for (int v = 0; v < 2; ++v)
          _mm256_store_ps(y[i] + 8 * v, scale_add(g, ends, i, v, _mm256_load_si256(&dots[i][v]), _mm256_load_ps(y[i] + 8 * v)));
    };
    if (e == w.group_end(g)) finish(std::true_type());
    else finish(std::false_type());
  }
}

// Rows [m0, m1) (at least kK4MinRows): 32-wide groups in pairs (see k4_rows), else four at a
// time, then threes, the rest in pairs.
template <int BITS>
void k4_tile(const MatmulArgs& a, const uint8_t* wk, const float* sc, const float* ns, int64_t m0, int64_t m1,
             int64_t g0, int64_t k0, int64_t k1, float (*y)[16]) {
  const int64_t G = a.w.h->G, rows = m1 - m0;
  auto run = [&](auto mr, auto g32, int64_t i) {
    constexpr int MR = decltype(mr)::value;
    constexpr bool G32 = decltype(g32)::value;
    if (a.x.sg) k4_rows<BITS, MR, G32, true>(a, wk, sc, ns + i * G, m0 + i, g0, k0, k1, y + i);
    else k4_rows<BITS, MR, G32, false>(a, wk, sc, ns + i * G, m0 + i, g0, k0, k1, y + i);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  int64_t i = 0;
  if (a.w.h->group_size == kBlockK) {
    for (; rows - i >= 3; i += 3) run(std::integral_constant<int, 3>(), std::true_type(), i);
    if (rows - i == 2) run(Two(), std::true_type(), i);
    if (rows - i == 1) run(One(), std::true_type(), i);
    return;
  }
  for (; rows - i >= 8 || rows - i == 4 || rows - i == 7; i += 4)  // leaving 0, 3, 5 or 6 rows
    run(std::integral_constant<int, 4>(), std::false_type(), i);
  for (; rows - i >= 3 && rows - i != 4; i += 3) run(std::integral_constant<int, 3>(), std::false_type(), i);
  for (; i < rows; i += 2) run(Two(), std::false_type(), i);
}

// W4A8 / W8A8 GEMM on the k4 scratch, per four panels: k in chunks of about kK4ChunkK (whole
// groups when they are narrower), so the chunk's scratch (16 KiB) and activations stay in L1
// while every row of the tile passes over them.
template <int BITS>
void int_k4_walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  thread_local K4Sets<BITS> sets;
  thread_local std::vector<float> ns;
  k4_neg_sums(a, m0, m1, true, ns);
  k4_walk_sets<1>(a, m0, m1, p0, p1, sets, kK4ChunkK, a.x.sa,
                  [&](int, const uint8_t* const* wk, const float* const* sc, int64_t g0, int64_t k0, int64_t k1,
                      float (*const* y)[16]) { k4_tile<BITS>(a, wk[0], sc[0], ns.data(), m0, m1, g0, k0, k1, y[0]); });
}

// int4 codes with float activations (not nf4), the decode path: a 32-bit lane j of a half-block
// holds the bytes k = 4j + c (c = 0..3), so v & (15 << 8c) is row 2h's code at k = 4j + c times
// 2^8c, and (v >> 4) & (15 << 8c) row 2h+1's; vcvtdq2ps converts both exactly. One shift per
// 64 codes instead of a vpmovzxbd and a shift per 16 (K = N = 4096, weights in L3, 1 thread,
// M = 1 / 2: 0.87 / 1.31 -> 0.77 / 1.17 ms). The activations are permuted once per call into
// that order and scaled by 2^-8c: xs[32b + 8c + j] = x[32b + 4j + c] · 2^(e - 8c), with 2^e
// bringing max|x| to [2^63, 2^64), so the 2^-24 of c = 3 underflows nothing that matters (without
// it x = 1e-35 loses 3 digits); the dot sums are scaled back by 2^-e per row.
// nf4 (see nf4_planes): xs[32b + 8q + t] = x[32b + 4q + t] for t < 4, x[32b + 16 + 4q + t - 4]
// for t >= 4, unscaled.
struct PermutedX {
  std::vector<float> xs;  // [rows][Kp]
  std::vector<float> unscale;  // [rows] 2^-e
  void prepare(const PreparedAct& x, int64_t m0, int64_t m1, bool nf4) {
    const int64_t Kp = x.Kp;
    xs.resize(size_t((m1 - m0) * Kp));
    unscale.resize(size_t(m1 - m0));
    for (int64_t m = m0; m < m1; ++m) {
      const float* xf = x.xf + m * x.ld;
      float* out = xs.data() + (m - m0) * Kp;
      if (nf4) {
        unscale[m - m0] = 1.f;
        for (int64_t b = 0; b < Kp; b += kBlockK)
          for (int q = 0; q < 4; ++q)
            for (int t = 0; t < 8; ++t) out[b + 8 * q + t] = xf[b + 4 * q + (t < 4 ? t : 12 + t)];
        continue;
      }
      float mx = 0.f;
      for (int64_t k = 0; k < Kp; ++k) mx = std::max(mx, std::fabs(xf[k]));
      const int e = mx > 0.f && std::isfinite(mx) ? std::clamp(63 - std::ilogb(mx), -64, 100) : 0;
      unscale[m - m0] = std::ldexp(1.f, -e);
      float f[4];
      for (int c = 0; c < 4; ++c) f[c] = std::ldexp(1.f, e - 8 * c);
      for (int64_t b = 0; b < Kp; b += kBlockK)
        for (int c = 0; c < 4; ++c)
          for (int j = 0; j < 8; ++j) out[b + 8 * c + j] = xf[b + 4 * j + c] * f[c];
    }
  }
};

// nf4 codes with float activations, the decode path: vpermps is slow on Zen 3 (1.3 cycles, two
// per 8 codes with the blend), so each byte of the codebook's floats is a 16-entry vpshufb table
// instead. Four lookups give the byte planes of 32 codes (one per byte, in k order), and two
// rounds of unpacks interleave them into four registers of floats, f[q] = NF4 at k = 4q .. 4q+3
// (low lane) and 16 + 4q .. 16 + 4q + 3 (high lane): 3 shuffles per 8 codes, all exact.
struct NF4Planes {
  __m256i t[4];
  NF4Planes() {
    for (int b = 0; b < 4; ++b) {
      alignas(16) uint8_t bytes[16];
      for (int u = 0; u < 16; ++u) {
        uint32_t bits;
        std::memcpy(&bits, &kNF4Values[u], 4);
        bytes[u] = uint8_t(bits >> (8 * b));
      }
      t[b] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes)));
    }
  }
  // idx: one code in [0, 15] per byte
  inline void decode(__m256i idx, __m256 f[4]) const {
    const __m256i p0 = _mm256_shuffle_epi8(t[0], idx), p1 = _mm256_shuffle_epi8(t[1], idx);
    const __m256i p2 = _mm256_shuffle_epi8(t[2], idx), p3 = _mm256_shuffle_epi8(t[3], idx);
    const __m256i l01 = _mm256_unpacklo_epi8(p0, p1), h01 = _mm256_unpackhi_epi8(p0, p1);
    const __m256i l23 = _mm256_unpacklo_epi8(p2, p3), h23 = _mm256_unpackhi_epi8(p2, p3);
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  }
};

// Weight-only kernel, up to 2 rows of X (x[i]: row i's activations, in PermutedX's order for
// int4 and nf4) against one panel. One row of X: two accumulators per panel row, alternating by
// k slice, so the 4 FMAs per block and row do not form one 16-cycle dependency chain. Group results
// stay in vector sums (one FMA by the broadcast scale per panel row and group, one horizontal
// sum per panel): M = 1 above, 1.10 -> 0.87 ms over a horizontal sum per group. Every pass
// prefetches the weights 8 KiB ahead into L2 (T1), as int8's int_walk does for 2+ rows (K = N =
// 4096, weights from DRAM, 1 thread, 3 alternations, min ms, T0 2 KiB -> T1 8 KiB: int8 M = 1
// 0.96 -> 0.84, M = 2 1.46 -> 1.07, M = 4 2.43 -> 2.09; int4 g128, decode-bound, unchanged).
// Σ_g s_g·z_g·Σx_g per row of W (z: layout zq or the one constant) for rows m.. m + MR of X, once
// the groups are done, two groups per step (s·z formed per group cost the fp32-activation int4
// decode 7-10% at g32, 1 thread, in cache)
template <int MR>
inline void zero_terms(const MatmulArgs& a, int64_t m, int64_t p, __m128* out) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const float* sw = w.sw + p * G * 4;
  const int8_t* zq = w.zq ? w.zq + p * G * 4 : nullptr;
  const __m256i two = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) {
    __m256 z = _mm256_set1_ps(w.h->zero);
    if (zq) {
      int64_t zz;
      std::memcpy(&zz, zq + g * 4, 8);
      z = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(zz)));
    }
    const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(sw + g * 4), z);
    for (int i = 0; i < MR; ++i) {
      const __m128 sx = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.x.sumx + (m + i) * G + g)));
      acc[i] = _mm256_fmadd_ps(sz, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(sx), two), acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
  if (g < G) {
    const __m128 sz = group_zero_scales(w, p, g, _mm_loadu_ps(sw + g * 4));
    for (int i = 0; i < MR; ++i) out[i] = _mm_fmadd_ps(sz, _mm_set1_ps(a.x.sumx[(m + i) * G + g]), out[i]);
  }
}

template <int MR, int BITS, bool NF4>
void float_tile(const MatmulArgs& a, int64_t m, int64_t p, const float* const* x, const float* unscale) {
  constexpr bool NIB = BITS == 4 && !NF4;
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G;
  const uint8_t* panel = w.panel(p);
  static const NF4Planes nf4;
  __m256 vacc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) vacc[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  constexpr int NA = MR == 1 ? 2 : 1;
  for (int64_t g = 0; g < G; ++g) {
    __m256 facc[MR][4][NA];
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < NA; ++j) facc[i][r][j] = _mm256_setzero_ps();
    for (const int64_t e = w.group_end(g); k < e; k += kBlockK) {
      const uint8_t* src = panel + (k / kBlockK) * (BITS == 4 ? sizeof(W4Block) : sizeof(W8Block));
      prefetch_weights(src, kPrefetchFar, true);
      if (BITS == 8) prefetch_weights(src + 64, kPrefetchFar, true);
      if constexpr (NIB) {
        // One row of X: both halves' codes in registers, x loaded once per slice c; two rows:
        // one half at a time, which leaves registers for 2 · 4 sums (M = 1 / 2: 0.77 / 1.17 ms;
        // slices outer for both: 0.77 / 1.38, halves outer for both: 0.81 / 1.16).
        auto load_half = [&](int h) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h)); };
        auto load_x = [&](int c, __m256* xv) {
          for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x[i] + k + 8 * c);
        };
        auto slice = [&](__m256i v, __m256i vs, int h, int c, const __m256* xv) {  // vs = v >> 4
          const __m256i mask = _mm256_set1_epi32(15 << (8 * c));
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(vs, mask));
          for (int i = 0; i < MR; ++i) {
            facc[i][2 * h][c % NA] = _mm256_fmadd_ps(lo, xv[i], facc[i][2 * h][c % NA]);
            facc[i][2 * h + 1][c % NA] = _mm256_fmadd_ps(hi, xv[i], facc[i][2 * h + 1][c % NA]);
          }
        };
        __m256 xv[MR];
        if constexpr (MR == 1) {
          const __m256i v0 = load_half(0), v1 = load_half(1);
          const __m256i vs0 = _mm256_srli_epi32(v0, 4), vs1 = _mm256_srli_epi32(v1, 4);
          for (int c = 0; c < 4; ++c) {
            load_x(c, xv);
            slice(v0, vs0, 0, c, xv);
            slice(v1, vs1, 1, c, xv);
          }
        } else {
          for (int h = 0; h < 2; ++h) {
            const __m256i v = load_half(h), vs = _mm256_srli_epi32(v, 4);
            for (int c = 0; c < 4; ++c) {
              load_x(c, xv);
              slice(v, vs, h, c, xv);
            }
          }
        }
      } else if constexpr (BITS == 4) {  // nf4: byte-plane lookups, x in their order (PermutedX)
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h));
          __m256 fa[4], fb[4];
          nf4.decode(_mm256_and_si256(v, low4), fa);
          nf4.decode(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), fb);
          for (int q = 0; q < 4; ++q)
            for (int i = 0; i < MR; ++i) {
              const __m256 xv = _mm256_loadu_ps(x[i] + k + 8 * q);
              facc[i][2 * h][q % NA] = _mm256_fmadd_ps(fa[q], xv, facc[i][2 * h][q % NA]);
              facc[i][2 * h + 1][q % NA] = _mm256_fmadd_ps(fb[q], xv, facc[i][2 * h + 1][q % NA]);
            }
        }
      } else {  // int8: vpmovsxbd straight from memory, 8 codes per load
        for (int q = 0; q < 4; ++q) {
          __m256 xv[MR];
          for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x[i] + k + 8 * q);
          for (int r = 0; r < 4; ++r) {
            const __m128i c8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 32 * r + 8 * q));
            const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c8));
            for (int i = 0; i < MR; ++i) facc[i][r][q % NA] = _mm256_fmadd_ps(wf, xv[i], facc[i][r][q % NA]);
          }
        }
      }
    }
    const float* sg = w.sw + (p * G + g) * 4;
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < 4; ++r) {
        const __m256 f = NA == 2 ? _mm256_add_ps(facc[i][r][0], facc[i][r][NA - 1]) : facc[i][r][0];
        vacc[i][r] = _mm256_fmadd_ps(_mm256_broadcast_ss(sg + r), f, vacc[i][r]);
      }
  }
  __m128 zacc[MR];
  zero_terms<MR>(a, m, p, zacc);
  for (int i = 0; i < MR; ++i) {
    const __m128 acc = hsum4_ps(vacc[i][0], vacc[i][1], vacc[i][2], vacc[i][3]);
    store_tile(a, m + i, p, _mm_fmsub_ps(acc, _mm_set1_ps(unscale[i]), zacc[i]), 1.0f);
  }
}

// Weight-only GEMM (kK4MinRows or more rows of X) on the k4 scratch: per chunk of kF4ChunkK k the four
// panels' codes are decoded once into dequantized floats wf[k][16 rows] (s·d(u) − s·z, one
// rounding, in L1 — never the whole matrix), then every row of X streams over them as a
// broadcast-and-FMA GEMM: 6 rows of X × 16 rows of W = 12 independent FMA chains per k, so the
// FMA units never wait and no horizontal sum or per-group scaling is left in the loop.
constexpr int64_t kF4ChunkK = 256;  // wf: 16 KiB

template <int BITS, bool NF4>
inline void decode_k4_chunk(const PackedLinear& w, const uint8_t* wk, const float* sc, int64_t k0, int64_t k1,
                            float (*wf)[16]) {
  const int64_t G = w.h->G, gs = w.h->group_size;
  const __m256i byte = _mm256_set1_epi32(0xFF);
  static const NF4Planes nf4;
  // a 4 × 4 byte transpose per lane: bytes 4j .. 4j+3 become the lane's 4 rows at k + j
  const __m256i by_k = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t k = k0; k < k1; k += kBlockK) {  // groups start on a block
    const float* sg = sc + std::min(k / gs, G - 1) * 32;
    for (int s = 0; s < 8; ++s)
      for (int v = 0; v < 2; ++v) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + ((k >> 2) + s) * kK4Step + 32 * v));
        const __m256 sw = _mm256_loadu_ps(sg + 8 * v), swz = _mm256_loadu_ps(sg + 16 + 8 * v);
        if constexpr (NF4) {  // byte planes (see NF4Planes) on the codes ordered by k within each lane
          __m256 f[4];
          nf4.decode(_mm256_shuffle_epi8(c, by_k), f);
          for (int j = 0; j < 4; ++j) _mm256_store_ps(wf[k - k0 + 4 * s + j] + 8 * v, _mm256_fmsub_ps(f[j], sw, swz));
          continue;
        }
        for (int j = 0; j < 4; ++j) {  // byte j of each row's dword: k = k + 4s + j
          __m256 d;
          if constexpr (BITS == 8) d = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(c, 24 - 8 * j), 24));
          else d = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(c, 8 * j), byte));
          _mm256_store_ps(wf[k - k0 + 4 * s + j] + 8 * v, _mm256_fmsub_ps(d, sw, swz));
        }
      }
  }
}

// y[i] += Σ_k x_i[k] · wf[k] for MR rows of X (x at the chunk's first k, row stride ld). Two
// arrays of MR accumulators, not one [MR][2]: GCC keeps the smaller ones in registers.
template <int MR>
inline void k4f_rows(const float* x, int64_t ld, const float (*wf)[16], int64_t len, float (*y)[16]) {
  __m256 lo[MR], hi[MR];
  for (int i = 0; i < MR; ++i) {
    lo[i] = _mm256_load_ps(y[i]);
    hi[i] = _mm256_load_ps(y[i] + 8);
  }
  int64_t k = 0;
  do {  // len > 0; with a for loop GCC keeps the accumulators in memory as well, storing every k
    const __m256 w0 = _mm256_load_ps(wf[k]), w1 = _mm256_load_ps(wf[k] + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(x + i * ld + k);
      lo[i] = _mm256_fmadd_ps(w0, xb, lo[i]);
      hi[i] = _mm256_fmadd_ps(w1, xb, hi[i]);
    }
  } while (++k < len);
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(y[i], lo[i]);
    _mm256_store_ps(y[i] + 8, hi[i]);
  }
}

template <int BITS, bool NF4>
void float_k4_walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t Kp = a.w.h->Kp, rows = m1 - m0, ld = a.x.ld;
  thread_local K4Sets<BITS> sets;
  thread_local std::vector<float> wfv;
  wfv.resize(size_t(kF4ChunkK * 16 + 8));
  float (*wf)[16] = reinterpret_cast<float (*)[16]>((reinterpret_cast<uintptr_t>(wfv.data()) + 31) & ~uintptr_t(31));
  float (*y)[16] = k4_out_scratch(rows);
  for (int64_t p = p0; p < p1; p += 4) {
    const int64_t np = std::min<int64_t>(4, p1 - p);
    const auto [wk, sc] = sets.get(a, p0, p1, p);
    std::fill(&y[0][0], &y[0][0] + rows * 16, 0.f);
    for (int64_t k0 = 0; k0 < Kp; k0 += kF4ChunkK) {
      const int64_t len = std::min(kF4ChunkK, Kp - k0);
      decode_k4_chunk<BITS, NF4>(a.w, wk, sc, k0, k0 + len, wf);
      const float* x = a.x.xf + m0 * ld + k0;
      int64_t i = 0;
      for (; i + 6 <= rows; i += 6) k4f_rows<6>(x + i * ld, ld, wf, len, y + i);
      switch (rows - i) {
        case 5: k4f_rows<5>(x + i * ld, ld, wf, len, y + i); break;
        case 4: k4f_rows<4>(x + i * ld, ld, wf, len, y + i); break;
        case 3: k4f_rows<3>(x + i * ld, ld, wf, len, y + i); break;
        case 2: k4f_rows<2>(x + i * ld, ld, wf, len, y + i); break;
        case 1: k4f_rows<1>(x + i * ld, ld, wf, len, y + i); break;
      }
    }
    store_k4_set(a, m0, m1, p, np, y, nullptr);
  }
}

template <int BITS, bool NF4>
void float_walk(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  // nf4 from 4 rows: its decode costs 3 shuffles per 8 codes, which the scratch pays once per
  // tile (K = N = 4096 g64, 1 thread, M = 3 / 4, weights streamed from DRAM: 3.66-3.69 / 4.20 ms
  // in float_tile, 3.70-3.74 / 3.73-3.80 on the scratch; M = 2 in L3: 2.15 against 3.29).
  // int8 from 10 (per channel, M = 8 / 10 / 12: scratch 5.2-5.5 / 5.3-5.5 / 6.3, float_tile 4.2 /
  // 5.2 / 6.3-6.5 ms).
  const int64_t k4_rows = NF4 ? 4 : BITS == 8 ? 10 : kK4MinRows;
  if (m1 - m0 >= k4_rows) return float_k4_walk<BITS, NF4>(a, m0, m1, p0, p1);
  constexpr bool PERMUTED = BITS == 4;
  thread_local PermutedX nx;
  if (PERMUTED) nx.prepare(a.x, m0, m1, NF4);
  const float ones[2] = {1.f, 1.f};
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t m = m0; m < m1; m += 2) {
      const float* x[2];
      for (int64_t i = 0; i < 2 && m + i < m1; ++i)
        x[i] = PERMUTED ? nx.xs.data() + (m + i - m0) * a.x.Kp : a.x.xf + (m + i) * a.x.ld;
      const float* unscale = PERMUTED ? nx.unscale.data() + (m - m0) : ones;
      if (m + 2 <= m1) float_tile<2, BITS, NF4>(a, m, p, x, unscale);
      else float_tile<1, BITS, NF4>(a, m, p, x, unscale);
    }
  }
}

}  // namespace

void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  // int8 from 17 rows of X (K = N = 4096, 1 thread, M = 8 / 16 / 512: panel4 2.40 / 4.90 / 147
  // ms, k4 2.73-3.13 / 4.90-5.04 / 134-135; 2 threads at 512: 97 -> 69 ms)
  if (a.w.h->bits == 8)
    return m1 - m0 > kDecodeRows ? int_k4_walk<8>(a, m0, m1, p0, p1) : int_walk<8, 0>(a, m0, m1, p0, p1);
  // The k4 scratch from 8 rows of X with 32-wide groups (the panel4 kernel's per-group fold is a
  // third of its work there), from 16 with 64-wide ones, else from 17: with decode-sized M the
  // panel4 kernel overlaps the weights' DRAM stream with every row's work, while the scratch is
  // built (from DRAM) before any row uses it. Measured (K = N = 4096, 1 thread), scratch ->
  // panel4 at M = 8 / 16: g128 2.66-3.06 / 3.93-4.92 -> 2.02-2.03 / 3.78-4.33 ms; g64 at M = 8 /
  // 12 / 16: 3.76-3.98 / 3.73-3.93 / 4.49-4.93 -> 2.68-3.60 / 3.46-3.80 / 4.70-5.78; g32 at 8:
  // 3.88 -> 4.49.
  const int64_t gs = a.w.h->group_size;
  const int64_t k4_rows = gs == kBlockK ? kK4MinRows : gs == 2 * kBlockK ? 16 : kDecodeRows + 1;
  if (m1 - m0 >= k4_rows) return int_k4_walk<4>(a, m0, m1, p0, p1);
  // int4 with every group whole (K = G · group_size): unrolled group bodies
  const int64_t G = a.w.h->G;
  if (G > 1 && a.w.h->K == G * gs) {
    if (gs == 32) return int_walk<4, 1>(a, m0, m1, p0, p1);
    if (gs == 64) return int_walk<4, 2>(a, m0, m1, p0, p1);
    if (gs == 128) return int_walk<4, 4>(a, m0, m1, p0, p1);
  }
  int_walk<4, 0>(a, m0, m1, p0, p1);
}

void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (a.w.h->bits == 8) float_walk<8, false>(a, m0, m1, p0, p1);
  else if (a.w.h->scheme == int(Scheme::nf4)) float_walk<4, true>(a, m0, m1, p0, p1);
  else float_walk<4, false>(a, m0, m1, p0, p1);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
