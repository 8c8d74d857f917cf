"""Helpers shared by the importers/exporters: QuantizedTensor <-> plain unsigned code matrices.

Everything here is numpy on the host; the public functions convert inputs with `host()` and build
results as numpy arrays. A checkpoint format and lowbit differ only in *layout* (how codes are
packed) when the formats coincide, so conversions are exact integer reshuffles: no dequantize.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import _interop
from ..tensor import QuantFormat, QuantizedTensor


def host(x: Any, name: str) -> np.ndarray:
    """x (numpy / torch / CuPy / sequence) as a numpy array; bfloat16 is widened to float32."""
    if _interop._is_framework_array(x):
        return np.asarray(_interop.to_numpy(x))
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 - anything that is not array-like
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from None


def require(a: np.ndarray, name: str, dtypes, ndim: int) -> None:
    if a.dtype.name not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(dtypes)}, got {a.dtype.name}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")


def exact_int(v: Any, what: str, lo: int = 0) -> int:
    """v (a number read from a file's metadata or config) as an int >= lo. Only integers pass:
    int() would truncate 16.7 to 16, overflow on 1e400 (JSON's inf), and take True for 1."""
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v < lo:
        raise ValueError(f"{what} must be an integer >= {lo}, got {v!r}")
    return int(v)


def require_nonempty(where: str, **arrays: np.ndarray) -> None:
    """An imported weight needs at least one input channel, output channel and group: with none,
    the group arithmetic divides by zero or reduces an empty array."""
    for name, a in arrays.items():
        if a.size == 0:
            raise ValueError(f"{where}: {name} is empty (shape {a.shape}); an imported weight needs at "
                             f"least one input channel, output channel and group")


def unsigned_codes(qt: QuantizedTensor) -> np.ndarray:
    """The codes of a uniform-grid QuantizedTensor as an int32 [rows, K] matrix in
    [0, 2^bits - 1]: symmetric codes are offset by 2^(bits-1), so w = (q - 2^(bits-1)) * scale."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"expected a QuantizedTensor, got {type(qt).__name__}")
    if qt.format.codebook is not None:
        raise ValueError(f"{qt.format.name} uses a codebook; the checkpoint formats hold uniform integer grids")
    qt.validate()
    rows, K = qt.shape
    codes = host(qt.codes, "codes")
    if qt.bits == 8:
        q = codes.astype(np.int32)
    else:
        nib = np.empty((rows, 2 * codes.shape[1]), np.int32)
        nib[:, 0::2] = codes & 0xF
        nib[:, 1::2] = codes >> 4
        q = nib[:, :K]
        if qt.symmetric:  # 4-bit two's complement
            q = np.where(q >= 8, q - 16, q)
    if qt.symmetric:
        q = q + (1 << (qt.bits - 1))
    return np.ascontiguousarray(q, dtype=np.int32)


def params(qt: QuantizedTensor):
    """(scales float32 [rows, G], zeros int32 [rows, G]) with per-tensor formats broadcast to
    every row and symmetric formats given their implicit zero 2^(bits-1)."""
    rows, K = qt.shape
    s = host(qt.scales, "scales").astype(np.float32)
    if qt.format.group_size == "tensor":
        s = np.broadcast_to(s.reshape(1, 1), (rows, 1))
    if qt.symmetric:
        z = np.full(s.shape, 1 << (qt.bits - 1), np.int32)
    else:
        z = host(qt.zeros, "zeros").astype(np.int32)
        if qt.format.group_size == "tensor":
            z = np.broadcast_to(z.reshape(1, 1), (rows, 1))
    return np.ascontiguousarray(s), np.ascontiguousarray(z)


def kernel_group_size(qt: QuantizedTensor) -> int:
    return qt.format.kernel_group_size(qt.shape[1])


def make_qt(q: np.ndarray, scales: np.ndarray, zeros: Optional[np.ndarray], bits: int,
            group_size: Optional[int], symmetric: bool) -> QuantizedTensor:
    """A QuantizedTensor from unsigned codes q [rows, K] in [0, 2^bits - 1], float32 scales
    [rows, G] and integer zeros [rows, G]. symmetric=True requires every zero to be 2^(bits-1)
    (the caller checks) and stores q - 2^(bits-1) as signed codes, with no zeros."""
    rows, K = q.shape
    mid = 1 << (bits - 1)
    if symmetric:
        signed = q.astype(np.int32) - mid
        if bits == 8:
            codes = signed.astype(np.int8)
        else:
            codes = pack_nibbles(signed & 0xF)
        z = None
    else:
        codes = q.astype(np.uint8) if bits == 8 else pack_nibbles(q)
        z = np.ascontiguousarray(zeros, dtype=np.uint8)
    fmt = QuantFormat(bits=bits, symmetric=symmetric, group_size=group_size)
    qt = QuantizedTensor(codes, np.ascontiguousarray(scales, dtype=np.float32), z, (rows, K), fmt)
    qt.validate()
    return qt


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """lowbit's nibble layout: element 2j in the low nibble of byte j (K odd: last high nibble 0)."""
    rows, K = q.shape
    q = q.astype(np.uint8)
    if K % 2:
        q = np.concatenate([q, np.zeros((rows, 1), np.uint8)], axis=1)
    return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))


def pack_int32(q: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Pack unsigned codes into int32 words along `axis`, 32/bits consecutive codes per word.
    Bit field f (bits f*bits .. f*bits+bits-1) holds code order[f] of its chunk; order=None means
    field f holds code f (the lowest field the lowest index)."""
    per = 32 // bits
    q = np.moveaxis(q.astype(np.uint32), axis, -1)
    if q.shape[-1] % per:
        raise ValueError(f"length {q.shape[-1]} along the packed axis is not a multiple of {per}")
    chunks = q.reshape(*q.shape[:-1], q.shape[-1] // per, per)
    if order is not None:
        chunks = chunks[..., list(order)]
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    words = np.bitwise_or.reduce(chunks << shifts, axis=-1).astype(np.uint32)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


def unpack_int32(words: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Inverse of pack_int32: int32 words -> int32 codes, 32/bits per word along `axis`."""
    per = 32 // bits
    w = np.moveaxis(words.astype(np.int32).view(np.uint32), axis, -1)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    fields = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    if order is not None:
        out = np.empty_like(fields)
        out[..., list(order)] = fields
        fields = out
    q = fields.reshape(*w.shape[:-1], w.shape[-1] * per).astype(np.int32)
    return np.ascontiguousarray(np.moveaxis(q, -1, axis))


def fp16_scales(s: np.ndarray, what: str) -> np.ndarray:
    """float32 scales rounded to float16 (round to nearest even) for formats that store fp16;
    a scale beyond float16's range is an error, not a silent inf, and so is a nonzero scale below
    its normal range, which would become 0 or a subnormal with few significant bits."""
    h = s.astype(np.float16)
    bad = np.isfinite(s) & ~np.isfinite(h)
    if bad.any():
        raise ValueError(f"{what}: a scale ({float(s[bad].reshape(-1)[0])}) overflows float16")
    tiny = np.finfo(np.float16).tiny  # 2^-14, the smallest normal float16
    small = (s != 0) & (np.abs(s) < tiny)
    if small.any():
        raise ValueError(f"{what}: a nonzero scale ({float(s[small].reshape(-1)[0])}) is below float16's "
                         f"normal range (smallest normal {float(tiny):.4g}); stored as float16 it would "
                         f"be flushed to zero or lose precision as a subnormal")
    return h
