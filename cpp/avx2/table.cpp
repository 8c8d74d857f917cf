#include "common/kernels.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
extern const KernelTable kTable;
// 96 rows of X per prefill work item: the integer GEMM builds a k4 scratch per item and walks the
// rows three at a time
const KernelTable kTable = {LOWBIT_ISA_NAME, quantize_rows, dequantize_rows, matmul_int, matmul_float, 96,
                            false, false, nullptr, {gram_tile, 6, 16}};
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
