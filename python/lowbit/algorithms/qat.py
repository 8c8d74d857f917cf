"""Quantization-aware training with lowbit's rounding.

Forward: the weight (and optionally the activation, per token, int8) is quantized and dequantized
by lowbit on a detached copy; backward: the straight-through estimator (gradient passed where the
value was not clipped). With learnable_scales the group scales are parameters trained LSQ-style
(Esser et al., 2019): ∂ŵ/∂s = (q − z) − w/s inside the range, (q − z) where clipped, with the
gradient scaled by 1/sqrt(numel · qmax). Zero points stay at their initial integers.

    model = prepare_qat(model, QATConfig(bits=4, group_size=64))
    ... train ...
    results = convert(model)     # {name: LayerResult}; model holds nn.Linear with dequantized weights
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from ..ops import fake_quantize, quantize
from .common import LayerResult, apply_simulated, fake_quant_tokens, find_linears, group_index
from .config import QATConfig


class _FakeQuantWeight(torch.autograd.Function):
    """Min-max group scales chosen by lowbit each step; identity gradient (no clipping occurs)."""

    @staticmethod
    def forward(ctx, w, bits, group_size, symmetric):
        return fake_quantize(w.detach().float().contiguous(), bits, group_size, symmetric).to(w.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None


class _FakeQuantLSQ(torch.autograd.Function):
    """Fixed-parameter fake quant with caller scales (LSQ); gradients for w (STE) and scales."""

    @staticmethod
    def forward(ctx, w, scales, zeros, bits, group_size, symmetric, gidx, grad_scale):
        s_pos = scales.detach().float().clamp(min=1e-8).contiguous()
        w_hat = fake_quantize(w.detach().float().contiguous(), bits, group_size, symmetric, scales=s_pos,
                              zeros=zeros)
        ctx.save_for_backward(w.detach().float(), w_hat, s_pos, gidx)
        ctx.grad_scale = grad_scale
        return w_hat.to(w.dtype)

    @staticmethod
    def backward(ctx, g):
        w, w_hat, s, gidx = ctx.saved_tensors
        s_full = s[:, gidx]
        v = w / s_full                    # where w sits on the grid
        qmz = w_hat / s_full              # q - zero (an integer, or the clip bound)
        inside = (v - qmz).abs() <= 0.5 + 1e-4
        g = g.float()
        grad_w = g * inside
        grad_s_el = g * torch.where(inside, qmz - v, qmz)
        grad_s = torch.zeros_like(s).index_add_(1, gidx, grad_s_el) * ctx.grad_scale
        return grad_w, grad_s, None, None, None, None, None, None


class _FakeQuantAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):
        return fake_quant_tokens(x, bits)

    @staticmethod
    def backward(ctx, g):
        return g, None


class QATLinear(nn.Linear):
    """nn.Linear whose forward uses fake-quantized weights (and activations)."""

    def __init__(self, linear: nn.Linear, config: QATConfig):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.config = config
        K = self.in_features
        self.register_buffer("gidx", group_index(K, config.group_size, self.weight.device), persistent=False)
        self.register_buffer("zeros", None)
        if config.learnable_scales:
            qt = quantize(self.weight.detach().float().contiguous(), config.bits, config.group_size, config.symmetric)
            self.scales = nn.Parameter(qt.scales.clone())
            if qt.zeros is not None:
                self.zeros = qt.zeros.clone()
            qmax = (1 << config.bits) - 1 if not config.symmetric else (1 << (config.bits - 1)) - 1
            self.grad_scale = 1.0 / math.sqrt(self.weight.numel() * qmax)

    def fake_weight(self) -> torch.Tensor:
        c = self.config
        if c.learnable_scales:
            return _FakeQuantLSQ.apply(self.weight, self.scales, self.zeros, c.bits, c.group_size,
                                       c.symmetric, self.gidx, self.grad_scale)
        return _FakeQuantWeight.apply(self.weight, c.bits, c.group_size, c.symmetric)

    def quantized(self):
        """The QuantizedTensor the current fake-quant forward uses."""
        c = self.config
        w = self.weight.detach().float().contiguous()
        if c.learnable_scales:
            return quantize(w, c.bits, c.group_size, c.symmetric,
                            scales=self.scales.detach().float().clamp(min=1e-8).contiguous(), zeros=self.zeros)
        return quantize(w, c.bits, c.group_size, c.symmetric)

    def forward(self, x):
        if self.config.act_bits is not None:
            x = _FakeQuantAct.apply(x, self.config.act_bits)
        return nn.functional.linear(x, self.fake_weight(), self.bias)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def prepare_qat(model: nn.Module, config: QATConfig) -> nn.Module:
    """Swap the model's Linears (minus config.skip) for QATLinear, in place; returns the model.
    A model already prepared with another config is refused (its layers would keep the old one)."""
    linears = find_linears(model, config.skip)
    other = [n for n, m in model.named_modules() if isinstance(m, QATLinear) and m.config != config]
    if other:
        raise ValueError(f"the model is already prepared for QAT with another config ({other[0]} and "
                         f"{len(other) - 1} more); convert() it, or prepare the float model")
    for name, lin in linears.items():
        if not isinstance(lin, QATLinear):
            _set_module(model, name, QATLinear(lin, config))
    return model


def convert(model: nn.Module) -> Dict[str, LayerResult]:
    """Quantize each QATLinear exactly as its forward does, put back a plain nn.Linear carrying the
    dequantized weight (simulated form, via apply_simulated), and return {name: LayerResult}."""
    results = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLinear):
            results[name] = LayerResult(m.quantized(), act_bits=m.config.act_bits)
            lin = nn.Linear(m.in_features, m.out_features, m.bias is not None,
                            device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight)
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            _set_module(model, name, lin)
    apply_simulated(model, results)
    return results
