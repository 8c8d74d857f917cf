// The k4 scratch shared by the AVX2 and AVX-512 integer and weight-only GEMMs (many rows of X):
// four panel4 panels (16 rows of W) unpacked into 4-k steps of 64 bytes, each 16 rows × 4
// consecutive k, so a dot against 4 activations broadcast to every lane leaves each row of W's
// sum in its own lane (no per-group horizontal fold). Built once per set of four panels and kept
// per thread for the rest of the call (K4Sets); the GEMMs write y[row of X][16] and store it
// with store_k4_set. AVX2 instructions only: the AVX-512 files include it too.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/matmul_epilogue.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

constexpr int64_t kK4Step = 64;    // bytes per 4-k step: 16 rows × 4 codes

// Panels [p, p + np) (np <= 4; the rest zero) as k4 steps, rows 0-7 in the first half of a step
// and 8-15 in the second (int4: u in [0, 15]; int8: the stored int8 w', or with U8 the unsigned
// u = w' + 128, vpdpbusd's u8 operand, its offset folded into swz); their scales as
// [G][sw 0-7 | sw 8-15 | swz 0-7 | swz 8-15].
template <int BITS, bool U8 = false>
inline void unpack_k4(const PackedLinear& w, int64_t p, int64_t np, uint8_t* dst, float* sc, bool prefetch_next) {
  static_assert(!U8 || BITS == 8, "int4 codes are unsigned already");
  const __m256i low4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(char(0x80));
  const int64_t nblk = w.h->Kp / kBlockK, G = w.h->G;
  const uint8_t* panels[4];
  for (int q = 0; q < 4; ++q) panels[q] = q < np ? w.panel(p + q) : nullptr;
  // Per k-block the four panels together (each step's 64 bytes written at once), not two panels
  // over all of K and then the other two (every step line written in two halves, far apart).
  // K = N = 4096, 1 thread, alternating builds: int8 M = 8 / 16, weights rotated through 5
  // copies: 2.2-2.5 / 2.8-3.1 -> 1.8-2.0 / 2.5-2.7 ms; fp32 x int8 M = 512 (its 1 MB activation
  // tile keeps L2 full): 215-218 -> 169-175 ms; int8 / int4 x int8 M = 512 unchanged.
  // With prefetch_next (walks without a PanelStream), the next set's panels (contiguous after
  // these) are prefetched into L2 meanwhile, a slice per k-block, so they arrive while this set's
  // rows are computed instead of stalling its unpack (K = N = 4096, weights from DRAM, 1 thread, 3 alternating builds, min ms: int4 g128 M = 16
  // 2.24 -> 2.05, M = 32 3.65 -> 3.52, M = 128 12.06 -> 11.88; int8 M = 16 2.66 -> 2.55, M = 128
  // 12.47 -> 12.23).
  const int64_t block_bytes = BITS == 4 ? sizeof(W4Block) : sizeof(W8Block), P = w.h->Np / kPanelRows;
  const uint8_t* next = prefetch_next && p + 4 < P ? w.panel(p + 4) : nullptr;
  const int64_t next_bytes = next ? std::min<int64_t>(4, P - p - 4) * w.panel_bytes() : 0;
  for (int64_t b = 0; b < nblk; ++b) {
    for (int64_t l = b * 4 * block_bytes, e = std::min(next_bytes, l + 4 * block_bytes); l < e; l += 64)
      _mm_prefetch(reinterpret_cast<const char*>(next + l), _MM_HINT_T1);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* const* src = panels + 2 * half;
      __m256i r[8];  // rows 0-3 of the first panel, then of the second: 32 codes each, k in order
      for (int q = 0; q < 2; ++q) {
        if constexpr (BITS == 8) {
          for (int row = 0; row < 4; ++row)
            r[4 * q + row] = src[q] ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[q] + b * int64_t(sizeof(W8Block)) + 32 * row))
                                    : _mm256_setzero_si256();
          if constexpr (U8)
            for (int row = 0; row < 4; ++row) r[4 * q + row] = _mm256_xor_si256(r[4 * q + row], flip);
          continue;
        }
        for (int h = 0; h < 2; ++h) {
          const __m256i v = src[q] ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[q] + b * int64_t(sizeof(W4Block)) + 32 * h))
                                   : _mm256_setzero_si256();
          r[4 * q + 2 * h] = _mm256_and_si256(v, low4);
          r[4 * q + 2 * h + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
      }
      // 8 × 8 transpose of dwords: step s gets dword s (k 4s .. 4s+3) of rows 0..7
      __m256i t[8], u[8];
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 2; ++i) {
        u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
      }
      uint8_t* out = dst + b * 8 * kK4Step + 32 * half;
      for (int s = 0; s < 4; ++s) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + s * kK4Step), _mm256_permute2x128_si256(u[s], u[4 + s], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (s + 4) * kK4Step), _mm256_permute2x128_si256(u[s], u[4 + s], 0x31));
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int q = 0; q < 4; ++q)
      for (int r = 0; r < 4; ++r) {
        const int64_t i = ((p + q) * G + g) * 4 + r;
        sc[g * 32 + 4 * q + r] = q < np ? w.sw[i] : 0.f;
        sc[g * 32 + 16 + 4 * q + r] = q < np ? w.swz_at(i) + (U8 ? 128.f * w.sw[i] : 0.f) : 0.f;
      }
}

// The unpacked sets of four panels of one work item, kept per thread for the rest of the call:
// a call's prefill items that share panels (one per tile of rows of X) unpack each set once per
// thread, not once per item (K = N = 4096, M = 512: 6 items per panel chunk). Up to 16 panels
// (the dispatcher's prefill chunk); longer ranges (decode) unpack each set as they go.
// Decode (void, or a type with `static int64_t bytes(int64_t Kp)` and `static void run(const
// PackedLinear& w, const uint8_t* k4, float* sc, uint8_t* out)`): what is kept is the k4 scratch
// decoded once more (the AVX-512 bf16 GEMM's code pairs, its signed int4 codes), not the scratch
// itself; run may rewrite the set's scales too.
template <int BITS, bool U8 = false, class Decode = void>
class K4Sets {
 public:
  // The scratch (or its decoded form) and scales of the set at p (p0 <= p < p1, p - p0 a
  // multiple of 4).
  std::pair<const uint8_t*, const float*> get(const MatmulArgs& a, int64_t p0, int64_t p1, int64_t p, bool prefetch_next = true) {
    const int64_t Kp = a.w.h->Kp, k4_bytes = Kp / 4 * kK4Step, set_scales = a.w.h->G * 32;
    int64_t set_bytes = k4_bytes;
    if constexpr (!std::is_void_v<Decode>) set_bytes = Decode::bytes(Kp);
    const bool keep = p1 - p0 <= 16;
    if (!keep || call_ != a.call || p0_ != p0 || p1_ != p1) {
      const int64_t sets = keep ? (p1 - p0 + 3) / 4 : 2;  // unkept: two in turn (k4_walk_sets' pairs)
      wk_.resize(size_t(sets * set_bytes));
      sc_.resize(size_t(sets * set_scales));
      ready_.assign(size_t(sets), false);
      call_ = keep ? a.call : 0, p0_ = p0, p1_ = p1;
    }
    const int64_t i = keep ? (p - p0) / 4 : (p - p0) / 4 % 2;
    uint8_t* wk = wk_.data() + i * set_bytes;
    float* sc = sc_.data() + i * set_scales;
    if (!ready_[size_t(i)]) {
      if constexpr (std::is_void_v<Decode>) {
        unpack_k4<BITS, U8>(a.w, p, std::min<int64_t>(4, p1 - p), wk, sc, prefetch_next);
      } else {
        raw_.resize(size_t(k4_bytes));
        unpack_k4<BITS, U8>(a.w, p, std::min<int64_t>(4, p1 - p), raw_.data(), sc, prefetch_next);
        Decode::run(a.w, raw_.data(), sc, wk);
      }
      ready_[size_t(i)] = keep;
    }
    return {wk, sc};
  }

 private:
  uint64_t call_ = 0;  // 0: nothing kept (call ids start at 1)
  int64_t p0_ = 0, p1_ = 0;
  std::vector<uint8_t> wk_, raw_;
  std::vector<float> sc_;
  std::vector<bool> ready_;
};

// y[m - m0][r] (rows of W p·4 + r of the set of np panels at p) times row_scale[m] (nullptr: 1)
// into the output. Only this call's panels: the rows past them belong to another call (thread).
inline void store_k4_set(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p, int64_t np, const float (*y)[16],
                         const float* row_scale) {
  const int64_t n0 = p * kPanelRows, n1 = std::min(a.w.h->N, (p + np) * kPanelRows);
  for (int64_t m = m0; m < m1; ++m) {
    const float rs = row_scale ? row_scale[m] : 1.f;
    if (a.y_dtype == DType::f32 && n0 + 16 <= n1) {  // the common case, 16 outputs at once
      float* out = static_cast<float*>(a.y) + m * a.w.h->N + n0;
      for (int v = 0; v < 2; ++v) {
        __m256 o = _mm256_mul_ps(_mm256_load_ps(y[m - m0] + 8 * v), _mm256_set1_ps(rs));
        if (a.bias) o = _mm256_add_ps(o, _mm256_loadu_ps(a.bias + n0 + 8 * v));
        _mm256_storeu_ps(out + 8 * v, o);
      }
      continue;
    }
    for (int64_t n = n0; n < n1; ++n) store_matmul_out(a, m, n, y[m - m0][n - n0], rs);
  }
}

// The k4 GEMMs' zero-point operand for rows [m0, m1) of X, [row][G]: −Σ_group x (int mode: −suma,
// times sg for per-block activations; float mode: −sumx).
inline void k4_neg_sums(const MatmulArgs& a, int64_t m0, int64_t m1, bool int_mode, std::vector<float>& ns) {
  const int64_t G = a.w.h->G;
  ns.resize(size_t((m1 - m0) * G));
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t g = 0; g < G; ++g)
      ns[size_t((m - m0) * G + g)] = int_mode ? -float(a.x.suma[m * G + g]) * (a.x.sg ? a.x.sg[m * G + g] : 1.f)
                                              : -a.x.sumx[m * G + g];
}

// Aligned per-thread scratch for y[rows][16].
inline float (*k4_out_scratch(int64_t rows))[16] {
  thread_local std::vector<float> yv;
  yv.resize(size_t(rows * 16 + 8));
  return reinterpret_cast<float (*)[16]>((reinterpret_cast<uintptr_t>(yv.data()) + 31) & ~uintptr_t(31));
}

// The panels of the sets a k4 walk unpacks next, prefetched into L2 a line or two at a time over
// the k-blocks of the current sets' passes (step()), so their unpack finds them there: avx512's
// int8 GEMM, whose unpack (a byte flip and a transpose) is light enough to wait on DRAM even
// with unpack_k4's prefetch of the next set. 1 thread, weights rotated from DRAM, 3 alternations,
// min ms, without -> with: 576×1536 M = 32 / 64 / 128 0.213 / 0.370 / 0.685 -> 0.204 / 0.355 /
// 0.680; 2048² 0.874 / 1.533 / 2.878 -> 0.779 / 1.440 / 2.792 (weights in cache: within 1%,
// K = N = 4096 M = 512 42.1-42.5 -> 42.3-42.7). Not int4 (half the bytes, a
// heavier unpack): g32 4-6% slower, g128 no faster; any step in the int4 loops, even of an
// empty stream, cost g32 4%. The walk's own, not a thread_local: in this shared library a
// thread_local costs a __tls_get_addr call where GCC does not hoist it, and a call inside the
// GEMM loops spills every accumulator (int8 11-15% slower).
struct PanelStream {
  const char* next = nullptr;
  const char* end = nullptr;
  double per_step = 0, due = 0;  // bytes
  // panels [q, q + n) of w (none when n <= 0) over about `steps` steps; the undone rest of the
  // last panels is dropped
  void start(const PackedLinear& w, int64_t q, int64_t n, int64_t steps) {
    next = end = nullptr, due = 0;
    if (n <= 0) return;
    next = reinterpret_cast<const char*>(w.panel(q));
    end = next + n * w.panel_bytes();
    per_step = double(end - next) / double(std::max<int64_t>(steps, 1));
  }
  // a line whenever the bytes due are positive: the stream runs a line ahead of its pace
  void step() {
    for (due += per_step; due > 0 && next < end; due -= 64, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

// Rows [0, rows) of X in passes against n (1 or 2) sets, the AVX-512 GEMMs' register blocking:
// one set in passes of 8 rows, two in passes of 6 (12 dot chains, 2 weight loads and 6
// broadcasts per 12 dots, where 8 rows against 2 sets spill), then 4, 2 and 1 rows.
// pass(std::integral_constant<int, MR>(), std::integral_constant<int, NS>(), first row).
template <class Pass>
inline void row_passes(int64_t rows, int n, Pass&& pass) {
  auto run = [&](auto ns) {
    constexpr int wide = decltype(ns)::value == 1 ? 8 : 6;
    int64_t i = 0;
    // with 8 rows left, two passes of 4 rather than 6 and 2 (2 rows against two sets: 4 weight
    // loads and 2 broadcasts per 4 dots)
    for (; rows - i >= wide && !(wide == 6 && rows - i == 8); i += wide) pass(std::integral_constant<int, wide>(), ns, i);
    for (; rows - i >= 4; i += 4) pass(std::integral_constant<int, 4>(), ns, i);
    if (rows - i >= 2) pass(std::integral_constant<int, 2>(), ns, i), i += 2;
    if (rows - i >= 1) pass(std::integral_constant<int, 1>(), ns, i);
  };
  if (n == 1) run(std::integral_constant<int, 1>());
  else run(std::integral_constant<int, 2>());
}

// The k4 GEMM driver: NS sets of four panels of [p0, p1) at a time (NS <= 2; their scratch and
// scales from `sets`, the last turn may hold fewer), k in chunks of `chunk_k` (whole groups where
// they are narrower), chunk(n, wk, sc, g0, k0, k1, y) for each: n sets, set s's scratch wk[s],
// scales sc[s] and outputs y[s][row of X][16]; then the sets' 16 outputs of every row of X
// stored, times row_scale[m] (nullptr: 1). With a stream, which the chunks of each turn step
// about stream_steps times, the next NS sets' panels stream into L2 meanwhile, in place of
// unpack_k4's prefetch.
template <int NS, class Sets, class Chunk>
inline void k4_walk_sets(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1, Sets& sets,
                         int64_t chunk_k, const float* row_scale, Chunk&& chunk, PanelStream* stream = nullptr,
                         int64_t stream_steps = 0) {
  static_assert(NS == 1 || NS == 2, "K4Sets holds two sets at a time where it keeps none");
  const int64_t G = a.w.h->G, gs = a.w.h->group_size, Kp = a.w.h->Kp, rows = m1 - m0;
  float (*y)[16] = k4_out_scratch(NS * rows);
  // whole groups where they are narrower than a chunk (G > 1: group sizes are multiples of 32)
  const int64_t step = G > 1 && gs <= chunk_k ? chunk_k / gs * gs : chunk_k;
  for (int64_t p = p0; p < p1; p += 4 * NS) {
    const int n = int(std::min<int64_t>(NS, (p1 - p + 3) / 4));
    const uint8_t* wk[NS];
    const float* sc[NS];
    float (*ys[NS])[16];
    for (int s = 0; s < n; ++s) {
      std::tie(wk[s], sc[s]) = sets.get(a, p0, p1, p + 4 * s, !stream);
      ys[s] = y + s * rows;
    }
    if (stream) {  // the next sets (already unpacked where an earlier item of this call took them:
                   // skipping those was no faster)
      const int64_t q = p + 4 * NS, P = a.w.h->Np / kPanelRows;
      stream->start(a.w, q, std::min<int64_t>(4 * NS, P - q), stream_steps);
    }
    std::fill(&y[0][0], &y[0][0] + n * rows * 16, 0.f);
    // a chunk starts on a group (g0 = k0 / gs), or inside one
    for (int64_t k0 = 0; k0 < Kp; k0 += step) chunk(n, wk, sc, k0 / gs, k0, std::min(Kp, k0 + step), ys);
    for (int s = 0; s < n; ++s) store_k4_set(a, m0, m1, p + 4 * s, std::min<int64_t>(4, p1 - p - 4 * s), ys[s], row_scale);
  }
}

}  // namespace
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
