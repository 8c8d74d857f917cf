// lowbit CPU kernel contracts: the argument structs every ISA variant implements, and the table
// of function pointers one variant fills. Kernels see raw pointers and sizes only (no Python, no
// torch); arguments arrive already validated by validate_*() in dispatch.cpp.
#pragma once
#include <cstddef>
#include <cstdint>

namespace lowbit {

enum class DType : uint8_t { f32 = 0, f16 = 1, bf16 = 2 };
inline size_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// Logical quantization format (see README "Rounding convention").
//   asymmetric: q = clamp(rint(w * inv_scale) + zero, 0, 2^bits - 1),  w ≈ (q - zero) * scale
//   symmetric : q = clamp(rint(w * inv_scale), -2^(bits-1), 2^(bits-1) - 1),  w ≈ q * scale
//   nf4       : q = #{i : w * inv_scale > nf4_midpoint[i]},  w ≈ nf4_value[q] * scale
// rint rounds half to even; inv_scale = 1 / scale in float32, and 0 where scale == 0.
enum class Scheme : uint8_t { asymmetric = 0, symmetric = 1, nf4 = 2 };

struct QuantFormat {
  int bits;            // 2, 3, 4 or 8 (nf4: 4)
  Scheme scheme;
  int64_t group_size;  // elements per group along K; the last group of a row may be shorter
  float clip_ratio;    // (0, 1]: scales the min/max (or absmax) range before the scale is chosen
};

inline int64_t num_groups(int64_t K, int64_t group_size) { return (K + group_size - 1) / group_size; }
// Codes of 2-4 bits are stored two per byte (element 2j in the low nibble of byte j); 8-bit codes
// one per byte (int8 for symmetric, uint8 otherwise).
inline int64_t packed_row_bytes(int64_t K, int bits) { return bits == 8 ? K : (K + 1) / 2; }

extern const float kNF4Values[16];     // the NF4 codebook (QLoRA), ascending, in [-1, 1]
extern const float kNF4Midpoints[15];  // float32 midpoints between consecutive codebook values

struct QuantizeArgs {
  const void* w;       // [rows, K] with row stride ld_w elements
  DType w_dtype;
  int64_t rows, K, ld_w;
  QuantFormat fmt;
  bool params_given;   // true: scales (and zeros) are inputs; false: computed from min/max
  float* scales;       // [rows, groups], contiguous
  uint8_t* zeros;      // [rows, groups] for asymmetric, else nullptr
  uint8_t* codes;      // [rows, packed_row_bytes(K, bits)], contiguous
};

struct DequantizeArgs {
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;  // nullptr unless asymmetric
  int64_t rows, K;
  QuantFormat fmt;
  void* out;             // [rows, K] contiguous, out_dtype
  DType out_dtype;
};

// A quantize kernel processes rows [r0, r1) and returns -1, or the first row holding NaN/Inf
// (that row's outputs are then unspecified; the caller raises).
using QuantizeFn = int64_t (*)(const QuantizeArgs&, int64_t r0, int64_t r1);
using DequantizeFn = void (*)(const DequantizeArgs&, int64_t r0, int64_t r1);

}  // namespace lowbit
#include "common/layout_panel4.h"
namespace lowbit {
// A matmul kernel computes Y rows [m0, m1) × panels [p0, p1) (columns 4·p0 .. min(4·p1, N)).
// Integer kernels (act_bits=8, int4/int8 weights) use x.xq/sa/suma; float kernels x.xf/sumx.
using MatmulFn = void (*)(const MatmulArgs&, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
// Decode: up to this many rows of X, the dispatcher gives each thread all rows and a contiguous
// range of panels (the weights stream from DRAM once); more rows are tiled (prefill).
constexpr int64_t kDecodeRows = 16;

// Gram update (cpp/common/gram.cpp): the driver packs kGramRows rows of x at a time into strips of
// 16 columns, panel[s][t][c] = x[t][16·s + c] (zeros past K, plus one all-zero strip), and a tile
// kernel computes c[r·ldc + q] += Σ_{t<kc} panel(t, i0 + r) · panel(t, j0 + q) for r < mr, q < nr
// (i0 a multiple of mr, j0 of nr; nr a multiple of 16).
constexpr int64_t kGramStrip = 16;
using GramTileFn = void (*)(const float* panel, int64_t kc, int64_t i0, int64_t j0, float* c, int64_t ldc);
struct GramKernel {
  GramTileFn tile = nullptr;
  int mr = 0, nr = 0;
};

// One ISA variant's kernels. A null entry means "use the reference".
struct KernelTable {
  const char* name;
  QuantizeFn quantize;
  DequantizeFn dequantize;
  MatmulFn matmul_int;    // W4A8 / W8A8 on layout panel4_k32
  MatmulFn matmul_float;  // weight-only int4 / int8 / nf4, float activations, panel4_k32
  // Rows of X per prefill work item of matmul_int (and of matmul_float on bfloat16 x when it asks
  // for those): a kernel that rebuilds its weight operand per call (amx, avx2's int4 GEMM)
  // wants tall items.
  int64_t int_prefill_rows = 64;
  // matmul_float wants bfloat16 activations as such (PreparedAct::xb).
  bool float_wants_bf16_x = false;
  // matmul_int wants the int8 activations also as unsigned bytes (PreparedAct::xu).
  bool int_wants_u8_x = false;
  // The table whose matmul_int serves per-block activations (PreparedAct::sg) when this one's
  // does not take them; nullptr: matmul_int takes both.
  const KernelTable* per_block_int = nullptr;
  GramKernel gram;
};

// Each variant defines its table in cpp/<isa>/table.cpp, in namespace lowbit::<isa>.
namespace ref { extern const KernelTable kTable; }
namespace avx2 { extern const KernelTable kTable; }
namespace avx512 { extern const KernelTable kTable; }
namespace avx512_emulated { extern const KernelTable kTable; }
namespace amx { extern const KernelTable kTable; }
namespace amx_emulated { extern const KernelTable kTable; }
namespace avx2_vnni { extern const KernelTable kTable; }
namespace avx2_vnni_emulated { extern const KernelTable kTable; }

#ifdef LOWBIT_ISA_NS
// Kernel entry points, declared once for whichever variant this file is compiled as.
namespace LOWBIT_ISA_NS {
int64_t quantize_rows(const QuantizeArgs& a, int64_t r0, int64_t r1);
void dequantize_rows(const DequantizeArgs& a, int64_t r0, int64_t r1);
void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void gram_tile(const float* panel, int64_t kc, int64_t i0, int64_t j0, float* c, int64_t ldc);
}  // namespace LOWBIT_ISA_NS
#define LOWBIT_STR2(x) #x
#define LOWBIT_STR(x) LOWBIT_STR2(x)
#define LOWBIT_ISA_NAME LOWBIT_STR(LOWBIT_ISA_NS)
#endif

}  // namespace lowbit
