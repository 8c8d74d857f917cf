// CUDA quantize / dequantize / pack_int4 / unpack_int4, bit-exact with cpp/ref/quantize_ref.cpp.
//
// Layouts (as on the CPU, see cpp/common/kernels.h):
//   w, out  : [rows, K] float32/float16/bfloat16 (w: row stride ld_w elements; out contiguous)
//   codes   : [rows, K] int8/uint8 for 8 bits, or [rows, ceil(K/2)] uint8 for <= 4 bits with
//             element 2j in the low nibble of byte j (symmetric codes as 4-bit two's complement)
//   scales  : float32 [rows, G], zeros uint8 [rows, G]; G = ceil(K / group_size), last group ragged
//
// Work unit: a *chunk* of 8 consecutive elements of one row starting at an index that is a
// multiple of 8. group_size is a multiple of 16 or the whole row, so a chunk never straddles two
// groups, and for <= 4 bits a chunk owns whole code bytes (4 of them). A chunk is moved with
// 16-byte loads / 4- or 8-byte code stores when its addresses are aligned and it is full, else
// element by element (odd K, ld_w or pointer offsets make rows misaligned; still coalesced).
//
// Kernels (each templated on the float type and the scheme, everything else run-time uniform):
//   quantize_groups : parameters computed from the group (min/max or absmax). `tpg` threads own
//                     one group: tpg = 1..32 (a sub-warp; several groups per warp), or the whole
//                     256-thread block for groups longer than 512 elements. Pass 1 loads the
//                     group's chunks (keeping up to kCache chunks per thread in registers) and
//                     reduces with xor shuffles (+ shared memory across warps in block mode);
//                     every thread then derives the same GroupParams with the shared scalar rule
//                     of cpp/common/format.h; pass 2 writes the codes (re-loading only chunks
//                     beyond the register cache).
//   quantize_given  : parameters given (GPTQ/AWQ, per-tensor): one thread per chunk.
//   dequantize      : one thread per chunk.
//   pack / unpack   : one thread per chunk.
//
// Bit-exactness: float32 throughout; this file is compiled with --fmad=false, -prec-div=true and
// -ftz=false (see lowbit_cuda.cmake) so x * inv_scale, 1 / scale and (hi - lo) / qmax round
// exactly like the CPU; rint is nearbyint (half to even); f16/bf16 conversions are the _rn
// intrinsics, which round to nearest even like cpp/common/convert.h. min/max reductions are exact
// in any order (the sign of a zero lo/hi cannot change a scale or zero point; see format.h).
//
// Bad input (NaN/Inf in w, out-of-range given params or int4 codes) is recorded in the caller's
// status buffer (lowbit_cuda.cuh); the kernels never stop early, the outputs are then unspecified.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/format.h"
#include "launch_util.cuh"
#include "lowbit_cuda.cuh"

namespace lowbit {
// The NF4 tables live in cpp/common/format.cpp, which this module links too (one source of
// truth); the launchers pass them to the kernels by value as kernel parameters.
namespace gpu {
namespace {

constexpr int kChunk = 8;         // elements per chunk
constexpr int kThreads = 256;     // block size of the one-thread-per-chunk kernels
constexpr int kCache = 2;         // chunks per thread kept in registers between the two passes
constexpr int64_t kMaxBlocks = 1 << 20;  // grid cap; every kernel loops (grid stride) past it

struct NF4Tables {
  float values[16];
  float midpoints[15];
};

// ---------------------------------------------------------------------------------------------
// Element access

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ bool aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Loads n <= 8 elements (the rest read as 0, which no min/max/absmax below can be changed by:
// the asymmetric range always includes 0). vec: p is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* p, int n, bool vec, float (&v)[kChunk]) {
  if (vec && n == kChunk) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p));
      const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        T lo, hi;
        const uint16_t l16 = uint16_t(w[i] & 0xffffu), h16 = uint16_t(w[i] >> 16);
        memcpy(&lo, &l16, 2);
        memcpy(&hi, &h16, 2);
        v[2 * i] = to_f32(lo);
        v[2 * i + 1] = to_f32(hi);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = i < n ? to_f32(p[i]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, int n, bool vec, const float (&v)[kChunk]) {
  if (vec && n == kChunk) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const T lo = from_f32<T>(v[2 * i]), hi = from_f32<T>(v[2 * i + 1]);
        uint16_t l16, h16;
        memcpy(&l16, &lo, 2);
        memcpy(&h16, &hi, 2);
        w[i] = uint32_t(l16) | (uint32_t(h16) << 16);
      }
      *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < n) p[i] = from_f32<T>(v[i]);
  }
}

// Codes of one chunk. bits == 8: n bytes (8-byte store when vec), else nibble pairs: ceil(n/2)
// bytes (4-byte store when vec), an odd tail leaves the high nibble 0 like the CPU.
__device__ __forceinline__ void store_codes(uint8_t* dst, int n, bool nibbles, bool vec,
                                            const uint8_t (&q)[kChunk]) {
  if (nibbles) {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < n) word |= uint32_t(q[i] & 0xF) << (4 * i);
    if (vec && n == kChunk) {
      *reinterpret_cast<uint32_t*>(dst) = word;
    } else {
#pragma unroll
      for (int j = 0; j < kChunk / 2; ++j)
        if (2 * j < n) dst[j] = uint8_t(word >> (8 * j));
    }
  } else if (vec && n == kChunk) {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      lo |= uint32_t(q[i]) << (8 * i);
      hi |= uint32_t(q[i + 4]) << (8 * i);
    }
    *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < n) dst[i] = q[i];
  }
}

// The codes of one chunk: 8-bit bytes, or the nibbles unpacked (q & 0xF, not yet sign-extended).
__device__ __forceinline__ void load_codes(const uint8_t* src, int n, bool nibbles, bool vec,
                                           int (&q)[kChunk]) {
  if (nibbles) {
    uint32_t word = 0;
    if (vec && n == kChunk) {
      word = __ldg(reinterpret_cast<const uint32_t*>(src));
    } else {
#pragma unroll
      for (int j = 0; j < kChunk / 2; ++j)
        if (2 * j < n) word |= uint32_t(src[j]) << (8 * j);
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) q[i] = int((word >> (4 * i)) & 0xF);
  } else if (vec && n == kChunk) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(src));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[i] = int((u.x >> (8 * i)) & 0xFF);
      q[i + 4] = int((u.y >> (8 * i)) & 0xFF);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) q[i] = i < n ? int(src[i]) : 0;
  }
}

__device__ __forceinline__ void report(int32_t* status, int32_t flag, int64_t row = -1) {
  if (!status) return;
  atomicOr(status, flag);
  if (row >= 0) atomicMax(status + 1, int32_t(INT_MAX - (row < INT_MAX - 1 ? row : INT_MAX - 1)));
}

template <Scheme S>
__device__ __forceinline__ uint8_t code_of_dev(const QuantFormat& f, const GroupParams& p, float x,
                                               const float (&mid)[15]) {
  const float v = x * p.inv_scale;
  if constexpr (S == Scheme::nf4) return nf4_code(v, mid);
  else return uniform_code(f, p, v);
}

// ---------------------------------------------------------------------------------------------
// quantize

struct QuantizeParams {
  const void* w;
  int64_t rows, K, ld_w, group_size, G, row_bytes;
  QuantFormat fmt;
  float* scales;
  uint8_t* zeros;
  uint8_t* codes;
  int32_t* status;
  int tpg;  // quantize_groups: threads per group (power of two <= 32, or blockDim.x)
  NF4Tables nf4;
};

struct Range {
  float lo, hi, amax;
  int bad;
};

__device__ __forceinline__ void accumulate(Range& r, const float (&v)[kChunk]) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    r.lo = fminf(r.lo, v[i]);
    r.hi = fmaxf(r.hi, v[i]);
    r.amax = fmaxf(r.amax, fabsf(v[i]));
    r.bad |= !isfinite(v[i]);
  }
}

// Butterfly over lanes [0, width) of aligned sub-warps: every lane ends with its sub-warp's
// result. All 32 lanes must call it (inactive lanes hold the neutral Range).
__device__ __forceinline__ void reduce_subwarp(Range& r, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) {
    r.lo = fminf(r.lo, __shfl_xor_sync(0xffffffffu, r.lo, o));
    r.hi = fmaxf(r.hi, __shfl_xor_sync(0xffffffffu, r.hi, o));
    r.amax = fmaxf(r.amax, __shfl_xor_sync(0xffffffffu, r.amax, o));
    r.bad |= __shfl_xor_sync(0xffffffffu, r.bad, o);
  }
}

template <typename T, Scheme S>
__global__ void __launch_bounds__(kThreads, 2) quantize_groups_kernel(const QuantizeParams a) {
  __shared__ Range partial[kThreads / 32];
  QuantFormat f = a.fmt;
  f.scheme = S;  // a compile-time constant from here on
  float mid[15];
#pragma unroll
  for (int i = 0; i < 15; ++i) mid[i] = a.nf4.midpoints[i];
  const int tpg = a.tpg;
  const bool block_mode = tpg > 32;
  const int lane = threadIdx.x & (tpg - 1), sub = threadIdx.x / tpg;
  const int groups_per_block = blockDim.x / tpg;
  const bool nibbles = f.bits != 8;
  const int64_t total = a.rows * a.G;

  // Uniform trip count for the whole block, so every lane reaches every shuffle and barrier.
  for (int64_t base = int64_t(blockIdx.x) * groups_per_block; base < total;
       base += int64_t(gridDim.x) * groups_per_block) {
    const int64_t gi = base + sub;
    const bool active = gi < total;
    int64_t r = 0, k0 = 0, len = 0;
    if (active) {
      r = gi / a.G;
      k0 = (gi - r * a.G) * a.group_size;
      len = std::min(a.group_size, a.K - k0);
    }
    const T* src = static_cast<const T*>(a.w) + r * a.ld_w + k0;
    const bool vec_in = aligned(src, 16);
    const int64_t nchunks = (len + kChunk - 1) / kChunk;

    // Pass 1: the group's range.
    Range rg{INFINITY, -INFINITY, 0.f, 0};
    float v[kCache][kChunk];
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int64_t c = lane + int64_t(i) * tpg;
      if (c < nchunks) {
        load_chunk(src + c * kChunk, int(std::min<int64_t>(kChunk, len - c * kChunk)), vec_in, v[i]);
        accumulate(rg, v[i]);
      }
    }
#pragma unroll 1
    for (int64_t c = lane + int64_t(kCache) * tpg; c < nchunks; c += tpg) {
      float t[kChunk];
      load_chunk(src + c * kChunk, int(std::min<int64_t>(kChunk, len - c * kChunk)), vec_in, t);
      accumulate(rg, t);
    }
    if (!block_mode) {
      reduce_subwarp(rg, tpg);
    } else {
      reduce_subwarp(rg, 32);
      if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = rg;
      __syncthreads();
      rg = partial[0];
      for (int w = 1; w < int(blockDim.x >> 5); ++w) {
        const Range o = partial[w];
        rg.lo = fminf(rg.lo, o.lo);
        rg.hi = fmaxf(rg.hi, o.hi);
        rg.amax = fmaxf(rg.amax, o.amax);
        rg.bad |= o.bad;
      }
      __syncthreads();  // partial[] is rewritten by the next iteration
    }

    // Every lane derives the same parameters with the CPU's scalar rule.
    const GroupParams p = params_from_range(f, rg.lo, rg.hi, rg.amax);
    if (active && lane == 0) {
      a.scales[gi] = p.scale;
      if (S == Scheme::asymmetric) a.zeros[gi] = uint8_t(p.zero);
      if (rg.bad) report(a.status, kNonFinite, r);
    }

    // Pass 2: the codes.
    uint8_t* dst = a.codes + r * a.row_bytes + (nibbles ? k0 / 2 : k0);
    const bool vec_out = aligned(dst, nibbles ? 4 : 8);
    const int64_t out_step = nibbles ? kChunk / 2 : kChunk;
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int64_t c = lane + int64_t(i) * tpg;
      if (c < nchunks) {
        const int n = int(std::min<int64_t>(kChunk, len - c * kChunk));
        uint8_t q[kChunk];
#pragma unroll
        for (int j = 0; j < kChunk; ++j) q[j] = code_of_dev<S>(f, p, v[i][j], mid);
        store_codes(dst + c * out_step, n, nibbles, vec_out, q);
      }
    }
#pragma unroll 1
    for (int64_t c = lane + int64_t(kCache) * tpg; c < nchunks; c += tpg) {
      const int n = int(std::min<int64_t>(kChunk, len - c * kChunk));
      float t[kChunk];
      load_chunk(src + c * kChunk, n, vec_in, t);
      uint8_t q[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) q[j] = code_of_dev<S>(f, p, t[j], mid);
      store_codes(dst + c * out_step, n, nibbles, vec_out, q);
    }
  }
}

template <typename T, Scheme S>
__global__ void __launch_bounds__(kThreads) quantize_given_kernel(const QuantizeParams a) {
  QuantFormat f = a.fmt;
  f.scheme = S;
  float mid[15];
#pragma unroll
  for (int i = 0; i < 15; ++i) mid[i] = a.nf4.midpoints[i];
  const bool nibbles = f.bits != 8;
  const int64_t chunks_per_row = (a.K + kChunk - 1) / kChunk, total = a.rows * chunks_per_row;
  const float qmax = float((1 << f.bits) - 1);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / chunks_per_row, k = (idx - r * chunks_per_row) * kChunk;
    const int n = int(std::min<int64_t>(kChunk, a.K - k));
    const int64_t g = r * a.G + k / a.group_size;
    const float scale = a.scales[g];
    const uint8_t zero = S == Scheme::asymmetric ? a.zeros[g] : 0;
    if (k % a.group_size == 0) {  // the group's first chunk checks its parameters, as the CPU does
      if (!(isfinite(scale) && scale >= 0.f)) report(a.status, kBadScale);
      if (S == Scheme::asymmetric && float(zero) > qmax) report(a.status, kBadZero);
    }
    const GroupParams p = params_given(f, scale, zero);
    const T* src = static_cast<const T*>(a.w) + r * a.ld_w + k;
    float v[kChunk];
    load_chunk(src, n, aligned(src, 16), v);
    int bad = 0;
    uint8_t q[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      bad |= !isfinite(v[j]);
      q[j] = code_of_dev<S>(f, p, v[j], mid);
    }
    if (bad) report(a.status, kNonFinite, r);
    uint8_t* dst = a.codes + r * a.row_bytes + (nibbles ? k / 2 : k);
    store_codes(dst, n, nibbles, aligned(dst, nibbles ? 4 : 8), q);
  }
}

// ---------------------------------------------------------------------------------------------
// dequantize

struct DequantizeParams {
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;
  void* out;
  int64_t rows, K, group_size, G, row_bytes;
  int bits;
  NF4Tables nf4;
};

template <typename O, Scheme S>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const DequantizeParams a) {
  __shared__ float lut[16];  // NF4 values, indexed by code
  if constexpr (S == Scheme::nf4) {
    if (threadIdx.x < 16) lut[threadIdx.x] = a.nf4.values[threadIdx.x];
    __syncthreads();
  }
  const bool nibbles = a.bits != 8;
  const int64_t chunks_per_row = (a.K + kChunk - 1) / kChunk, total = a.rows * chunks_per_row;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / chunks_per_row, k = (idx - r * chunks_per_row) * kChunk;
    const int n = int(std::min<int64_t>(kChunk, a.K - k));
    const int64_t g = r * a.G + k / a.group_size;
    const float scale = a.scales[g];
    const int zero = S == Scheme::asymmetric ? int(a.zeros[g]) : 0;
    const uint8_t* src = a.codes + r * a.row_bytes + (nibbles ? k / 2 : k);
    int q[kChunk];
    load_codes(src, n, nibbles, aligned(src, nibbles ? 4 : 8), q);
    float v[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if constexpr (S == Scheme::nf4) {
        v[j] = lut[q[j]] * scale;
      } else if constexpr (S == Scheme::symmetric) {
        const int s = nibbles ? (q[j] ^ 8) - 8 : int(int8_t(uint8_t(q[j])));  // sign-extend
        v[j] = float(s) * scale;
      } else {
        v[j] = float(q[j] - zero) * scale;
      }
    }
    O* dst = static_cast<O*>(a.out) + r * a.K + k;
    store_chunk(dst, n, aligned(dst, 16), v);
  }
}

// ---------------------------------------------------------------------------------------------
// pack / unpack

__global__ void __launch_bounds__(kThreads)
pack_int4_kernel(const uint8_t* codes, int64_t rows, int64_t K, bool is_signed, uint8_t* packed,
                 int32_t* status) {
  const int64_t pb = (K + 1) / 2, chunks_per_row = (K + kChunk - 1) / kChunk;
  const int64_t total = rows * chunks_per_row;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / chunks_per_row, k = (idx - r * chunks_per_row) * kChunk;
    const int n = int(std::min<int64_t>(kChunk, K - k));
    const uint8_t* src = codes + r * K + k;
    int c[kChunk];
    load_codes(src, n, false, aligned(src, 8), c);
    bool bad = false;
    uint8_t q[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      // int8 codes in [-8, 7] are exactly the bytes with c + 8 (mod 256) <= 15.
      bad |= j < n && (is_signed ? uint8_t(c[j] + 8) > 15 : c[j] > 15);
      q[j] = uint8_t(c[j]);
    }
    if (bad) report(status, is_signed ? kPackRangeSigned : kPackRangeUnsigned);
    uint8_t* dst = packed + r * pb + k / 2;
    store_codes(dst, n, true, aligned(dst, 4), q);
  }
}

__global__ void __launch_bounds__(kThreads)
unpack_int4_kernel(const uint8_t* packed, int64_t rows, int64_t K, bool sign_extend,
                   uint8_t* codes) {
  const int64_t pb = (K + 1) / 2, chunks_per_row = (K + kChunk - 1) / kChunk;
  const int64_t total = rows * chunks_per_row;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / chunks_per_row, k = (idx - r * chunks_per_row) * kChunk;
    const int n = int(std::min<int64_t>(kChunk, K - k));
    const uint8_t* src = packed + r * pb + k / 2;
    int c[kChunk];
    load_codes(src, n, true, aligned(src, 4), c);
    uint8_t q[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      q[j] = uint8_t(sign_extend && (c[j] & 8) ? (c[j] | 0xF0) : c[j]);  // two's complement nibble
    uint8_t* dst = codes + r * K + k;
    store_codes(dst, n, false, aligned(dst, 8), q);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

NF4Tables nf4_tables() {
  NF4Tables t;
  for (int i = 0; i < 16; ++i) t.values[i] = kNF4Values[i];
  for (int i = 0; i < 15; ++i) t.midpoints[i] = kNF4Midpoints[i];
  return t;
}

unsigned grid_for(int64_t work_items, int per_block) {
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  return unsigned(blocks < 1 ? 1 : blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

template <typename Fn>
std::string launch(const Launch& l, int32_t* status, Fn&& enqueue) {
  DeviceGuard guard(l.device);
  if (guard.error() != cudaSuccess) return message(guard.error());
  const cudaStream_t s = to_stream(l.stream);
  if (status) {
    const cudaError_t e = cudaMemsetAsync(status, 0, kStatusWords * sizeof(int32_t), s);
    if (e != cudaSuccess) return message(e);
  }
  enqueue(s);
  return message(cudaGetLastError());
}

template <typename Fn>
void with_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::f32: fn(float{}); break;
    case DType::f16: fn(__half{}); break;
    default: fn(__nv_bfloat16{}); break;
  }
}

template <typename Fn>
void with_scheme(Scheme s, Fn&& fn) {
  switch (s) {
    case Scheme::asymmetric: fn(std::integral_constant<Scheme, Scheme::asymmetric>{}); break;
    case Scheme::symmetric: fn(std::integral_constant<Scheme, Scheme::symmetric>{}); break;
    default: fn(std::integral_constant<Scheme, Scheme::nf4>{}); break;
  }
}

int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace

std::string quantize(const QuantizeArgs& a, int32_t* status, const Launch& l) {
  QuantizeParams p{a.w, a.rows, a.K, a.ld_w, a.fmt.group_size, num_groups(a.K, a.fmt.group_size),
                   packed_row_bytes(a.K, a.fmt.bits), a.fmt, a.scales, a.zeros, a.codes, status,
                   0, nf4_tables()};
  return launch(l, status, [&](cudaStream_t s) {
    with_dtype(a.w_dtype, [&](auto t) {
      using T = decltype(t);
      with_scheme(a.fmt.scheme, [&](auto sc) {
        constexpr Scheme S = decltype(sc)::value;
        if (a.params_given) {
          const int64_t chunks = a.rows * ((a.K + kChunk - 1) / kChunk);
          quantize_given_kernel<T, S><<<grid_for(chunks, kThreads), kThreads, 0, s>>>(p);
          return;
        }
        // Threads per group: enough that each holds <= kCache chunks, up to one warp; longer
        // groups take the whole block, re-reading chunks beyond the register cache in pass 2.
        const int64_t chunks = (std::min(a.fmt.group_size, a.K) + kChunk - 1) / kChunk;
        p.tpg = chunks <= int64_t(kCache) * 32 ? pow2_at_least((chunks + kCache - 1) / kCache)
                                               : kThreads;
        quantize_groups_kernel<T, S>
            <<<grid_for(p.rows * p.G, kThreads / p.tpg), kThreads, 0, s>>>(p);
      });
    });
  });
}

std::string dequantize(const DequantizeArgs& a, const Launch& l) {
  DequantizeParams p{a.codes, a.scales, a.zeros, a.out, a.rows, a.K, a.fmt.group_size,
                     num_groups(a.K, a.fmt.group_size), packed_row_bytes(a.K, a.fmt.bits),
                     a.fmt.bits, nf4_tables()};
  const int64_t chunks = a.rows * ((a.K + kChunk - 1) / kChunk);
  return launch(l, nullptr, [&](cudaStream_t s) {
    with_dtype(a.out_dtype, [&](auto t) {
      using O = decltype(t);
      with_scheme(a.fmt.scheme, [&](auto sc) {
        dequantize_kernel<O, decltype(sc)::value><<<grid_for(chunks, kThreads), kThreads, 0, s>>>(p);
      });
    });
  });
}

std::string pack_int4(const uint8_t* codes, int64_t rows, int64_t K, bool is_signed,
                      uint8_t* packed, int32_t* status, const Launch& l) {
  const int64_t chunks = rows * ((K + kChunk - 1) / kChunk);
  return launch(l, status, [&](cudaStream_t s) {
    pack_int4_kernel<<<grid_for(chunks, kThreads), kThreads, 0, s>>>(codes, rows, K, is_signed,
                                                                      packed, status);
  });
}

std::string unpack_int4(const uint8_t* packed, int64_t rows, int64_t K, bool sign_extend,
                        uint8_t* codes, const Launch& l) {
  const int64_t chunks = rows * ((K + kChunk - 1) / kChunk);
  return launch(l, nullptr, [&](cudaStream_t s) {
    unpack_int4_kernel<<<grid_for(chunks, kThreads), kThreads, 0, s>>>(packed, rows, K,
                                                                        sign_extend, codes);
  });
}

}  // namespace gpu
}  // namespace lowbit
