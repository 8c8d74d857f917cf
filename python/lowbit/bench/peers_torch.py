"""PyTorch peers: F.linear in fp32 and bf16, dynamic int8 linear (fbgemm and onednn engines), and
the int4 and int8 weight-only kernels behind torchao's CPU int4 / int8 weight-only paths."""
from __future__ import annotations

import warnings
from typing import List, Union

import numpy as np

from .measure import Method, Unavailable
from .ours import Case

Entry = Union[Method, Unavailable]


def methods(case: Case) -> List[Entry]:
    try:
        import torch
    except ImportError:
        return [Unavailable("torch", "not installed (pip install torch)")]
    out: List[Entry] = _linear(torch, case)
    for engine in ("fbgemm", "onednn"):
        out.append(_guard(f"torch dynamic int8 ({engine})", lambda e=engine: _dynamic_int8(torch, case, e)))
    out.append(_guard("torch int4pack_mm bf16", lambda: _int4pack(torch, case)))
    out.append(_guard("torch int8pack_mm bf16", lambda: _int8pack(torch, case)))
    return out


def _guard(name, build) -> Entry:
    """build(), or Unavailable with the error when this torch build lacks the op or engine."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's quantized-tensor deprecation notices
            return build()
    except Exception as e:  # noqa: BLE001  (any failure means: not available here)
        return Unavailable(name, f"{type(e).__name__}: {e}")


def _linear(torch, case: Case) -> List[Method]:
    import torch.nn.functional as F

    w = torch.from_numpy(case.w)
    numel = case.N * case.K
    return [Method("torch fp32 F.linear", 4 * numel, "fp32", make_weight=w.clone, run=F.linear,
                   prepare_x=torch.from_numpy, to_numpy=lambda y: y.numpy()),
            Method("torch bf16 F.linear", 2 * numel, "bf16", make_weight=lambda: w.to(torch.bfloat16),
                   run=F.linear, prepare_x=lambda x: torch.from_numpy(x).to(torch.bfloat16),
                   to_numpy=lambda y: y.float().numpy())]


def _dynamic_int8(torch, case: Case, engine: str) -> Method:
    """Our int8 per-channel codes, prepacked by `engine`; activations quantized per tensor to uint8
    inside the call, with reduce_range=True as torch's dynamic Linear module calls it."""
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"engine {engine} is not compiled into this torch")
    qt = case.int8_per_channel
    codes = torch.from_numpy(np.asarray(qt.codes))
    scales = torch.from_numpy(np.asarray(qt.scales, np.float64).reshape(-1))

    def make_weight():
        wq = torch._make_per_channel_quantized_tensor(codes, scales, torch.zeros(case.N, dtype=torch.long), 0)
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine  # the packed weight remembers its engine
        try:
            return torch.ops.quantized.linear_prepack(wq, None)
        finally:
            torch.backends.quantized.engine = previous

    make_weight()
    return Method(f"torch dynamic int8 ({engine})", qt.nbytes, "int8", make_weight,
                  run=lambda x, p: torch.ops.quantized.linear_dynamic(x, p, True),
                  prepare_x=torch.from_numpy, to_numpy=lambda y: y.numpy(), reference=qt)


def _int4pack(torch, case: Case) -> Method:
    """Our int4 g128 codes. torch's rule is w = (q - 8) * scale + offset, so offset = (8 - zero) * scale."""
    qt = case.int4_g128
    from .. import ops

    codes = torch.from_numpy(np.asarray(ops.unpack_int4(qt.codes, case.K), np.int32))
    s, z = np.asarray(qt.scales), np.asarray(qt.zeros, np.float32)
    scales_offsets = torch.from_numpy(np.ascontiguousarray(np.stack([s, (8 - z) * s], -1).transpose(1, 0, 2)))
    scales_offsets = scales_offsets.to(torch.bfloat16)  # [K/g, N, 2]
    g = qt.format.kernel_group_size(case.K)

    def make_weight():
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2), scales_offsets.clone()

    make_weight()
    return Method("torch int4pack_mm bf16", case.N * case.K // 2 + scales_offsets.numel() * 2, "bf16",
                  make_weight, run=lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], g, w[1]),
                  prepare_x=lambda x: torch.from_numpy(x).to(torch.bfloat16),
                  to_numpy=lambda y: y.float().numpy(), reference=qt)


def _int8pack(torch, case: Case) -> Method:
    """Our int8 per-channel codes and scales. bfloat16 activations: torch's float32 variant of this
    kernel is about 10x slower on CPU (K = N = 4096, M = 1: 15.9 against 1.4 ms)."""
    qt = case.int8_per_channel
    codes = torch.from_numpy(np.asarray(qt.codes, np.int8))
    scales = torch.from_numpy(np.asarray(qt.scales, np.float32).reshape(-1)).to(torch.bfloat16)

    def make_weight():
        return codes.clone(), scales.clone()

    return Method("torch int8pack_mm bf16", case.N * case.K + case.N * 2, "bf16", make_weight,
                  run=lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1]),
                  prepare_x=lambda x: torch.from_numpy(x).to(torch.bfloat16),
                  to_numpy=lambda y: y.float().numpy(), reference=qt)
