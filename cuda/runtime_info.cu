// lowbit._cuda build_info(): what this module was compiled for and what the CUDA runtime sees.
// cudart is linked statically, so this runs on machines without a driver: every CUDA failure is
// reported as text, never thrown, and nothing here creates a context on a device.
#include <cuda_runtime.h>

#include <string>


#include "lowbit_cuda.cuh"

#ifndef LOWBIT_CUDA_ARCH_TARGETS
#define LOWBIT_CUDA_ARCH_TARGETS "unknown"
#endif

namespace lowbit {
namespace gpu {

RuntimeInfo runtime_info() {
  RuntimeInfo r;
  r.arch_targets = LOWBIT_CUDA_ARCH_TARGETS;
#ifdef __CUDA_ARCH_LIST__
  r.arch_list = {__CUDA_ARCH_LIST__};
#endif
  r.build_version = CUDART_VERSION;
  cudaRuntimeGetVersion(&r.runtime_version);
  if (cudaDriverGetVersion(&r.driver_version) != cudaSuccess) r.driver_version = 0;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    r.error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    cudaGetLastError();  // do not leave the error for the next runtime call to report
    return r;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p;
    e = cudaGetDeviceProperties(&p, i);
    if (e != cudaSuccess) {
      r.error = "device " + std::to_string(i) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
      cudaGetLastError();
      continue;
    }
    r.devices.push_back({i, p.name, p.major, p.minor, p.multiProcessorCount,
                         static_cast<int64_t>(p.totalGlobalMem)});
  }
  return r;
}

}  // namespace gpu
}  // namespace lowbit
