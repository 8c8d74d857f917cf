// Scalar reference for quantize / dequantize: the oracle every ISA variant is tested against.
// Plain loops, no intrinsics; compiled with baseline x86-64 flags only.
//   in : w [rows, K] (f32/f16/bf16, row stride ld_w) — out: codes [rows, packed_row_bytes]
//   plus scales/zeros [rows, groups]. Groups run along K; the last one of a row may be shorter.
#include <algorithm>
#include <cmath>

#include "common/convert.h"
#include "common/format.h"

namespace lowbit {
namespace LOWBIT_ISA_NS {

int64_t quantize_rows(const QuantizeArgs& a, int64_t r0, int64_t r1) {
  const QuantFormat& f = a.fmt;
  const int64_t G = num_groups(a.K, f.group_size), row_bytes = packed_row_bytes(a.K, f.bits);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * a.ld_w;
    uint8_t* codes = a.codes + r * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * f.group_size, k1 = std::min(a.K, k0 + f.group_size);
      GroupParams p;
      if (a.params_given) {
        p = params_given(f, a.scales[r * G + g], a.zeros ? a.zeros[r * G + g] : 0);
      } else {
        float lo = INFINITY, hi = -INFINITY, amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) {
          float x = load_as_f32(a.w, a.w_dtype, base + k);
          if (!std::isfinite(x)) return r;
          lo = std::min(lo, x);
          hi = std::max(hi, x);
          amax = std::max(amax, std::fabs(x));
        }
        p = params_from_range(f, lo, hi, amax);
        a.scales[r * G + g] = p.scale;
        if (a.zeros) a.zeros[r * G + g] = uint8_t(p.zero);
      }
      for (int64_t k = k0; k < k1; ++k) {
        float x = load_as_f32(a.w, a.w_dtype, base + k);
        if (!std::isfinite(x)) return r;
        uint8_t q = code_of(f, p, x);
        if (f.bits == 8) codes[k] = q;
        else if (k & 1) codes[k >> 1] = uint8_t(codes[k >> 1] | (q << 4));
        else codes[k >> 1] = q & 0xF;
      }
    }
  }
  return -1;
}

void dequantize_rows(const DequantizeArgs& a, int64_t r0, int64_t r1) {
  const QuantFormat& f = a.fmt;
  const int64_t G = num_groups(a.K, f.group_size), row_bytes = packed_row_bytes(a.K, f.bits);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* codes = a.codes + r * row_bytes;
    for (int64_t k = 0; k < a.K; ++k) {
      const int64_t g = r * G + k / f.group_size;
      uint8_t q = f.bits == 8 ? codes[k] : (codes[k >> 1] >> ((k & 1) * 4)) & 0xF;
      if (f.scheme == Scheme::symmetric && f.bits != 8 && (q & 8)) q |= 0xF0;  // sign-extend
      const GroupParams p = params_given(f, a.scales[g], a.zeros ? a.zeros[g] : 0);
      store_from_f32(a.out, a.out_dtype, r * a.K + k, value_of(f, q, p));
    }
  }
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
