// Host entry points of lowbit's CUDA kernels. Plain C++ on purpose: the pybind11 binding
// (python/bindings/cuda_module.cpp) includes this with the host compiler and never sees a CUDA
// header, a CUDA type or a kernel.
//
// Every entry point enqueues its work on the caller's stream and returns at once: it allocates
// nothing, never synchronizes, and returns "" on success or the CUDA error text. Pointers are
// device pointers on `Launch::device`; arguments arrive validated by the binding (same rules as
// the CPU path in cpp/common/dispatch.cpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/kernels.h"

namespace lowbit {
namespace gpu {

// Where a kernel runs: the arrays' CUDA device, and the caller's stream as a DLPack stream value
// (1: the legacy default stream, 2: the per-thread default stream, else a cudaStream_t).
struct Launch {
  int device;
  int64_t stream;
};

// Bad input found on the device cannot be raised from a kernel. Checked entry points take a
// device int32[kStatusWords] buffer (or null: no reports), zero it on the stream, and the kernels
// record there what the CPU path would have raised:
//   status[0] |= StatusFlag bits
//   status[1]  = max over rows holding NaN/Inf of (INT32_MAX - row), 0 if none — so the first
//                bad row is INT32_MAX - status[1], found with one atomicMax and no init value.
// The caller reads it back after the launch (that read is the synchronization) and raises.
enum StatusFlag : int32_t {
  kNonFinite = 1,          // quantize: w has NaN or Inf
  kBadScale = 2,           // quantize, given params: a scale is negative or not finite
  kBadZero = 4,            // quantize, given params: a zero point exceeds 2^bits - 1
  kPackRangeUnsigned = 8,  // pack_int4: a uint8 code above 15
  kPackRangeSigned = 16,   // pack_int4: an int8 code outside [-8, 7]
};
constexpr int kStatusWords = 2;

// a.scales/zeros are outputs unless a.params_given; a.ld_w is w's row stride in elements.
std::string quantize(const QuantizeArgs& a, int32_t* status, const Launch& l);
std::string dequantize(const DequantizeArgs& a, const Launch& l);
std::string pack_int4(const uint8_t* codes, int64_t rows, int64_t K, bool is_signed,
                      uint8_t* packed, int32_t* status, const Launch& l);
std::string unpack_int4(const uint8_t* packed, int64_t rows, int64_t K, bool sign_extend,
                        uint8_t* codes, const Launch& l);

// What was compiled and what the runtime sees. Never throws and works without a driver: a CUDA
// failure (no driver, no device) is reported in `error`.
struct DeviceInfo {
  int index;
  std::string name;
  int cc_major, cc_minor;
  int sm_count;
  int64_t total_memory;
};
struct RuntimeInfo {
  std::string arch_targets;          // CMake CUDA_ARCHITECTURES, e.g. "80-real 89-real ..."
  std::vector<int> arch_list;        // __CUDA_ARCH_LIST__ (virtual archs compiled, e.g. 800)
  int runtime_version = 0;           // cudaRuntimeGetVersion (static cudart), e.g. 13000
  int build_version = 0;             // CUDART_VERSION of the toolkit that built the module
  int driver_version = 0;            // cudaDriverGetVersion, 0 without a driver
  std::vector<DeviceInfo> devices;
  std::string error;                 // "" or why devices could not be listed
};
RuntimeInfo runtime_info();

}  // namespace gpu
}  // namespace lowbit
