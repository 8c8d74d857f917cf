"""lowbit: int8/int4 quantization kernels for numpy, PyTorch and CuPy arrays.

    import lowbit as lb
    qt = lb.quantize(w, bits=4, group_size=128)    # w: [rows, K] float
    w_hat = lb.dequantize(qt)
"""
from __future__ import annotations

from . import _ext
from .ops import dequantize, fake_quantize, matmul, pack_int4, quantize, unpack_int4
from .tensor import QuantFormat, QuantizedTensor

__version__ = "0.1.0"
__all__ = ["quantize", "dequantize", "fake_quantize", "matmul", "pack_int4", "unpack_int4", "QuantizedTensor", "QuantFormat",
           "build_info", "set_num_threads", "get_num_threads", "save", "load",
           "QuantLinear", "quantize_dynamic", "save_quantized_model", "load_quantized_model"]

# torch integration (lowbit.nn, lowbit.torch_ops) is imported on first use: `import lowbit` stays torch-free.
_NN_NAMES = ("QuantLinear", "quantize_dynamic", "save_quantized_model", "load_quantized_model")


def __getattr__(name: str):
    # lowbit.save / lowbit.load live in lowbit.io, imported on first use (safetensors lazily too).
    if name in ("save", "load", "io"):
        import importlib

        io = importlib.import_module(".io", __name__)
        return io if name == "io" else getattr(io, name)
    if name in ("nn", "torch_ops") + _NN_NAMES:
        import importlib

        mod = importlib.import_module(".nn" if name in _NN_NAMES else f".{name}", __name__)
        return mod if name in ("nn", "torch_ops") else getattr(mod, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")

# A bad LOWBIT_ISA (unknown, or an ISA this CPU lacks) is reported here, at import.
try:
    _ext.core().get_isa()
except ValueError as e:
    raise ImportError(f"lowbit: {e} (check the LOWBIT_ISA environment variable)") from None


def build_info() -> dict:
    """What was compiled, what this CPU has, which CPU kernel variant runs, and CUDA status."""
    info = dict(_ext.core().build_info())
    info["version"] = __version__
    info["cuda"] = _ext.cuda_status()
    if info["cuda"]["loaded"]:
        info["cuda"].update(_ext.cuda().build_info())
    return info


def set_num_threads(n: int) -> None:
    """Threads used by lowbit's CPU kernels (default: the CPUs this process may run on, or
    LOWBIT_NUM_THREADS). Separate from torch's pool."""
    _ext.core().set_num_threads(int(n))


def get_num_threads() -> int:
    return _ext.core().get_num_threads()
