// Interleaved A/B of two builds of the AVX2 matmul kernels (cpp/avx2/matmul_avx2.cpp), linked into
// one binary as namespaces va and vb (see run.sh): on a VM whose speed drifts, alternating the two
// builds call by call is the only fair comparison. Calls the kernel as the dispatcher does in decode
// (all rows of X, every panel, one thread) over weight copies rotated through >= 128 MB (COPIES=n
// overrides: COPIES=1 keeps the weight in cache); codes and scales are random (speed only).
//   ab BITS GROUP M [FLOAT [K N]]   ->  best of 6 alternations each, and B's speed-up over A
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/format.h"
#include "common/kernels.h"

namespace lowbit {
const float kNF4Values[16] = {};  // the NF4 path is not timed here
#define LOWBIT_AB_DECLARE(ns)                                                   \
  namespace ns {                                                                \
  void matmul_int(const MatmulArgs&, int64_t, int64_t, int64_t, int64_t);       \
  void matmul_float(const MatmulArgs&, int64_t, int64_t, int64_t, int64_t);     \
  }
LOWBIT_AB_DECLARE(va)
LOWBIT_AB_DECLARE(vb)
}  // namespace lowbit

using namespace lowbit;

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: ab BITS GROUP M [FLOAT [K N]]\n");
    return 2;
  }
  const int bits = std::atoi(argv[1]);
  const int64_t gs = std::atoi(argv[2]), M = std::atoi(argv[3]);
  const bool flt = argc > 4 && std::atoi(argv[4]);
  const int64_t K = argc > 6 ? std::atoi(argv[5]) : 4096, N = argc > 6 ? std::atoi(argv[6]) : 4096;
  const int64_t G = (K + gs - 1) / gs, Kp = (K + 31) / 32 * 32, Np = (N + 3) / 4 * 4, P = Np / 4;
  PackedLinearHeader h{};
  h.bits = bits;
  h.scheme = bits == 8 ? 1 : 0;
  h.N = N, h.K = K, h.Np = Np, h.Kp = Kp, h.G = G, h.group_size = gs;
  const size_t code_bytes = size_t(P * (Kp / 32) * (bits == 4 ? 64 : 128));
  const double weight_bytes = code_bytes + (bits == 4 ? 5.0 : 4.0) * Np * G;  // sw, and zq for asymmetric int4
  const char* env = std::getenv("COPIES");
  const int copies = env ? std::max(1, std::atoi(env)) : std::max(2, int(128e6 / weight_bytes) + 1);
  std::vector<std::vector<uint8_t>> codes(copies);
  std::vector<std::vector<float>> sw(copies);
  std::vector<std::vector<int8_t>> zq(copies);
  for (int c = 0; c < copies; ++c) {
    codes[c].resize(code_bytes);
    for (auto& v : codes[c]) v = uint8_t(std::rand());
    sw[c].assign(size_t(Np * G), 0.01f);
    zq[c].assign(size_t(Np * G), 8);
  }
  const int64_t ld = Kp + 64;
  std::vector<int8_t> xq(size_t(M * ld));
  for (auto& v : xq) v = int8_t(std::rand() % 255 - 127);
  std::vector<float> xf(size_t(M * ld)), sumx(size_t(M * G), 1.f), sa(size_t(M), 0.1f);
  for (auto& v : xf) v = float(std::rand() % 1000) * 1e-3f;
  std::vector<int32_t> suma(size_t(M * G), 5);
  std::vector<float> y[2] = {std::vector<float>(size_t(M * N)), std::vector<float>(size_t(M * N))};
  auto pass = [&](int which) {  // seconds per call over all copies
    const auto t0 = std::chrono::steady_clock::now();
    for (int c = 0; c < copies; ++c) {
      const MatmulArgs a{PackedLinear{&h, codes[c].data(), sw[c].data(), bits == 4 ? zq[c].data() : nullptr, nullptr},
                         PreparedAct{M, Kp, G, ld, xq.data(), sa.data(), suma.data(), nullptr, nullptr, xf.data(),
                                     sumx.data(), nullptr},
                         nullptr, y[which].data(), DType::f32, uint64_t(c)};
      if (which == 0) (flt ? va::matmul_float : va::matmul_int)(a, 0, M, 0, P);
      else (flt ? vb::matmul_float : vb::matmul_int)(a, 0, M, 0, P);
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / copies;
  };
  pass(0), pass(1);
  double maxrel = 0;  // the two builds should agree up to float summation order
  for (size_t i = 0; i < y[0].size(); ++i)
    maxrel = std::max(maxrel, double(std::fabs(y[0][i] - y[1][i]) / (std::fabs(y[0][i]) + 1e-3f)));
  double best[2] = {1e9, 1e9};
  for (int rep = 0; rep < 6; ++rep)
    for (int w = 0; w < 2; ++w) best[w] = std::min(best[w], pass(w));
  std::printf("bits %d g%ld M %ld %s K %ld N %ld: A %.3f ms (%.1f GB/s)  B %.3f ms (%.1f GB/s)  A/B %.2f  max rel diff %.1e\n",
              bits, long(gs), long(M), flt ? "float" : "int", long(K), long(N), best[0] * 1e3, weight_bytes / best[0] / 1e9,
              best[1] * 1e3, weight_bytes / best[1] / 1e9, best[0] / best[1], maxrel);
}
