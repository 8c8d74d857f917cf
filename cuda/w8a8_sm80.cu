// W8A8 GEMM on tensor cores (sm_80, sm_89, sm_90a): Y[M, N] = (Xq . Wq^T) * x_scale[m] * w_scale[n]
// (+ bias), where Xq are X's rows quantized to int8 per token inside the call and Wq are int8
// per-channel weights. Integer products are exact (s8 x s8 -> s32); Y in X's dtype (fp16/bf16).
//
// Two launches on the caller's stream:
//  1. quantize_rows: one block per row of X [M, K] (row stride ld_x): absmax -> scale, codes, by
//     the exact rule of lowbit.quantize(bits=8, symmetric=True, group_size=None) (format.h, with
//     x * inv_scale as an explicit __fmul_rn so no FMA contraction can change a code). Writes
//     xq [M, Kx] int8 (Kx = K rounded up to 16, zero tail), x_scale [M], x_sum [M] = sum of codes.
//  2. w8a8_kernel: layout "w8a8.mma_k32n8" v1 (lowbit_cuda.cuh). Zero-point weights were shifted
//     to int8 at prepack (q - 128, zero - 128); sum_k xq (wq - z) = acc - z * x_sum[m].
//
// Tiling (same skeleton as w4a16_sm80.cu): 128 threads; a block owns BM = 16*MT rows x 64
// columns and a K slice (split-K: int32 partials to a workspace, finished by splitk_epilogue).
// Stage = BK 128 bytes of K: Xq tile [BM][128] (swizzled, cp.async, zero-filled past M/Kx) and
// 64 x 128 packed weights (8 KB, 4 chunks per thread, lane-contiguous so LDS.128 is
// conflict-free). 4 stages. Warp w computes k32 step w of every stage for all 64 columns
// (MT x 8 mma.m16n8k32); the 4 warps' int32 accumulators are summed through shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/format.h"
#include "launch_util.cuh"
#include "lowbit_cuda.cuh"
#include "mma_sm80.cuh"

namespace lowbit {
namespace gpu {
namespace {

using namespace sm80;

constexpr int kThreads = 128;
constexpr int kBN = 64, kBK = 128, kStages = 4;
constexpr int kBChunks = kBK / 32 * 4 * 32;  // 512 chunks of 16 bytes = 8 KB per stage

template <int MT>
struct Tile {
  static constexpr int BM = 16 * MT;
  static constexpr int AChunks = BM * 8;
  static constexpr int Stage = AChunks + kBChunks;
  static constexpr int PipeBytes = kStages * Stage * 16;
  static constexpr int RedBytes = 4 * MT * 8 * 32 * 16;
  static constexpr int SmemBytes = PipeBytes > RedBytes ? PipeBytes : RedBytes;
};

struct Params {
  const int8_t* xq;
  int M, N, kx;   // kx: xq row bytes (multiple of 16)
  int k32;        // k32 blocks of the packed weights
  int tiles_per;
  const uint4* w;
  const float* w_scale;
  const int32_t* w_zero;
  const float* x_scale;
  const int32_t* x_sum;
  const float* bias;
  void* y;
  int32_t* ws;
};

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// The one place the int32 result becomes a float: exact integer correction, then two products.
template <typename T>
__device__ __forceinline__ T finish(int32_t acc, int m, int n, const float* x_scale, const int32_t* x_sum,
                                    const float* w_scale, const int32_t* w_zero, const float* bias) {
  const int32_t v = acc - w_zero[n] * x_sum[m];
  float r = float(v) * x_scale[m] * w_scale[n];
  if (bias) r += bias[n];
  return from_f32<T>(r);
}

template <typename T>
__global__ void __launch_bounds__(256) quantize_rows(const T* x, int64_t ld_x, int K, int kx, int8_t* xq,
                                                     float* x_scale, int32_t* x_sum) {
  __shared__ float s_max[8];
  __shared__ int s_sum[8];
  const int m = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* row = x + int64_t(m) * ld_x;
  float amax = 0.f;
  for (int k = tid; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(to_f32(row[k])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) s_max[warp] = amax;
  __syncthreads();
  amax = s_max[0];
  for (int w = 1; w < int(blockDim.x >> 5); ++w) amax = fmaxf(amax, s_max[w]);
  const QuantFormat f{8, Scheme::symmetric, K, 1.0f};
  const GroupParams gp = params_from_range(f, -amax, amax, amax);
  int sum = 0;
  int8_t* out = xq + int64_t(m) * kx;
  for (int k = tid; k < kx; k += blockDim.x) {
    int8_t q = 0;
    if (k < K) q = int8_t(uniform_code(f, gp, __fmul_rn(to_f32(row[k]), gp.inv_scale)));
    out[k] = q;
    sum += q;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) s_sum[warp] = sum;
  __syncthreads();
  if (tid == 0) {
    int total = 0;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) total += s_sum[w];
    x_sum[m] = total;
    x_scale[m] = gp.scale;
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) w8a8_kernel(const Params p) {
  using TL = Tile<MT>;
  extern __shared__ uint4 smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nb = blockIdx.x, m0 = blockIdx.z * TL::BM, n0 = nb * kBN;
  const int k_tiles = p.k32 / 4;
  const int t0 = blockIdx.y * p.tiles_per;
  const int n_tiles = min(k_tiles, t0 + p.tiles_per) - t0;

  auto load_stage = [&](int slot, int t) {
    uint4* sA = smem + slot * TL::Stage;
    uint4* sB = sA + TL::AChunks;
    const int k0 = t * kBK;
#pragma unroll
    for (int i = tid; i < TL::AChunks; i += kThreads) {
      const int r = i >> 3, c = i & 7, m = m0 + r, k = k0 + 16 * c;
      const bool ok = m < p.M && k < p.kx;  // kx % 16 == 0: a chunk is all in or all out
      cp_async16(sA + swizzled_chunk(r, c), ok ? p.xq + int64_t(m) * p.kx + k : p.xq, ok);
    }
    const uint4* src = p.w + (int64_t(nb) * p.k32 + 4 * t) * 128;
#pragma unroll
    for (int i = tid; i < kBChunks; i += kThreads) cp_async16(sB + i, src + i, true);
  };

  int acc[MT][8][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_stage(s, t0 + s);
    cp_async_commit();
  }
  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int nxt = it + kStages - 1;
      if (nxt < n_tiles) load_stage(nxt % kStages, t0 + nxt);
      cp_async_commit();
    }
    const int slot = it % kStages;
    const int kk = (t0 + it) * kBK + 32 * warp;
    if (kk < p.kx) {  // warp-uniform
      const uint4* sA = smem + slot * TL::Stage;
      const uint4* sB = sA + TL::AChunks;
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) load_a_frag(a[i], sA, 16 * i, warp, lane);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint4 b = sB[(warp * 4 + q) * 32 + lane];  // n8 tiles 2q (x, y) and 2q + 1 (z, w)
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_16832_s8(acc[i][2 * q], a[i], b.x, b.y);
          mma_16832_s8(acc[i][2 * q + 1], a[i], b.z, b.w);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  int4* red = reinterpret_cast<int4*>(smem);
  constexpr int kFrags = MT * 8 * 32;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
      red[warp * kFrags + (i * 8 + j) * 32 + lane] = make_int4(acc[i][j][0], acc[i][j][1], acc[i][j][2], acc[i][j][3]);
  __syncthreads();

  for (int e = tid; e < kFrags; e += kThreads) {
    int4 v = red[e];
#pragma unroll
    for (int w = 1; w < 4; ++w) {
      const int4 u = red[w * kFrags + e];
      v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
    }
    const int l = e & 31, tile = e >> 5, i = tile >> 3, j = tile & 7;
    const int row = m0 + 16 * i + (l >> 2), col = n0 + 8 * j + 2 * (l & 3);
    const int vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int m = row + 8 * (h >> 1), n = col + (h & 1);
      if (m >= p.M || n >= p.N) continue;
      if (p.ws)
        p.ws[(int64_t(blockIdx.y) * p.M + m) * p.N + n] = vals[h];
      else
        static_cast<T*>(p.y)[int64_t(m) * p.N + n] =
            finish<T>(vals[h], m, n, p.x_scale, p.x_sum, p.w_scale, p.w_zero, p.bias);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) splitk_epilogue(const int32_t* ws, int splits, int M, int N,
                                                       const float* x_scale, const int32_t* x_sum,
                                                       const float* w_scale, const int32_t* w_zero,
                                                       const float* bias, T* y) {
  const int64_t MN = int64_t(M) * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < MN;
       i += int64_t(gridDim.x) * blockDim.x) {
    int32_t v = 0;
    for (int s = 0; s < splits; ++s) v += ws[s * MN + i];
    y[i] = finish<T>(v, int(i / N), int(i % N), x_scale, x_sum, w_scale, w_zero, bias);
  }
}

// One thread per packed word: word i = [nb][kb][q][lane][w], fragment register r = (4q + w) % 2 of
// n8 tile (4q + w) / 2: 4 int8 at k = 32 kb + 4 (lane % 4) + 16 r .. + 3, n = 8 tile + lane / 4.
__global__ void __launch_bounds__(256) prepack_weights(const uint8_t* codes, bool shift, int64_t N,
                                                       int64_t K, int k32, int64_t words, uint32_t* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int w = int(i & 3), lane = int((i >> 2) & 31), q = int((i >> 7) & 3);
    const int64_t kb = (i >> 9) % k32, nb = (i >> 9) / k32;
    const int tile = (4 * q + w) >> 1, r = (4 * q + w) & 1;
    const int64_t n = nb * kBN + 8 * tile + (lane >> 2);
    const int64_t k = kb * 32 + 4 * (lane & 3) + 16 * r;
    uint32_t word = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      uint32_t b = 0;
      if (n < N && k + e < K) b = uint8_t(codes[n * K + k + e] - (shift ? 128 : 0));
      word |= b << (8 * e);
    }
    out[i] = word;
  }
}

__global__ void __launch_bounds__(256) prepack_params(const float* scales, const uint8_t* zeros, int64_t N,
                                                      int64_t n_pad, uint32_t* out) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < n_pad;
       n += int64_t(gridDim.x) * blockDim.x) {
    const float s = n < N ? scales[n] : 0.f;
    const int32_t z = n < N && zeros ? int32_t(zeros[n]) - 128 : 0;
    uint32_t us;
    memcpy(&us, &s, 4);
    out[n] = us;
    out[n_pad + n] = uint32_t(z);
  }
}

unsigned grid_1d(int64_t n, int per) {
  const int64_t b = (n + per - 1) / per;
  return unsigned(b < 1 ? 1 : b > (1 << 20) ? (1 << 20) : b);
}

int mt_for(int64_t M) { return M <= 16 ? 1 : M <= 32 ? 2 : 4; }

template <typename T, int MT>
cudaError_t launch_gemm(const Params& p, dim3 grid, cudaStream_t s) {
  auto kernel = w8a8_kernel<T, MT>;
  constexpr int smem = Tile<MT>::SmemBytes;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const W8A8Args& a, const Params& p, int mt, dim3 grid, int splits, cudaStream_t s) {
  quantize_rows<T><<<unsigned(a.M), 256, 0, s>>>(static_cast<const T*>(a.x), a.ld_x, int(a.w.K), p.kx,
                                                 a.xq, a.x_scale, a.x_sum);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  e = mt == 1 ? launch_gemm<T, 1>(p, grid, s) : mt == 2 ? launch_gemm<T, 2>(p, grid, s)
                                                      : launch_gemm<T, 4>(p, grid, s);
  if (e != cudaSuccess || splits == 1) return e;
  splitk_epilogue<T><<<grid_1d(a.M * a.w.N, 256), 256, 0, s>>>(a.workspace, splits, int(a.M), int(a.w.N),
                                                               a.x_scale, a.x_sum, p.w_scale, p.w_zero,
                                                               a.bias, static_cast<T*>(a.y));
  return cudaGetLastError();
}

}  // namespace

std::string w8a8_prepack(const void* codes, const float* scales, const uint8_t* zeros,
                         const W8A8Shape& sh, uint32_t* weights, uint32_t* params, const Launch& l) {
  DeviceGuard guard(l.device);
  if (guard.error() != cudaSuccess) return message(guard.error());
  const cudaStream_t s = to_stream(l.stream);
  prepack_weights<<<grid_1d(sh.weight_words(), 256), 256, 0, s>>>(
      static_cast<const uint8_t*>(codes), zeros != nullptr, sh.N, sh.K, int(sh.k_pad() / 32),
      sh.weight_words(), weights);
  prepack_params<<<grid_1d(sh.n_pad(), 256), 256, 0, s>>>(scales, zeros, sh.N, sh.n_pad(), params);
  return message(cudaGetLastError());
}

GemmPlan w8a8_plan(int64_t M, int64_t N, int64_t K, int device) {
  const int64_t bm = 16 * mt_for(M);
  const int64_t mn = ((M + bm - 1) / bm) * ((N + kBN - 1) / kBN);
  const SplitPlan sp = plan_splits(sm_count(device), mn, int((K + kBK - 1) / kBK), 2);
  return {sp.splits, sp.splits > 1 ? int64_t(sp.splits) * M * N : 0};
}

std::string w8a8_gemm(const W8A8Args& a, const Launch& l) {
  if (a.x_dtype == DType::f32) return "w8a8_gemm: x must be float16 or bfloat16";
  DeviceGuard guard(l.device);
  if (guard.error() != cudaSuccess) return message(guard.error());
  const cudaStream_t s = to_stream(l.stream);
  const int mt = mt_for(a.M);
  const int64_t bm = 16 * mt;
  const int64_t mn = ((a.M + bm - 1) / bm) * (a.w.n_pad() / kBN);
  const SplitPlan sp = plan_splits(sm_count(l.device), mn, int(a.w.k_pad() / kBK), 2);
  if (sp.splits > 1 && a.workspace == nullptr) return "w8a8_gemm: split-K needs a workspace";
  const int64_t n_pad = a.w.n_pad();
  Params p{a.xq, int(a.M), int(a.w.N), int(a.w.act_row_bytes()), int(a.w.k_pad() / 32), sp.tiles_per,
           reinterpret_cast<const uint4*>(a.weights), reinterpret_cast<const float*>(a.params),
           reinterpret_cast<const int32_t*>(a.params + n_pad), a.x_scale, a.x_sum, a.bias, a.y,
           sp.splits > 1 ? a.workspace : nullptr};
  const dim3 grid(unsigned(n_pad / kBN), unsigned(sp.splits), unsigned((a.M + bm - 1) / bm));
  if (grid.z > 65535) return "w8a8_gemm: M is too large for one launch (more than 65535 row blocks)";
  const cudaError_t e = a.x_dtype == DType::f16 ? run<__half>(a, p, mt, grid, sp.splits, s)
                                                : run<__nv_bfloat16>(a, p, mt, grid, sp.splits, s);
  return message(e);
}

}  // namespace gpu
}  // namespace lowbit
