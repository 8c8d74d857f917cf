"""Loads the compiled extensions. _core (CPU) is always built; _cuda only when a CUDA toolkit was
found at build time, and it is imported lazily, when a CUDA array first reaches lowbit, so a
machine with no GPU or driver never touches it."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

from . import _core  # noqa: F401  (the CPU extension must be present)

_cuda_module = None
_cuda_error: Optional[str] = None


def core():
    return _core


def cuda(op: str = "this operation"):
    """The CUDA extension, or a RuntimeError saying why it is unavailable."""
    global _cuda_module, _cuda_error
    if _cuda_module is None and _cuda_error is None:
        try:
            _cuda_module = importlib.import_module("lowbit._cuda")
        except ImportError as e:
            _cuda_error = str(e)
    if _cuda_module is None:
        raise RuntimeError(f"lowbit.{op} got a CUDA array, but lowbit's CUDA extension is not "
                           f"available ({_cuda_error}); rebuild with a CUDA toolkit (LOWBIT_CUDA=ON)")
    return _cuda_module


def cuda_status() -> dict:
    """Whether the CUDA extension was built, without initialising CUDA."""
    spec = importlib.util.find_spec("lowbit._cuda")
    return {"built": spec is not None, "loaded": _cuda_module is not None,
            **({"error": _cuda_error} if _cuda_error else {})}
