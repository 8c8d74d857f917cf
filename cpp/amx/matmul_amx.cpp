// AMX-INT8 integer matmul (W4A8 / W8A8) for large M on layout panel4_k32. COMPILE-ONLY so far:
// no AMX CPU was available to run it; the dispatcher offers it only where cpuid reports
// amx_tile + amx_int8 and Linux granted the tile state (os_amx); tests cover it there.
// Computes Cᵀ = W · Xᵀ per 16×16 tile: A = 16 weight rows × 64 k (int4: unsigned u, tdpbusd;
// int8: signed w', tdpbssd), B = activations in VNNI order [k/4][16 m][4]. Per group the int32
// tile is stored and scaled with the reference's exact float steps (bit-exact with cpp/ref).
// A 32-k tail block (Kp is a multiple of 32) uses second tile shapes. Fewer than 16 rows of X:
// the AVX-512 VNNI kernel.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/format.h"
#include "common/matmul_epilogue.h"

namespace lowbit {
namespace avx512 {
void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
}
namespace LOWBIT_ISA_NS {
namespace {

struct alignas(64) TileConfig {  // the LDTILECFG memory format, palette 1
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "tile config is 64 bytes");

void configure_tiles() {
  TileConfig c{};
  c.palette_id = 1;
  c.colsb[0] = 64; c.rows[0] = 16;  // C: 16 n × 16 m int32
  c.colsb[1] = 64; c.rows[1] = 16;  // A: 16 n × 64 k
  c.colsb[2] = 64; c.rows[2] = 16;  // B: 16 (k/4) × 16 m × 4
  c.colsb[3] = 32; c.rows[3] = 16;  // A tail: 16 n × 32 k
  c.colsb[4] = 64; c.rows[4] = 8;   // B tail: 8 (k/4) × 16 m × 4
  _tile_loadconfig(&c);
}

// Weight rows of 4 panels [p, p+4) as plain bytes [16][Kp] (u for int4, w' for int8).
void unpack_ntile(const PackedLinear& w, int64_t p, int64_t np, uint8_t* out) {
  const int64_t Kp = w.h->Kp, nb = Kp / kBlockK;
  std::memset(out, 0, size_t(16 * Kp));
  for (int64_t q = 0; q < np; ++q) {
    const uint8_t* panel = w.panel(p + q);
    for (int64_t b = 0; b < nb; ++b)
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < kBlockK; ++j) {
          uint8_t v;
          if (w.h->bits == 4) {
            uint8_t byte = reinterpret_cast<const W4Block*>(panel)[b].half[r / 2][j];
            v = (r & 1) ? byte >> 4 : byte & 15;
          } else {
            v = uint8_t(reinterpret_cast<const W8Block*>(panel)[b].row[r][j]);
          }
          out[(q * 4 + r) * Kp + b * kBlockK + j] = v;
        }
  }
}

}  // namespace

void matmul_int(const MatmulArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m1 - m0 < 16) return avx512::matmul_int(a, m0, m1, p0, p1);
  const PackedLinear& w = a.w;
  const int64_t Kp = w.h->Kp, G = w.h->G, N = w.h->N;
  const int64_t mtiles = (m1 - m0 + 15) / 16;
  // Activations in VNNI order per 16-row m tile: [mt][Kp/4][16][4], rows past m1 zero.
  std::vector<int8_t> bx(size_t(mtiles * Kp * 16), 0);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t mt = (m - m0) / 16, mi = (m - m0) % 16;
    for (int64_t k = 0; k < Kp; ++k)
      bx[size_t(mt * Kp * 16 + (k / 4) * 64 + mi * 4 + (k % 4))] = a.x.xq[m * a.x.ld + k];
  }
  std::vector<uint8_t> aw(size_t(16 * Kp));
  alignas(64) int32_t c[16][16];
  std::vector<float> acc(16 * 16);
  configure_tiles();
  for (int64_t p = p0; p < p1; p += 4) {
    const int64_t np = std::min<int64_t>(4, p1 - p);
    unpack_ntile(w, p, np, aw.data());
    for (int64_t mt = 0; mt < mtiles; ++mt) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const int8_t* bt = bx.data() + mt * Kp * 16;
      int64_t k = 0;
      for (int64_t g = 0; g < G; ++g) {
        _tile_zero(0);
        for (const int64_t e = w.group_end(g); k < e;) {
          if (e - k >= 64) {
            _tile_loadd(1, aw.data() + k, Kp);
            _tile_loadd(2, bt + (k / 4) * 64, 64);
            if (w.h->bits == 4) _tile_dpbusd(0, 1, 2); else _tile_dpbssd(0, 1, 2);
            k += 64;
          } else {  // a 32-k block
            _tile_loadd(3, aw.data() + k, Kp);
            _tile_loadd(4, bt + (k / 4) * 64, 64);
            if (w.h->bits == 4) _tile_dpbusd(0, 3, 4); else _tile_dpbssd(0, 3, 4);
            k += 32;
          }
        }
        _tile_stored(0, c, 64);
        for (int nn = 0; nn < 16; ++nn) {
          const int64_t pp = p + nn / 4;
          if (pp >= p1) break;
          const int64_t s = (pp * G + g) * kPanelRows + nn % 4;
          for (int mi = 0; mi < 16; ++mi) {
            const int64_t m = m0 + mt * 16 + mi;
            if (m >= m1) break;
            float t1 = w.sw[s] * float(c[nn][mi]), t2 = w.swz[s] * float(a.x.suma[m * G + g]);
            acc[nn * 16 + mi] = acc[nn * 16 + mi] + (t1 - t2);
          }
        }
      }
      for (int nn = 0; nn < 16 && p + nn / 4 < p1; ++nn) {
        const int64_t n = (p + nn / 4) * kPanelRows + nn % 4;
        if (n >= N) continue;
        for (int mi = 0; mi < 16; ++mi) {
          const int64_t m = m0 + mt * 16 + mi;
          if (m < m1) store_matmul_out(a, m, n, acc[nn * 16 + mi], a.x.sa[m]);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
