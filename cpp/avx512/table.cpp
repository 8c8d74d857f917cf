#include "common/kernels.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {
extern const KernelTable kTable;
const KernelTable kTable = {LOWBIT_ISA_NAME, quantize_rows, dequantize_rows, nullptr, nullptr};
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
