// How fast can one row of X (decode, W4A8) go through int4 weights in groups of 32, by the code
// layout? The inner loop of three layouts, standalone, on random codes held in cache (the rate the
// core can compute at; a decode from DRAM is bounded by the lower of this and the DRAM rate):
//   panel4  : layout panel4_k32 as the avx512 panel kernel reads it (64-byte line = 4 rows × 32 k,
//             each vpdpbusd lane one row × 4 k): a row's 8 lanes are folded per group (packs +
//             madd), two groups folded once more, then one convert and FMA per two groups.
//   quad    : the same lines, each row's 32 codes as 4 dwords holding k 8j..8j+3 (low nibbles) and
//             8j+4..8j+7 (high): both nibbles' dots land in the row's own 4 lanes, so the
//             per-group fold goes; the pair fold stays.
//   rowlane : 16 rows per panel, each vpdpbusd lane one row: a group of 32 k is 4 lines, and its
//             dots need no fold at all, one convert and FMA per group of 16 rows.
// All three run the same vpdpbusd count (2 per 64 bytes of codes); what differs is the other
// vector work per line. Prints ns per 64-byte line of codes (the scales' bytes come on top).
//   bash bench/decode_layouts/run.sh [K N]     (default 4096 1024: 2 MB of codes, in L3)
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace {

inline __m512i broadcast256(const int8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// sw: [panel][G][4] floats; G even
__attribute__((noinline)) float panel4(const uint8_t* w, const float* sw, const int8_t* x, int G, int panels) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(int8_t(0xF0)), ones16 = _mm512_set1_epi16(1);
  const __m512i pidx = _mm512_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5, 2, 3, 6, 7, 2, 3, 6, 7);
  __m512 tot = _mm512_setzero_ps();
  for (int p = 0; p < panels; ++p) {
    const uint8_t* wp = w + size_t(p) * G * 64;
    const float* s = sw + size_t(p) * G * 4;
    __m512 f = _mm512_setzero_ps();
    for (int g = 0; g < G; g += 2) {
      __m512i d[2];
      for (int j = 0; j < 2; ++j) {
        const __m512i v = _mm512_loadu_si512(wp + (g + j) * 64), xv = broadcast256(x + (g + j) * 32);
        const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low4), xv);
        const __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, high4), xv);
        d[j] = _mm512_madd_epi16(_mm512_packs_epi32(d0, _mm512_srai_epi32(d1, 4)), ones16);
      }
      const __m512 sc = _mm512_permutexvar_ps(pidx, _mm512_castps256_ps512(_mm256_loadu_ps(s + g * 4)));
      f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_packs_epi32(d[0], d[1]), ones16)), sc, f);
    }
    tot = _mm512_add_ps(tot, f);
  }
  return _mm512_reduce_add_ps(tot);
}

// x16: per block, 16 bytes of k {0-3, 8-11, 16-19, 24-27} then 16 of {4-7, ..., 28-31} (once per call)
__attribute__((noinline)) float quad(const uint8_t* w, const float* sw, const int8_t* x16, int G, int panels) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), ones16 = _mm512_set1_epi16(1);
  const __m512i pidx = _mm512_setr_epi32(0, 0, 4, 4, 1, 1, 5, 5, 2, 2, 6, 6, 3, 3, 7, 7);
  __m512 tot = _mm512_setzero_ps();
  for (int p = 0; p < panels; ++p) {
    const uint8_t* wp = w + size_t(p) * G * 64;
    const float* s = sw + size_t(p) * G * 4;
    __m512 f = _mm512_setzero_ps();
    for (int g = 0; g < G; g += 2) {
      __m512i d[2];
      for (int j = 0; j < 2; ++j) {
        const __m512i v = _mm512_loadu_si512(wp + (g + j) * 64);
        const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x16 + (g + j) * 32)));
        const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x16 + (g + j) * 32 + 16)));
        const __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low4), xl);
        d[j] = _mm512_dpbusd_epi32(a, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xh);
      }
      const __m512 sc = _mm512_permutexvar_ps(pidx, _mm512_castps256_ps512(_mm256_loadu_ps(s + g * 4)));
      f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_packs_epi32(d[0], d[1]), ones16)), sc, f);
    }
    tot = _mm512_add_ps(tot, f);
  }
  return _mm512_reduce_add_ps(tot);
}

// sw: [panel16][G][16] floats. Low nibbles against x dword 2j, high (16×, own sums) against 2j+1.
__attribute__((noinline)) float rowlane(const uint8_t* w, const float* sw, const int8_t* x, int G, int panels16) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(int8_t(0xF0));
  __m512 tot = _mm512_setzero_ps();
  for (int p = 0; p < panels16; ++p) {
    const uint8_t* wp = w + size_t(p) * G * 256;
    const float* s = sw + size_t(p) * G * 16;
    __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();  // even / odd groups: two FMA chains
    auto group = [&](int g) {
      const int32_t* xd = reinterpret_cast<const int32_t*>(x + g * 32);
      __m512i lo0 = _mm512_setzero_si512(), lo1 = lo0, hi0 = lo0, hi1 = lo0;
      for (int j = 0; j < 4; j += 2) {
        const __m512i v0 = _mm512_loadu_si512(wp + g * 256 + j * 64), v1 = _mm512_loadu_si512(wp + g * 256 + j * 64 + 64);
        lo0 = _mm512_dpbusd_epi32(lo0, _mm512_and_si512(v0, low4), _mm512_set1_epi32(xd[2 * j]));
        hi0 = _mm512_dpbusd_epi32(hi0, _mm512_and_si512(v0, high4), _mm512_set1_epi32(xd[2 * j + 1]));
        lo1 = _mm512_dpbusd_epi32(lo1, _mm512_and_si512(v1, low4), _mm512_set1_epi32(xd[2 * j + 2]));
        hi1 = _mm512_dpbusd_epi32(hi1, _mm512_and_si512(v1, high4), _mm512_set1_epi32(xd[2 * j + 3]));
      }
      const __m512i d = _mm512_add_epi32(_mm512_add_epi32(lo0, lo1), _mm512_srai_epi32(_mm512_add_epi32(hi0, hi1), 4));
      return _mm512_cvtepi32_ps(d);
    };
    for (int g = 0; g < G; g += 2) {
      f0 = _mm512_fmadd_ps(group(g), _mm512_loadu_ps(s + g * 16), f0);
      f1 = _mm512_fmadd_ps(group(g + 1), _mm512_loadu_ps(s + g * 16 + 16), f1);
    }
    tot = _mm512_add_ps(tot, _mm512_add_ps(f0, f1));
  }
  return _mm512_reduce_add_ps(tot);
}

template <class T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t n) : p_(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))) {}
  ~AlignedBuffer() { std::free(p_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data() { return p_; }

 private:
  T* p_;
};

template <class F>
double best_seconds(F&& f, float& sink) {
  double best = 1e30;
  for (int r = 0; r < 300; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    sink += f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const int K = argc > 2 ? std::atoi(argv[1]) : 4096, N = argc > 2 ? std::atoi(argv[2]) : 1024;
  if (K % 64 || N % 16 || K <= 0 || N <= 0) {
    std::fprintf(stderr, "K must be a multiple of 64 and N of 16\n");
    return 1;
  }
  const int G = K / 32;
  const size_t code_bytes = size_t(N) * K / 2, lines = code_bytes / 64;
  // 64-byte aligned, as lowbit's packed weights are: a line split over two cache lines costs two
  // L1 accesses per load
  AlignedBuffer<uint8_t> w(code_bytes);
  AlignedBuffer<float> sw(size_t(N) * G);
  AlignedBuffer<int8_t> x(K);
  for (size_t i = 0; i < code_bytes; ++i) w.data()[i] = uint8_t(std::rand());
  for (size_t i = 0; i < size_t(N) * G; ++i) sw.data()[i] = 1e-3f * float(std::rand() % 100);
  for (int i = 0; i < K; ++i) x.data()[i] = int8_t(std::rand() % 255 - 127);
  float sink = 0;
  const double t4 = best_seconds([&] { return panel4(w.data(), sw.data(), x.data(), G, N / 4); }, sink);
  const double tq = best_seconds([&] { return quad(w.data(), sw.data(), x.data(), G, N / 4); }, sink);
  const double tr = best_seconds([&] { return rowlane(w.data(), sw.data(), x.data(), G, N / 16); }, sink);
  std::printf("K=%d N=%d, %.1f MB of codes, ns per 64-byte line (best of 300):\n", K, N, code_bytes / 1e6);
  std::printf("  panel4  %.3f\n  quad    %.3f  (%.2fx)\n  rowlane %.3f  (%.2fx)\n", t4 * 1e9 / lines, tq * 1e9 / lines,
              t4 / tq, tr * 1e9 / lines, t4 / tr);
  return sink == 12345.f;  // keeps the results live
}
