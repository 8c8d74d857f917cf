// AVX-512 intrinsics for this folder's kernels. Natively: <immintrin.h>. In the avx512_emulated
// test build (LOWBIT_SIMDE_EMULATION): SIMDe's portable versions, plus lb_* stand-ins for the few
// intrinsics SIMDe 0.8 lacks — each is built from simpler intrinsics with the same semantics.
#pragma once
#include <cstdint>
#include <cstring>

#ifdef LOWBIT_SIMDE_EMULATION
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <immintrin.h>  // AVX2 / F16C natively

inline __m512i lb_cvtepi8_epi32(__m128i b) { return _mm512_cvtepi16_epi32(_mm256_cvtepi8_epi16(b)); }
inline __m512i lb_cvtepu8_epi32(__m128i b) { return _mm512_cvtepu16_epi32(_mm256_cvtepu8_epi16(b)); }
inline __m256i lb_cvtps_ph(__m512 v) {
  __m256 lo = _mm512_castps512_ps256(v), hi = _mm512_extractf32x8_ps(v, 1);
  return _mm256_setr_m128i(_mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                           _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __m256i lb_cvtepi32_epi16(__m512i v) {  // truncation
  alignas(64) int32_t a[16]; alignas(32) int16_t b[16];
  _mm512_store_si512(a, v);
  for (int i = 0; i < 16; ++i) b[i] = int16_t(a[i]);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
}
inline __m128i lb_cvtepi32_epi8(__m512i v) {
  alignas(64) int32_t a[16]; alignas(16) int8_t b[16];
  _mm512_store_si512(a, v);
  for (int i = 0; i < 16; ++i) b[i] = int8_t(a[i]);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(b));
}
inline __m128i lb_cvtepi64_epi8(__m512i v) {
  alignas(64) int64_t a[8]; alignas(16) int8_t b[16] = {};
  _mm512_store_si512(a, v);
  for (int i = 0; i < 8; ++i) b[i] = int8_t(a[i]);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(b));
}
inline void lb_mask_storeu_epi8(void* p, __mmask16 m, __m128i v) {
  alignas(16) uint8_t b[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(b), v);
  for (int i = 0; i < 16; ++i) if ((m >> i) & 1) static_cast<uint8_t*>(p)[i] = b[i];
}
inline __m128i lb_maskz_loadu_epi8(__mmask16 m, const void* p) {
  alignas(16) uint8_t b[16] = {};
  for (int i = 0; i < 16; ++i) if ((m >> i) & 1) b[i] = static_cast<const uint8_t*>(p)[i];
  return _mm_load_si128(reinterpret_cast<const __m128i*>(b));
}
// SIMDe's masked loads/stores touch all lanes (its stores even write zeros to masked-off
// lanes), so the emulation does them element by element.
inline __m512 lb_maskz_loadu_ps(__mmask16 m, const float* p) {
  alignas(64) float b[16] = {};
  for (int i = 0; i < 16; ++i) if ((m >> i) & 1) b[i] = p[i];
  return _mm512_load_ps(b);
}
inline __m256i lb_maskz_loadu_epi16(__mmask16 m, const uint16_t* p) {
  alignas(32) uint16_t b[16] = {};
  for (int i = 0; i < 16; ++i) if ((m >> i) & 1) b[i] = p[i];
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
}
inline void lb_mask_storeu_ps(float* p, __mmask16 m, __m512 v) {
  alignas(64) float b[16];
  _mm512_store_ps(b, v);
  for (int i = 0; i < 16; ++i) if ((m >> i) & 1) p[i] = b[i];
}
// vdpbf16ps on bf16 pairs held in integer registers: each product rounded once (the native
// instruction's accumulation order and denormal flushing aside; tests compare to a tolerance).
inline __m512 lb_dpbf16_ps(__m512 acc, __m512i a, __m512i b) {
  const __m512i hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(b, hi)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
}
constexpr bool kNativeBf16 = false;
inline void lb_mask_storeu_epi16(uint16_t* p, __mmask16 m, __m256i v) {
  alignas(32) uint16_t b[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(b), v);
  for (int i = 0; i < 16; ++i) if ((m >> i) & 1) p[i] = b[i];
}
#else
#include <immintrin.h>
inline __m512 lb_maskz_loadu_ps(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m256i lb_maskz_loadu_epi16(__mmask16 m, const uint16_t* p) { return _mm256_maskz_loadu_epi16(m, p); }
inline void lb_mask_storeu_ps(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void lb_mask_storeu_epi16(uint16_t* p, __mmask16 m, __m256i v) { _mm256_mask_storeu_epi16(p, m, v); }
inline __m512i lb_cvtepi8_epi32(__m128i b) { return _mm512_cvtepi8_epi32(b); }
inline __m512i lb_cvtepu8_epi32(__m128i b) { return _mm512_cvtepu8_epi32(b); }
inline __m256i lb_cvtps_ph(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m256i lb_cvtepi32_epi16(__m512i v) { return _mm512_cvtepi32_epi16(v); }
inline __m128i lb_cvtepi32_epi8(__m512i v) { return _mm512_cvtepi32_epi8(v); }
inline __m128i lb_cvtepi64_epi8(__m512i v) { return _mm512_cvtepi64_epi8(v); }
inline void lb_mask_storeu_epi8(void* p, __mmask16 m, __m128i v) { _mm_mask_storeu_epi8(p, m, v); }
inline __m512 lb_dpbf16_ps(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
constexpr bool kNativeBf16 = true;  // vdpbf16ps needs avx512_bf16 at run time (cpu_features)
inline __m128i lb_maskz_loadu_epi8(__mmask16 m, const void* p) { return _mm_maskz_loadu_epi8(m, p); }
#endif
