// A scalar model of the AMX tile state and of the tile instructions lowbit's AMX kernels use, for
// the test-only "amx_emulated" variant (LOWBIT_AMX_EMULATION): matmul_amx.cpp compiled with these
// in place of the intrinsics runs on any AVX-512 CPU, so its logic (tile shapes, the VNNI B
// operand, per-group scales, zero points, tails) is tested against the reference where no AMX CPU
// can be reached. It follows the Intel SDM's pseudocode of LDTILECFG, TILELOADD, TILESTORED,
// TILEZERO, TDPBSSD and TDPBF16PS (bf16 inputs as denormals-are-zero, each product added
// to its fp32 lane in turn, odd element first, round to nearest even, results flushed to zero), and
// aborts with a message where the hardware would fault: a tile used before LDTILECFG, operand
// shapes that do not chain (rows(C) = rows(A), colsb(C) = colsb(B), rows(B) = colsb(A) / 4).
#pragma once
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace lowbit {
namespace amx_emulation {

struct TileState {
  bool configured = false;
  uint16_t colsb[8] = {};
  uint8_t rows[8] = {};
  alignas(64) uint8_t t[8][16][64] = {};
};

inline TileState& state() {
  thread_local TileState s;  // tile registers are per thread
  return s;
}

[[noreturn]] inline void fault(const char* what, int tile) {
  std::fprintf(stderr, "lowbit amx_emulated: %s (tile %d): AMX hardware would fault here\n", what, tile);
  std::abort();
}

inline TileState& tile(int t) {
  TileState& s = state();
  if (t < 0 || t > 7) fault("no such tile", t);
  if (!s.configured) fault("tile used before LDTILECFG", t);
  if (s.rows[t] == 0 || s.colsb[t] == 0) fault("tile not configured", t);
  return s;
}

inline void loadconfig(const void* cfg) {
  const uint8_t* c = static_cast<const uint8_t*>(cfg);
  TileState& s = state();
  if (c[0] != 1) fault("palette other than 1", -1);
  for (int t = 0; t < 8; ++t) {
    std::memcpy(&s.colsb[t], c + 16 + 2 * t, 2);
    s.rows[t] = c[48 + t];
    if (s.colsb[t] > 64 || s.rows[t] > 16) fault("tile shape over 16 rows x 64 bytes", t);
  }
  std::memset(s.t, 0, sizeof(s.t));
  s.configured = true;
}

inline void release() { state() = TileState{}; }

inline void zero(int t) { std::memset(tile(t).t[t], 0, sizeof(TileState::t[0])); }

inline void loadd(int t, const void* base, int64_t stride) {
  TileState& s = tile(t);
  std::memset(s.t[t], 0, sizeof(TileState::t[0]));
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(s.t[t][r], static_cast<const uint8_t*>(base) + r * stride, s.colsb[t]);
}

inline void stored(int t, void* base, int64_t stride) {
  TileState& s = tile(t);
  for (int r = 0; r < s.rows[t]; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.t[t][r], s.colsb[t]);
}

inline void check_chain(int c, int a, int b) {
  TileState& s = tile(c);
  tile(a);
  tile(b);
  if (s.rows[c] != s.rows[a]) fault("rows(C) != rows(A)", c);
  if (s.colsb[c] != s.colsb[b]) fault("colsb(C) != colsb(B)", c);
  if (s.colsb[a] % 4 || s.colsb[c] % 4) fault("colsb not a multiple of 4", c);
  if (s.rows[b] != s.colsb[a] / 4) fault("rows(B) != colsb(A) / 4", b);
}

// C[m][n] += Σ_k Σ_i A[m][4k + i] · B[k][4n + i] (signed bytes), int32 lanes wrapping as the hardware's do.
inline void dpbssd(int c, int a, int b) {
  check_chain(c, a, b);
  TileState& s = state();
  const int K = s.colsb[a] / 4, N = s.colsb[c] / 4;
  for (int m = 0; m < s.rows[c]; ++m)
    for (int n = 0; n < N; ++n) {
      uint32_t acc;
      std::memcpy(&acc, s.t[c][m] + 4 * n, 4);
      for (int k = 0; k < K; ++k)
        for (int i = 0; i < 4; ++i) {
          acc += uint32_t(int32_t(int8_t(s.t[a][m][4 * k + i])) * int8_t(s.t[b][k][4 * n + i]));
        }
      std::memcpy(s.t[c][m] + 4 * n, &acc, 4);
    }
}

inline float bf16_daz(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  if ((h & 0x7F80) == 0) h &= 0x8000;  // a denormal input reads as zero
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float ftz(float v) { return std::fabs(v) < FLT_MIN ? std::copysign(0.f, v) : v; }

inline void dpbf16ps(int c, int a, int b) {
  check_chain(c, a, b);
  TileState& s = state();
  const int K = s.colsb[a] / 4, N = s.colsb[c] / 4;
  for (int m = 0; m < s.rows[c]; ++m)
    for (int n = 0; n < N; ++n) {
      float acc;
      std::memcpy(&acc, s.t[c][m] + 4 * n, 4);
      for (int k = 0; k < K; ++k)
        for (int i = 1; i >= 0; --i) {  // the odd element first, as the SDM's pseudocode
          const float prod = bf16_daz(s.t[a][m] + 4 * k + 2 * i) * bf16_daz(s.t[b][k] + 4 * n + 2 * i);  // exact
          acc = ftz(acc + prod);
        }
      std::memcpy(s.t[c][m] + 4 * n, &acc, 4);
    }
}

}  // namespace amx_emulation
}  // namespace lowbit

// The intrinsics' names, routed to the model (the real ones are macros or always-inline functions
// of immintrin.h, included above so these definitions come after theirs).
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbf16ps
#define _tile_loadconfig(cfg) ::lowbit::amx_emulation::loadconfig(cfg)
#define _tile_release() ::lowbit::amx_emulation::release()
#define _tile_zero(t) ::lowbit::amx_emulation::zero(t)
#define _tile_loadd(t, base, stride) ::lowbit::amx_emulation::loadd(t, base, stride)
#define _tile_stored(t, base, stride) ::lowbit::amx_emulation::stored(t, base, stride)
#define _tile_dpbssd(c, a, b) ::lowbit::amx_emulation::dpbssd(c, a, b)
#define _tile_dpbf16ps(c, a, b) ::lowbit::amx_emulation::dpbf16ps(c, a, b)
