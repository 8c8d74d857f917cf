// W4A16 GEMM on tensor cores (sm_80, sm_89, sm_90a): Y[M, N] = X[M, K] . dequantize(W)[N, K]^T
// (+ bias), X and Y fp16 or bf16, W int4 per-group (any group size that is a multiple of 16, or
// one group per row), symmetric or zero-point. fp32 accumulation.
//
// Layouts in: X [M, K] (row stride ld_x); weights/params in layout "w4a16.mma_k16n16" v1
// (lowbit_cuda.cuh), produced once by w4a16_prepack from lowbit's format. Out: Y [M, N] contiguous.
//
// Weight word (one uint32 per lane per k16 block per 16 columns), nibble slot s at bits 4s:
//   slot 0/4: W[k = 2t, 2t+1][n]       slot 1/5: W[k = 2t+8, 2t+9][n]        (n8 tile 0)
//   slot 2/6: W[k = 2t, 2t+1][n + 8]   slot 3/7: W[k = 2t+8, 2t+9][n + 8]    (n8 tile 1)
//   with t = lane % 4, n = lane / 4 inside the 16-column group: exactly the lane's mma B fragment
//   registers {b0, b1} of two n8 tiles, so (q & 0x000f000f) yields the (low-k, high-k) pair of one
//   register already in half2 order. Nibbles are offset binary u = q + zero_shift (0..15).
//
// Dequantization in registers, exact until the final multiply:
//   fp16: (u & 0x000f000f) | 0x64006400 is half2(1024 + u); the 0x00f0 nibble gives 1024 + 16u.
//         1024 + u - (1024 + z) = u - z by one HSUB2 (the magic bias and the zero point are one
//         constant); fma(1024 + 16u, 1/16, -(64 + z)) = u - z by one HFMA2. Then HMUL2 by scale.
//   bf16: bf16 has 7 mantissa bits, so only bits 0..3 of each half can carry a nibble: each slot
//         pair is shifted down first; (..) | 0x43004300 is bf16x2(128 + u), minus (128 + z).
//   All intermediates are small integers, exact in either type; the only rounding is (u - z) * s
//   to x's dtype (scales are converted to x's dtype at prepack time).
//
// Tiling: 128 threads (4 warps); a block owns BM = 16*MT rows x 64 columns and a slice of K
// (split-K: blockIdx.y; partial sums to a float workspace, summed by splitk_reduce). Each pipeline
// stage covers BK = 64 of K: X tile [BM][64] (swizzled, cp.async), the packed weights of 64 x 64
// (2 KB, one 16-byte cp.async per thread) and the params rows of the <= 4 groups the stage
// touches. 4 stages in flight. Warp w computes k16 step w of every stage for all 64 columns
// (MT x 8 mma per step, no duplicated dequantization); the 4 warps' accumulators are summed
// through shared memory at the end (intra-block split-K), which keeps M = 1..16 efficient.
// Predication: rows >= M and k >= K of X load as zeros (cp.async src-size 0); padded weight
// columns/k have zero scale; outputs are bounds-checked. A ragged last group is just a group
// index: g = k / group_size per k16 step (group_size is a multiple of 16).
// Preconditions (checked by the binding): K, N >= 1; group_size % 16 == 0 or group_size == K.
// X rows are loaded 16 bytes at a time when X is 16-byte aligned and ld_x % 8 == 0, else by
// element (same tile, plain stores).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launch_util.cuh"
#include "lowbit_cuda.cuh"
#include "mma_sm80.cuh"

namespace lowbit {
namespace gpu {
namespace {

using namespace sm80;

constexpr int kThreads = 128;
constexpr int kBN = 64, kBK = 64, kStages = 4;
constexpr int kBChunks = kBK / 16 * 32;  // 16-byte chunks of packed weights per stage (128)
constexpr int kPChunks = 4 * kBN / 4;    // params: up to 4 group rows x 64 words (64 chunks)

template <int MT>
struct Tile {
  static constexpr int BM = 16 * MT;
  static constexpr int AChunks = BM * 8;
  static constexpr int Stage = AChunks + kBChunks + kPChunks;  // uint4 per stage
  static constexpr int PipeBytes = kStages * Stage * 16;
  static constexpr int RedBytes = 4 * MT * 8 * 32 * 16;  // 4 warps' accumulators
  static constexpr int SmemBytes = PipeBytes > RedBytes ? PipeBytes : RedBytes;
};

struct Params {
  const void* x;
  int64_t ld_x;
  int M, N, K;
  int gs;        // group size (K for one group per row)
  int g_pad, n_pad, k16;  // params rows, padded N, k16 blocks of the packed weights
  int tiles_per;  // k tiles (of 64) per split
  const uint4* w;
  const uint32_t* p;
  const float* bias;
  void* y;
  float* ws;
};

template <typename T> struct Pair;
template <> struct Pair<__half> { using H2 = __half2; };
template <> struct Pair<__nv_bfloat16> { using H2 = __nv_bfloat162; };

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Per-column dequantization constants of one group for one n8 column of this lane.
template <typename T>
struct ColConst {
  using H2 = typename Pair<T>::H2;
  H2 scale;  // (s, s)
  H2 lo;     // fp16: (1024 + z); bf16: (128 + z)
  H2 hi;     // fp16 only: -(64 + z)
};

template <typename T>
__device__ __forceinline__ ColConst<T> col_const(uint32_t word) {
  using H2 = typename Pair<T>::H2;
  ColConst<T> c;
  const uint32_t s = word & 0xffffu, z = word >> 16;
  c.scale = as_h2<H2>(s | (s << 16));
  const H2 z2 = as_h2<H2>(z | (z << 16));
  if constexpr (std::is_same<T, __half>::value) {
    c.lo = __hadd2(z2, as_h2<H2>(0x64006400u));             // 1024 + z, exact
    c.hi = __hneg2(__hadd2(z2, as_h2<H2>(0x54005400u)));    // -(64 + z), exact
  } else {
    c.lo = __hadd2(z2, as_h2<H2>(0x43004300u));             // 128 + z, exact
    c.hi = c.lo;
  }
  return c;
}

// One packed word -> B fragments {b0, b1} of the two n8 tiles it covers.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t q, const ColConst<T>& c0, const ColConst<T>& c1,
                                             uint32_t (&b)[4]) {
  using H2 = typename Pair<T>::H2;
  if constexpr (std::is_same<T, __half>::value) {
    const H2 sixteenth = as_h2<H2>(0x2c002c00u);  // 1/16 in both halves
    const uint32_t r0 = (q & 0x000f000fu) | 0x64006400u;  // slots 0,4: 1024 + u
    const uint32_t r1 = (q & 0x00f000f0u) | 0x64006400u;  // slots 1,5: 1024 + 16u
    const uint32_t q2 = q >> 8;
    const uint32_t r2 = (q2 & 0x000f000fu) | 0x64006400u;  // slots 2,6
    const uint32_t r3 = (q2 & 0x00f000f0u) | 0x64006400u;  // slots 3,7
    b[0] = as_u32(__hmul2(__hsub2(as_h2<H2>(r0), c0.lo), c0.scale));
    b[1] = as_u32(__hmul2(__hfma2(as_h2<H2>(r1), sixteenth, c0.hi), c0.scale));
    b[2] = as_u32(__hmul2(__hsub2(as_h2<H2>(r2), c1.lo), c1.scale));
    b[3] = as_u32(__hmul2(__hfma2(as_h2<H2>(r3), sixteenth, c1.hi), c1.scale));
  } else {
    const uint32_t r0 = (q & 0x000f000fu) | 0x43004300u;          // slots 0,4: 128 + u
    const uint32_t r1 = ((q >> 4) & 0x000f000fu) | 0x43004300u;   // slots 1,5
    const uint32_t r2 = ((q >> 8) & 0x000f000fu) | 0x43004300u;   // slots 2,6
    const uint32_t r3 = ((q >> 12) & 0x000f000fu) | 0x43004300u;  // slots 3,7
    b[0] = as_u32(__hmul2(__hsub2(as_h2<H2>(r0), c0.lo), c0.scale));
    b[1] = as_u32(__hmul2(__hsub2(as_h2<H2>(r1), c0.lo), c0.scale));
    b[2] = as_u32(__hmul2(__hsub2(as_h2<H2>(r2), c1.lo), c1.scale));
    b[3] = as_u32(__hmul2(__hsub2(as_h2<H2>(r3), c1.lo), c1.scale));
  }
}

template <typename T, int MT, bool VEC>
__global__ void __launch_bounds__(kThreads) w4a16_kernel(const Params p) {
  using TL = Tile<MT>;
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nb = blockIdx.x, m0 = blockIdx.z * TL::BM, n0 = nb * kBN;
  const int k_tiles = p.k16 / 4;
  const int t0 = blockIdx.y * p.tiles_per;
  const int n_tiles = min(k_tiles, t0 + p.tiles_per) - t0;
  const T* x = static_cast<const T*>(p.x);

  auto load_stage = [&](int slot, int t) {
    uint4* sA = smem + slot * TL::Stage;
    uint4* sB = sA + TL::AChunks;
    uint4* sP = sB + kBChunks;
    const int k0 = t * kBK;
#pragma unroll
    for (int i = tid; i < TL::AChunks; i += kThreads) {
      const int r = i >> 3, c = i & 7, m = m0 + r, k = k0 + 8 * c;
      uint4* dst = sA + swizzled_chunk(r, c);
      if constexpr (VEC) {
        const bool ok = m < p.M && k < p.K;  // K % 8 == 0 here: a chunk is all in or all out
        cp_async16(dst, ok ? x + int64_t(m) * p.ld_x + k : x, ok);
      } else {
        uint16_t v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const bool ok = m < p.M && k + e < p.K;
          v[e] = ok ? reinterpret_cast<const uint16_t*>(x)[int64_t(m) * p.ld_x + k + e] : uint16_t(0);
        }
        *dst = make_uint4(v[0] | uint32_t(v[1]) << 16, v[2] | uint32_t(v[3]) << 16,
                          v[4] | uint32_t(v[5]) << 16, v[6] | uint32_t(v[7]) << 16);
      }
    }
    // Packed weights of this 64 x 64 tile are 2 KB contiguous: one chunk per thread.
    cp_async16(sB + tid, p.w + (int64_t(nb) * p.k16 + 4 * t) * 32 + tid, true);
    if (tid < kPChunks) {
      const int row = tid >> 4, col = tid & 15;
      const int g = k0 / p.gs + row;
      const bool ok = g < p.g_pad && g <= (k0 + kBK - 1) / p.gs;
      cp_async16(sP + tid, ok ? p.p + int64_t(g) * p.n_pad + n0 + 4 * col : p.p, ok);
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  ColConst<T> cc[8];  // this lane's 8 columns (n8 tiles), for group cur_g
  int cur_g = -1;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_stage(s, t0 + s);
    cp_async_commit();
  }
  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` landed for everyone; slot (it - 1) % S is free again
    {
      const int nxt = it + kStages - 1;
      if (nxt < n_tiles) load_stage(nxt % kStages, t0 + nxt);
      cp_async_commit();
    }
    const int slot = it % kStages;
    const int k0 = (t0 + it) * kBK;
    const int kk = k0 + 16 * warp;  // this warp's k16 step
    if (kk < p.K) {                 // warp-uniform
      const uint4* sA = smem + slot * TL::Stage;
      const uint4* sB = sA + TL::AChunks;
      const uint32_t* sP = reinterpret_cast<const uint32_t*>(sB + kBChunks);
      const int g = kk / p.gs;
      if (g != cur_g) {  // warp-uniform: new group, new constants
        cur_g = g;
        const uint32_t* row = sP + (g - k0 / p.gs) * kBN;
#pragma unroll
        for (int j = 0; j < 8; ++j) cc[j] = col_const<T>(row[8 * j + (lane >> 2)]);
      }
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) load_a_frag(a[i], sA, 16 * i, warp, lane);
      const uint4 q4 = sB[warp * 32 + lane];
      const uint32_t qw[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t b[4];
        dequant_word<T>(qw[j], cc[2 * j], cc[2 * j + 1], b);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_16816<T>(acc[i][2 * j], a[i], b[0], b[1]);
          mma_16816<T>(acc[i][2 * j + 1], a[i], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline smem is now the reduction buffer

  float4* red = reinterpret_cast<float4*>(smem);
  constexpr int kFrags = MT * 8 * 32;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
      red[warp * kFrags + (i * 8 + j) * 32 + lane] =
          make_float4(acc[i][j][0], acc[i][j][1], acc[i][j][2], acc[i][j][3]);
  __syncthreads();

  for (int e = tid; e < kFrags; e += kThreads) {
    float4 v = red[e];
#pragma unroll
    for (int w = 1; w < 4; ++w) {
      const float4 u = red[w * kFrags + e];
      v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
    }
    const int l = e & 31, tile = e >> 5, i = tile >> 3, j = tile & 7;
    const int row = m0 + 16 * i + (l >> 2), col = n0 + 8 * j + 2 * (l & 3);
    const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int m = row + 8 * (h >> 1), n = col + (h & 1);
      if (m >= p.M || n >= p.N) continue;
      if (p.ws) {
        p.ws[(int64_t(blockIdx.y) * p.M + m) * p.N + n] = vals[h];
      } else {
        const float b = p.bias ? p.bias[n] : 0.f;
        static_cast<T*>(p.y)[int64_t(m) * p.N + n] = from_f32<T>(vals[h] + b);
      }
    }
  }
}

// y = sum of the split-K partial sums + bias, in T.
template <typename T>
__global__ void __launch_bounds__(256) splitk_reduce(const float* ws, int splits, int64_t MN, int N,
                                                     const float* bias, T* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < MN;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += ws[s * MN + i];
    if (bias) v += bias[i % N];
    y[i] = from_f32<T>(v);
  }
}

// Prepack: one thread per packed word.
__global__ void __launch_bounds__(256) prepack_weights(const uint8_t* codes, int64_t N, int64_t K,
                                                       bool symmetric, int k16, int64_t words,
                                                       uint32_t* out) {
  const int64_t row_bytes = (K + 1) / 2;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int j = int(i & 3), lane = int((i >> 2) & 31);
    const int64_t kb = (i >> 7) % k16, nb = (i >> 7) / k16;
    const int64_t n_base = nb * kBN + 16 * j + (lane >> 2);
    const int64_t k_base = kb * 16 + 2 * (lane & 3);
    uint32_t word = 0;
#pragma unroll
    for (int slot = 0; slot < 8; ++slot) {
      // slot = 4 * (k parity) + 2 * (n8 tile) + (k + 8 half)
      const int64_t n = n_base + 8 * ((slot >> 1) & 1);
      const int64_t k = k_base + (slot >> 2) + 8 * (slot & 1);
      uint32_t u = 0;
      if (n < N && k < K) {
        u = (codes[n * row_bytes + (k >> 1)] >> (4 * (k & 1))) & 0xfu;
        if (symmetric) u ^= 0x8u;  // 4-bit two's complement -> offset binary, zero point 8
      }
      word |= u << (4 * slot);
    }
    out[i] = word;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) prepack_params(const float* scales, const uint8_t* zeros,
                                                      int64_t N, int64_t G, int64_t n_pad,
                                                      int64_t words, uint32_t* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / n_pad, n = i % n_pad;
    float s = 0.f, z = 0.f;
    if (n < N && g < G) {
      s = scales[n * G + g];
      z = zeros ? float(zeros[n * G + g]) : 8.f;
    }
    const T hs = from_f32<T>(s), hz = from_f32<T>(z);
    uint16_t us, uz;
    memcpy(&us, &hs, 2);
    memcpy(&uz, &hz, 2);
    out[i] = us | (uint32_t(uz) << 16);
  }
}

unsigned grid_1d(int64_t n, int per) {
  const int64_t b = (n + per - 1) / per;
  return unsigned(b < 1 ? 1 : b > (1 << 20) ? (1 << 20) : b);
}

int mt_for(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

template <typename T, int MT, bool VEC>
cudaError_t launch_gemm(const Params& p, dim3 grid, cudaStream_t s) {
  auto kernel = w4a16_kernel<T, MT, VEC>;
  constexpr int smem = Tile<MT>::SmemBytes;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T, bool VEC>
cudaError_t launch_mt(int mt, const Params& p, dim3 grid, cudaStream_t s) {
  switch (mt) {
    case 1: return launch_gemm<T, 1, VEC>(p, grid, s);
    case 2: return launch_gemm<T, 2, VEC>(p, grid, s);
    default: return launch_gemm<T, 4, VEC>(p, grid, s);
  }
}

}  // namespace

std::string w4a16_prepack(const uint8_t* codes, const float* scales, const uint8_t* zeros,
                          const W4A16Shape& sh, DType act, uint32_t* weights, uint32_t* params,
                          const Launch& l) {
  if (act == DType::f32) return "w4a16_prepack: activations must be float16 or bfloat16";
  DeviceGuard guard(l.device);
  if (guard.error() != cudaSuccess) return message(guard.error());
  const cudaStream_t s = to_stream(l.stream);
  const int64_t G = num_groups(sh.K, sh.group_size);
  const int k16 = int(sh.k_pad() / 16);
  prepack_weights<<<grid_1d(sh.weight_words(), 256), 256, 0, s>>>(codes, sh.N, sh.K, zeros == nullptr,
                                                                  k16, sh.weight_words(), weights);
  if (act == DType::f16)
    prepack_params<__half><<<grid_1d(sh.param_words(), 256), 256, 0, s>>>(
        scales, zeros, sh.N, G, sh.n_pad(), sh.param_words(), params);
  else
    prepack_params<__nv_bfloat16><<<grid_1d(sh.param_words(), 256), 256, 0, s>>>(
        scales, zeros, sh.N, G, sh.n_pad(), sh.param_words(), params);
  return message(cudaGetLastError());
}

GemmPlan w4a16_plan(int64_t M, int64_t N, int64_t K, int device) {
  const int64_t bm = 16 * mt_for(M);
  const int64_t mn = ((M + bm - 1) / bm) * ((N + kBN - 1) / kBN);
  const SplitPlan sp = plan_splits(sm_count(device), mn, int((K + kBK - 1) / kBK), 4);
  return {sp.splits, sp.splits > 1 ? int64_t(sp.splits) * M * N : 0};
}

std::string w4a16_gemm(const W4A16Args& a, const Launch& l) {
  if (a.x_dtype == DType::f32) return "w4a16_gemm: x must be float16 or bfloat16";
  DeviceGuard guard(l.device);
  if (guard.error() != cudaSuccess) return message(guard.error());
  const cudaStream_t s = to_stream(l.stream);
  const int mt = mt_for(a.M);
  const int64_t bm = 16 * mt;
  const int64_t mn = ((a.M + bm - 1) / bm) * (a.w.n_pad() / kBN);
  const int k_tiles = int(a.w.k_pad() / kBK);
  const SplitPlan sp = plan_splits(sm_count(l.device), mn, k_tiles, 4);
  if (sp.splits > 1 && a.workspace == nullptr) return "w4a16_gemm: split-K needs a workspace";
  Params p{a.x, a.ld_x, int(a.M), int(a.w.N), int(a.w.K), int(a.w.group_size), int(a.w.g_pad()),
           int(a.w.n_pad()), int(a.w.k_pad() / 16), sp.tiles_per, reinterpret_cast<const uint4*>(a.weights),
           a.params, a.bias, a.y, sp.splits > 1 ? a.workspace : nullptr};
  const dim3 grid(unsigned(a.w.n_pad() / kBN), unsigned(sp.splits), unsigned((a.M + bm - 1) / bm));
  if (grid.z > 65535) return "w4a16_gemm: M is too large for one launch (more than 65535 row blocks)";
  const bool vec = (reinterpret_cast<uintptr_t>(a.x) & 15) == 0 && a.ld_x % 8 == 0 && a.w.K % 8 == 0;
  cudaError_t e;
  if (a.x_dtype == DType::f16)
    e = vec ? launch_mt<__half, true>(mt, p, grid, s) : launch_mt<__half, false>(mt, p, grid, s);
  else
    e = vec ? launch_mt<__nv_bfloat16, true>(mt, p, grid, s) : launch_mt<__nv_bfloat16, false>(mt, p, grid, s);
  if (e != cudaSuccess || sp.splits == 1) return message(e);
  const int64_t MN = a.M * a.w.N;
  if (a.x_dtype == DType::f16)
    splitk_reduce<__half><<<grid_1d(MN, 256), 256, 0, s>>>(a.workspace, sp.splits, MN, int(a.w.N), a.bias,
                                                         static_cast<__half*>(a.y));
  else
    splitk_reduce<__nv_bfloat16><<<grid_1d(MN, 256), 256, 0, s>>>(
        a.workspace, sp.splits, MN, int(a.w.N), a.bias, static_cast<__nv_bfloat16*>(a.y));
  return message(cudaGetLastError());
}

}  // namespace gpu
}  // namespace lowbit
