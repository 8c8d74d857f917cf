#include "common/kernels.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
extern const KernelTable kTable;
// bfloat16 x kept as such: the weight-only GEMM dots it with vdpbf16ps; the int4 GEMM takes x + 128
// as vpdpbusd's unsigned operand
const KernelTable kTable = {LOWBIT_ISA_NAME, quantize_rows, dequantize_rows, matmul_int, matmul_float,
                            64, true, true, nullptr, {gram_tile, 12, 32}};
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
