"""The CUDA route of lowbit.matmul: fused W4A16 and W8A8 tensor-core GEMMs (lowbit._cuda).

    y = matmul_cuda(x, qt, bias=None, act_bits=None)    # == x @ dequantize(qt).T + bias

x: a torch tensor or CuPy array on a CUDA device, float16 or bfloat16, shape [..., K]; qt a
QuantizedTensor on the same device. Output [..., N] in x's dtype, framework and device.
  * 4-bit uniform weights (symmetric or zero-point, any group size, per-row) and act_bits None:
    W4A16 — per-group dequantization inside the GEMM, fp32 accumulation.
  * 8-bit per-channel weights (group_size=None) and act_bits=8: W8A8 — x's rows are quantized to
    int8 per token inside the call by lowbit.quantize's rule (bits=8, symmetric, one group per row),
    then s8 x s8 -> s32 tensor-core products and a per-token x per-channel scale epilogue.
  * W4A16 from W4A16_DENSE_MIN_M rows of x: the weight is dequantized to x's dtype (the same
    rounding of (u - z)·s as the fused kernel's) into a temporary array from the caller's
    allocator and multiplied by the framework's matmul (cuBLAS): the fused kernel (mma.sync,
    64 x 64 tiles, no wgmma) is 4-6x slower than cuBLAS at prefill sizes.
Everything runs on the caller's current stream and never synchronizes. The weights are prepacked
once into the kernels' layout and cached on qt (see _packed); the split-K workspace and the
activation scratch are allocated here, through the caller's framework (its caching allocator).
"""
from __future__ import annotations

from typing import Any, Optional

from . import _ext, _interop, ops
from .tensor import QuantizedTensor

_CACHE_ATTR = "_lowbit_packed"  # dict on the QuantizedTensor: layout key -> packed arrays
# W4A16 rows of x from which dequantize + cuBLAS beats the fused kernel. H100, fp16, eager calls,
# µs fused -> dense (bench/results_bench/h100_cuda_gemm.json): M = 128: N×K = 4096² 69 -> 122,
# 11008×4096 130 -> 142, 14336×4096 157 -> 115; M = 256: 118 -> 136, 236 -> 101, 287 -> 128;
# M = 2048: 587 -> 142, 1473 -> 349, 1905 -> 418.
W4A16_DENSE_MIN_M = 256


def _data_ptr(a: Any) -> int:
    if _interop.framework_of(a) == "torch":
        return int(a.data_ptr())
    return int(a.data.ptr)


def _packed(qt: QuantizedTensor, mod, layout: str, act_dtype: str, stream: int):
    """(weights, params) of qt in `layout`, prepacked on first use and cached on qt under a key of
    layout name + version + device (+ activation dtype for W4A16, whose params hold x-dtype
    scales) + the identity of the source arrays, so replacing qt.codes repacks."""
    name, version = mod.W4A16_LAYOUT if layout == "w4a16" else mod.W8A8_LAYOUT
    srcs = (qt.codes, qt.scales, qt.zeros)
    key = (name, int(version), qt.device, act_dtype if layout == "w4a16" else "",
           tuple(_data_ptr(a) if a is not None else 0 for a in srcs))
    cache = qt.__dict__.setdefault(_CACHE_ATTR, {})
    hit = cache.get(key)
    if hit is not None:
        return hit
    N, K = qt.shape
    codes = _interop.contiguous(qt.codes)
    scales = _interop.contiguous(qt.scales)
    zeros = None if qt.zeros is None else _interop.contiguous(qt.zeros)
    if layout == "w4a16":
        g = qt.format.kernel_group_size(K)
        n_words, n_params = mod.w4a16_sizes(N, K, g)
        weights = _interop.empty(codes, (n_words,), "int32")
        params = _interop.empty(codes, (n_params,), "int32")
        mod.w4a16_prepack(codes, scales, zeros, weights, params, N, K, g, act_dtype, stream=stream)
    else:
        n_words, n_params, _ = mod.w8a8_sizes(N, K)
        weights = _interop.empty(codes, (n_words,), "int32")
        params = _interop.empty(codes, (n_params,), "int32")
        mod.w8a8_prepack(codes, scales, zeros, weights, params, N, K, stream=stream)
    # Drop packings of arrays qt no longer holds (their pointers are gone from every key).
    for k in [k for k in cache if k[:4] == key[:4]]:
        del cache[k]
    cache[key] = (weights, params)
    return weights, params


def _check(x: Any, qt: QuantizedTensor, bias: Any, act_bits: Optional[int]):
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if not _interop._is_framework_array(x):
        raise TypeError(f"x must be a torch tensor or CuPy array on a CUDA device, got {type(x).__name__}")
    dev = _interop.device_of(x)
    if dev[0] != "cuda":
        raise ValueError(f"x is on {_interop.describe_device(dev)}; the CUDA matmul takes CUDA arrays "
                         "(use lowbit.matmul, which picks the CPU kernels for CPU arrays)")
    dt = _interop.dtype_name(x)
    if dt not in ("float16", "bfloat16"):
        raise TypeError(f"x must be float16 or bfloat16 for the CUDA GEMMs, got {dt} "
                        "(cast x, e.g. x.half() or x.bfloat16())")
    qt.validate()
    qdev = _interop.device_of(qt.codes)
    if qdev != dev:
        raise ValueError(f"qt is on {_interop.describe_device(qdev)} but x is on "
                         f"{_interop.describe_device(dev)}; put them on one device")
    N, K = qt.shape
    if len(x.shape) < 1 or int(x.shape[-1]) != K:
        raise ValueError(f"x must have shape [..., {K}] to multiply a [{N}, {K}] QuantizedTensor, "
                         f"got {tuple(x.shape)}")
    if act_bits not in (None, 8):
        raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
    f = qt.format
    if f.codebook is not None:
        raise NotImplementedError("the CUDA GEMMs take uniform int4/int8 weights; nf4 is not supported yet")
    if f.group_size == "tensor":
        raise NotImplementedError("per-tensor formats are not supported by the CUDA GEMMs; "
                                  "quantize with group_size=None (per row) instead")
    if f.bits == 4:
        if act_bits == 8:
            raise NotImplementedError("W4A8 is not implemented on CUDA; use act_bits=None (W4A16)")
        kind = "w4a16"
    elif f.bits == 8:
        if act_bits != 8:
            raise NotImplementedError("8-bit weights on CUDA need act_bits=8 (W8A8)")
        if f.group_size is not None:
            raise NotImplementedError("W8A8 needs per-channel weights (group_size=None), got "
                                      f"group_size={f.group_size}")
        kind = "w8a8"
    else:
        raise NotImplementedError(f"the CUDA GEMMs take 4- or 8-bit weights, got bits={f.bits}")
    if bias is not None:
        if not _interop._is_framework_array(bias):
            raise TypeError(f"bias must be an array on x's device, got {type(bias).__name__}")
        if _interop.device_of(bias) != dev:
            raise ValueError(f"bias is on {_interop.describe_device(_interop.device_of(bias))} but x is on "
                             f"{_interop.describe_device(dev)}; put them on one device")
        if tuple(int(s) for s in bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    return kind, dev, dt


def _dense(x2: Any, w: Any, bias: Any, dt: str) -> Any:
    """x2 @ w.T (+ bias) by the framework's matmul, in x's dtype."""
    if _interop.framework_of(x2) == "torch":
        import torch

        b = None if bias is None else _interop.asarray_like(x2, bias, dt)
        return torch.nn.functional.linear(x2, w, b)
    y = x2 @ w.T
    if bias is not None:
        y += _interop.asarray_like(x2, bias, dt)
    return y


def matmul_cuda(x: Any, qt: QuantizedTensor, bias: Any = None, act_bits: Optional[int] = None) -> Any:
    """x @ dequantize(qt).T (+ bias) on the GPU; see the module docstring."""
    kind, dev, dt = _check(x, qt, bias, act_bits)
    mod = _ext.cuda("matmul")
    N, K = qt.shape
    lead = tuple(int(s) for s in x.shape[:-1])
    M = 1
    for s in lead:
        M *= s
    stream = _interop.cuda_stream(x)
    y = _interop.empty(x, (M, N), dt)
    if M == 0:
        return y.reshape(lead + (N,))
    x2 = _interop.contiguous(x.reshape(M, K))
    b = None if bias is None else _interop.asarray_like(x, bias, "float32")
    if kind == "w4a16" and M >= W4A16_DENSE_MIN_M:
        return _dense(x2, ops.dequantize(qt, dtype=dt), bias, dt).reshape(lead + (N,))
    weights, params = _packed(qt, mod, kind, dt, stream)
    if kind == "w4a16":
        g = qt.format.kernel_group_size(K)
        splits, ws_words = mod.w4a16_plan(M, N, K, dev[1])
        ws = _interop.empty(x, (ws_words,), "float32") if splits > 1 else None
        mod.w4a16_gemm(x2, weights, params, b, y, ws, N, K, g, stream=stream)
    else:
        _, _, row_bytes = mod.w8a8_sizes(N, K)
        splits, ws_words = mod.w8a8_plan(M, N, K, dev[1])
        ws = _interop.empty(x, (ws_words,), "int32") if splits > 1 else None
        xq = _interop.empty(x, (M, row_bytes), "int8")
        x_scale = _interop.empty(x, (M,), "float32")
        x_sum = _interop.empty(x, (M,), "int32")
        mod.w8a8_gemm(x2, weights, params, b, y, xq, x_scale, x_sum, ws, N, K, stream=stream)
    return y.reshape(lead + (N,))
