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

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMMs (cuda/w4a16_sm80.cu, cuda/w8a8_sm80.cu): Y[M, N] = X[M, K] . W[N, K]^T + bias.
// W is prepacked once into a named, versioned layout (below); the Python layer caches the packed
// buffers on the QuantizedTensor. Split-K partial sums go to a caller-allocated workspace whose
// size the *_plan functions give; the GEMM entry points allocate nothing and never synchronize.

// "w4a16.mma_k16n16" v1: int4 codes as offset-binary nibbles (symmetric codes get +8, zero 8), in
//   uint32 words [ceil(N/64)][K16][32 lanes][4] with K16 = ceil(K/64)*4: word j of lane l in k16
//   block kb is that lane's mma.m16n8k16 B fragment for columns 16j + l/4 and 16j + 8 + l/4 of
//   the 64-column block (nibble order in cuda/w4a16_sm80.cu). Params: uint32 [G_pad][N_pad] =
//   {scale, zero} as two x-dtype halves (low 16 bits: scale), zero scale for padding;
//   G_pad = ceil(K16*16 / group_size), N_pad = ceil(N/64)*64.
constexpr const char* kW4A16Layout = "w4a16.mma_k16n16";
constexpr int kW4A16LayoutVersion = 1;
struct W4A16Shape {
  int64_t N, K, group_size;
  int64_t n_pad() const { return (N + 63) / 64 * 64; }
  int64_t k_pad() const { return (K + 63) / 64 * 64; }
  int64_t g_pad() const { return (k_pad() + group_size - 1) / group_size; }
  int64_t weight_words() const { return n_pad() * k_pad() / 8; }
  int64_t param_words() const { return g_pad() * n_pad(); }
};
// codes uint8 [N, ceil(K/2)], scales float32 [N, G], zeros uint8 [N, G] (nullptr: symmetric).
std::string w4a16_prepack(const uint8_t* codes, const float* scales, const uint8_t* zeros,
                          const W4A16Shape& s, DType act, uint32_t* weights, uint32_t* params,
                          const Launch& l);

struct GemmPlan {
  int splits;               // K slices; > 1: the call needs `workspace_words` 4-byte words
  int64_t workspace_words;  // splits * M * N, or 0
};
GemmPlan w4a16_plan(int64_t M, int64_t N, int64_t K, int device);

struct W4A16Args {
  const void* x;  // [M, K] fp16/bf16, row stride ld_x elements
  DType x_dtype;
  int64_t M, ld_x;
  W4A16Shape w;
  const uint32_t* weights;  // prepacked for x_dtype
  const uint32_t* params;
  const float* bias;  // [N] or nullptr
  void* y;            // [M, N] contiguous, x_dtype
  float* workspace;   // GemmPlan::workspace_words floats, or nullptr when splits == 1
};
std::string w4a16_gemm(const W4A16Args& a, const Launch& l);

// "w8a8.mma_k32n8" v1: int8 weights (asymmetric uint8 codes shifted by -128) in uint32 words
//   [ceil(N/64)][K32][4][32 lanes][4] with K32 = ceil(K/128)*4: the 16 words of a lane in k32 block
//   kb (quad q, word w) are its mma.m16n8k32 B fragment registers b[(4q+w)%2] of n8 tile (4q+w)/2.
//   Params: float32 scale [N_pad] then int32 zero-128 (0 when symmetric) [N_pad].
constexpr const char* kW8A8Layout = "w8a8.mma_k32n8";
constexpr int kW8A8LayoutVersion = 1;
struct W8A8Shape {
  int64_t N, K;
  int64_t n_pad() const { return (N + 63) / 64 * 64; }
  int64_t k_pad() const { return (K + 127) / 128 * 128; }
  int64_t weight_words() const { return n_pad() * k_pad() / 4; }
  int64_t param_words() const { return 2 * n_pad(); }
  int64_t act_row_bytes() const { return (K + 15) / 16 * 16; }  // quantized activation row
};
// codes int8 (symmetric) or uint8 [N, K]; scales float32 [N, 1]; zeros uint8 [N, 1] or nullptr.
std::string w8a8_prepack(const void* codes, const float* scales, const uint8_t* zeros,
                         const W8A8Shape& s, uint32_t* weights, uint32_t* params, const Launch& l);
GemmPlan w8a8_plan(int64_t M, int64_t N, int64_t K, int device);

struct W8A8Args {
  const void* x;  // [M, K] fp16/bf16, row stride ld_x elements
  DType x_dtype;
  int64_t M, ld_x;
  W8A8Shape w;
  const uint32_t* weights;
  const uint32_t* params;
  const float* bias;
  void* y;           // [M, N] contiguous, x_dtype
  int8_t* xq;        // scratch [M, act_row_bytes]: activations quantized per token
  float* x_scale;    // scratch [M]
  int32_t* x_sum;    // scratch [M]: row sums of xq (zero-point weights)
  int32_t* workspace;  // GemmPlan::workspace_words, or nullptr when splits == 1
};
std::string w8a8_gemm(const W8A8Args& a, const Launch& l);

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
