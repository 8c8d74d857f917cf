"""A numpy twin of lowbit's rounding convention (see the docstring of lowbit/ops.py), written from
the documented rule only: it imports nothing from lowbit. Every step is float32 arithmetic so the
results are bit-exact with the kernels:

  inv_scale = 1 / scale in float32, or 0 when scale < FLT_MIN (the group quantizes to its zero)
  asymmetric: lo = min(min(w_g), 0) * clip, hi = max(max(w_g), 0) * clip
              scale = (hi - lo) / (2^bits - 1)  (hi/(2^bits - 1) - lo/(2^bits - 1) if hi - lo overflows);  zero = clamp(rint(-lo * inv_scale), 0, 2^bits - 1)
              q = clamp(rint(w * inv_scale) + zero, 0, 2^bits - 1)
  symmetric : scale = max|w_g| * clip / (2^(bits-1) - 1);  q = clamp(rint(w * inv_scale), qmin, qmax)
  nf4       : scale = max|w_g| * clip;  q = number of float32 NF4 midpoints strictly below w*inv_scale

A computed scale below FLT_MIN is stored as 0 (the kernels' shared scalar rule in
cpp/common/format.h does the same; it only matters for groups whose range is subnormal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

F32 = np.float32
FLT_MIN = np.finfo(np.float32).tiny  # smallest normal float32, 2^-126

# The NF4 codebook (QLoRA): normal quantiles rescaled to [-1, 1] with an exact 0, as float32.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
# Midpoints of consecutive values, each computed in float32: (v[i] + v[i+1]) * 0.5.
NF4_MIDPOINTS = ((NF4_VALUES[:-1] + NF4_VALUES[1:]) * F32(0.5)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# float16 / bfloat16 <-> float32

def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest, ties to even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    odd = (u >> np.uint64(16)) & np.uint64(1)
    rounded = ((u + np.uint64(0x7FFF) + odd) >> np.uint64(16)).astype(np.uint16)
    nan = (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
    quiet = ((u >> np.uint64(16)) | np.uint64(0x40)).astype(np.uint16)
    return np.where(nan, quiet, rounded)


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 with round to nearest even (numpy's cast rounds that way)."""
    with np.errstate(over="ignore"):  # beyond 65504 rounds to +-inf, as the kernels do
        return np.asarray(x, dtype=np.float32).astype(np.float16)


def to_f32(w: np.ndarray, dtype: str) -> np.ndarray:
    """Input values as float32: w is float32/float16 data, or uint16 bit patterns for bfloat16."""
    if dtype == "bfloat16":
        return bf16_bits_to_f32(w)
    return np.asarray(w).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Formats

@dataclass(frozen=True)
class Fmt:
    bits: int
    scheme: str                     # "asymmetric", "symmetric" or "nf4"
    group_size: Union[int, None, str]  # int, None (per row) or "tensor"

    def group_len(self, K: int) -> int:
        return K if self.group_size in (None, "tensor") else int(self.group_size)

    def num_groups(self, K: int) -> int:
        g = self.group_len(K)
        return (K + g - 1) // g

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.scheme == "symmetric" else 0

    @property
    def qmax(self) -> int:
        if self.scheme == "symmetric":
            return (1 << (self.bits - 1)) - 1
        return (1 << self.bits) - 1


def inverse_scale(scale: np.ndarray) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = (F32(1.0) / np.where(scale >= FLT_MIN, scale, F32(1.0))).astype(np.float32)
    return np.where(scale >= FLT_MIN, inv, F32(0.0)).astype(np.float32)


def params_from_range(fmt: Fmt, lo, hi, amax, clip: float):
    """scale (float32) and zero (float32 integer value) of groups with the given min/max/absmax."""
    clip = F32(clip)
    lo, hi, amax = (np.asarray(v, dtype=np.float32) for v in (lo, hi, amax))
    with np.errstate(over="ignore", invalid="ignore"):
        if fmt.scheme == "asymmetric":
            lo_c = (np.minimum(lo, F32(0)) * clip).astype(np.float32)
            hi_c = (np.maximum(hi, F32(0)) * clip).astype(np.float32)
            scale = ((hi_c - lo_c) / F32(fmt.qmax)).astype(np.float32)
            # A range wider than float32 (hi - lo overflows): divide first, then subtract.
            split = ((hi_c / F32(fmt.qmax)).astype(np.float32)
                     - (lo_c / F32(fmt.qmax)).astype(np.float32)).astype(np.float32)
            scale = np.where(np.isinf(scale), split, scale).astype(np.float32)
        elif fmt.scheme == "symmetric":
            scale = ((amax * clip).astype(np.float32) / F32(fmt.qmax)).astype(np.float32)
        else:
            scale = (amax * clip).astype(np.float32)
        scale = np.where(scale >= FLT_MIN, scale, F32(0)).astype(np.float32)
        inv = inverse_scale(scale)
        if fmt.scheme == "asymmetric":
            zero = np.clip(np.rint((-lo_c * inv).astype(np.float32)), 0, fmt.qmax).astype(np.float32)
        else:
            zero = np.zeros_like(scale)
    return scale, zero


def codes_of(fmt: Fmt, x: np.ndarray, inv: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Integer codes (int32, signed for symmetric) of float32 x with broadcastable inv/zero."""
    v = (x.astype(np.float32) * inv.astype(np.float32)).astype(np.float32)
    if fmt.scheme == "nf4":
        return np.searchsorted(NF4_MIDPOINTS, v, side="left").astype(np.int32)
    q = (np.rint(v).astype(np.float32) + zero.astype(np.float32)).astype(np.float32)
    return np.clip(q, fmt.qmin, fmt.qmax).astype(np.int32)


def _expand(a: np.ndarray, g: int, K: int) -> np.ndarray:
    """[rows, G] per-group values -> [rows, K] per element (the last group may be ragged)."""
    return np.repeat(a, g, axis=1)[:, :K]


def group_ranges(x: np.ndarray, g: int):
    """Per-group min, max and max|x| of x [rows, K] (float32), the last group ragged."""
    rows, K = x.shape
    G = (K + g - 1) // g
    pad = G * g - K
    lo_src = np.pad(x, ((0, 0), (0, pad)), constant_values=np.inf).reshape(rows, G, g)
    hi_src = np.pad(x, ((0, 0), (0, pad)), constant_values=-np.inf).reshape(rows, G, g)
    ab_src = np.pad(np.abs(x), ((0, 0), (0, pad)), constant_values=0).reshape(rows, G, g)
    return lo_src.min(axis=2), hi_src.max(axis=2), ab_src.max(axis=2)


@dataclass
class RefQuant:
    codes: np.ndarray          # int32 [rows, K]: the integer codes, unpacked (signed when symmetric)
    scales: np.ndarray         # float32 [rows, G] ([1, 1] per tensor)
    zeros: Optional[np.ndarray]  # uint8 [rows, G] ([1, 1] per tensor) for asymmetric, else None
    fmt: Fmt

    def stored_codes(self) -> np.ndarray:
        """The codes as lowbit stores them: 8-bit one per byte (int8 when symmetric, else uint8),
        fewer bits two per byte (element 2j in the low nibble of byte j, symmetric as 4-bit two's
        complement, an odd row's last high nibble 0)."""
        if self.fmt.bits == 8:
            return self.codes.astype(np.int8 if self.fmt.scheme == "symmetric" else np.uint8)
        return pack_nibbles(self.codes)


def quantize(w32: np.ndarray, bits: int, group_size, scheme: str, clip: float = 1.0,
             scales=None, zeros=None) -> RefQuant:
    """w32: float32 [rows, K] values (convert fp16/bf16 inputs with to_f32 first)."""
    fmt = Fmt(bits, scheme, group_size)
    x = np.ascontiguousarray(w32, dtype=np.float32)
    rows, K = x.shape
    g = fmt.group_len(K)
    if scales is not None:
        scale = np.asarray(scales, dtype=np.float32).reshape(-1, 1) if group_size == "tensor" \
            else np.asarray(scales, dtype=np.float32)
        zero = (np.zeros_like(scale) if zeros is None
                else np.asarray(zeros, dtype=np.float32).reshape(scale.shape))
        if group_size == "tensor":
            scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
    elif group_size == "tensor":
        lo, hi = x.min(), x.max()
        scale, zero = params_from_range(fmt, lo, hi, max(abs(lo), abs(hi)), clip)
        scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
    else:
        lo, hi, amax = group_ranges(x, g)
        scale, zero = params_from_range(fmt, lo, hi, amax, clip)
    inv = inverse_scale(scale)
    if group_size == "tensor":
        inv_e, zero_e = np.broadcast_to(inv, x.shape), np.broadcast_to(zero, x.shape)
    else:
        inv_e, zero_e = _expand(inv, g, K), _expand(zero, g, K)
    q = codes_of(fmt, x, inv_e, zero_e)
    zeros_out = zero.astype(np.uint8) if scheme == "asymmetric" else None
    return RefQuant(q, scale.astype(np.float32), zeros_out, fmt)


def dequantize(ref: RefQuant, K: Optional[int] = None) -> np.ndarray:
    """float32 [rows, K]: (q - zero) * scale, q * scale or NF4[q] * scale, one float32 multiply."""
    fmt, q = ref.fmt, ref.codes
    rows, K = q.shape
    g = fmt.group_len(K)
    if fmt.group_size == "tensor":
        s = np.broadcast_to(ref.scales.reshape(1, 1), q.shape)
        z = np.broadcast_to((ref.zeros if ref.zeros is not None else np.zeros((1, 1))).reshape(1, 1), q.shape)
    else:
        s = _expand(ref.scales, g, K)
        z = _expand(ref.zeros, g, K) if ref.zeros is not None else np.zeros(q.shape)
    if fmt.scheme == "nf4":
        base = NF4_VALUES[q]
    elif fmt.scheme == "symmetric":
        base = q.astype(np.float32)
    else:
        base = (q.astype(np.int32) - z.astype(np.int32)).astype(np.float32)
    with np.errstate(over="ignore"):
        return (base * s.astype(np.float32)).astype(np.float32)


def dequantize_as(ref: RefQuant, dtype: str) -> np.ndarray:
    """dequantize() rounded to the output dtype: float32 / float16 arrays, bfloat16 as uint16 bits."""
    out = dequantize(ref)
    if dtype == "float32":
        return out
    if dtype == "float16":
        return f32_to_f16(out)
    return f32_to_bf16_bits(out)


# ------------------------------------------------------------------------------------------------
# Nibble packing

def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Integer codes in [-8, 15] [rows, K] -> uint8 [rows, ceil(K/2)]; element 2j in the low
    nibble of byte j (negative codes as 4-bit two's complement); odd K leaves the last high nibble 0."""
    c = np.asarray(codes).astype(np.int64) & 0xF
    rows, K = c.shape
    if K % 2:
        c = np.concatenate([c, np.zeros((rows, 1), np.int64)], axis=1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, K: int, signed: bool = False) -> np.ndarray:
    p = np.asarray(packed, dtype=np.uint8).astype(np.int64)
    out = np.empty((p.shape[0], 2 * p.shape[1]), np.int64)
    out[:, 0::2] = p & 0xF
    out[:, 1::2] = p >> 4
    out = out[:, :K]
    if signed:
        out = np.where(out >= 8, out - 16, out)
        return out.astype(np.int8)
    return out.astype(np.uint8)
