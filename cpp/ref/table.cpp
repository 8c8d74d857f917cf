#include "common/kernels.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
extern const KernelTable kTable;
const KernelTable kTable = {LOWBIT_ISA_NAME, quantize_rows, dequantize_rows, matmul_int, matmul_float,
                            64, false, false, nullptr, {gram_tile, 4, 16}};
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
