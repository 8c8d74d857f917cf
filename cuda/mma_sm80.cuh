// Device building blocks of the sm_80+ tensor-core GEMMs (w4a16_sm80.cu, w8a8_sm80.cu):
// cp.async, ldmatrix, mma.sync wrappers and the swizzled activation tile both GEMMs stage.
// Every instruction here exists on sm_80, sm_89 and sm_90a (mma.sync still runs on Hopper).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lowbit {
namespace gpu {
namespace sm80 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; pred false writes 16 zero bytes and reads
// nothing (src-size 0), which is how out-of-range rows and K tails become zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; thread l supplies the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// D += A * B on one m16n8k16 tile, fp32 accumulators. A: 4 regs, B: 2 regs of two 16-bit values.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// D += A * B on one m16n8k32 int8 tile, int32 accumulators (exact).
__device__ __forceinline__ void mma_16832_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename H2>
__device__ __forceinline__ H2 as_h2(uint32_t u) {
  H2 h;
  memcpy(&h, &u, 4);
  return h;
}
template <typename H2>
__device__ __forceinline__ uint32_t as_u32(H2 h) {
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// The activation tile of one pipeline stage: rows of 128 bytes (64 fp16/bf16 or 128 int8 values
// of K) = 8 chunks of 16 bytes. Chunk c of row r lives at chunk c ^ (r & 7) of that row, so the 8
// row addresses of one ldmatrix phase (same logical chunk, rows r..r+7) hit 8 different 16-byte
// bank groups: conflict-free without padding.
__device__ __forceinline__ int swizzled_chunk(int row, int chunk) { return row * 8 + (chunk ^ (row & 7)); }

// Loads the A fragment (m16 x 32 bytes of K) at k-chunk pair `kc` (chunks 2kc, 2kc+1) of the
// m16 tile starting at row r0. Matrix i of ldmatrix.x4 = (rows 8*(i&1).., chunk 2kc + (i>>1)),
// which is the a0..a3 register order of both mma shapes above.
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const uint4* tile, int r0, int kc, int lane) {
  const int r = r0 + (lane & 15);
  ldmatrix_x4(a, tile + swizzled_chunk(r, 2 * kc + (lane >> 4)));
}

}  // namespace sm80
}  // namespace gpu
}  // namespace lowbit
