// Machine-limit microbenchmarks for bench/. Each returns a rate over the lowbit thread pool's
// threads; the caller checks that the variant holding it runs on this CPU.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>

#include "common/dispatch.h"

namespace lowbit {
inline double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs chains(iters) once on every thread of the pool at the same time: G ops per second over
// all of them, ops_per_iter ops per iteration and thread. What chains returns is summed into a
// sink, so the compiler cannot drop its work.
template <class Chains>
double rate_on_all_threads(int64_t iters, double ops_per_iter, Chains chains) {
  const int threads = get_num_threads();
  std::atomic<int64_t> sink{0};
  const double t0 = seconds_now();
  parallel_for(threads, 1, [&](int64_t t0_, int64_t t1_) {
    for (int64_t t = t0_; t < t1_; ++t) sink += chains(iters);
  });
  const double dt = seconds_now() - t0;
  return double(threads) * double(iters) * ops_per_iter / dt / 1e9 + 0 * double(sink.load());
}
namespace avx2 {  // cpp/avx2/peak_avx2.cpp
double peak_read_gbps(const uint8_t* buf, int64_t bytes, int reps);  // streaming 32-byte loads
double peak_fma_gflops(int64_t iters);   // 2 FLOP per fp32 FMA lane, 10 independent chains
double peak_int8_gops(int64_t iters);    // vpmaddubsw+vpaddw (u8×s8 into int16): 2 OP per int8 MAC
double peak_int8_exact_gops(int64_t iters);  // vpsignb+vpmaddubsw+vpmaddwd+vpaddd: exact s8×s8
double peak_vnni256_gops(int64_t iters);     // vpdpbusd ymm (AVX-VNNI; builds with the avx2_vnni variant)
}  // namespace avx2
namespace avx512 {  // cpp/avx512/peak_avx512.cpp
double peak_fma512_gflops(int64_t iters);
double peak_vnni512_gops(int64_t iters);       // vpdpbusd zmm
double peak_bf16dot512_gflops(int64_t iters);  // vdpbf16ps zmm
}  // namespace avx512
namespace amx {  // cpp/amx/peak_amx.cpp
double peak_amx_int8_gops(int64_t iters);   // tdpbusd on 16×64 tiles, 4 accumulators
double peak_amx_bf16_gflops(int64_t iters);  // tdpbf16ps
}  // namespace amx
}  // namespace lowbit
