// matmul: prepack (layout panel4_k32), per-call activation preparation, and the validated entry
// that tiles the work over threads and calls the active variant's kernel (null entry: reference).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/convert.h"
#include "common/dispatch.h"
#include "common/format.h"

namespace lowbit {

static void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}
static void require(bool ok, const char* msg) {  // no string built per call where it holds
  if (!ok) throw std::invalid_argument(msg);
}

static int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// max |x| of a row, or a value above FLT_MAX when the row holds NaN/Inf. On the bits: for
// |x| = bits & 0x7fffffff the integer order is the float order, and every NaN/Inf is >= the bits
// of Inf, so one integer max (which vectorizes, unlike a float max) does both jobs.
// The row helpers below are compiled per ISA (LOWBIT_ROW_CLONES, dispatch.h).

LOWBIT_ROW_CLONES static float abs_max(const float* x, int64_t K) {
  int32_t m = 0;
  for (int64_t k = 0; k < K; ++k) {
    uint32_t u;
    std::memcpy(&u, x + k, 4);
    const int32_t a = int32_t(u & 0x7fffffffu);
    m = a > m ? a : m;
  }
  if (m > 0x7f800000) m = 0x7f800000;  // a NaN reads as Inf
  return bits_to_f32(uint32_t(m));
}

// q = clamp(rint(x · inv), -127, 127). Adding and subtracting 1.5·2^23 rounds a float of
// magnitude < 2^22 to the nearest integer, ties to even (as rint does), without a libm call.
LOWBIT_ROW_CLONES static void round_row_int8(const float* x, int64_t K, float inv, int8_t* q) {
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23
  for (int64_t k = 0; k < K; ++k) {  // |x·inv| <= 127 + a few ulps; the clamp is a guard
    int32_t r = int32_t((x[k] * inv + kRound) - kRound);
    r = r < -127 ? -127 : r;
    q[k] = int8_t(r > 127 ? 127 : r);
  }
}

// Σ x in float, as 8 interleaved partial sums (lane j takes k ≡ j mod 8, k ascending) added
// pairwise at the end: a fixed order, so every variant sees the same sumx.
LOWBIT_ROW_CLONES static float sum8(const float* x, int64_t n) {
  float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) p[j] = p[j] + x[k + j];
  for (int j = 0; k < n; ++k, ++j) p[j] = p[j] + x[k];
  return ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
}

LOWBIT_ROW_CLONES static int32_t sum_int8(const int8_t* q, int64_t n) {
  int32_t t = 0;
  for (int64_t k = 0; k < n; ++k) t += q[k];
  return t;
}

// q + 128 as unsigned bytes (PreparedAct::xu): the sign bit flipped. __restrict, so it vectorizes
// (a uint8_t store may alias the source: as a plain loop it ran scalar, 1.2 ms for 512 × 4096).
LOWBIT_ROW_CLONES static void offset_row_u8(const int8_t* __restrict q, int64_t n, uint8_t* __restrict u) {
  for (int64_t k = 0; k < n; ++k) u[k] = uint8_t(q[k]) ^ 0x80u;
}

// A row of x in float: bfloat16 widens by a shift (vectorizes); float16 goes through the scalar rule.
LOWBIT_ROW_CLONES static void widen_row(const void* x, DType t, int64_t i0, int64_t K, float* out) {
  if (t == DType::bf16) {
    const uint16_t* h = static_cast<const uint16_t*>(x) + i0;
    for (int64_t k = 0; k < K; ++k) out[k] = bits_to_f32(uint32_t(h[k]) << 16);
  } else {
    for (int64_t k = 0; k < K; ++k) out[k] = load_as_f32(x, t, i0 + k);
  }
}

// The whole header of an [N, K] weight in format f: pack_linear writes it, and a buffer handed
// to matmul must carry exactly it (so no offset or size in it can send a kernel out of bounds).
static PackedLinearHeader layout_header(int64_t N, int64_t K, const QuantFormat& f) {
  require(N > 0 && K > 0, "cannot pack an empty weight");
  require(N <= INT32_MAX && K <= INT32_MAX, "weight too large for layout panel4_k32");
  if (f.bits != 4 && f.bits != 8)  // (messages built only on failure: every matmul checks its header)
    require(false, "matmul kernels take 4- or 8-bit weights, got bits=" + std::to_string(f.bits));
  require(f.scheme != Scheme::nf4 || f.bits == 4, "nf4 needs bits=4");
  require(f.group_size > 0, "group_size must be positive");
  const int64_t G = num_groups(K, f.group_size);
  if (G != 1 && f.group_size % kBlockK != 0)
    require(false, "layout panel4_k32 needs group_size % 32 == 0 or one group per row, got " +
                       std::to_string(f.group_size));
  PackedLinearHeader h{};
  h.magic = kPanel4Magic; h.version = kPanel4Version; h.bits = f.bits; h.scheme = int(f.scheme);
  h.N = N; h.K = K; h.Np = round_up(N, kPanelRows); h.Kp = round_up(K, kBlockK); h.G = G;
  h.group_size = f.group_size;
  h.codes_offset = sizeof(PackedLinearHeader);
  h.sw_offset = h.codes_offset + round_up(h.Np * h.Kp * (f.bits == 4 ? 1 : 2) / 2, 64);
  const bool asym = f.scheme == Scheme::asymmetric;
  h.total_bytes = h.sw_offset + round_up(h.Np * G * 4, 64);
  if (asym) {
    h.zq_offset = h.total_bytes;
    h.total_bytes += round_up(h.Np * G, 64);
  }
  h.zero = f.bits == 4 && f.scheme == Scheme::symmetric ? 8.f : 0.f;
  if (f.bits == 8 && f.scheme == Scheme::symmetric) {
    h.wsum_offset = h.total_bytes;
    h.total_bytes += round_up(h.Np * G * 4, 64);
  }
  return h;
}

int64_t packed_linear_bytes(int64_t N, int64_t K, const QuantFormat& f) {
  return layout_header(N, K, f).total_bytes;
}

void pack_linear(const uint8_t* codes, const float* scales, const uint8_t* zeros, int64_t N,
                 int64_t K, const QuantFormat& f, uint8_t* out, int64_t out_bytes) {
  const PackedLinearHeader h = layout_header(N, K, f);
  require(out_bytes == h.total_bytes, "packed buffer has the wrong size");
  require(f.scheme != Scheme::asymmetric || zeros, "asymmetric weights need zeros");
  if (f.scheme == Scheme::asymmetric && f.bits == 4)  // zq holds them as int8: nothing may wrap
    for (int64_t i = 0, n = N * num_groups(K, f.group_size); i < n; ++i)
      if (zeros[i] > 15) require(false, "zeros must be in [0, 15] for 4-bit codes, got " + std::to_string(zeros[i]));
  const int64_t G = h.G;
  const bool asym = f.scheme == Scheme::asymmetric, sym = f.scheme == Scheme::symmetric;
  std::memset(out, 0, size_t(out_bytes));
  std::memcpy(out, &h, sizeof h);
  uint8_t* cbase = out + h.codes_offset;
  float* sw = reinterpret_cast<float*>(out + h.sw_offset);
  int8_t* zq = asym ? reinterpret_cast<int8_t*>(out + h.zq_offset) : nullptr;
  int32_t* wsum = h.wsum_offset ? reinterpret_cast<int32_t*>(out + h.wsum_offset) : nullptr;
  const int64_t nb = h.Kp / kBlockK, row_bytes = packed_row_bytes(K, f.bits);
  parallel_for(N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t p = n / kPanelRows;
      const int r = int(n % kPanelRows);
      const uint8_t* src = codes + n * row_bytes;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t b = k / kBlockK, j = k % kBlockK;
        if (f.bits == 4) {
          uint8_t u = (src[k >> 1] >> ((k & 1) * 4)) & 15;
          if (sym) u ^= 8;  // two's complement nibble + 8: flip the sign bit
          W4Block* blk = reinterpret_cast<W4Block*>(cbase) + p * nb + b;
          blk->half[r / 2][j] |= uint8_t((r & 1) ? u << 4 : u);
        } else {
          W8Block* blk = reinterpret_cast<W8Block*>(cbase + p * nb * sizeof(W8Block)) + b;
          const int v = sym ? int(int8_t(src[k])) : int(src[k]) - 128;
          blk->row[r][j] = int8_t(v);
          if (wsum) wsum[(p * G + k / f.group_size) * kPanelRows + r] += v;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float s = scales[n * G + g];
        sw[(p * G + g) * kPanelRows + r] = s;
        if (asym) zq[(p * G + g) * kPanelRows + r] = int8_t(int(zeros[n * G + g]) - (f.bits == 8 ? 128 : 0));
      }
    }
  });
  float max_scale = 0.f;
  for (int64_t i = 0; i < N * G; ++i) max_scale = std::max(max_scale, scales[i]);
  reinterpret_cast<PackedLinearHeader*>(out)->max_scale = max_scale;
}

static PackedLinear view_packed(const uint8_t* packed) {
  const auto* h = reinterpret_cast<const PackedLinearHeader*>(packed);
  require(h->magic == kPanel4Magic, "packed weight is not in layout panel4_k32 (bad magic)");
  if (h->version != kPanel4Version)
    require(false, "packed weight has layout panel4_k32 version " + std::to_string(h->version) + ", expected " +
                       std::to_string(kPanel4Version) + "; repack it");
  require(h->scheme >= 0 && h->scheme <= int(Scheme::nf4), "packed weight has a bad header (scheme)");
  QuantFormat f{};
  f.bits = h->bits; f.scheme = Scheme(h->scheme); f.group_size = h->group_size;
  PackedLinearHeader want;
  try {
    want = layout_header(h->N, h->K, f);
  } catch (const std::invalid_argument& e) {
    require(false, std::string("packed weight has a bad header: ") + e.what());
  }
  require(h->max_scale >= 0.f && h->max_scale <= FLT_MAX, "packed weight has a bad header (max_scale)");
  want.max_scale = h->max_scale;
  require(std::memcmp(h, &want, sizeof want) == 0, "packed weight has a bad header (inconsistent sizes or offsets)");
  return PackedLinear{h, packed + h->codes_offset, reinterpret_cast<const float*>(packed + h->sw_offset),
                      h->zq_offset ? reinterpret_cast<const int8_t*>(packed + h->zq_offset) : nullptr,
                      h->wsum_offset ? reinterpret_cast<const int32_t*>(packed + h->wsum_offset) : nullptr};
}

static bool use_int(const PackedLinear& w, int act_bits) {
  return act_bits == 8 && w.h->scheme != int(Scheme::nf4);
}

// The table whose kernel runs: the active one, or its stand-in for per-block int activations.
static const KernelTable& kernel_table(bool int_mode, bool per_block) {
  const KernelTable& t = active();
  return int_mode && per_block && t.per_block_int ? *t.per_block_int : t;
}

std::string matmul_kernel_name(const uint8_t* packed, int act_bits, bool act_per_block) {
  PackedLinear w = view_packed(packed);
  const bool i = use_int(w, act_bits);
  const KernelTable& t = kernel_table(i, act_per_block);
  bool has = i ? t.matmul_int != nullptr : t.matmul_float != nullptr;
  return std::string(has ? t.name : reference().name) + (i ? ":int" : ":float");
}

static uint64_t next_call_id() {
  static std::atomic<uint64_t> calls{0};
  return ++calls;
}

// Whether y[m0, m1) × [n0, n1) holds no NaN or Inf: a float16 Inf is a legitimate overflow of the
// narrowing, so only its NaN counts. Read right after the kernel wrote it, so from cache.
static bool result_finite(const void* y, DType t, int64_t N, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  uint32_t bad = 0;
  for (int64_t m = m0; m < m1; ++m) {
    if (t == DType::f32) {
      const uint32_t* r = static_cast<const uint32_t*>(y) + m * N;
      for (int64_t n = n0; n < n1; ++n) bad |= (r[n] & 0x7f800000u) == 0x7f800000u;
    } else {
      const uint16_t* r = static_cast<const uint16_t*>(y) + m * N;
      if (t == DType::bf16)
        for (int64_t n = n0; n < n1; ++n) bad |= (r[n] & 0x7f80u) == 0x7f80u;
      else
        for (int64_t n = n0; n < n1; ++n) bad |= (r[n] & 0x7fffu) > 0x7c00u;
    }
  }
  return !bad;
}

void matmul(const MatmulCall& c) {
  require(c.packed && c.packed_bytes >= int64_t(sizeof(PackedLinearHeader)), "packed weight is missing");
  PackedLinear w = view_packed(c.packed);
  require(w.h->total_bytes == c.packed_bytes, "packed weight buffer is truncated");
  if (c.K != w.h->K) require(false, "x has K=" + std::to_string(c.K) + " but the weight has K=" + std::to_string(w.h->K));
  require(c.M > 0, "x is empty");
  if (c.act_bits != 0 && c.act_bits != 8) require(false, "act_bits must be None or 8, got " + std::to_string(c.act_bits));
  require(c.act_bits == 8 || !c.act_per_block, "per-block activation scales need act_bits=8");
  const int64_t M = c.M, K = c.K, Kp = w.h->Kp, G = w.h->G, N = w.h->N;
  const int64_t ld = Kp + 64;  // a 4 KiB-multiple row stride would map every row to the same L1 sets
  const bool int_mode = use_int(w, c.act_bits);

  // Per-call activation preparation (portable code, O(M·K); written as simple loops the compiler
  // vectorizes at the baseline ISA, so M=1 decode spends ~1 µs here, not tens).
  std::vector<int8_t> xq;
  std::vector<uint8_t> xu;
  std::vector<float> sa, sg, xf, sumx, bias;
  std::vector<int32_t> suma;
  std::vector<uint16_t> xb;
  const KernelTable& t = kernel_table(int_mode, c.act_per_block);
  const bool keep_bf16 = !int_mode && c.x_dtype == DType::bf16 && c.act_bits == 0 && t.float_wants_bf16_x;
  if (int_mode) { xq.assign(size_t(M * ld), 0); sa.resize(M); suma.assign(size_t(M * G), 0); }
  if (int_mode && c.act_per_block) sg.resize(size_t(M * G));
  if (int_mode && t.int_wants_u8_x &&
      ((w.wsum && M > 3 && M < int8_panel_rows(K)) || (w.h->bits == 4 && w.h->group_size <= kU8xMaxGroup && !c.act_per_block && M >= kU8xMinRows)))
    xu.assign(size_t(M * ld), 128);
  if (!int_mode) { xf.assign(size_t(M * ld), 0.f); sumx.assign(size_t(M * G), 0.f); }
  if (keep_bf16) xb.assign(size_t(M * ld), 0);
  const int64_t gs = w.h->group_size;
  std::atomic<int64_t> bad{-1};
  std::vector<float> row_amax(static_cast<size_t>(M));
  parallel_for(M, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(c.x_dtype == DType::f32 ? 0 : size_t(K));
    std::vector<int8_t> qbuf(int_mode ? 0 : size_t(K));
    for (int64_t m = r0; m < r1; ++m) {
      const float* row = static_cast<const float*>(c.x) + m * K;
      if (c.x_dtype != DType::f32) {
        widen_row(c.x, c.x_dtype, m * K, K, buf.data());
        row = buf.data();
      }
      const float amax = abs_max(row, K);
      if (!(amax <= FLT_MAX)) { bad = m; continue; }  // NaN or Inf
      row_amax[m] = amax;
      if (c.act_bits == 8) {
        // Dynamic int8, per token: s = max|x_row| / 127, q = clamp(rint(x / s), -127, 127); per
        // block: the same rule on each weight group of the row with its own s.
        int8_t* q = int_mode ? &xq[m * ld] : qbuf.data();
        const bool per_block = c.act_per_block;
        const int64_t blocks = per_block ? G : 1, bk = per_block ? gs : K;
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t k0 = b * bk, n = std::min(K, k0 + bk) - k0;
          const float s = (per_block ? abs_max(row + k0, n) : amax) / 127.f;
          round_row_int8(row + k0, n, inverse_scale(s), q + k0);
          if (!int_mode) {
            for (int64_t k = k0; k < k0 + n; ++k) xf[m * ld + k] = float(q[k]) * s;
          } else {
            sa[m] = per_block ? 1.f : s;
            if (per_block) sg[m * G + b] = s;
          }
        }
        if (int_mode) {
          if (!xu.empty()) offset_row_u8(q, K, &xu[m * ld]);
          for (int64_t g = 0; g < G; ++g) {
            const int64_t k0 = g * gs;
            suma[m * G + g] = sum_int8(q + k0, std::min(K, k0 + gs) - k0);
          }
          continue;
        }
      } else {
        std::memcpy(&xf[m * ld], row, size_t(K) * 4);
        if (keep_bf16) std::memcpy(&xb[m * ld], static_cast<const uint16_t*>(c.x) + m * K, size_t(K) * 2);
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * gs;
        sumx[m * G + g] = sum8(&xf[m * ld + k0], std::min(K, k0 + gs) - k0);
      }
    }
  });
  if (bad.load() >= 0) require(false, "x contains NaN or Inf (row " + std::to_string(bad.load()) + ")");
  if (c.bias) {
    bias.resize(size_t(N));
    for (int64_t n = 0; n < N; ++n) bias[n] = load_as_f32(c.bias, c.x_dtype, n);
    for (int64_t n = 0; n < N; ++n) require(std::fabs(bias[n]) <= FLT_MAX, "bias contains NaN or Inf");
  }
  // x, the weights and bias are finite, yet magnitudes near FLT_MAX can overflow a kernel's float32
  // partial sums where the result itself would be finite (integer dots times the weight scale
  // before the activation scale, offset codes against z·Σx): then an error, not Inf or NaN in y.
  // No partial sum exceeds max(1, max s) · Kp · 2^16 · max(1, max |x|) (a code or offset code
  // times an int8 or u8 activation is below 2^16; some kernels sum codes times x before they scale
  // by s): y is scanned only when that bound comes near FLT_MAX.
  const float x_amax = *std::max_element(row_amax.begin(), row_amax.end());
  float bias_amax = 0.f;
  for (float b : bias) bias_amax = std::max(bias_amax, std::fabs(b));
  const bool scan_y = !(std::max(1.0, double(w.h->max_scale)) * double(Kp) * 65536.0 * std::max(1.0, double(x_amax)) < FLT_MAX / 4) ||
                      bias_amax > FLT_MAX / 4;
  MatmulArgs a{w, PreparedAct{M, Kp, G, ld, xq.data(), sa.data(), suma.data(), sg.empty() ? nullptr : sg.data(),
                              xu.empty() ? nullptr : xu.data(),
                              xf.data(), sumx.data(), keep_bf16 ? xb.data() : nullptr},
               c.bias ? bias.data() : nullptr, c.y, c.x_dtype, next_call_id()};
  const MatmulFn kernel = int_mode ? (t.matmul_int ? t.matmul_int : reference().matmul_int)
                                   : (t.matmul_float ? t.matmul_float : reference().matmul_float);
  std::atomic<bool> overflow{false};
  auto fn = [&](const MatmulArgs& args, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    kernel(args, m0, m1, p0, p1);
    if (scan_y && !result_finite(c.y, c.x_dtype, N, m0, m1, p0 * kPanelRows, std::min(N, p1 * kPanelRows)))
      overflow = true;
  };
  auto done = [&] {
    require(!overflow.load(), "the matmul result overflowed float32 (activations or weights near the float32 limit)");
  };
  const int64_t P = w.h->Np / kPanelRows;
  if (M <= kDecodeRows) {
    // decode: split N (panels) into contiguous streams, one per thread, each at least
    // kMinDecodeShare bytes of weights; below two shares, one thread: waking a worker that has
    // gone to sleep (no call for the pool's 1 ms of spin) costs 20-60 µs in a VM, more than a
    // second thread saves on a small layer. M = 1 on the EPYC VM, 2 threads (awake: calls 300
    // µs apart) against 1, min / median µs: int4 g128 576² 10 / 11 vs 12 / 13, 2048×640 26 / 32
    // vs 37 / 43, 1024×2048 40 / 41 vs 61 / 61; int8 per channel 576² 21 / 22 vs 17 / 17,
    // 2048×640 56 / 59 vs 58 / 59, 1024×2048 65 / 73 vs 86 / 132. More rows of X count as more
    // bytes (work, below): 576×1536 (0.5 MB as int4 g64) M = 8 / 16, 2 threads, µs median,
    // one thread -> split: int4 g64 82 / 120 -> 50 / 90, int8 per channel 65 / 122 -> 44 / 70,
    // float x (int4) 222 / 444 -> 118 / 231. Shares of 512 -> 256 KB (calls back to back, 2
    // threads, weights from DRAM, int4 g128 576×1536, 3 alternations, min µs): M = 2 fp32 x 55 ->
    // 32, int8 x 30 -> 19; M = 4 int8 x 45 -> 27 (torch loaded alike; M = 1, 0.5 MB, stays on
    // one thread).
    // Pieces (claimed by whichever thread runs, see parallel_for) stay long DRAM streams, one a
    // thread, unless they would exceed kDecodePiece: then up to four a thread, so a thread that
    // starts late (Gemma3's 168 MB int8 lm_head beside torch's threads) leaves less undone. More
    // pieces than threads: a multiple of them, so threads that run alike finish together (3
    // pieces on 2 threads took as long as 4: K = N = 4096 int4 g32, 12.6 MB, M=1, 81-84% -> 95-100%
    // of the 2-thread DRAM read rate).
    constexpr int64_t kMinDecodeShare = int64_t(256) << 10, kDecodePiece = int64_t(4) << 20;
    const int64_t bytes = w.h->total_bytes, threads = get_num_threads();
    // several rows of X: more work per byte (µs on one thread, int4 g64 576×1536, M = 1 / 4 /
    // 16: 18 / 42 / 120; float x 40 / 111 / 440), counted as bytes streamed at M = 1
    const int64_t work = bytes + bytes * (M - 1) * (int_mode ? 1 : 4) / 4;
    int64_t pieces = work < 2 * kMinDecodeShare ? 1
                     : std::max(std::min(threads, work / kMinDecodeShare), std::min(4 * threads, bytes / kDecodePiece));
    if (pieces > threads) pieces = (pieces + threads - 1) / threads * threads;
    parallel_for(P, std::max<int64_t>(8, (P + pieces - 1) / pieces), [&](int64_t p0, int64_t p1) { fn(a, 0, M, p0, p1); });
    return done();
  }
  // prefill: tiles of MT rows (64, or the table's int_prefill_rows in int mode) × 16 panels
  // (16·4 rows of W ≈ K·32 bytes for int4, L2-resident); each kernel call walks its panels with
  // the activation block reused from L2.
  const bool tall = int_mode ? t.matmul_int != nullptr : keep_bf16;
  const int64_t MT = tall ? t.int_prefill_rows : 64, PT = 16;
  const int64_t mt = (M + MT - 1) / MT, pt = (P + PT - 1) / PT;
  parallel_for(mt * pt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pi = t / mt, mi = t % mt;  // consecutive tiles share a weight panel chunk
      fn(a, mi * MT, std::min(M, mi * MT + MT), pi * PT, std::min(P, pi * PT + PT));
    }
  });
  done();
}

}  // namespace lowbit
