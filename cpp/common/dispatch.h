// The one place a CPU kernel variant is chosen. Variants are filled from cpuid + XCR0 once;
// LOWBIT_ISA (or set_isa) may force a lower one; forcing one the CPU cannot run is an error.
#pragma once
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/kernels.h"

namespace lowbit {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, avx_vnni = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool os_ymm = false, os_zmm = false, os_amx = false;  // XCR0 enables the register state
  bool amd = false;                                     // vendor AuthenticAMD (tuning only)
  std::vector<std::string> names() const;              // the features present, for build_info
};
const CpuFeatures& cpu_features();

struct VariantInfo {
  const KernelTable* table;
  bool compiled;
  bool runnable;            // this CPU and OS can execute it
  std::string missing;      // why not, when !runnable
};
std::vector<VariantInfo> variants();  // ordered from the most to the least capable

// The chosen table. Entries it leaves null fall back to the reference.
const KernelTable& active();
const KernelTable& reference();
// Force a variant by name ("auto" = best runnable). Throws std::invalid_argument naming the
// variant and what the CPU lacks. LOWBIT_ISA is applied the same way on first use.
void set_isa(const std::string& name);
std::string active_isa();

// Portable loops compiled per ISA by GCC's target_clones (picked once at load): the same
// element-wise steps in the same order (and -ffp-contract=off), so every clone gives
// bit-identical results.
#define LOWBIT_ROW_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// Thread pool: persistent workers; parallel_for splits [0, n) into contiguous pieces of at least
// min_chunk items (up to 4 a thread), claimed by whichever threads are running.
void set_num_threads(int n);
int get_num_threads();
void parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);
// Where parallel_for's pieces run now: "openmp" (the team of a GNU OpenMP runtime this process
// has loaded, e.g. torch's: its threads are reused instead of competing with lowbit's) or
// "lowbit" (the pool above).
std::string thread_runtime();

// Validated entry points used by the bindings (they throw std::invalid_argument on bad input).
void quantize(const QuantizeArgs& a);
void dequantize(const DequantizeArgs& a);
void pack_int4(const uint8_t* codes, int64_t rows, int64_t K, bool is_signed, uint8_t* packed);
void unpack_int4(const uint8_t* packed, int64_t rows, int64_t K, bool sign_extend, uint8_t* codes);

// GPTQ's column loop (cpp/common/gptq.cpp) on one lazy block of B columns of W, stored as rows
// ([B, N], row i = weight column i). For columns i in [begin, end): round w[i] with the given
// scales/zeros (lowbit's rounding), q[i] = the rounded values, err[i] = (w[i] - q[i]) / u[i][i],
// and w[j] -= u[i][j] * err[i] for every later column j < B of the block.
struct GptqColumnsCall {
  float* w;               // [B, N], updated in place
  float* q;               // [B, N] out (rows begin..end-1 written)
  float* err;             // [B, N] out (rows begin..end-1 written)
  const float* u;         // [B, B]: the block's rows and columns of the upper Cholesky factor of H^-1
  int64_t B, N, begin, end;
  QuantFormat fmt;        // bits and scheme (group_size and clip_ratio unused)
  const float* scales;    // [N] for every column, or [end - begin, N] when param_stride
  const uint8_t* zeros;   // same shape as scales (asymmetric), else nullptr
  bool param_stride;      // one parameter row per column (static groups under act-order)
};
void gptq_columns(const GptqColumnsCall& c);

// Per-group clip-ratio search by squared error (GPTQ's and the observers' clip search): for each
// group of w [rows, K] and each ratio, the group's parameters by params_from_range with that
// clip_ratio, and the error Σ_k c_k (w_k − dequantize(quantize(w_k)))² of the round trip (c: the
// per-column weights col_weight [K], or 1). The first ratio with the least error wins: its scale
// and zero go to scales/zeros [rows, groups] and the ratio to best_ratio. Uniform formats only.
struct ClipSearchCall {
  const float* w; int64_t rows, K;
  QuantFormat fmt;            // bits, scheme (asymmetric / symmetric), group_size
  const float* ratios; int64_t n_ratios;
  const float* col_weight;    // [K] or nullptr
  float* scales; uint8_t* zeros; float* best_ratio;  // zeros: nullptr unless asymmetric
};
void clip_search(const ClipSearchCall& c);

// h += xᵀx on and above the diagonal (cpp/common/gram.cpp): h[i][j] += Σ_t x[t][i]·x[t][j] for
// j >= i; entries below the diagonal are left unspecified (a calibration Hessian mirrors them
// once, at the end). x [m, K] with row stride ld_x, h [K, K] with row stride ld_h, float32.
struct GramCall {
  const float* x; int64_t m, K, ld_x;
  float* h; int64_t ld_h;
};
void gram_update(const GramCall& c);

// matmul (cpp/common/matmul.cpp). Prepack W once into layout panel4_k32 (see layout_panel4.h):
// packed_linear_bytes() says how big a buffer pack_linear() fills. codes/scales/zeros as in a
// QuantizedTensor (scales/zeros [N, groups]; zeros only for asymmetric).
int64_t packed_linear_bytes(int64_t N, int64_t K, const QuantFormat& f);
void pack_linear(const uint8_t* codes, const float* scales, const uint8_t* zeros, int64_t N,
                 int64_t K, const QuantFormat& f, uint8_t* out, int64_t out_bytes);
struct MatmulCall {
  const void* x; DType x_dtype; int64_t M, K;   // x [M, K] contiguous
  const uint8_t* packed; int64_t packed_bytes;  // from pack_linear
  const void* bias;                             // [N] in x_dtype, or nullptr
  void* y;                                      // [M, N] contiguous, x_dtype
  int act_bits;                                 // 0 (float activations) or 8
  bool act_per_block;                           // act_bits=8: one scale per row and weight group
};
void matmul(const MatmulCall& c);
// Which kernel matmul() would run for this packed weight and act_bits ("avx2:int", "ref:float").
std::string matmul_kernel_name(const uint8_t* packed, int act_bits, bool act_per_block);

}  // namespace lowbit
