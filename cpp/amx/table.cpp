// The "amx" variant: AVX-512 kernels everywhere, AMX-INT8 tiles for the integer matmul with
// per-token activations (per-block activations take the AVX-512 kernel), AMX-BF16 for bf16 x.
// x + 128 is prepared for int8 weights: the rows short of a tile run the AVX-512 int8 panel
// kernel, which takes it (int4 weights never hand it rows that use it).
#include "common/kernels.h"

namespace lowbit {
namespace avx512 {
int64_t quantize_rows(const QuantizeArgs& a, int64_t r0, int64_t r1);
void dequantize_rows(const DequantizeArgs& a, int64_t r0, int64_t r1);
void gram_tile(const float* panel, int64_t kc, int64_t i0, int64_t j0, float* c, int64_t ldc);
}
namespace LOWBIT_ISA_NS {
extern const KernelTable kTable;
const KernelTable kTable = {LOWBIT_ISA_NAME, avx512::quantize_rows, avx512::dequantize_rows, matmul_int,
                            matmul_float, 256, true, true, &avx512::kTable,
                            {avx512::gram_tile, 12, 32}};
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
