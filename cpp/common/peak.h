// Machine-limit microbenchmarks for bench/ (AVX2 implementations in cpp/avx2/peak_avx2.cpp; the
// caller checks that the avx2 variant is runnable). Each returns a rate for `threads` threads.
#pragma once
#include <cstdint>

namespace lowbit {
namespace avx2 {
double peak_read_gbps(const uint8_t* buf, int64_t bytes, int reps);  // streaming 32-byte loads
double peak_fma_gflops(int64_t iters);   // 2 FLOP per fp32 FMA lane, 10 independent chains
double peak_int8_gops(int64_t iters);    // vpmaddubsw+vpmaddwd+vpaddd: 2 OP per int8 MAC
}  // namespace avx2
}  // namespace lowbit
