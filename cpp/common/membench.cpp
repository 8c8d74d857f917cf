// Memory-read microbenchmark for the benchmark harness: streams a buffer with 16-byte loads
// (baseline SSE2, enough to saturate DRAM from one core) into four independent accumulators.
#include <emmintrin.h>

#include <algorithm>
#include <atomic>

#include "common/dispatch.h"

namespace lowbit {

uint64_t read_buffer(const void* data, int64_t bytes) {
  const int64_t chunk = 1 << 20;  // threads take 1 MiB pieces
  std::atomic<uint64_t> checksum{0};
  parallel_for((bytes + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    const char* begin = static_cast<const char*>(data) + c0 * chunk;
    const int64_t n = std::min(bytes, c1 * chunk) - c0 * chunk;
    __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      a0 = _mm_xor_si128(a0, _mm_loadu_si128(reinterpret_cast<const __m128i*>(begin + i)));
      a1 = _mm_xor_si128(a1, _mm_loadu_si128(reinterpret_cast<const __m128i*>(begin + i + 16)));
      a2 = _mm_xor_si128(a2, _mm_loadu_si128(reinterpret_cast<const __m128i*>(begin + i + 32)));
      a3 = _mm_xor_si128(a3, _mm_loadu_si128(reinterpret_cast<const __m128i*>(begin + i + 48)));
    }
    uint64_t s = uint64_t(_mm_cvtsi128_si64(_mm_xor_si128(_mm_xor_si128(a0, a1), _mm_xor_si128(a2, a3))));
    for (; i < n; ++i) s += uint8_t(begin[i]);
    checksum.fetch_xor(s);
  });
  return checksum.load();
}

}  // namespace lowbit
