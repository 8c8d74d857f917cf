"""AWQ "GEMM" checkpoints (AutoAWQ) <-> QuantizedTensor, without requantizing.

Layout of one Linear with K inputs, N outputs, 4 bits:
  qweight int32 [K, N/8]  codes packed along N; bit field f (bits 4f..4f+3) of word c holds
                          column 8c + ORDER[f], ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  qzeros  int32 [G, N/8]  zero points, same packing (stored as is: no v1-style offset)
  scales  fp16  [G, N]
  meaning: w[n, k] = (q[k, n] - z[k // (K/G), n]) * scales[k // (K/G), n]
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from ..tensor import QuantizedTensor
from . import _common as C

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def from_awq(qweight: Any, qzeros: Any, scales: Any, *, symmetric: Optional[bool] = False,
             name: str = "weight") -> QuantizedTensor:
    """Import one AWQ GEMM Linear as a lowbit int4 QuantizedTensor [N, K]. AWQ is a zero-point
    format, so the default keeps explicit zeros (asymmetric); symmetric=None converts to lowbit
    symmetric when every zero is 8. The dequantized values are bit-identical either way."""
    where = f"AWQ tensor {name!r}"
    qw, qz, sc = C.host(qweight, "qweight"), C.host(qzeros, "qzeros"), C.host(scales, "scales")
    try:
        C.require(qw, "qweight", ("int32", "uint32"), 2)
        C.require(qz, "qzeros", ("int32", "uint32"), 2)
        C.require(sc, "scales", ("float16", "float32", "bfloat16"), 2)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
    C.require_nonempty(where, qweight=qw, scales=sc)
    K, N = qw.shape[0], qw.shape[1] * 8
    G = sc.shape[0]
    if sc.shape[1] != N:
        raise ValueError(f"{where}: scales {sc.shape} do not match qweight {qw.shape} (want [G, {N}])")
    if qz.shape != (G, N // 8):
        raise ValueError(f"{where}: qzeros {qz.shape} do not match (want [{G}, {N // 8}])")
    if G < 1 or K % G or (G > 1 and (K // G) % 16):
        raise ValueError(f"{where}: K={K} does not split into {G} groups of a multiple of 16")
    q = C.unpack_int32(qw, 4, axis=1, order=ORDER)        # [K, N]
    z = C.unpack_int32(qz, 4, axis=1, order=ORDER)        # [G, N]
    all_mid = bool(np.all(z == 8))
    if symmetric and not all_mid:
        raise ValueError(f"{where}: symmetric=True but the zero points are not all 8")
    sym = all_mid if symmetric is None else bool(symmetric)
    return C.make_qt(q.T, sc.astype(np.float32).T, z.T, 4, None if G == 1 else K // G, sym)


def to_awq(qt: QuantizedTensor) -> Dict[str, np.ndarray]:
    """Export a lowbit int4 QuantizedTensor [N, K] as AWQ GEMM arrays {qweight, qzeros, scales}
    (numpy). Scales are rounded to float16; symmetric tensors get zero 8."""
    if qt.bits != 4:
        raise ValueError(f"AWQ GEMM holds 4-bit codes; this tensor has {qt.bits} bits")
    q = C.unsigned_codes(qt)
    s, z = C.params(qt)
    N, K = qt.shape
    if N % 8:
        raise ValueError(f"AWQ packs 8 output channels per int32: N={N} must be a multiple of 8")
    if K % C.kernel_group_size(qt):
        raise ValueError(f"AWQ groups must divide K: K={K}, group size {C.kernel_group_size(qt)}")
    return {"qweight": C.pack_int32(q.T, 4, axis=1, order=ORDER),
            "qzeros": C.pack_int32(z.T, 4, axis=1, order=ORDER),
            "scales": C.fp16_scales(s.T, "AWQ export")}


def load_awq(path: str, *, symmetric: Optional[bool] = False) -> Dict[str, Any]:
    """Read an AWQ GEMM safetensors checkpoint: {layer prefix: QuantizedTensor} for every
    `<prefix>.qweight`, plus the other tensors as numpy arrays."""
    from .safetensors_io import read_raw

    tensors, _ = read_raw(path)
    out: Dict[str, Any] = {}
    used = set()
    for key in sorted(tensors):
        if not key.endswith(".qweight"):
            continue
        pre = key[: -len(".qweight")]
        for p in ("qzeros", "scales"):
            if f"{pre}.{p}" not in tensors:
                raise ValueError(f"AWQ tensor {pre!r}: {pre}.{p} is missing")
        out[pre] = from_awq(tensors[key], tensors[f"{pre}.qzeros"], tensors[f"{pre}.scales"],
                            symmetric=symmetric, name=pre)
        used.update({key, f"{pre}.qzeros", f"{pre}.scales"})
    for key, a in tensors.items():
        if key not in used:
            out[key] = a
    return out
