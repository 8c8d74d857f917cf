"""The primitives: quantize, dequantize, fake_quantize, pack_int4, unpack_int4.

Rounding convention (bit-exact on every CPU variant and GPU; float32 arithmetic throughout):
  inv_scale = 1 / scale, or 0 when scale < FLT_MIN (such a group quantizes to its zero point)
  asymmetric: lo = min(min(w_g), 0) * clip_ratio, hi = max(max(w_g), 0) * clip_ratio
              scale = (hi - lo) / (2^bits - 1)   (hi / (2^bits - 1) - lo / (2^bits - 1) when
                      hi - lo overflows float32, so the scale of finite weights is finite)
              zero = clamp(rint(-lo * inv_scale), 0, 2^bits - 1)
              q = clamp(rint(w * inv_scale) + zero, 0, 2^bits - 1)        w ≈ (q - zero) * scale
  symmetric : scale = max|w_g| * clip_ratio / (2^(bits-1) - 1)
              q = clamp(rint(w * inv_scale), -2^(bits-1), 2^(bits-1) - 1)  w ≈ q * scale
  nf4       : scale = max|w_g| * clip_ratio;  q = #{i : w * inv_scale > m_i}  w ≈ NF4[q] * scale
              (m_i: float32 midpoints of consecutive NF4 values)
rint rounds half to even. Groups run along the last axis K; when K is not a multiple of
group_size the last group of each row is shorter (a ragged group), never padded.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Optional

import numpy as np

from . import _ext, _interop
from .tensor import SCHEMES, GroupSize, QuantFormat, QuantizedTensor

_VALID_BITS = (2, 3, 4, 8)


def _backend(x: Any, name: str, checked: bool = False):
    """(module, kwargs) for the device x lives on. checked: on CUDA, also pass a small int32
    status buffer in which the kernel flags the bad input the CPU path raises for (see _raise_flagged)."""
    dev = _interop.device_of(x)
    if dev[0] == "cpu":
        return _ext.core(), {}
    kw = {"stream": _interop.cuda_stream(x)}
    if checked:
        kw["status"] = _interop.empty(x, (2,), "int32")
    return _ext.cuda(name), kw


def _raise_flagged(mod, kw) -> None:
    """Raise the CPU path's ValueError for what a CUDA kernel flagged (NaN/Inf, codes out of
    range). Reading the flags back waits for the kernel: the one synchronisation of these ops."""
    if "status" in kw:
        mod.check_status(_interop.to_numpy(kw["status"]).tolist())


def _check_same_device(name: str, a: Any, ref: Any, ref_name: str) -> None:
    da, dr = _interop.device_of(a), _interop.device_of(ref)
    if da != dr:
        raise ValueError(f"{name} is on {_interop.describe_device(da)} but {ref_name} is on "
                         f"{_interop.describe_device(dr)}; put them on one device")


def _format(bits: int, group_size: GroupSize, symmetric: bool, codebook: Optional[str]) -> QuantFormat:
    if codebook is not None:
        if codebook != "nf4":
            raise ValueError(f"codebook must be None or 'nf4', got {codebook!r}")
        if bits != 4:
            raise ValueError(f"the nf4 codebook has 4-bit codes; got bits={bits}")
        symmetric = True
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in _VALID_BITS:
        raise ValueError(f"bits must be one of {_VALID_BITS}, got {bits!r}")
    if group_size is not None and group_size != "tensor":
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
            raise TypeError(f"group_size must be an int, None (per row) or 'tensor', got {group_size!r}")
        if group_size <= 0 or group_size % 16:
            raise ValueError(f"group_size must be a positive multiple of 16 (e.g. 32, 64, 128), "
                             f"None (one group per row) or 'tensor'; got {group_size}")
        group_size = int(group_size)
    return QuantFormat(int(bits), bool(symmetric), group_size, codebook)


def _require_array(x: Any, name: str) -> None:
    if not _interop._is_framework_array(x):
        raise TypeError(f"{name} must be a numpy array, torch tensor or CuPy array, got {type(x).__name__}")


def _check_float_2d(w: Any, name: str) -> None:
    _require_array(w, name)
    if len(w.shape) != 2:
        raise ValueError(f"{name} must be 2-D [rows, K], got shape {tuple(w.shape)}")
    dt = _interop.dtype_name(w)
    if dt not in _interop.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dt}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)})")


def quantize(w: Any, bits: int = 4, group_size: GroupSize = 128, symmetric: bool = False, *,
             codebook: Optional[str] = None, clip_ratio: float = 1.0,
             scales: Any = None, zeros: Any = None) -> QuantizedTensor:
    """Quantize a 2-D [rows, K] float tensor (numpy, torch or CuPy; float32/float16/bfloat16),
    grouped along K. Returns a QuantizedTensor whose arrays are in w's framework and device.

    bits: 2, 3, 4 or 8. group_size: a multiple of 16 (a ragged last group when K is not a
    multiple), None for one group per row, "tensor" for one scale overall. symmetric: signed codes,
    no zero point. codebook="nf4": 4-bit NormalFloat. clip_ratio in (0, 1] shrinks the range.
    scales/zeros: caller-chosen parameters ([rows, groups], or [1, 1]/scalar for "tensor"); then
    only the codes are computed (GPTQ/AWQ use this). NaN or Inf in w raises ValueError.
    See the module docstring for the exact rounding rule.
    """
    _check_float_2d(w, "w")
    fmt = _format(bits, group_size, symmetric, codebook)
    if not (0.0 < float(clip_ratio) <= 1.0):
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    if zeros is not None and scales is None:
        raise ValueError("zeros were given without scales")
    if zeros is not None and fmt.scheme != "asymmetric":
        raise ValueError(f"zeros are only used by asymmetric formats, not {fmt.scheme}")
    if scales is not None and fmt.scheme == "asymmetric" and zeros is None:
        raise ValueError("asymmetric quantization with given scales needs zeros too")
    w = _interop.contiguous(w)
    rows, K = (int(s) for s in w.shape)
    G = fmt.num_groups(K)
    mod, stream = _backend(w, "quantize", checked=True)

    if scales is not None:
        scales_k = _given_param(w, scales, "scales", "float32", fmt, rows, G)
        zeros_k = _given_param(w, zeros, "zeros", "uint8", fmt, rows, G) if zeros is not None else None
        params_given = True
    elif fmt.group_size == "tensor":
        scales_k, zeros_k = _per_tensor_params(w, fmt, float(clip_ratio), rows)
        params_given = True
    else:
        scales_k = _interop.empty(w, (rows, G), "float32")
        zeros_k = _interop.empty(w, (rows, G), "uint8") if fmt.scheme == "asymmetric" else None
        params_given = False

    code_dtype = "int8" if (fmt.bits == 8 and fmt.scheme == "symmetric") else "uint8"
    codes = _interop.empty(w, (rows, K if fmt.bits == 8 else (K + 1) // 2), code_dtype)
    mod.quantize(w, scales_k, zeros_k, codes, fmt.bits, SCHEMES[fmt.scheme],
                 fmt.kernel_group_size(K), float(clip_ratio), params_given, **stream)
    _raise_flagged(mod, stream)
    if fmt.group_size == "tensor":  # store one scale (and zero), not one per row
        scales_k = scales_k[:1]
        zeros_k = zeros_k[:1] if zeros_k is not None else None
    return QuantizedTensor(codes, scales_k, zeros_k, (rows, K), fmt)


def fake_quantize(w: Any, bits: int = 4, group_size: GroupSize = 128, symmetric: bool = False, *,
                  codebook: Optional[str] = None, clip_ratio: float = 1.0,
                  scales: Any = None, zeros: Any = None) -> Any:
    """dequantize(quantize(w, ...)) as float32 in w's framework and device: the values w rounds
    to on its group grid ("fake quantization", as QAT and GPTQ use it). Same arguments and
    rounding as quantize; one call, without re-validating the QuantizedTensor it just made."""
    qt = quantize(w, bits, group_size, symmetric, codebook=codebook, clip_ratio=clip_ratio,
                  scales=scales, zeros=zeros)
    rows, K = qt.shape
    s, z = qt.scales, qt.zeros
    if qt.format.group_size == "tensor":
        s = _interop.asarray_like(qt.codes, _tile_rows(s, rows), "float32")
        z = _interop.asarray_like(qt.codes, _tile_rows(z, rows), "uint8") if z is not None else None
    out = _interop.empty(qt.codes, (rows, K), "float32")
    mod, stream = _backend(qt.codes, "dequantize")
    mod.dequantize(qt.codes, _interop.contiguous(s), None if z is None else _interop.contiguous(z),
                   out, qt.bits, SCHEMES[qt.format.scheme], qt.format.kernel_group_size(K), **stream)
    return out


def gptq_columns(w: Any, q: Any, err: Any, u: Any, begin: int, end: int, scales: Any, zeros: Any,
                 bits: int, symmetric: bool) -> None:
    """GPTQ's column loop on one lazy block, in place (CPU, float32; lowbit.algorithms.gptq uses it).
    w, q, err: [B, N], weight column i of the block as row i. For i in [begin, end): round w[i]
    with lowbit's rounding given scales/zeros ([N] for all those columns, or [end - begin, N] one
    row per column), q[i] = its values, err[i] = (w[i] - q[i]) / u[i, i], then
    w[j] -= u[i, j] * err[i] for every later j < B. u: [B, B], the block of the upper Cholesky
    factor of H⁻¹. Bad arguments raise (the C++ side checks dtypes, shapes, range and NaN/Inf)."""
    fmt = _format(bits, None, symmetric, None)
    for name, a in (("w", w), ("q", q), ("err", err), ("u", u), ("scales", scales)):
        _require_array(a, name)
        if _interop.device_of(a)[0] != "cpu":
            raise ValueError(f"gptq_columns runs on the CPU; {name} is on "
                             f"{_interop.describe_device(_interop.device_of(a))}")
    _ext.core().gptq_columns(w, q, err, u, int(begin), int(end), scales, zeros, fmt.bits,
                             SCHEMES[fmt.scheme])


def gram_update(h: Any, x: Any) -> None:
    """h += xᵀx on and above the diagonal, in place (CPU, float32: the calibration Hessian's sum;
    lowbit.algorithms uses it): h[i, j] += Σ_t x[t, i]·x[t, j] for j >= i, while entries below the
    diagonal are left unspecified (mirror the upper triangle once the sum is complete).
    x: [m, K] with contiguous rows, h: [K, K] contiguous; numpy or torch."""
    for name, a in (("h", h), ("x", x)):
        _require_array(a, name)
        if _interop.device_of(a)[0] != "cpu":
            raise ValueError(f"gram_update runs on the CPU; {name} is on "
                             f"{_interop.describe_device(_interop.device_of(a))}")
    _ext.core().gram_update(h, x)


def clip_search(w: Any, bits: int, group_size: GroupSize, symmetric: bool, ratios, col_weight: Any = None):
    """Per-group clip ratio of least squared round-trip error (CPU, float32 w [rows, K]): for each
    ratio c, quantize(w, clip_ratio=c) then dequantize, error Σ_k col_weight_k (w_k − ŵ_k)² per group
    (col_weight [K], default 1); the first c with the least error wins. Returns (scales, zeros,
    best_ratio), each [rows, groups] ([1, 1] for "tensor"; zeros None unless asymmetric), numpy or
    torch like w, ready for quantize(w, scales=, zeros=)."""
    fmt = _format(bits, group_size, symmetric, None)
    _check_float_2d(w, "w")
    if _interop.device_of(w)[0] != "cpu":
        raise ValueError("clip_search runs on the CPU; w is on "
                         f"{_interop.describe_device(_interop.device_of(w))}")
    rows, K = (int(d) for d in w.shape)
    w32 = _interop.to_numpy(w).astype(np.float32, copy=False)
    if fmt.group_size == "tensor":   # one group over the whole tensor: the same rule on one long row
        w32, rows, K = w32.reshape(1, rows * K), 1, rows * K
    w32 = np.ascontiguousarray(w32)
    G = fmt.num_groups(K)
    r = np.ascontiguousarray(np.asarray(ratios, np.float32).reshape(-1))
    cw = None if col_weight is None else np.ascontiguousarray(_interop.to_numpy(col_weight), np.float32).reshape(-1)
    scales = np.empty((rows, G), np.float32)
    best = np.empty((rows, G), np.float32)
    zeros = np.empty((rows, G), np.uint8) if fmt.scheme == "asymmetric" else None
    _ext.core().clip_search(w32, r, cw, scales, zeros, best, fmt.bits, SCHEMES[fmt.scheme],
                            fmt.kernel_group_size(K))
    wrap = (lambda a: a) if type(w) is np.ndarray else (lambda a: _interop.asarray_like(w, a, str(a.dtype)))
    return wrap(scales), None if zeros is None else wrap(zeros), wrap(best)


def _given_param(w, value, name, dtype, fmt, rows, G):
    """A caller-supplied scales/zeros as a contiguous [rows, G] array beside w. Values are checked
    here (zeros: integers in [0, 2^bits - 1]; scales: finite, >= 0) so nothing wraps silently."""
    # A numpy array is plain numbers for any w (copied to w's device); a framework tensor must
    # already be on w's device.
    tensor = _interop._is_framework_array(value) and not (
        type(value) is np.ndarray and _interop.device_of(w)[0] != "cpu")
    if tensor:
        _check_same_device(name, value, w, "w")
        if (fmt.group_size != "tensor" and _interop.dtype_name(value) == dtype
                and _interop.framework_of(value) == _interop.framework_of(w)
                and tuple(int(d) for d in value.shape) == (rows, G)):
            # Already the kernel's dtype and shape: nothing can wrap, and the compiled kernels
            # validate the values themselves (scales finite and >= 0, zeros <= 2^bits - 1), so
            # skip the host copy — GPTQ makes one such call per weight column.
            return _interop.contiguous(value)
        host = _interop.to_numpy(value)
    else:
        host = np.asarray(value)
    try:
        host = np.asarray(host, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numbers (an array or a scalar), got {type(value).__name__}") from None
    if fmt.group_size == "tensor":
        if host.size != 1:
            raise ValueError(f"{name} of a per-tensor format must hold one value, got {host.size}")
        host = np.full((rows, 1), host.reshape(-1)[0])
    if host.shape != (rows, G):
        raise ValueError(f"{name} must have shape {(rows, G)} for w of shape {tuple(w.shape)} "
                         f"and group_size={fmt.group_size}; got {host.shape}")
    if name == "zeros":
        qmax = (1 << fmt.bits) - 1
        if not (np.all(host == np.round(host)) and host.min() >= 0 and host.max() <= qmax):
            raise ValueError(f"zeros must be integers in [0, {qmax}] for {fmt.bits}-bit codes")
    elif not (np.all(np.isfinite(host)) and host.min() >= 0):
        raise ValueError("scales must be finite and >= 0")
    if tensor and fmt.group_size != "tensor":
        return _interop.asarray_like(w, value, dtype)  # stays on its device, no host round trip
    return _interop.asarray_like(w, host.astype(dtype), dtype)


def _per_tensor_params(w, fmt: QuantFormat, clip_ratio: float, rows: int):
    """One (scale, zero) for the whole tensor by the same scalar rule the kernels use."""
    # numpy reductions return numpy scalars (not arrays); torch/CuPy return 0-d arrays.
    lo, hi = (float(v) if isinstance(v, np.generic) else _interop.to_numpy(v).item()
              for v in (w.min(), w.max()))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("w contains NaN or Inf")
    scale, zero = _ext.core().group_params(fmt.bits, SCHEMES[fmt.scheme], clip_ratio, lo, hi,
                                           max(abs(lo), abs(hi)))
    scales = _interop.asarray_like(w, np.full((rows, 1), scale, np.float32), "float32")
    zeros = (_interop.asarray_like(w, np.full((rows, 1), zero, np.uint8), "uint8")
             if fmt.scheme == "asymmetric" else None)
    return scales, zeros


def dequantize(qt: QuantizedTensor, dtype: Optional[str] = None) -> Any:
    """The float [rows, K] matrix a QuantizedTensor stands for, in its framework and device.
    dtype: "float32" (default), "float16" or "bfloat16" (a torch dtype is accepted too)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    out_dtype = "float32" if dtype is None else _dtype_name(dtype)
    if out_dtype not in _interop.FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    qt.validate()
    rows, K = qt.shape
    scales, zeros = qt.scales, qt.zeros
    if qt.format.group_size == "tensor":
        scales = _interop.asarray_like(qt.codes, _tile_rows(scales, rows), "float32")
        zeros = _interop.asarray_like(qt.codes, _tile_rows(zeros, rows), "uint8") if zeros is not None else None
    out = _interop.empty(qt.codes, (rows, K), out_dtype)
    mod, stream = _backend(qt.codes, "dequantize")
    mod.dequantize(_interop.contiguous(qt.codes), _interop.contiguous(scales),
                   None if zeros is None else _interop.contiguous(zeros), out, qt.bits,
                   SCHEMES[qt.format.scheme], qt.format.kernel_group_size(K), **stream)
    return out


def _dtype_name(dtype: Any) -> str:
    """'float16' from 'float16', np.float16, np.dtype('float16') or torch.float16."""
    if isinstance(dtype, str) or type(dtype).__module__.startswith("torch"):
        return str(dtype).replace("torch.", "")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _tile_rows(a, rows):
    fw = _interop.framework_of(a)
    if fw == "torch":
        return a.reshape(1, 1).expand(rows, 1)
    if fw == "cupy":
        import cupy

        return cupy.broadcast_to(a.reshape(1, 1), (rows, 1))
    return np.broadcast_to(a.reshape(1, 1), (rows, 1))


def pack_int4(codes: Any) -> Any:
    """Pack 4-bit codes two per byte along the last axis: element 2j goes to the low nibble of
    byte j. codes: uint8 in [0, 15] or int8 in [-8, 7] (stored as two's complement nibbles),
    shape [rows, K] or [K]; K may be odd (the last high nibble is 0). Returns uint8 [rows, ceil(K/2)]."""
    _require_array(codes, "codes")
    dt = _interop.dtype_name(codes)
    if dt not in ("uint8", "int8"):
        raise TypeError(f"codes must be uint8 or int8, got {dt}")
    one_d = len(codes.shape) == 1
    c2 = codes.reshape(1, -1) if one_d else codes
    if len(c2.shape) != 2:
        raise ValueError(f"codes must be 1-D or 2-D, got shape {tuple(codes.shape)}")
    if 0 in tuple(c2.shape):
        raise ValueError("codes is empty")
    c2 = _interop.contiguous(c2)
    rows, K = (int(s) for s in c2.shape)
    packed = _interop.empty(c2, (rows, (K + 1) // 2), "uint8")
    mod, stream = _backend(c2, "pack_int4", checked=True)
    mod.pack_int4(c2, packed, **stream)
    _raise_flagged(mod, stream)
    return packed.reshape(-1) if one_d else packed


def unpack_int4(packed: Any, K: Optional[int] = None, signed: bool = False) -> Any:
    """Inverse of pack_int4: uint8 [rows, ceil(K/2)] -> [rows, K] codes, uint8 in [0, 15], or
    int8 in [-8, 7] with signed=True. K defaults to 2 * packed.shape[-1]."""
    _require_array(packed, "packed")
    if _interop.dtype_name(packed) != "uint8":
        raise TypeError(f"packed must be uint8, got {_interop.dtype_name(packed)}")
    one_d = len(packed.shape) == 1
    p2 = packed.reshape(1, -1) if one_d else packed
    if len(p2.shape) != 2:
        raise ValueError(f"packed must be 1-D or 2-D, got shape {tuple(packed.shape)}")
    rows, nb = (int(s) for s in p2.shape)
    if rows == 0 or nb == 0:
        raise ValueError(f"packed is empty (shape {tuple(packed.shape)})")
    if K is not None and (isinstance(K, bool) or not isinstance(K, (int, np.integer))):
        raise TypeError(f"K must be an int or None, got {K!r}")
    K = 2 * nb if K is None else int(K)
    if K <= 0 or (K + 1) // 2 != nb:
        raise ValueError(f"K={K} does not match packed rows of {nb} bytes (need K in {{{2 * nb - 1}, {2 * nb}}})")
    p2 = _interop.contiguous(p2)
    out = _interop.empty(p2, (rows, K), "int8" if signed else "uint8")
    mod, stream = _backend(p2, "unpack_int4")
    mod.unpack_int4(p2, out, **stream)
    return out.reshape(-1) if one_d else out


_PACK_ATTR = "_lowbit_packed"  # cache on the QuantizedTensor: {(layout, version): packed uint8 buffer}


def _packed_weight(qt: QuantizedTensor):
    """qt prepacked for the CPU kernels, built once per QuantizedTensor and cached on it (the
    cache key names the layout and its version, so a newer layout never reads a stale buffer).
    None when no packed kernel takes this format (bits 2/3, or a group size that is not a
    multiple of 32)."""
    layout = _ext.core().packed_layout()
    cache = qt.__dict__.get(_PACK_ATTR)
    if cache is None:
        cache = qt.__dict__[_PACK_ATTR] = {}
    elif layout in cache:
        return cache[layout]
    rows, K = qt.shape
    g = qt.format.kernel_group_size(K)
    if qt.bits not in (4, 8) or (g < K and g % 32):
        cache[layout] = None
        return None
    codes, scales, zeros = (None if a is None else np.ascontiguousarray(_interop.to_numpy(a))
                            for a in (qt.codes, qt.scales, qt.zeros))
    if qt.format.group_size == "tensor":
        scales = np.ascontiguousarray(_tile_rows(scales, rows))
        zeros = np.ascontiguousarray(_tile_rows(zeros, rows)) if zeros is not None else None
    cache[layout] = _ext.core().pack_linear(codes, scales, zeros, rows, K, qt.bits,
                                            SCHEMES[qt.format.scheme], g)
    return cache[layout]


def _fake_quant_act(x64: np.ndarray, block: Optional[int] = None) -> np.ndarray:
    """Dynamic int8 rounding of [M, K] rows, the rule of the kernels (float32 steps): one scale per
    row, or per block of `block` elements along K (the last block of a row may be shorter)."""
    x32 = x64.astype(np.float32)
    M, K = x32.shape
    b = K if block is None else min(int(block), K)
    nb = -(-K // b)
    xp = np.zeros((M, nb * b), np.float32)
    xp[:, :K] = x32
    xp = xp.reshape(M, nb, b)
    s = (np.abs(xp).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(s >= np.finfo(np.float32).tiny, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xp * inv), -127, 127).astype(np.float32) * s
    return q.reshape(M, nb * b)[:, :K]


_DTYPE_NAMES: dict = {}  # (array type, dtype object) -> name; _interop.dtype_name costs ~15 µs


def _x_dtype_name(x: Any) -> str:
    key = (type(x), getattr(x, "dtype", None))
    name = _DTYPE_NAMES.get(key)
    if name is None:
        name = _interop.dtype_name(x)  # TypeError for anything that is not a framework array
        _DTYPE_NAMES[key] = name
    return name


ACT_GRANULARITIES = ("token", "block")
_NUMPY_X_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_TORCH_X_DTYPES: tuple = ()  # torch's float32 / bfloat16 / float16, once torch is in use


def _plain_cpu_x(x: Any, K: int) -> bool:
    """x is a contiguous, non-empty [M, K] numpy array or CPU torch tensor (not requiring grad)
    of a dtype the packed kernels take: matmul's fast path."""
    global _TORCH_X_DTYPES
    if type(x) is np.ndarray:
        return x.dtype in _NUMPY_X_DTYPES and x.ndim == 2 and x.shape[1] == K and x.shape[0] > 0 and x.flags.c_contiguous
    torch = sys.modules.get("torch")
    if torch is None or type(x) is not torch.Tensor:
        return False
    if not _TORCH_X_DTYPES:
        _TORCH_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    return (x.dtype in _TORCH_X_DTYPES and x.is_cpu and x.dim() == 2 and x.shape[1] == K and x.shape[0] > 0
            and not x.requires_grad and x.is_contiguous())


def matmul(x: Any, qt: QuantizedTensor, bias: Any = None, act_bits: Optional[int] = None,
           act_granularity: str = "token") -> Any:
    """y = x @ dequantize(qt).T (+ bias), for x [..., K] (float32, bfloat16 or float16; numpy or
    torch on the CPU; torch/CuPy float16/bfloat16 on CUDA) and qt a quantized [N, K] weight. Returns [..., N] in x's dtype.
    act_bits=8 quantizes x to int8 on the fly and multiplies with integer dot products (W8A8 /
    W4A8; nf4 weights use the rounded activations in float). act_granularity picks the scales:
    "token", one per row of x (max|x_row|/127); "block", one per row and per group of qt along K
    (the K-blocks of qt's group_size, as llama.cpp's Q8_0 activations), which bounds the damage
    an outlier channel does to the rest of its row.
    The weight is prepacked on first use and the packed copy cached on qt."""
    # The per-call Python work is kept to a few µs (decode calls are ~100 µs in all): qt.validate
    # and the packed weight are cached on qt, dtype names per dtype object.
    if (bias is None and act_granularity == "token" and (act_bits is None or type(act_bits) is int)
            and type(qt) is QuantizedTensor and type(qt.codes) is np.ndarray and _plain_cpu_x(x, qt.shape[1])):
        # the common CPU call (a contiguous numpy / torch [M, K] of a kernel dtype, no bias):
        # straight to the packed kernel, which checks NaN/Inf and act_bits itself (int4, N = 4,
        # K = 576, µs a call: numpy 4.0-4.2 -> 3.3-3.8, torch 8.9-9.4 -> 7.3-7.8); anything else,
        # errors included, takes the checks below
        qt.validate()
        packed = _packed_weight(qt)
        if packed is not None:
            return _matmul_packed(x, packed, None, qt.shape[0], act_bits, False)
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if act_bits is not None and (isinstance(act_bits, bool) or not isinstance(act_bits, (int, np.integer))
                                 or act_bits != 8):  # not 8.0 or True either
        raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
    if act_granularity not in ACT_GRANULARITIES:
        raise ValueError(f"act_granularity must be one of {ACT_GRANULARITIES}, got {act_granularity!r}")
    per_block = act_granularity == "block"
    if per_block and act_bits is None:
        raise ValueError('act_granularity="block" quantizes activations: it needs act_bits=8')
    if not hasattr(x, "shape") or len(x.shape) < 1:
        raise ValueError("x must be an array of shape [..., K]")
    dt = _x_dtype_name(x)
    if dt not in _interop.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {dt}")
    N, K = qt.shape
    if int(x.shape[-1]) != K:
        raise ValueError(f"x has {x.shape[-1]} features (last axis) but the weight expects K={K} "
                         f"(weight shape [N, K] = {list(qt.shape)})")
    lead = tuple(x.shape[:-1])  # ints already (numpy, torch.Size, CuPy)
    M = math.prod(lead)
    if M == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    numpy_x = isinstance(x, np.ndarray)
    if numpy_x and type(x) is not np.ndarray:
        x = _interop.plain_ndarray(x, "x")
    dev = ("cpu", -1) if numpy_x else _interop.device_of(x)
    if dev[0] != "cpu":
        from .ops_cuda import matmul_cuda  # tensor-core kernels (fp16/bf16 activations)

        if per_block:
            raise NotImplementedError('act_granularity="block" is not implemented on CUDA')
        return matmul_cuda(x, qt, bias, act_bits)
    if type(qt.codes) is not np.ndarray and _interop.device_of(qt.codes) != dev:
        _check_same_device("qt", qt.codes, x, "x")  # raises, naming both devices
    qt.validate()
    if bias is not None:
        _check_same_device("bias", bias, x, "x")
        if tuple(int(s) for s in bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        bias = _interop.asarray_like(x, bias, dt)
    x2 = _interop.contiguous(x if len(x.shape) == 2 else x.reshape(M, K))
    packed = _packed_weight(qt)
    if packed is None:
        return _matmul_unpacked(x2, qt, bias, act_bits, per_block, lead, dt)
    out = _matmul_packed(x2, packed, bias, N, act_bits, per_block)
    return out if len(lead) == 1 else out.reshape(*lead, N)


def _matmul_packed(x2, packed, bias, N: int, act_bits: Optional[int], per_block: bool):
    """The packed CPU kernel: [M, N] = x2 [M, K] (contiguous numpy, or torch on the CPU; its
    shape, dtype and NaN/Inf are checked by the C++ side) against a packed weight, bias (None, or
    [N] in x2's framework and dtype, or a numpy view of it) fused. The C++ side reads numpy and
    torch arrays through their own attributes (~1 µs an array; torch's __dlpack__ costs more)."""
    out = x2.new_empty((x2.shape[0], N)) if not isinstance(x2, np.ndarray) else np.empty((x2.shape[0], N), x2.dtype)
    _ext.core().matmul(x2, packed, bias, out, 0 if act_bits is None else act_bits, per_block)
    return out


def _matmul_unpacked(x2, qt, bias, act_bits, per_block, lead, dt):
    """Formats no packed kernel takes (2/3-bit codes, group sizes not a multiple of 32): a plain
    float64 product with the dequantized weight. Correct, not fast."""
    x64 = _interop.to_numpy(x2).astype(np.float64)
    if not np.all(np.isfinite(x64)):
        raise ValueError("x contains NaN or Inf")
    if act_bits == 8:
        block = qt.format.kernel_group_size(qt.shape[1]) if per_block else None
        x64 = _fake_quant_act(x64, block).astype(np.float64)
    y = x64 @ _interop.to_numpy(dequantize(qt)).astype(np.float64).T
    if bias is not None:
        y = y + _interop.to_numpy(bias).astype(np.float64)
    out = _interop.asarray_like(x2, y.astype(np.float32), dt)
    return out.reshape(*lead, qt.shape[0])
