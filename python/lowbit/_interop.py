"""Framework interop: recognise numpy / torch / CuPy arrays, allocate results in the caller's
framework and on the caller's device, and find the caller's current CUDA stream.

Nothing here copies data except where a function says so. torch and CuPy are imported only when
the caller already uses them (their module is in sys.modules), so `import lowbit` needs numpy alone.
"""
from __future__ import annotations

import sys
from typing import Any, Tuple

import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def framework_of(x: Any) -> str:
    """'numpy', 'torch' or 'cupy'; TypeError for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    raise TypeError(f"expected a numpy array, torch tensor or CuPy array, got {type(x).__name__}")


def dtype_name(x: Any) -> str:
    fw = framework_of(x)
    if fw == "torch":
        return str(x.dtype).replace("torch.", "")
    if not x.dtype.isnative:   # the kernels (and DLPack) read native byte order only
        raise TypeError(f"arrays must be in native byte order, got dtype {x.dtype.str!r} "
                        "(convert with a.astype(a.dtype.newbyteorder('=')))")
    return np.dtype(x.dtype).name


def device_of(x: Any) -> Tuple[str, int]:
    """('cpu', -1) or ('cuda', index)."""
    fw = framework_of(x)
    if fw == "numpy":
        return ("cpu", -1)
    if fw == "torch":
        if x.device.type == "cpu":
            return ("cpu", -1)
        if x.device.type == "cuda":
            return ("cuda", x.device.index if x.device.index is not None else 0)
        raise ValueError(f"unsupported torch device {x.device}")
    return ("cuda", x.device.id)


def describe_device(dev: Tuple[str, int]) -> str:
    return "cpu" if dev[0] == "cpu" else f"cuda:{dev[1]}"


def empty(like: Any, shape, dtype: str) -> Any:
    """An uninitialised array of `shape`/`dtype` in the framework and on the device of `like`."""
    fw = framework_of(like)
    shape = tuple(int(s) for s in shape)
    if fw == "numpy":
        if dtype == "bfloat16":
            raise TypeError("numpy has no bfloat16; use float32/float16 or a torch tensor")
        return np.empty(shape, dtype=dtype)
    if fw == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    import cupy

    if dtype == "bfloat16":
        raise TypeError("CuPy has no bfloat16; use float32/float16 or a torch tensor")
    with like.device:
        return cupy.empty(shape, dtype=dtype)


def asarray_like(like: Any, value: Any, dtype: str) -> Any:
    """`value` (array of any framework, or a Python/numpy scalar or sequence) as a contiguous
    array of `dtype` in the framework and on the device of `like`. Copies only when needed."""
    fw = framework_of(like)
    if fw == "numpy":
        if not isinstance(value, np.ndarray) and _is_framework_array(value):
            value = to_numpy(value)
        return np.ascontiguousarray(value, dtype=dtype)
    if fw == "torch":
        import torch

        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(np.asarray(value) if not _is_framework_array(value) else to_numpy(value))
        return value.detach().to(device=like.device, dtype=getattr(torch, dtype)).contiguous()
    import cupy

    with like.device:
        return cupy.ascontiguousarray(cupy.asarray(value, dtype=dtype))


def plain_ndarray(x: np.ndarray, name: str) -> np.ndarray:
    """A numpy subclass (memmap, matrix) as a plain ndarray view; masked arrays are refused (their
    mask would be dropped silently)."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array: fill it (x.filled(0)) or pass x.data")
    return np.asarray(x)


def _is_framework_array(x: Any) -> bool:
    try:
        framework_of(x)
        return True
    except TypeError:
        return False


def to_numpy(x: Any) -> np.ndarray:
    """A numpy copy/view of any supported array (bfloat16 is widened to float32)."""
    fw = framework_of(x)
    if fw == "numpy":
        return x
    if fw == "torch":
        import torch

        t = x.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.cpu().numpy()
    return x.get()


def contiguous(x: Any) -> Any:
    """x itself when its rows are unit-stride, else a contiguous copy in the same framework.
    torch tensors come back detached: the kernels are outside autograd, and DLPack refuses
    tensors that require grad."""
    fw = framework_of(x)
    if fw == "torch":
        if x.requires_grad:
            x = x.detach()
        return x if x.is_contiguous() else x.contiguous()
    if fw == "numpy":
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)
    import cupy

    return x if x.flags.c_contiguous else cupy.ascontiguousarray(x)


def cuda_stream(x: Any) -> int:
    """The caller's current stream on x's device, as a DLPack stream value (1 = legacy default)."""
    fw = framework_of(x)
    if fw == "torch":
        import torch

        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # µs cheaper than current_stream
        index = x.device.index
        ptr = raw(0 if index is None else index) if raw else torch.cuda.current_stream(x.device).cuda_stream
    else:
        import cupy

        with x.device:
            ptr = cupy.cuda.get_current_stream().ptr
    return ptr if ptr else 1
