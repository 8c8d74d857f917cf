// AVX2 (+FMA, F16C) quantize / dequantize. Same layouts and rounding as cpp/ref/quantize_ref.cpp:
//   in : w [rows, K] f32/f16/bf16 (row stride ld_w)
//   out: codes [rows, packed_row_bytes(K, bits)], scales/zeros [rows, groups]
// Per group: pass 1 finds min/max (or absmax) in registers, pass 2 (group now in L1) rounds
// 16 elements per step. Group starts are multiples of 16, so every step begins on a whole byte
// of nibble codes; the < 16-element tail of a group goes through the scalar rule in format.h.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/convert.h"
#include "common/format.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

template <DType T>
inline __m256 load8(const void* base, int64_t i) {
  if constexpr (T == DType::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (T == DType::f16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
        static_cast<const uint16_t*>(base) + i)));
  } else {  // bfloat16 is the top half of a float32
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Eight codes as int32, by the rule of code_of().
template <Scheme S>
inline __m256i codes8(__m256 x, __m256 inv, __m256 zero, __m256 qmin, __m256 qmax,
                      const __m256* mids) {
  __m256 v = _mm256_mul_ps(x, inv);
  if constexpr (S == Scheme::nf4) {
    __m256i q = _mm256_setzero_si256();
    for (int i = 0; i < 15; ++i)  // each true compare is -1: subtracting counts midpoints below v
      q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(v, mids[i], _CMP_GT_OQ)));
    return q;
  } else {
    __m256 q = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zero);
    q = _mm256_min_ps(_mm256_max_ps(q, qmin), qmax);
    return _mm256_cvttps_epi32(q);
  }
}

// 16 int32 codes (in range) -> 16 bytes in element order.
inline __m128i bytes16(__m256i q0, __m256i q1, bool unsigned8) {
  __m256i w = _mm256_packs_epi32(q0, q1);  // lanes: q0[0:4] q1[0:4] | q0[4:8] q1[4:8]
  __m256i b = unsigned8 ? _mm256_packus_epi16(w, w) : _mm256_packs_epi16(w, w);
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5));
  return _mm256_castsi256_si128(b);
}

// 16 byte codes -> 8 bytes of nibbles: element 2j in the low nibble of byte j.
inline __m128i nibbles8(__m128i b) {
  __m128i lo = _mm_and_si128(b, _mm_set1_epi16(0x000F));
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi16(0x00F0));
  __m128i n = _mm_or_si128(lo, hi);
  return _mm_packus_epi16(n, n);
}

// 32 codes as int16 (w0: codes 0-3, 8-11 | 4-7, 12-15 by lane after packs_epi32; w1 likewise
// for 16-31) -> 32 bytes in element order, or 16 bytes of nibbles, stored at element k.
inline void store_codes32(uint8_t* codes, int64_t k, int bits, __m256i w0, __m256i w1, bool unsigned8) {
  __m256i b = unsigned8 && bits == 8 ? _mm256_packus_epi16(w0, w1) : _mm256_packs_epi16(w0, w1);
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (bits == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k), b);
    return;
  }
  __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(0x000F));
  __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi16(0x00F0));
  __m256i n = _mm256_permute4x64_epi64(_mm256_packus_epi16(_mm256_or_si256(lo, hi), lo), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k / 2), _mm256_castsi256_si128(n));
}

template <DType T, Scheme S>
int64_t quantize_rows_t(const QuantizeArgs& a, int64_t r0, int64_t r1) {
  const QuantFormat& f = a.fmt;
  const int64_t G = num_groups(a.K, f.group_size), row_bytes = packed_row_bytes(a.K, f.bits);
  const __m256 qmin = _mm256_set1_ps(qmin_of(f)), qmax = _mm256_set1_ps(qmax_of(f));
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  __m256 mids[15];
  for (int i = 0; i < 15; ++i) mids[i] = _mm256_set1_ps(kNF4Midpoints[i]);
  const bool unsigned8 = S == Scheme::asymmetric;

  // Per row: ranges of all groups, then all groups' parameters (independent scalar divisions
  // that overlap in the pipeline instead of stalling each group), then all codes (row in L1/L2).
  std::vector<GroupParams> params(static_cast<size_t>(G));
  std::vector<float> lo_g(static_cast<size_t>(G)), hi_g(static_cast<size_t>(G));
  for (int64_t r = r0; r < r1; ++r) {
    const void* w = static_cast<const char*>(a.w) + r * a.ld_w * int64_t(dtype_size(T));
    // Pass 2 runs from L1 and leaves DRAM idle: it prefetches the next row meanwhile, so the next
    // pass 1 finds its data in cache and the two overlap (a 2x difference when w is in DRAM).
    const char* next_row = r + 1 < r1 ? static_cast<const char*>(w) + a.ld_w * int64_t(dtype_size(T)) : nullptr;
    auto prefetch_next = [&](int64_t k, int64_t n) {  // elements [k, k + n) of the next row
      if (!next_row) return;
      for (int64_t b = 0; b < n * int64_t(dtype_size(T)); b += 64)
        _mm_prefetch(next_row + k * int64_t(dtype_size(T)) + b, _MM_HINT_T0);
    };
    uint8_t* codes = a.codes + r * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * f.group_size, k1 = std::min(a.K, k0 + f.group_size);
      const int64_t kv = k0 + (k1 - k0) / 16 * 16;  // end of the 16-wide part
      // Four independent accumulator sets keep the min/max/FMA latency chains off the
      // critical path. x * 0 is NaN exactly when x is NaN or Inf.
      __m256 vlo[4], vhi[4], poison[4];
      for (int i = 0; i < 4; ++i) {
        vlo[i] = _mm256_set1_ps(INFINITY);
        vhi[i] = _mm256_set1_ps(-INFINITY);
        poison[i] = _mm256_setzero_ps();
      }
      auto step = [&](int i, __m256 x) {
        poison[i] = _mm256_fmadd_ps(x, _mm256_setzero_ps(), poison[i]);
        if (a.params_given) return;
        if constexpr (S == Scheme::asymmetric) {
          vlo[i] = _mm256_min_ps(vlo[i], x);
          vhi[i] = _mm256_max_ps(vhi[i], x);
        } else {
          vhi[i] = _mm256_max_ps(vhi[i], _mm256_andnot_ps(sign_mask, x));
        }
      };
      int64_t k = k0;
      for (; k + 32 <= kv; k += 32) {
        step(0, load8<T>(w, k));
        step(1, load8<T>(w, k + 8));
        step(2, load8<T>(w, k + 16));
        step(3, load8<T>(w, k + 24));
      }
      if (k < kv) {  // kv - k0 is a multiple of 16
        step(0, load8<T>(w, k));
        step(1, load8<T>(w, k + 8));
      }
      __m256 bad = _mm256_or_ps(_mm256_or_ps(poison[0], poison[1]), _mm256_or_ps(poison[2], poison[3]));
      if (_mm256_movemask_ps(_mm256_cmp_ps(bad, bad, _CMP_UNORD_Q))) return r;
      float lo = hmin(_mm256_min_ps(_mm256_min_ps(vlo[0], vlo[1]), _mm256_min_ps(vlo[2], vlo[3])));
      float hi = hmax(_mm256_max_ps(_mm256_max_ps(vhi[0], vhi[1]), _mm256_max_ps(vhi[2], vhi[3])));
      for (k = kv; k < k1; ++k) {
        float x = load_as_f32(w, T, k);
        if (!std::isfinite(x)) return r;
        lo = std::min(lo, x);
        hi = std::max(hi, S == Scheme::asymmetric ? x : std::fabs(x));
      }
      lo_g[g] = lo;
      hi_g[g] = hi;
    }
    for (int64_t g = 0; g < G; ++g) {
      if (a.params_given) {
        params[g] = params_given(f, a.scales[r * G + g], a.zeros ? a.zeros[r * G + g] : 0);
      } else {
        params[g] = params_from_range(f, lo_g[g], hi_g[g], hi_g[g]);
        a.scales[r * G + g] = params[g].scale;
        if (a.zeros) a.zeros[r * G + g] = uint8_t(params[g].zero);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * f.group_size, k1 = std::min(a.K, k0 + f.group_size);
      const int64_t kv = k0 + (k1 - k0) / 16 * 16;
      const GroupParams& p = params[g];
      const __m256 inv = _mm256_set1_ps(p.inv_scale), zero = _mm256_set1_ps(p.zero);
      int64_t k = k0;
      if constexpr (S != Scheme::nf4) {
        // 32 per step, fewer instructions per code: clamping v to [qmin - zero, qmax - zero]
        // (integers) before rounding equals clamping rint(v) + zero to [qmin, qmax], so one
        // vcvtps2dq (MXCSR's default round-to-nearest-even) rounds, and the zero point is added
        // afterwards in int16, 16 lanes per instruction.
        const __m256 vlo = _mm256_set1_ps(qmin_of(f) - p.zero), vhi = _mm256_set1_ps(qmax_of(f) - p.zero);
        const __m256i zero16 = _mm256_set1_epi16(int16_t(p.zero));
        for (; k + 32 <= kv; k += 32) {
          prefetch_next(k, 32);
          __m256i q[4];
          for (int i = 0; i < 4; ++i)
            q[i] = _mm256_cvtps_epi32(
                _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load8<T>(w, k + 8 * i), inv), vlo), vhi));
          __m256i w0 = _mm256_packs_epi32(q[0], q[1]), w1 = _mm256_packs_epi32(q[2], q[3]);
          if constexpr (S == Scheme::asymmetric) {
            w0 = _mm256_add_epi16(w0, zero16);
            w1 = _mm256_add_epi16(w1, zero16);
          }
          store_codes32(codes, k, f.bits, w0, w1, unsigned8);
        }
      }
      for (; k < kv; k += 16) {
        prefetch_next(k, 16);
        __m256i q0 = codes8<S>(load8<T>(w, k), inv, zero, qmin, qmax, mids);
        __m256i q1 = codes8<S>(load8<T>(w, k + 8), inv, zero, qmin, qmax, mids);
        __m128i b = bytes16(q0, q1, unsigned8 && f.bits == 8);
        if (f.bits == 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), b);
        else _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + k / 2), nibbles8(b));
      }
      prefetch_next(kv, k1 - kv);
      for (int64_t k = kv; k < k1; ++k) {
        uint8_t q = code_of(f, p, load_as_f32(w, T, k));
        if (f.bits == 8) codes[k] = q;
        else if (k & 1) codes[k >> 1] = uint8_t(codes[k >> 1] | (q << 4));
        else codes[k >> 1] = q & 0xF;
      }
    }
  }
  return -1;
}

template <DType T>
inline void store8(void* out, int64_t i, __m256 v) {
  if constexpr (T == DType::f32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
  } else if constexpr (T == DType::f16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // round to nearest even, as f32_to_bf16 (no NaN can reach here: inputs are finite)
    __m256i x = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    x = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), odd), 16);
    __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                     _mm256_castsi256_si128(h));
  }
}

// 16 codes of one row starting at element k (k even) -> two vectors of 8 int32.
template <Scheme S>
inline void load_codes16(const uint8_t* codes, int64_t k, int bits, __m256i& c0, __m256i& c1) {
  __m128i b;
  if (bits == 8) {
    b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k));
  } else {
    __m128i n = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k / 2));
    __m128i lo = _mm_and_si128(n, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(n, 4), _mm_set1_epi8(0x0F));
    b = _mm_unpacklo_epi8(lo, hi);
    if (S == Scheme::symmetric)  // sign-extend the nibble: (v ^ 8) - 8
      b = _mm_sub_epi8(_mm_xor_si128(b, _mm_set1_epi8(8)), _mm_set1_epi8(8));
  }
  if (S == Scheme::symmetric) {
    c0 = _mm256_cvtepi8_epi32(b);
    c1 = _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8));
  } else {
    c0 = _mm256_cvtepu8_epi32(b);
    c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  }
}

template <Scheme S>
inline __m256 values8(__m256i c, __m256 scale, __m256i zero, __m256 nf4_lo, __m256 nf4_hi) {
  if constexpr (S == Scheme::nf4) {  // 16-entry table lookup: two 8-entry permutes, pick by bit 3
    __m256 lo = _mm256_permutevar8x32_ps(nf4_lo, c), hi = _mm256_permutevar8x32_ps(nf4_hi, c);
    return _mm256_mul_ps(_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28))), scale);
  } else {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, zero)), scale);
  }
}

template <DType T, Scheme S>
void dequantize_rows_t(const DequantizeArgs& a, int64_t r0, int64_t r1) {
  const QuantFormat& f = a.fmt;
  const int64_t G = num_groups(a.K, f.group_size), row_bytes = packed_row_bytes(a.K, f.bits);
  const __m256 nf4_lo = _mm256_loadu_ps(kNF4Values), nf4_hi = _mm256_loadu_ps(kNF4Values + 8);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* codes = a.codes + r * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * f.group_size, k1 = std::min(a.K, k0 + f.group_size);
      const int64_t kv = k0 + (k1 - k0) / 16 * 16;
      const float s = a.scales[r * G + g];
      const int z = S == Scheme::asymmetric ? a.zeros[r * G + g] : 0;
      const __m256 scale = _mm256_set1_ps(s);
      const __m256i zero = _mm256_set1_epi32(z);
      for (int64_t k = k0; k < kv; k += 16) {
        __m256i c0, c1;
        load_codes16<S>(codes, k, f.bits, c0, c1);
        store8<T>(a.out, r * a.K + k, values8<S>(c0, scale, zero, nf4_lo, nf4_hi));
        store8<T>(a.out, r * a.K + k + 8, values8<S>(c1, scale, zero, nf4_lo, nf4_hi));
      }
      for (int64_t k = kv; k < k1; ++k) {
        int q = f.bits == 8 ? codes[k] : (codes[k >> 1] >> ((k & 1) * 4)) & 0xF;
        float v;
        if (S == Scheme::nf4) v = kNF4Values[q] * s;
        else if (S == Scheme::symmetric) v = float(f.bits == 8 ? int(int8_t(q)) : (q ^ 8) - 8) * s;
        else v = float(q - z) * s;
        store_from_f32(a.out, T, r * a.K + k, v);
      }
    }
  }
}

}  // namespace

int64_t quantize_rows(const QuantizeArgs& a, int64_t r0, int64_t r1) {
  return visit_dtype_scheme(a.w_dtype, a.fmt.scheme, [&](auto T, auto S) {
    return quantize_rows_t<decltype(T)::value, decltype(S)::value>(a, r0, r1);
  });
}

void dequantize_rows(const DequantizeArgs& a, int64_t r0, int64_t r1) {
  visit_dtype_scheme(a.out_dtype, a.fmt.scheme, [&](auto T, auto S) {
    dequantize_rows_t<decltype(T)::value, decltype(S)::value>(a, r0, r1);
  });
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
