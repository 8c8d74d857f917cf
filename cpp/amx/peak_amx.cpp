// AMX microbenchmarks for the machine's limits (bench/): peak tdpbusd (int8) and tdpbf16ps (bf16)
// throughput, four independent 16×16 accumulator tiles fed by register-resident operand tiles, so
// the tile unit alone bounds the loop. The caller checks that the amx variant (and, for bf16,
// amx_bf16) runs here; Linux's tile-state permission is requested once at feature detection.
#include <immintrin.h>

#include "amx/tiles.h"
#include "common/dispatch.h"
#include "common/peak.h"

namespace lowbit {
namespace amx {
namespace {

// Each thread configures its tiles, zeroes the four accumulators and loads the four operands
// (register-resident from then on), runs body(iters), and releases the tiles.
template <class Body>
double rate(int64_t iters, double ops_per_iter, Body body) {
  return rate_on_all_threads(iters, ops_per_iter, [&](int64_t n) -> int64_t {
    amx_tiles::configure();
    alignas(64) static const uint8_t ones[16 * 64] = {1};
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, ones, 64); _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64); _tile_loadd(7, ones, 64);
    body(n);
    _tile_release();
    return 0;
  });
}

}  // namespace

double peak_amx_int8_gops(int64_t iters) {  // 16·16·64 MACs per tdpbusd, 2 OP each
  return rate(iters, 4 * 16 * 16 * 64 * 2, [](int64_t n) {
    for (int64_t it = 0; it < n; ++it) {
      _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
    }
  });
}

double peak_amx_bf16_gflops(int64_t iters) {  // 16·16·32 bf16 products per tdpbf16ps
  return rate(iters, 4 * 16 * 16 * 32 * 2, [](int64_t n) {
    for (int64_t it = 0; it < n; ++it) {
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
  });
}

}  // namespace amx
}  // namespace lowbit
