#include "common/kernels.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
extern const KernelTable kTable;
const KernelTable kTable = {LOWBIT_ISA_NAME, quantize_rows, dequantize_rows, matmul_int, matmul_float};
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
