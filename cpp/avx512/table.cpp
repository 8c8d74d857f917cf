#include "common/kernels.h"

namespace lowbit {
// Weight-only float activations: the AVX2 kernel (every AVX-512 CPU runs AVX2); no AVX-512
// float kernel yet.
namespace avx2 {
void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
}
namespace LOWBIT_ISA_NS {
extern const KernelTable kTable;
const KernelTable kTable = {LOWBIT_ISA_NAME, quantize_rows, dequantize_rows, matmul_int, avx2::matmul_float};
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
