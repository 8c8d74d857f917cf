"""The benchmarked weight (one per layer shape) and lowbit's own matmul kernels on it."""
from __future__ import annotations

import functools
import importlib.util
from typing import List

import numpy as np

from .. import ops
from ..tensor import QuantizedTensor
from .measure import Method


class Case:
    """A random [N, K] float32 weight and its lowbit quantizations, shared by ours and the peers
    (peers that take a given int4/int8 format get these exact codes, so outputs are comparable)."""

    def __init__(self, K: int, N: int, seed: int = 0):
        self.K, self.N = K, N
        self.w = (np.random.default_rng(seed).standard_normal((N, K)) * 0.05).astype(np.float32)

    @functools.cached_property
    def int4_g128(self) -> QuantizedTensor:  # asymmetric, the common GPTQ/AWQ format
        return ops.quantize(self.w, bits=4, group_size=self.group(128))

    @functools.cached_property
    def int4_g32(self) -> QuantizedTensor:
        return ops.quantize(self.w, bits=4, group_size=self.group(32))

    @functools.cached_property
    def int8_per_channel(self) -> QuantizedTensor:  # symmetric, one scale per output row
        return ops.quantize(self.w, bits=8, group_size=None, symmetric=True)

    def group(self, g: int) -> int:
        """g, or a smaller power of two dividing K (small layers, test shapes)."""
        while self.K % g:
            g //= 2
        return g


def _copy(qt: QuantizedTensor) -> QuantizedTensor:
    return QuantizedTensor(*[None if a is None else np.copy(a) for a in (qt.codes, qt.scales, qt.zeros)],
                           qt.shape, qt.format)


def _lowbit(name: str, qt: QuantizedTensor, act_bits, bf16_x: bool = False, act_granularity: str = "token") -> Method:
    def make_weight():
        q = _copy(qt)
        ops.matmul(np.zeros((1, qt.shape[1]), np.float32), q)  # prepacks (cached on q), untimed
        return q

    compute = "int8" if act_bits == 8 else "bf16" if bf16_x else "fp32"
    extra = {}
    if bf16_x:
        import torch
        extra = dict(prepare_x=lambda x: torch.from_numpy(x).to(torch.bfloat16),
                     to_numpy=lambda y: y.float().numpy())
    return Method(name, weight_bytes=int(ops._packed_weight(qt).nbytes), compute=compute,
                  make_weight=make_weight,
                  run=lambda x, q: ops.matmul(x, q, act_bits=act_bits, act_granularity=act_granularity),
                  ours=True, reference=qt, **extra)


def _quant_linear(name: str, qt: QuantizedTensor, act_bits) -> Method:
    """The drop-in path a framework takes: lowbit.nn.QuantLinear called on torch tensors (its
    per-call Python work included, as torch's own F.linear rows include theirs). Listed like a
    peer: its ratio to the kernel rows (numpy in, numpy out) is what the torch module costs."""
    import torch
    from ..nn import QuantLinear

    def make_weight():
        m = QuantLinear.from_quantized(_copy(qt), act_bits=act_bits)
        m(torch.zeros(1, qt.shape[1]))  # prepacks, untimed
        return m

    return Method(name, weight_bytes=int(ops._packed_weight(qt).nbytes), compute="int8" if act_bits == 8 else "fp32",
                  make_weight=make_weight, run=lambda x, m: m(x), prepare_x=torch.from_numpy,
                  to_numpy=lambda y: y.numpy(), reference=qt)


def methods(case: Case) -> List[Method]:
    """Weight bytes are the prepacked buffer the kernel streams (codes, scales, zeros, column sums)."""
    g = case.group(128)
    out = [_lowbit(f"lowbit w4a8 int4 g{g}", case.int4_g128, 8),
           _lowbit(f"lowbit w4a8_g32 int4 g{case.group(32)}", case.int4_g32, 8),
           _lowbit(f"lowbit w4a8_xblk int4 g{g} (x per block)", case.int4_g128, 8, act_granularity="block"),
           _lowbit(f"lowbit w4a32 int4 g{g}", case.int4_g128, None),
           _lowbit("lowbit w8a8 int8 per-channel", case.int8_per_channel, 8),
           _lowbit("lowbit w8a32 int8 per-channel", case.int8_per_channel, None)]
    if importlib.util.find_spec("torch") is not None:  # bf16 activations come as torch tensors
        out.insert(2, _lowbit(f"lowbit w4a16 int4 g{g} (bf16 x)", case.int4_g128, None, bf16_x=True))
        out.insert(1, _quant_linear(f"lowbit QuantLinear w4a8 int4 g{g}", case.int4_g128, 8))
    return out
