// AVX2 microbenchmarks for the machine's limits (bench/bench_matmul.py): DRAM read bandwidth
// (sum of 32-byte loads over a buffer much larger than the L3), peak fp32 FMA and peak int8-dot
// throughput (independent dependency chains so the ports, not latency, bound the loop). They run
// on the lowbit thread pool, one contiguous share per thread.
#include <immintrin.h>

#include <atomic>

#include "common/dispatch.h"
#include "common/peak.h"

namespace lowbit {
namespace avx2 {

double peak_read_gbps(const uint8_t* buf, int64_t bytes, int reps) {
  std::atomic<int64_t> sink{0};
  const int64_t lines = bytes / 128;
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    double t0 = seconds_now();
    parallel_for(lines, 1024, [&](int64_t l0, int64_t l1) {
      __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
      for (int64_t l = l0; l < l1; ++l) {
        const __m256i* p = reinterpret_cast<const __m256i*>(buf + l * 128);
        a = _mm256_xor_si256(a, _mm256_loadu_si256(p));
        b = _mm256_xor_si256(b, _mm256_loadu_si256(p + 1));
        c = _mm256_xor_si256(c, _mm256_loadu_si256(p + 2));
        d = _mm256_xor_si256(d, _mm256_loadu_si256(p + 3));
      }
      __m256i s = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
      sink += _mm256_extract_epi64(s, 0);
    });
    double dt = seconds_now() - t0;
    if (dt > 0 && lines * 128 / dt / 1e9 > best) best = lines * 128 / dt / 1e9;
  }
  return best + 0 * double(sink.load());
}

double peak_fma_gflops(int64_t iters) {
  constexpr int kChains = 10;
  return rate_on_all_threads(iters, kChains * 8 * 2, [](int64_t n) -> int64_t {
    __m256 acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(float(i));
    const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (int64_t it = 0; it < n; ++it)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], m, c);
    __m256 s = acc[0];
    for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
    return int64_t(_mm256_cvtss_f32(s));
  });
}

// Each int8 microbenchmark: kInt8Chains chains of one 32-byte multiply per iteration.
constexpr int kInt8Chains = 6;

// The u8×s8 multiply rate: vpmaddubsw into int16 sums (how the int4 kernels use it; an exact
// int32 dot of int8 × int8 needs a vpmaddwd more). Each chain has its own weight operand and the
// activation operand is opaque to the compiler every iteration, so no product is shared or hoisted.
double peak_int8_gops(int64_t iters) {
  return rate_on_all_threads(iters, kInt8Chains * 32 * 2, [](int64_t n) -> int64_t {
    __m256i acc[kInt8Chains], u[kInt8Chains];
    for (int i = 0; i < kInt8Chains; ++i) {
      acc[i] = _mm256_set1_epi16(int16_t(i));
      u[i] = _mm256_set1_epi8(char(3 + i));
      asm("" : "+x"(u[i]));  // opaque: not rebuilt from constants in the loop
    }
    __m256i x = _mm256_set1_epi8(-5);
    for (int64_t it = 0; it < n; ++it) {
      asm("" : "+x"(x));
      for (int i = 0; i < kInt8Chains; ++i) acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(u[i], x));
    }
    __m256i r = acc[0];
    for (int i = 1; i < kInt8Chains; ++i) r = _mm256_add_epi16(r, acc[i]);
    return _mm256_extract_epi16(r, 0);
  });
}

// The exact s8×s8 rate on AVX2, the ceiling of the W8A8 kernels: the sign trick
// (maddubs(|w|, sign(x, w))) and a vpmaddwd to int32 per vpmaddubsw, as those kernels do it
// (the u8×s8 form without vpsignb can saturate int16, so no exact kernel gets the rate above).
double peak_int8_exact_gops(int64_t iters) {
  return rate_on_all_threads(iters, kInt8Chains * 32 * 2, [](int64_t n) -> int64_t {
    __m256i acc[kInt8Chains], w[kInt8Chains], aw[kInt8Chains];
    for (int i = 0; i < kInt8Chains; ++i) {
      acc[i] = _mm256_set1_epi32(i);
      w[i] = _mm256_set1_epi8(char(i % 2 ? -3 - i : 3 + i));
      aw[i] = _mm256_abs_epi8(w[i]);
      asm("" : "+x"(w[i]), "+x"(aw[i]));  // opaque: not rebuilt from constants in the loop
    }
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256i x = _mm256_set1_epi8(-5);
    for (int64_t it = 0; it < n; ++it) {
      asm("" : "+x"(x));
      for (int i = 0; i < kInt8Chains; ++i)
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw[i], _mm256_sign_epi8(x, w[i])), ones16));
    }
    __m256i r = acc[0];
    for (int i = 1; i < kInt8Chains; ++i) r = _mm256_add_epi32(r, acc[i]);
    return _mm256_extract_epi32(r, 0);
  });
}

#ifdef LOWBIT_HAVE_AVX2_VNNI
// The AVX-VNNI rate: vpdpbusd on ymm (u8×s8 into int32, exact). Its own target attribute: the
// avx2 variant is built without -mavxvnni, and only the caller's check (avx2_vnni runnable)
// guards the instruction.
__attribute__((target("avx2,avxvnni"))) static int64_t vnni256_chains(int64_t n) {
  __m256i acc[kInt8Chains], u[kInt8Chains];
  for (int i = 0; i < kInt8Chains; ++i) {
    acc[i] = _mm256_set1_epi32(i);
    u[i] = _mm256_set1_epi8(char(3 + i));
    asm("" : "+x"(u[i]));  // opaque: not rebuilt from constants in the loop
  }
  __m256i x = _mm256_set1_epi8(-5);
  for (int64_t it = 0; it < n; ++it) {
    asm("" : "+x"(x));
    for (int i = 0; i < kInt8Chains; ++i) acc[i] = _mm256_dpbusd_avx_epi32(acc[i], u[i], x);
  }
  __m256i r = acc[0];
  for (int i = 1; i < kInt8Chains; ++i) r = _mm256_add_epi32(r, acc[i]);
  return _mm256_extract_epi32(r, 0);
}

double peak_vnni256_gops(int64_t iters) { return rate_on_all_threads(iters, kInt8Chains * 32 * 2, vnni256_chains); }
#endif

}  // namespace avx2
}  // namespace lowbit
