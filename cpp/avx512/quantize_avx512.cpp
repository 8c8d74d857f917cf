// AVX-512 (F/BW/VL/DQ) quantize / dequantize. Same layouts and rounding as cpp/ref:
//   in : w [rows, K] f32/f16/bf16 (row stride ld_w)
//   out: codes [rows, packed_row_bytes(K, bits)], scales/zeros [rows, groups]
// 16 elements per step; a group's ragged end is handled with masked loads/stores, not a scalar
// tail. Masked-off lanes load as 0, which cannot change a group's range: it always contains 0.
#include "avx512/intrin.h"

#include <algorithm>
#include <cmath>

#include "common/convert.h"
#include "common/format.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

inline __mmask16 first_n(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

template <DType T>
inline __m512 load16(const void* base, int64_t i, __mmask16 m) {
  if constexpr (T == DType::f32) {
    return lb_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
  } else {
    __m256i h = lb_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i);
    if constexpr (T == DType::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16
  }
}

template <Scheme S>
inline __m512i codes16(__m512 x, __m512 inv, __m512 zero, __m512 qmin, __m512 qmax,
                       const __m512* mids) {
  __m512 v = _mm512_mul_ps(x, inv);
  if constexpr (S == Scheme::nf4) {  // count the midpoints strictly below v
    __m512i q = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    for (int i = 0; i < 15; ++i)
      q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask(v, mids[i], _CMP_GT_OQ), q, one);
    return q;
  } else {
    __m512 q = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zero);
    return _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(q, qmin), qmax));
  }
}

template <DType T, Scheme S>
int64_t quantize_rows_t(const QuantizeArgs& a, int64_t r0, int64_t r1) {
  const QuantFormat& f = a.fmt;
  const int64_t G = num_groups(a.K, f.group_size), row_bytes = packed_row_bytes(a.K, f.bits);
  const __m512 qmin = _mm512_set1_ps(qmin_of(f)), qmax = _mm512_set1_ps(qmax_of(f));
  __m512 mids[15];
  for (int i = 0; i < 15; ++i) mids[i] = _mm512_set1_ps(kNF4Midpoints[i]);

  for (int64_t r = r0; r < r1; ++r) {
    const void* w = static_cast<const char*>(a.w) + r * a.ld_w * int64_t(dtype_size(T));
    // Pass 2 works from L1; it prefetches the next row meanwhile so DRAM reads overlap it (as in
    // the AVX2 variant, where this took int4 g128 from 39% to ~55% of DRAM bandwidth).
    const char* next_row = r + 1 < r1 ? static_cast<const char*>(w) + a.ld_w * int64_t(dtype_size(T)) : nullptr;
    uint8_t* codes = a.codes + r * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * f.group_size, k1 = std::min(a.K, k0 + f.group_size);
      // Pass 1: range (unless given) and the NaN/Inf check: x * 0 is NaN exactly for NaN/Inf.
      __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps(), poison = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; k += 16) {
        __m512 x = load16<T>(w, k, first_n(k1 - k));
        poison = _mm512_fmadd_ps(x, _mm512_setzero_ps(), poison);
        if (a.params_given) continue;
        if constexpr (S == Scheme::asymmetric) {
          vlo = _mm512_min_ps(vlo, x);
          vhi = _mm512_max_ps(vhi, x);
        } else {
          vhi = _mm512_max_ps(vhi, _mm512_abs_ps(x));
        }
      }
      if (_mm512_cmp_ps_mask(poison, poison, _CMP_UNORD_Q)) return r;
      GroupParams p;
      if (a.params_given) {
        p = params_given(f, a.scales[r * G + g], a.zeros ? a.zeros[r * G + g] : 0);
      } else {
        float lo = _mm512_reduce_min_ps(vlo), hi = _mm512_reduce_max_ps(vhi);
        p = params_from_range(f, lo, hi, hi);
        a.scales[r * G + g] = p.scale;
        if (a.zeros) a.zeros[r * G + g] = uint8_t(p.zero);
      }
      // Pass 2: codes.
      const __m512 inv = _mm512_set1_ps(p.inv_scale), zero = _mm512_set1_ps(p.zero);
      for (int64_t k = k0; k < k1; k += 16) {
        if (next_row) _mm_prefetch(next_row + k * int64_t(dtype_size(T)), _MM_HINT_T0);  // 16 elements <= 64 B
        const int64_t n = std::min<int64_t>(16, k1 - k);
        __m512i q = codes16<S>(load16<T>(w, k, first_n(n)), inv, zero, qmin, qmax, mids);
        if (f.bits == 8) {
          __m128i b = lb_cvtepi32_epi8(q);  // truncation: q is in [-128, 255]
          if (n == 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), b);
          else lb_mask_storeu_epi8(codes + k, first_n(n), b);
        } else {
          // Nibble pairs: qword j holds codes 2j (bits 0-3) and 2j+1 (bits 32-35); shifting the
          // qword right by 28 lands 2j+1 on bits 4-7, so its low byte is the packed byte.
          __m512i t = _mm512_and_si512(q, _mm512_set1_epi32(0xF));
          __m128i b = lb_cvtepi64_epi8(_mm512_or_si512(t, _mm512_srli_epi64(t, 28)));
          if (n == 16) {
            _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + k / 2), b);
          } else {
            alignas(16) uint8_t tmp[16];
            _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b);
            if (n & 1) tmp[n / 2] &= 0x0F;  // a row's odd last code leaves the high nibble 0
            std::memcpy(codes + k / 2, tmp, size_t((n + 1) / 2));
          }
        }
      }
    }
  }
  return -1;
}

template <DType T>
inline void store16(void* out, int64_t i, __m512 v, __mmask16 m) {
  if constexpr (T == DType::f32) {
    lb_mask_storeu_ps(static_cast<float*>(out) + i, m, v);
  } else if constexpr (T == DType::f16) {
    lb_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, m, lb_cvtps_ph(v));
  } else {  // round to nearest even, as f32_to_bf16 (inputs are finite)
    __m512i x = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    x = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), odd), 16);
    lb_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, m, lb_cvtepi32_epi16(x));
  }
}

template <DType T, Scheme S>
void dequantize_rows_t(const DequantizeArgs& a, int64_t r0, int64_t r1) {
  const QuantFormat& f = a.fmt;
  const int64_t G = num_groups(a.K, f.group_size), row_bytes = packed_row_bytes(a.K, f.bits);
  const __m512 nf4 = _mm512_loadu_ps(kNF4Values);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* codes = a.codes + r * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * f.group_size, k1 = std::min(a.K, k0 + f.group_size);
      const __m512 scale = _mm512_set1_ps(a.scales[r * G + g]);
      const __m512i zero = _mm512_set1_epi32(S == Scheme::asymmetric ? a.zeros[r * G + g] : 0);
      for (int64_t k = k0; k < k1; k += 16) {
        const int64_t n = std::min<int64_t>(16, k1 - k);
        __m128i b;
        if (f.bits == 8) {
          b = n == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k))
                      : lb_maskz_loadu_epi8(first_n(n), codes + k);
        } else {
          __m128i nb = n == 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k / 2))
                               : lb_maskz_loadu_epi8(first_n((n + 1) / 2), codes + k / 2);
          __m128i lo = _mm_and_si128(nb, _mm_set1_epi8(0x0F));
          __m128i hi = _mm_and_si128(_mm_srli_epi16(nb, 4), _mm_set1_epi8(0x0F));
          b = _mm_unpacklo_epi8(lo, hi);
          if (S == Scheme::symmetric)  // sign-extend the nibble: (v ^ 8) - 8
            b = _mm_sub_epi8(_mm_xor_si128(b, _mm_set1_epi8(8)), _mm_set1_epi8(8));
        }
        __m512i c = S == Scheme::symmetric ? lb_cvtepi8_epi32(b) : lb_cvtepu8_epi32(b);
        __m512 v = S == Scheme::nf4 ? _mm512_permutexvar_ps(c, nf4)  // 16-entry table lookup
                                    : _mm512_cvtepi32_ps(_mm512_sub_epi32(c, zero));
        store16<T>(a.out, r * a.K + k, _mm512_mul_ps(v, scale), first_n(n));
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
