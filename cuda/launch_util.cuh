// Host-side launch helpers shared by every .cu file of the extension: the caller's stream from its
// DLPack value, a device guard, CUDA error text, the SM count and the split-K plan of the GEMMs.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace lowbit {
namespace gpu {

inline cudaStream_t to_stream(int64_t s) {
  if (s == 1 || s == 0) return cudaStreamLegacy;
  if (s == 2) return cudaStreamPerThread;
  return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(s));
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    err_ = cudaGetDevice(&prev_);
    if (err_ == cudaSuccess && prev_ != device) err_ = cudaSetDevice(device);
    else prev_ = -1;
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  cudaError_t error() const { return err_; }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  cudaError_t err_ = cudaSuccess;
};

inline std::string message(cudaError_t e) {
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// Split-K plan of a tensor-core GEMM whose blocks own BM x 64 outputs and step through K in
// k_tiles tiles: enough K slices that the grid holds ~4 blocks per SM (small M leaves few
// M x N tiles), each slice at least min_tiles tiles long, and no slice empty.
struct SplitPlan {
  int splits;        // K slices (blockIdx.y); > 1 needs a workspace of splits * M * N words
  int tiles_per;     // k tiles per slice
};
inline SplitPlan plan_splits(int sm_count, int64_t mn_blocks, int k_tiles, int min_tiles) {
  const int64_t want = (4 * int64_t(sm_count) + mn_blocks - 1) / mn_blocks;
  int max_splits = k_tiles / min_tiles;
  if (max_splits < 1) max_splits = 1;
  if (max_splits > 32) max_splits = 32;
  int splits = int(want < 1 ? 1 : want > max_splits ? max_splits : want);
  const int per = (k_tiles + splits - 1) / splits;
  return {(k_tiles + per - 1) / per, per};
}

// Multiprocessor count of a device (0 when the runtime cannot say: plan for one SM then).
inline int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // clear it: no launch follows from a failed query without a new check
    n = 1;
  }
  return n;
}

}  // namespace gpu
}  // namespace lowbit
