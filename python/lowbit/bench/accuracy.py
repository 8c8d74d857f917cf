"""How far each method's output is from the float product with the same (dequantized) weights, on
activations with a few large channels as real models have, next to what rounding the activations
to int8 alone would cost."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .. import ops
from .measure import Method
from .ours import Case

OUTLIER_SCALE = 30.0  # outlier channels are this many times larger than the rest (LLM-like)


def outlier_activations(M: int, K: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K))
    x[:, rng.choice(K, size=max(2, K // 512), replace=False)] *= OUTLIER_SCALE
    return x.astype(np.float32)


def round_int8(x: np.ndarray, block: int = 0) -> np.ndarray:
    """The kernels' dynamic activation rule: symmetric int8, scale max|x| / 127 over each row, or
    over each block of `block` elements of a row (block > 0)."""
    out = np.empty_like(x)
    b = block or x.shape[1]
    for k0 in range(0, x.shape[1], b):
        xb = x[:, k0:k0 + b]
        s = np.abs(xb).max(axis=1, keepdims=True) / 127
        out[:, k0:k0 + b] = np.rint(xb / np.where(s > 0, s, 1)) * s
    return out


def round_per_tensor_uint8(x: np.ndarray) -> np.ndarray:
    """torch dynamic int8 / onnxruntime DynamicQuantizeMatMul: one asymmetric uint8 range for all of x."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / 255 or 1.0
    zero = np.rint(-lo / s)
    return (np.clip(np.rint(x / s) + zero, 0, 255) - zero) * s


def _rel_err(y, ref) -> float:
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


def measure(case: Case, methods: List[Method], M: int = 16) -> Dict[str, Dict[str, float]]:
    """{"<weight format>, <whose codes>": {method or rounding rule: relative error}} for every method
    that says which weight it multiplies by."""
    x = outlier_activations(M, case.K)
    x64 = x.astype(np.float64)
    out: Dict[str, Dict[str, float]] = {}
    for m in methods:
        if m.reference is None:
            continue
        w = np.asarray(ops.dequantize(m.reference), np.float64)
        ref = x64 @ w.T
        g = m.reference.format.kernel_group_size(case.K)
        section = out.setdefault(f"{m.reference.format.name}, {m.reference_origin}", {
            "(x rounded per token to int8, exact product)": _rel_err(round_int8(x64) @ w.T, ref),
            f"(x rounded per block of {g} to int8, exact product)": _rel_err(round_int8(x64, g) @ w.T, ref),
            "(x rounded per tensor to uint8, exact product)": _rel_err(round_per_tensor_uint8(x64) @ w.T, ref)})
        section[m.name] = _rel_err(m.to_numpy(m.run(m.prepare_x(x), m.make_weight())), ref)
    return out
