// Layout "panel4_k32" v5: a QuantizedTensor W[N, K] (int4 / int8 / nf4 codes) prepacked once for
// the CPU matmul kernels (Y = X · dequantize(W)ᵀ). One contiguous byte buffer:
//   PackedLinearHeader (128 B)
//   codes : [Np/4 panels][Kp/32 k-blocks] blocks, one block = 4 rows × 32 k
//           bits=4: W4Block (64 B, one cache line). Byte j of half h holds row 2h k=j in its low
//                   nibble and row 2h+1 k=j in its high nibble, so `v & 15` / `v >> 4` of one
//                   32-byte load are two rows' 32 codes in natural k order.
//                   Codes are unsigned u in [0, 15]: asym/nf4 codes as is, symmetric codes + 8.
//           bits=8: W8Block (128 B), row r = 32 signed int8 w' (symmetric q, asymmetric q - 128).
//   sw    : float [Np/4][G][4]   the group scale s
//   zq    : int8  [Np/4][G][4]   z, the integer offset to subtract from the stored code (asym
//                               int4: zero, asym int8: zero - 128); asymmetric formats only:
//                               elsewhere z is one constant, header.zero (sym int4: 8, sym int8
//                               and nf4: 0) and zq_offset is 0. Kernels form s·z as the float
//                               product sw · z (PackedLinear::swz_at), which v4 stored as floats:
//                               3 bytes more per group and row, 12% of a g32 int4 weight's bytes,
//                               which decode streams from DRAM (v1 stored s·z even for one z)
//   wsum  : int32 [Np/4][G][4]  symmetric int8 only: Σ w' over the group, so a kernel can feed
//                               x + 128 as vpdpbusd's unsigned operand against the stored signed
//                               w' and take the exact 128·Σw' back out of each group's dot (v2 had
//                               no wsum: its kernels flipped every weight byte's sign bit instead).
//                               Not for asymmetric int8 (v3 stored it): there w' = q − 128 sits
//                               near z − 128 all along a row whose zero point is far from 128, so
//                               the partial dots a kernel keeps per lane carry 128·Σw' in the
//                               millions and their float sum cancels it only to ~1e-3 of y
// so that  w[n, k] = s · (d(code) − z)   with d(u) = u (int formats) or NF4[u] (nf4, z = 0).
// Np = N rounded up to 4 (extra rows: codes 0, s = s·z = 0). Kp = K rounded up to 32; codes past
// K are 0 and every kernel multiplies them by zero-padded activations. Groups must start on a
// 32-element block (group_size % 32 == 0, or one group per row); the Python layer routes other
// formats elsewhere.
#pragma once
#include <cstdint>

namespace lowbit {

constexpr uint32_t kPanel4Magic = 0x3450424Cu;  // "LBP4"
constexpr uint32_t kPanel4Version = 5;
constexpr int kPanelRows = 4;   // NR: rows of W per panel
constexpr int kBlockK = 32;     // KB: k per block (one AVX2 register of int8)

struct PackedLinearHeader {
  uint32_t magic, version;
  int32_t bits, scheme;          // Scheme as int (0 asym, 1 sym, 2 nf4)
  int64_t N, K, Np, Kp, G, group_size;
  int64_t codes_offset, sw_offset, zq_offset, total_bytes;  // zq_offset 0: not stored
  float zero;                    // z of every row and group when zq is not stored
  float max_scale;               // the largest s (v4): with max |x| it bounds every partial sum
  int64_t wsum_offset;           // 0: not stored (bits=4, asymmetric int8)
  int64_t reserved[2];
};
static_assert(sizeof(PackedLinearHeader) == 128, "PackedLinearHeader is 128 bytes");

struct W4Block { uint8_t half[2][32]; };   // rows (0,1) then (2,3): lo nibble = even row
static_assert(sizeof(W4Block) == 64, "W4Block is one cache line");
struct W8Block { int8_t row[4][32]; };
static_assert(sizeof(W8Block) == 128, "W8Block is two cache lines");

// A typed view of a packed buffer (validated once by the dispatcher).
struct PackedLinear {
  const PackedLinearHeader* h;
  const uint8_t* codes;  // W4Block or W8Block array
  const float* sw;
  const int8_t* zq;  // nullptr: z is h->zero everywhere
  const int32_t* wsum;  // [Np/4][G][4] Σ w' of each group and row (bits=8), else nullptr
  int64_t panel_bytes() const { return (h->Kp / kBlockK) * (h->bits == 4 ? 64 : 128); }
  const uint8_t* panel(int64_t p) const { return codes + p * panel_bytes(); }
  // s·z of scale index i ([panel][group][row]): one float product, the value v4 stored
  float swz_at(int64_t i) const { return sw[i] * (zq ? float(zq[i]) : h->zero); }
  // The zero-point term Σ_g s·z·Σx as Σ_g zs·(zx·Σx): zs = s·z (asymmetric), or s when z is one
  // constant, and zx = 1 or that constant. zx·Σx is exact (zx is 1, 8 or 0), so zs·(zx·Σx)
  // rounds exactly as s·z·Σx does. No term at all when z is 0 everywhere.
  float zero_act() const { return zq ? 1.f : h->zero; }
  bool has_zero() const { return zq || h->zero != 0.f; }
  int64_t group_end(int64_t g) const {  // exclusive k end of group g, rounded up to a block
    int64_t e = (g + 1) * h->group_size;
    return e >= h->K ? h->Kp : e;
  }
};

// Activations prepared once per call (common code, identical for every variant):
//   int mode (act_bits=8): xq [M][Kp] int8 = clamp(rint(x * inv_sa), -127, 127), zero padded,
//                          sa [M] = max|x_row| / 127, suma [M][G] = Σ_group xq  (int32)
//                          per-block activations (act_per_block): each (row, weight group)
//                          has its own scale sg [M][G] = max|x_group| / 127 and sa [M] = 1;
//                          per token, sg is nullptr. A kernel scales group g's integer dot
//                          (and its zero-point term) by sg[m][g] when sg is set.
//                          xu [M][Kp] uint8 = xq + 128 (padding 128) when the kernel table
//                          asks for it (int_wants_u8_x) and it pays: symmetric int8 weights and 3 < M <
//                          int8_panel_rows(K) (the AVX-512 int8 panel kernel takes it for 3-4
//                          rows, also for the amx table's tails), int4 weights in groups of up to kU8xMaxGroup with per-token x
//                          and M >= kU8xMinRows; else nullptr
//   float mode            : xf [M][Kp] float (x widened; act_bits=8 with nf4: xq * sa), zero
//                          padded; sumx [M][G] = Σ_group xf in float (8 interleaved partial
//                          sums, a fixed order: matmul.cpp sum8); xb [M][Kp] the bfloat16 input's
//                          own bits, zero padded, only when x is bfloat16 and the kernel table
//                          asks for it (float_wants_bf16_x), else nullptr
// avx512's signed-int4 GEMM (matmul_avx512vnni.cpp) repays its per-set pass from this many rows,
// and saves enough only on narrow groups. K = N = 4096, 1 thread, alternating builds, ms, without
// -> with: g32 M = 16: 3.0 -> 3.3, M = 32: 4.8-4.9 -> 5.0, M = 48: 6.5 -> 6.3-6.4, M = 64: 8.2 ->
// 7.8-7.9, M = 128: 15.0 -> 14.0-14.1, M = 512: 55.5-56.1 -> 50.7-51.1; g64 M = 48: 5.7 -> 5.7,
// M = 128: 13.4 -> 12.8-13.0; g128 M = 64: 6.8-6.9 -> 7.1, M = 512: 46.2-46.8 -> 46.8-47.6.
constexpr int64_t kU8xMinRows = 48, kU8xMaxGroup = 64;
// Per-channel int8 calls of fewer rows than this run avx512's panel kernel, larger ones its k4
// GEMM, which takes xq (their tails run the panel kernel on xq too). The panel kernel's passes
// of 4 rows each end in an epilogue, which short rows pay often: 1 thread, weights in cache,
// min ms, panel -> k4: K x N = 576 x 1536 M = 32 / 128 / 255 0.23 / 0.94 / 1.90 -> 0.18 / 0.63
// / 1.26; 1536 x 576 0.18 / 0.71 / 1.43 -> 0.17 / 0.61 / 1.19; 2048 x 2048 M = 32 / 64 / 128
// 0.75 / 1.54 / 3.09 -> 0.76 / 1.43 / 2.84; but 3072 x 3072 M = 32 / 64 1.59 / 3.22 -> 1.80 /
// 3.49, 4096 x 4096 M = 64 / 128 5.54 / 11.15 -> 6.21 / 11.38. With the k4 GEMM's panel stream
// (k4_scratch.h, PanelStream), shorter rows take it sooner: 3 alternations, 1 thread, min ms,
// panel -> k4, weights rotated from DRAM: 576 x 1536 M = 16 / 20 / 24 / 28 0.128 / 0.156 / 0.182
// / 0.217 -> 0.120 / 0.147 / 0.166 / 0.187, 1024 x 2816 0.435 / 0.545 / 0.638 / 0.735 -> 0.415 /
// 0.462 / 0.524 / 0.568, 2048² 0.463 / 0.574 / 0.693 / 0.818 -> 0.438 / 0.534 / 0.622 / 0.709;
// in cache: 576 x 1536 M = 24 / 28 / 31 0.177 / 0.203 / 0.232 -> 0.137 / 0.154 / 0.173, 1024 x
// 2816 M = 20 / 24 0.383 / 0.468 -> 0.356 / 0.415, 1536 x 576 M = 20 / 24 0.114 / 0.139 ->
// 0.114 / 0.132, but 2048² M = 20 / 24 0.482 / 0.578 -> 0.542 / 0.594. Below 20 rows the two
// trade places with the machine's state (M = 16, 2 threads, 576 x 1536 from DRAM: 0.067 ->
// 0.076; 1 thread, 960 x 2560: 0.271 -> 0.276; M = 12 the panel kernel by 2-5%).
constexpr int64_t int8_panel_rows(int64_t K) { return K > 2048 ? 256 : K > 1024 ? 24 : 20; }
struct PreparedAct {
  int64_t M, Kp, G;
  int64_t ld;  // row stride of xq / xf in elements: Kp + 64, so rows do not alias in L1 sets
  const int8_t* xq; const float* sa; const int32_t* suma; const float* sg;
  const uint8_t* xu;
  const float* xf; const float* sumx;
  const uint16_t* xb;
};

struct MatmulArgs {
  PackedLinear w;
  PreparedAct x;
  const float* bias;  // [N] float32 or nullptr
  void* y;            // [M, N] contiguous
  DType y_dtype;
  uint64_t call;      // unique per matmul call: the key of per-thread scratch kept across its work items
};

}  // namespace lowbit
