// AVX-512 microbenchmarks for the machine's limits (bench/): peak fp32 FMA, vpdpbusd (VNNI int8
// dot) and vdpbf16ps (bf16 dot) throughput on zmm registers, independent accumulator chains so
// the ports, not latency, bound the loop. Native build only (not the SIMDe-emulated variant).
#include <immintrin.h>

#include "common/dispatch.h"
#include "common/peak.h"

namespace lowbit {
namespace avx512 {
namespace {

constexpr int kChains = 12;  // > latency (4-5 cycles) × ports (2)

}  // namespace

double peak_fma512_gflops(int64_t iters) {
  return rate_on_all_threads(iters, kChains * 16 * 2, [](int64_t n) {
    __m512 acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i));
    const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    for (int64_t it = 0; it < n; ++it)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, c);
    __m512 s = acc[0];
    for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
    return int64_t(_mm512_reduce_add_ps(s));
  });
}

double peak_vnni512_gops(int64_t iters) {  // 64 u8×s8 MACs per vpdpbusd, 2 OP each
  return rate_on_all_threads(iters, kChains * 64 * 2, [](int64_t n) {
    __m512i acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(i);
    const __m512i u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-5);
    for (int64_t it = 0; it < n; ++it)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], u, s);
    __m512i r = acc[0];
    for (int i = 1; i < kChains; ++i) r = _mm512_add_epi32(r, acc[i]);
    return int64_t(_mm512_reduce_add_epi32(r));
  });
}

double peak_bf16dot512_gflops(int64_t iters) {  // 32 bf16 products per vdpbf16ps, 2 FLOP each
  return rate_on_all_threads(iters, kChains * 32 * 2, [](int64_t n) {
    __m512 acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i));
    const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
    for (int64_t it = 0; it < n; ++it)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __m512 s = acc[0];
    for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
    return int64_t(_mm512_reduce_add_ps(s));
  });
}

}  // namespace avx512
}  // namespace lowbit
