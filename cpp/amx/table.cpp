// The "amx" variant: AVX-512 kernels everywhere, AMX-INT8 tiles for the integer matmul.
#include "common/kernels.h"

namespace lowbit {
namespace avx512 {
int64_t quantize_rows(const QuantizeArgs& a, int64_t r0, int64_t r1);
void dequantize_rows(const DequantizeArgs& a, int64_t r0, int64_t r1);
}
namespace avx2 {
void matmul_float(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
}
namespace LOWBIT_ISA_NS {
extern const KernelTable kTable;
const KernelTable kTable = {LOWBIT_ISA_NAME, avx512::quantize_rows, avx512::dequantize_rows, matmul_int,
                            avx2::matmul_float};
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
