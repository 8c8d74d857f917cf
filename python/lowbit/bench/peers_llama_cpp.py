"""llama.cpp peer: Q4_0 and Q8_0 mul_mat through the ggml library bundled with llama-cpp-python."""
from __future__ import annotations

from typing import List

from .measure import Unavailable
from .ours import Case


def methods(case: Case, threads: int) -> List:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return [Unavailable("llama.cpp", "not installed (pip install llama-cpp-python, which compiles llama.cpp)")]
    return []
