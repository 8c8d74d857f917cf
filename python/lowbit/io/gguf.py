"""GGUF (llama.cpp) Q4_0 / Q8_0 tensors <-> QuantizedTensor, without requantizing.

Rows are split into blocks of 32 along K (ggml's ne[0]); each block holds
  Q8_0 (34 bytes): fp16 d, then 32 int8 codes q          w = q * d
  Q4_0 (18 bytes): fp16 d, then 16 bytes; byte j holds element j in its low nibble and element
                   j + 16 in its high nibble, codes q in [0, 15]        w = (q - 8) * d
So Q8_0 is lowbit int8 symmetric g32 and Q4_0 is lowbit int4 symmetric g32 with signed code
q - 8, both with scale d (fp16 -> float32 is exact; d may be negative: ggml's Q4_0 quantizer uses
the signed extreme). Export rounds lowbit's float32 scales to fp16. F32/F16 tensors are plain
arrays. Q4_K and the other k-quants keep non-integer minimums and are not a lowbit format:
reading one is an error unless unsupported="dequantize" (float32 via the gguf package) or "skip".
Reading and writing use the `gguf` package (pip install gguf).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..tensor import QuantizedTensor
from . import _common as C

BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF support needs the gguf package: pip install gguf") from None
    return gguf


def _reader(path: str):
    """A GGUFReader that tolerates a short file while indexing, so that the truncated tensor can be
    named afterwards (the stock reader fails inside numpy with a reshape error)."""
    gguf = _gguf()

    class _Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            itemsize = np.dtype(dtype).itemsize
            if offset + itemsize * int(count) > len(self.data):
                return np.zeros(int(count), dtype=dtype)
            return super()._get(offset, dtype, count, override_order)

    size = os.path.getsize(path)
    try:
        r = _Reader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises assorted errors on garbage
        raise ValueError(f"{path}: not a readable GGUF file, or its header is truncated/corrupted ({e})") from None
    for t in r.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path}: truncated file: tensor {t.name!r} ends at byte "
                             f"{t.data_offset + t.n_bytes} but the file has {size}")
    return r


def _q_from_blocks(blocks: np.ndarray, qtype: str, rows: int, K: int):
    """(unsigned codes [rows, K], fp16 scales [rows, K/32]) from raw block bytes [rows, nb * size]."""
    nb = K // BLOCK
    size = 34 if qtype == "Q8_0" else 18
    b = blocks.reshape(rows, nb, size)
    d = np.ascontiguousarray(b[:, :, :2]).view("<f2").reshape(rows, nb)
    if qtype == "Q8_0":
        q = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).astype(np.int32) + 128
    else:
        qs = b[:, :, 2:].astype(np.int32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # elements 0..15 low, 16..31 high
    return q.reshape(rows, K), d


def load_gguf(path: str, *, unsupported: str = "error") -> Dict[str, Any]:
    """Read a GGUF file: {name: QuantizedTensor} for Q4_0 / Q8_0 tensors (2-D, [rows, K] with K
    = ggml ne[0]), numpy arrays for F32/F16/integer tensors. unsupported: "error" (default),
    "dequantize" (float32 through the gguf package) or "skip" for any other tensor type."""
    if unsupported not in ("error", "dequantize", "skip"):
        raise ValueError(f"unsupported must be 'error', 'dequantize' or 'skip', got {unsupported!r}")
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    out: Dict[str, Any] = {}
    for t in _reader(path).tensors:
        kind = T(t.tensor_type).name
        dims = [int(v) for v in t.shape]  # ggml order: ne[0] (contiguous) first
        if kind in ("Q4_0", "Q8_0"):
            if len(dims) != 2:
                raise ValueError(f"{path}: tensor {t.name!r} ({kind}) has {len(dims)} dimensions; lowbit "
                                 f"imports 2-D quantized tensors")
            K, rows = dims
            q, d = _q_from_blocks(np.asarray(t.data), kind, rows, K)
            out[t.name] = C.make_qt(q, d.astype(np.float32), None, 8 if kind == "Q8_0" else 4, BLOCK, True)
        elif kind in ("F32", "F16", "F64", "I8", "I16", "I32", "I64"):
            out[t.name] = np.array(t.data)
        elif unsupported == "dequantize":
            out[t.name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(dims[::-1])
        elif unsupported == "error":
            raise ValueError(f"{path}: tensor {t.name!r} is GGUF type {kind}, which lowbit does not import "
                             f"(supported: Q4_0, Q8_0, F32, F16); pass unsupported='dequantize' or 'skip'")
    return out


def _blocks_from_qt(qt: QuantizedTensor, name: str):
    """(raw block bytes uint8 [rows, nb * size], GGML type name) for a lowbit tensor that is
    exactly Q4_0 or Q8_0: uniform symmetric int4/int8 (int4 asymmetric with every zero 8 too),
    group size 32."""
    f = qt.format
    rows, K = qt.shape
    s, z = C.params(qt)
    if f.codebook is not None or qt.bits not in (4, 8) or f.kernel_group_size(K) != BLOCK or K % BLOCK \
            or np.any(z != (1 << (qt.bits - 1))):
        raise ValueError(f"GGUF export of {name!r}: {f.name} with K={K} is neither Q4_0 nor Q8_0; quantize "
                         f"with bits=4 or 8, group_size=32, symmetric=True and K a multiple of 32")
    q = C.unsigned_codes(qt)
    nb = K // BLOCK
    d = C.fp16_scales(s, f"GGUF export of {name!r}").astype("<f2").view(np.uint8).reshape(rows, nb, 2)
    if qt.bits == 8:
        body = (q - 128).astype(np.int8).view(np.uint8).reshape(rows, nb, 32)
        kind = "Q8_0"
    else:
        qb = q.reshape(rows, nb, 32).astype(np.uint8)
        body = qb[:, :, :16] | (qb[:, :, 16:] << 4)
        kind = "Q4_0"
    return np.ascontiguousarray(np.concatenate([d, body], axis=2).reshape(rows, -1)), kind


def save_gguf(path: str, tensors: Mapping[str, Any], *, arch: str = "llama",
              metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write {name: QuantizedTensor | float32/float16 array} as a GGUF file (via gguf.GGUFWriter),
    QuantizedTensors as Q4_0 / Q8_0 with scales rounded to fp16. metadata: extra string / int /
    float key-values. Written to a temporary file beside `path` and renamed into place."""
    gguf = _gguf()
    from .safetensors_io import atomic_path

    prepared = []
    for name, v in tensors.items():
        if isinstance(v, QuantizedTensor):
            data, kind = _blocks_from_qt(v, name)
            prepared.append((name, data, getattr(gguf.GGMLQuantizationType, kind)))
        else:
            a = np.ascontiguousarray(C.host(v, name))
            if a.dtype.name not in ("float32", "float16"):
                raise TypeError(f"GGUF export of {name!r}: plain tensors must be float32 or float16, got {a.dtype.name}")
            prepared.append((name, a, None))

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        for k, v in (metadata or {}).items():
            if isinstance(v, str):
                w.add_string(k, v)
            elif isinstance(v, (bool, np.bool_)):
                w.add_bool(k, bool(v))
            elif isinstance(v, (int, np.integer)):
                w.add_int64(k, int(v))
            else:
                w.add_float32(k, float(v))
        for name, data, raw in prepared:
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
