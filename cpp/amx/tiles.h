// The AMX tile configuration lowbit's AMX routines use: palette 1, tiles 0-3 the 16×16 32-bit
// accumulators C, 4-5 the A operands (16 rows of a_bytes), 6-7 the B operands (b_rows rows of 64
// bytes); a_bytes = 4·b_rows, the k of one step.
#pragma once
#include <immintrin.h>
#ifdef LOWBIT_AMX_EMULATION
#include "amx/tile_emulation.h"  // the amx_emulated test variant: a scalar model of the tiles
#endif

#include <cstdint>

namespace lowbit {
namespace amx_tiles {

struct alignas(64) TileConfig {  // the LDTILECFG memory format
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "tile config is 64 bytes");

inline void configure(int a_bytes = 64, int b_rows = 16) {
  TileConfig c{};
  c.palette_id = 1;
  for (int i = 0; i < 8; ++i) { c.colsb[i] = 64; c.rows[i] = 16; }
  c.colsb[4] = c.colsb[5] = uint16_t(a_bytes);
  c.rows[6] = c.rows[7] = uint8_t(b_rows);
  _tile_loadconfig(&c);
}

}  // namespace amx_tiles
}  // namespace lowbit
