// Machine-limit microbenchmarks for bench/. Each returns a rate over the lowbit thread pool's
// threads; the caller checks that the variant holding it runs on this CPU.
#pragma once
#include <chrono>
#include <cstdint>

namespace lowbit {
inline double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
namespace avx2 {  // cpp/avx2/peak_avx2.cpp
double peak_read_gbps(const uint8_t* buf, int64_t bytes, int reps);  // streaming 32-byte loads
double peak_fma_gflops(int64_t iters);   // 2 FLOP per fp32 FMA lane, 10 independent chains
double peak_int8_gops(int64_t iters);    // vpmaddubsw+vpaddw (u8×s8 into int16): 2 OP per int8 MAC
double peak_int8_exact_gops(int64_t iters);  // vpsignb+vpmaddubsw+vpmaddwd+vpaddd: exact s8×s8
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
