// AMX matmuls for prefill (M >= 16) on layout panel4_k32: AMX-INT8 for W4A8 / W8A8 and AMX-BF16
// for int4 / int8 weights times bfloat16 activations.
// C[m][n] += X[m][k..k+step) · W[n][k..k+step): A tiles are 16 rows of the prepared activations
// read in place (row stride ld), B tiles the weights in VNNI order (16 rows of 64 bytes, each 16 n
// × one 4-byte k group): int4 codes as s8 u − z of their row and group, int8 w' as s8 (both
// tdpbssd with int8 x), or the codes as bfloat16 — small integers, so exact — (tdpbf16ps with
// bf16 x, 2 k per dword).
// B is rebuilt per kernel call from the panels (nibbles split, converted, dword-transposed) and
// reused across the call's rows, which is why the amx table asks for tall prefill tiles.
// Int8 steps are 64 k (32 for 32-wide groups); each group's range is padded to whole steps with zero B rows (the A tile
// then reads the next group's or the row padding's activations, multiplied by 0), so one tile
// shape serves every group size. Blocks of 2 m-tiles × 2 n-tiles (4 accumulator tiles, 2 A, 2 B),
// each over all of K with the next step's activation rows prefetched. Tile loads bound it: 2×2
// blocking with every operand in L1 reached ~2.7 of the 6.5 TOP/s tdpbusd peak on the Xeon VM it
// was tuned on (the kernel itself ~1).
// After each group the tiles are scaled into float accumulators (acc += sw·C, as the other
// kernels' per-group step); int8 and bf16 subtract the zero-point term Σ_g swz·Σx at the end.
// Int4 has none: its group dots are exactly Σx(u − z), as avx512's signed k4 GEMM's. Codes
// unsigned against x and the term taken out in float afterwards cancelled only to 2.6e-6 of
// max |y| where the codes sit far from z (tests/test_matmul.py, codes far from their offset,
// found by the amx_emulated build). Rows past the last whole 16-row tile and activations the
// tiles cannot take exactly (fp32/fp16 x, nf4 codes) go to the AVX-512 kernels.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx/tiles.h"
#include "common/format.h"
#include "common/matmul_epilogue.h"

namespace lowbit {
namespace avx512 {
void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
}
namespace LOWBIT_ISA_NS {
namespace {

// The operand kinds: int4 codes as u − z × int8 x, int8 codes × int8 x, codes as bf16 × bf16 x.
enum class Op { s4, s8, bf16 };

// The tile steps of a call: the activation k where each starts; first[g] is group g's first step
// and first[G] the step count. A step is 32 k of bf16, or 64 k of int8 — 32 where the groups are
// 32 wide, so no step is half padding. b_rows: the VNNI rows of B per step (4 bytes of k each).
struct Steps {
  int64_t step_k, b_rows;
  std::vector<int64_t> k0, first;
  Steps(const PackedLinear& w, bool bf16)
      : step_k(bf16 || w.h->group_size <= 32 ? 32 : 64), b_rows(bf16 ? 16 : step_k / 4) {
    const int64_t step = step_k;
    int64_t k = 0;
    for (int64_t g = 0; g < w.h->G; ++g) {
      first.push_back(int64_t(k0.size()));
      for (const int64_t e = w.group_end(g); k < e; k += step) k0.push_back(k);
      k = w.group_end(g);
    }
    first.push_back(int64_t(k0.size()));
  }
};

// Rows 2i, 2i+1 of 16 rows × 8 dwords in Z[i] -> 8 rows of 16 dwords: out[j][n] = row n dword j.
inline void transpose_16x8(const __m512i Z[8], uint8_t* out) {
  // stage 1, rows 4q..4q+3: lo = j 0..3 × r 0..3, hi = j 4..7 × r 0..3
  alignas(64) static const int32_t i1lo[16] = {0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27};
  alignas(64) static const int32_t i1hi[16] = {4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31};
  // stage 2, two 4-row sets: a j pair × [set0 r0..3, set1 r0..3]
  alignas(64) static const int32_t i2a[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static const int32_t i2b[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i l1 = _mm512_load_si512(i1lo), h1 = _mm512_load_si512(i1hi);
  const __m512i ia = _mm512_load_si512(i2a), ib = _mm512_load_si512(i2b);
  __m512i P[4][2];
  for (int q = 0; q < 4; ++q) {
    P[q][0] = _mm512_permutex2var_epi32(Z[2 * q], l1, Z[2 * q + 1]);
    P[q][1] = _mm512_permutex2var_epi32(Z[2 * q], h1, Z[2 * q + 1]);
  }
  for (int half = 0; half < 2; ++half)
    for (int jp = 0; jp < 2; ++jp) {
      const __m512i& idx = jp ? ib : ia;
      const __m512i lo8 = _mm512_permutex2var_epi32(P[0][half], idx, P[1][half]);  // rows 0..7
      const __m512i hi8 = _mm512_permutex2var_epi32(P[2][half], idx, P[3][half]);  // rows 8..15
      const int64_t j = 4 * half + 2 * jp;
      _mm512_storeu_si512(out + j * 64, _mm512_shuffle_i64x2(lo8, hi8, _MM_SHUFFLE(1, 0, 1, 0)));
      _mm512_storeu_si512(out + (j + 1) * 64, _mm512_shuffle_i64x2(lo8, hi8, _MM_SHUFFLE(3, 2, 3, 2)));
    }
}

// 16 rows × 16 dwords -> out[j][n] = row n dword j (4 rounds of 2-input permutes).
inline void transpose_16x16(__m512i r[16], uint8_t* out) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + j] = _mm512_unpacklo_epi64(t[i + j], t[i + j + 2]);
      r[i + j + 2] = _mm512_unpackhi_epi64(t[i + j], t[i + j + 2]);
    }
  // now r[4b + i] holds, in 128-bit lane L, dword column 4L + kCol[i] of rows 4b..4b+3;
  // out column 4L + kCol[i] gathers lane L of the four row blocks
  static constexpr int kCol[4] = {0, 2, 1, 3};
  for (int i = 0; i < 4; ++i) {
    const int c = kCol[i];
    const __m512i a01 = _mm512_shuffle_i32x4(r[i], r[i + 4], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i b01 = _mm512_shuffle_i32x4(r[i], r[i + 4], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512i a23 = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i b23 = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], _MM_SHUFFLE(3, 1, 3, 1));
    _mm512_storeu_si512(out + (c + 0) * 64, _mm512_shuffle_i32x4(a01, a23, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(out + (c + 4) * 64, _mm512_shuffle_i32x4(b01, b23, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(out + (c + 8) * 64, _mm512_shuffle_i32x4(a01, a23, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_si512(out + (c + 12) * 64, _mm512_shuffle_i32x4(b01, b23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

// The codes of 32-k block kb of panel rows [4q, 4q+4) as bytes: Z0 = rows 0, 1, Z1 = rows 2, 3.
// SIGNED (int4): u − z of each row's z in the block's group.
template <bool SIGNED>
inline void panel_block_bytes(const PackedLinear& w, int64_t panel, int64_t kb, __m512i& Z0, __m512i& Z1) {
  const uint8_t* blk = w.panel(panel) + kb * (w.h->bits == 4 ? 64 : 128);
  if (w.h->bits == 4) {  // lo nibbles: [row0 | row2], hi: [row1 | row3]
    const __m512i low4 = _mm512_set1_epi8(0x0F), v = _mm512_loadu_si512(blk);
    const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    Z0 = _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));
    Z1 = _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));
    if constexpr (SIGNED) {
      const int64_t g = std::min(kb * kBlockK / w.h->group_size, w.h->G - 1), i = (panel * w.h->G + g) * kPanelRows;
      int8_t z[4];
      for (int r = 0; r < 4; ++r) z[r] = w.zq ? w.zq[i + r] : int8_t(w.h->zero);
      Z0 = _mm512_sub_epi8(Z0, _mm512_inserti64x4(_mm512_set1_epi8(z[0]), _mm256_set1_epi8(z[1]), 1));
      Z1 = _mm512_sub_epi8(Z1, _mm512_inserti64x4(_mm512_set1_epi8(z[2]), _mm256_set1_epi8(z[3]), 1));
    }
  } else {
    Z0 = _mm512_loadu_si512(blk);
    Z1 = _mm512_loadu_si512(blk + 64);
  }
}

// B operand of the 16 rows of panels [p, p+np): per step 16 VNNI rows of 64 bytes; rows of
// missing panels and of a step's k past its group end are zero.
template <Op OP>
void build_b(const PackedLinear& w, const Steps& st, int64_t p, int64_t np, uint8_t* b) {
  const int64_t step_bytes = st.b_rows * 64;
  std::memset(b, 0, size_t(st.k0.size() * step_bytes));
  const int64_t nblocks = w.h->Kp / kBlockK;
  int64_t step = 0;
  for (int64_t kb = 0; kb < nblocks; ++kb) {
    const int64_t k = kb * kBlockK;
    while (step + 1 < int64_t(st.k0.size()) && st.k0[step + 1] <= k) ++step;
    __m512i Z[8];
    for (int q = 0; q < 4; ++q) {
      if (q < np) panel_block_bytes<OP == Op::s4>(w, p + q, kb, Z[2 * q], Z[2 * q + 1]);
      else Z[2 * q] = Z[2 * q + 1] = _mm512_setzero_si512();
    }
    if constexpr (OP != Op::bf16) {
      transpose_16x8(Z, b + step * step_bytes + (k - st.k0[step]) / 4 * 64);
    } else {  // one step per block: each row's 32 codes as bf16 (16 dwords of k pairs)
      __m512i rows[16];
      for (int i = 0; i < 8; ++i)
        for (int h = 0; h < 2; ++h) {  // row 2i + h: 32 bytes at 256-bit half h of Z[i]
          const __m256i bytes = h ? _mm512_extracti64x4_epi64(Z[i], 1) : _mm512_castsi512_si256(Z[i]);
          const __m512i wide = w.h->bits == 4 ? _mm512_cvtepu8_epi16(bytes) : _mm512_cvtepi8_epi16(bytes);
          const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(wide)));
          const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(wide, 1)));
          rows[2 * i + h] = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);
        }
      transpose_16x16(rows, b + step * step_bytes);
    }
  }
}

// Per-group scales (sw, or s·z with zero) of the 16 rows of panels [p, p+np) as [G][16] (zero
// past the panels).
void gather_scales(const PackedLinear& w, bool zero, int64_t p, int64_t np, float* out) {
  const int64_t G = w.h->G;
  std::memset(out, 0, size_t(G * 16) * sizeof(float));
  for (int64_t q = 0; q < np; ++q)
    for (int64_t g = 0; g < G; ++g)
      for (int r = 0; r < 4; ++r) {
        const int64_t i = ((p + q) * G + g) * 4 + r;
        out[g * 16 + q * 4 + r] = zero ? w.swz_at(i) : w.sw[i];
      }
}

struct NTile {
  int64_t p, np;               // panels
  std::vector<uint8_t> b;      // VNNI B, [steps][b_rows][64]
  std::vector<float> sw, swz;  // [G][16] (swz: int8 and bf16 only)
};

// Per block of 2 m-tiles × 2 n-tiles: float accumulators and the stored 32-bit tiles (int32 or float).
struct BlockState {
  alignas(64) float acc[4][16][16];
  alignas(64) int32_t c[4][16][16];
};

template <Op OP>
inline const uint8_t* a_rows(const MatmulArgs& a, int64_t m, int64_t k) {
  if constexpr (OP == Op::bf16) return reinterpret_cast<const uint8_t*>(a.x.xb + m * a.x.ld + k);
  return reinterpret_cast<const uint8_t*>(a.x.xq + m * a.x.ld + k);
}

// One block over all of K: per group, the tile products, then acc += sw·C.
template <int TM, int TN, Op OP>
void block_dots(const MatmulArgs& a, const Steps& st, int64_t m, NTile* const* nt, BlockState& bs) {
  const int64_t lda = a.x.ld * (OP == Op::bf16 ? 2 : 1);  // bytes
  std::memset(bs.acc, 0, sizeof(bs.acc));
  for (int64_t g = 0; g + 1 < int64_t(st.first.size()); ++g) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t s = st.first[g]; s < st.first[g + 1]; ++s) {
      const uint8_t* xa = a_rows<OP>(a, m, st.k0[s]);
      if (s + 1 < int64_t(st.k0.size())) {  // the next step's operands: L2 -> L1
        const uint8_t* xn = a_rows<OP>(a, m, st.k0[s + 1]);
        for (int r = 0; r < 16 * TM; ++r) _mm_prefetch(reinterpret_cast<const char*>(xn + r * lda), _MM_HINT_T0);
        for (int ni = 0; ni < TN; ++ni)
          for (int64_t r = 0; r < st.b_rows; ++r)
            _mm_prefetch(reinterpret_cast<const char*>(nt[ni]->b.data() + ((s + 1) * st.b_rows + r) * 64), _MM_HINT_T0);
      }
      _tile_loadd(4, xa, lda);
      if (TM == 2) _tile_loadd(5, xa + 16 * lda, lda);
      _tile_loadd(6, nt[0]->b.data() + s * st.b_rows * 64, 64);
      if (TN == 2) _tile_loadd(7, nt[1]->b.data() + s * st.b_rows * 64, 64);
      if constexpr (OP != Op::bf16) {
        _tile_dpbssd(0, 4, 6);
        if (TN == 2) _tile_dpbssd(1, 4, 7);
        if (TM == 2) _tile_dpbssd(2, 5, 6);
        if (TM == 2 && TN == 2) _tile_dpbssd(3, 5, 7);
      } else {
        _tile_dpbf16ps(0, 4, 6);
        if (TN == 2) _tile_dpbf16ps(1, 4, 7);
        if (TM == 2) _tile_dpbf16ps(2, 5, 6);
        if (TM == 2 && TN == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, bs.c[0], 64);  // tile index = mi·2 + ni
    if (TN == 2) _tile_stored(1, bs.c[1], 64);
    if (TM == 2) _tile_stored(2, bs.c[2], 64);
    if (TM == 2 && TN == 2) _tile_stored(3, bs.c[3], 64);
    for (int mi = 0; mi < TM; ++mi)
      for (int ni = 0; ni < TN; ++ni) {
        const int t = mi * 2 + ni;
        const __m512 sv = _mm512_loadu_ps(nt[ni]->sw.data() + g * 16);
        for (int r = 0; r < 16; ++r) {
          const __m512 cv = OP == Op::bf16 ? _mm512_load_ps(reinterpret_cast<const float*>(bs.c[t][r]))
                                           : _mm512_cvtepi32_ps(_mm512_load_si512(bs.c[t][r]));
          _mm512_store_ps(bs.acc[t][r], _mm512_fmadd_ps(cv, sv, _mm512_load_ps(bs.acc[t][r])));
        }
      }
  }
}

// y for one block: acc − Σ_g swz·Σx (int4: acc), times the row's activation scale (int8 x), plus bias.
template <int TM, int TN, Op OP>
void block_store(const MatmulArgs& a, int64_t m, NTile* const* nt, const BlockState& bs) {
  const PackedLinear& w = a.w;
  const int64_t G = w.h->G, N = w.h->N;
  for (int mi = 0; mi < TM; ++mi)
    for (int ni = 0; ni < TN; ++ni) {
      const int t = mi * 2 + ni;
      // only the tile's own panels: a decode piece can end mid-tile, and the next piece's thread
      // writes the columns after it (found by the amx_emulated build, 2 threads, M = 16)
      const int64_t n0 = nt[ni]->p * kPanelRows, nvalid = std::min<int64_t>(nt[ni]->np * kPanelRows, N - n0);
      const __mmask16 keep = __mmask16((1u << nvalid) - 1);
      const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(keep, a.bias + n0) : _mm512_setzero_ps();
      for (int r = 0; r < 16; ++r) {
        const int64_t row = m + mi * 16 + r;
        __m512 z = _mm512_setzero_ps();
        for (int64_t g = 0; OP != Op::s4 && g < G; ++g) {
          const float sx = OP == Op::bf16 ? a.x.sumx[row * G + g] : float(a.x.suma[row * G + g]);
          z = _mm512_fmadd_ps(_mm512_set1_ps(sx), _mm512_loadu_ps(nt[ni]->swz.data() + g * 16), z);
        }
        __m512 y = _mm512_sub_ps(_mm512_load_ps(bs.acc[t][r]), z);
        // the rounding steps of store_matmul_out: acc·scale, then + bias
        if (OP != Op::bf16) y = _mm512_mul_ps(y, _mm512_set1_ps(a.x.sa[row]));
        if (a.bias) y = _mm512_add_ps(y, bias);
        if (a.y_dtype == DType::f32) {
          _mm512_mask_storeu_ps(static_cast<float*>(a.y) + row * N + n0, keep, y);
        } else if (a.y_dtype == DType::bf16) {  // round to nearest even, as f32_to_bf16
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + row * N + n0, keep, (__m256i)_mm512_cvtneps_pbh(y));
        } else {
          alignas(64) float tmp[16];
          _mm512_store_ps(tmp, y);
          for (int64_t j = 0; j < nvalid; ++j) store_from_f32(a.y, a.y_dtype, row * N + n0 + j, tmp[j]);
        }
      }
    }
}

template <Op OP>
void walk(const MatmulArgs& a, int64_t m0, int64_t mfull, int64_t p0, int64_t p1) {
  const PackedLinear& w = a.w;
  const Steps st(w, OP == Op::bf16);
  const int64_t G = w.h->G;
  thread_local NTile tiles[2];
  thread_local BlockState bs;
  amx_tiles::configure(int(st.b_rows * 4), int(st.b_rows));
  for (int64_t p = p0; p < p1; p += 8) {  // two n-tiles of 4 panels
    NTile* nt[2] = {&tiles[0], &tiles[1]};
    int tn = 0;
    for (int i = 0; i < 2 && p + 4 * i < p1; ++i, ++tn) {
      NTile& t = tiles[i];
      t.p = p + 4 * i;
      t.np = std::min<int64_t>(4, p1 - t.p);
      t.b.resize(size_t(st.k0.size() * st.b_rows * 64));
      t.sw.resize(size_t(G * 16));
      build_b<OP>(w, st, t.p, t.np, t.b.data());
      gather_scales(w, false, t.p, t.np, t.sw.data());
      if (OP != Op::s4) {
        t.swz.resize(size_t(G * 16));
        gather_scales(w, true, t.p, t.np, t.swz.data());
      }
    }
    for (int64_t m = m0; m < mfull; m += 32) {
      if (m + 32 <= mfull) {
        tn == 2 ? block_dots<2, 2, OP>(a, st, m, nt, bs) : block_dots<2, 1, OP>(a, st, m, nt, bs);
        tn == 2 ? block_store<2, 2, OP>(a, m, nt, bs) : block_store<2, 1, OP>(a, m, nt, bs);
      } else {
        tn == 2 ? block_dots<1, 2, OP>(a, st, m, nt, bs) : block_dots<1, 1, OP>(a, st, m, nt, bs);
        tn == 2 ? block_store<1, 2, OP>(a, m, nt, bs) : block_store<1, 1, OP>(a, m, nt, bs);
      }
    }
  }
  _tile_release();
}

}  // namespace

void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t mfull = m0 + (m1 - m0) / 16 * 16;
  if (mfull < m1) avx512::matmul_int(a, mfull, m1, p0, p1);
  if (mfull == m0) return;
  if (a.w.h->bits == 4) walk<Op::s4>(a, m0, mfull, p0, p1);
  else walk<Op::s8>(a, m0, mfull, p0, p1);
}

void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t mfull = m0 + (m1 - m0) / 16 * 16;
  const bool tiles = a.x.xb && a.w.h->scheme != int(Scheme::nf4) && mfull > m0;
  if (!tiles) return avx512::matmul_float(a, m0, m1, p0, p1);
  if (mfull < m1) avx512::matmul_float(a, mfull, m1, p0, p1);
  walk<Op::bf16>(a, m0, mfull, p0, p1);
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
