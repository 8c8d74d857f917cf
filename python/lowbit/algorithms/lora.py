"""QLoRA-style low-rank adapters over a frozen quantized base (Dettmers et al. 2023).

    layer = LoRALinear(QuantLinear.from_linear(linear, bits=4, codebook="nf4", group_size=64), r=8, alpha=16)
    y = layer(x)        # base(x) + dropout(x) @ Aᵀ @ Bᵀ · alpha / r      (A, B float, trainable)
    merged, report = layer.merge()   # one QuantLinear of the same format holding base + B·A·scale

The base runs lowbit's quantized matmul (torch.ops.lowbit.matmul), whose backward gives the input
gradient grad_y @ dequantize(W), so gradients reach A and every earlier layer; the base weight is
frozen. A starts random (Kaiming uniform), B at zero, so a fresh adapter leaves the output unchanged.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn import QuantLinear, replace_module
from ..ops import dequantize, quantize


class LoRALinear(nn.Module):
    """Frozen QuantLinear base + trainable rank-r update scaled by alpha / r."""

    def __init__(self, base: QuantLinear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, QuantLinear):
            raise TypeError(f"base must be a lowbit.nn.QuantLinear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
        if not math.isfinite(alpha):      # nan / inf scaling turns every output into nan
            raise ValueError(f"alpha must be finite, got {alpha}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        dev = base.codes.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """B·A·scale [out, in] in the original input domain."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        d = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()
        return y + (d @ self.lora_B.t() * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> Tuple[QuantLinear, Dict[str, float]]:
        """Dequantize the base, add B·A·scale, re-quantize with the base's format (bits, group size,
        scheme, perm, input scale, act_bits and act_granularity kept). Returns (QuantLinear, report)
        where report holds the re-quantization error of the merged weight against dequantized base +
        B·A·scale (the exact merge target; the original float weights are not known here): max_abs,
        rel_fro, and the size of the update (delta_rel_fro = |BA·scale| / |base|)."""
        b = self.base
        qt = b.quantized_tensor()
        w_q = dequantize(qt)                                # [N, K] in the base's (x / s)[perm] domain
        delta = self.delta_weight().float()                 # original input domain
        if b.input_scale is not None:                       # y = (x/s) @ (W·s)ᵀ: map the update in
            delta = delta * b.input_scale[None, :]
        if b.perm is not None:
            delta = delta[:, b.perm]
        target = (w_q + delta).contiguous()
        f = qt.format
        new_qt = quantize(target, f.bits, f.group_size, f.symmetric, codebook=f.codebook)
        merged = QuantLinear.from_quantized(new_qt, None if b.bias is None else b.bias.detach(), perm=b.perm,
                                            input_scale=b.input_scale, act_bits=b.act_bits,
                                            act_granularity=b.act_granularity)
        err = dequantize(new_qt) - target
        report = {"max_abs": float(err.abs().max()),
                  "rel_fro": float(err.norm() / target.norm().clamp_min(1e-30)),
                  "delta_rel_fro": float(delta.norm() / w_q.norm().clamp_min(1e-30))}
        return merged, report

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target: Optional[Union[str, Sequence[str]]] = None) -> nn.Module:
    """Wrap the model's QuantLinears (those whose name ends with `target` — one name or a sequence
    of names — or all) in LoRALinear, in place, and freeze every other parameter. Returns the model.
    Layers already wrapped by a LoRALinear keep their adapter (r, alpha and trainability unchanged),
    so calling add_lora again only adds adapters to the layers not yet wrapped. Raises ValueError if
    target matches no QuantLinear (nothing is frozen then)."""
    if isinstance(target, str):         # one pattern, not a sequence of one-character patterns
        target = (target,)
    if target is not None:
        target = tuple(target)
        if not all(isinstance(t, str) for t in target):
            raise TypeError(f"target must be a str or a sequence of str, got {target!r}")
    if isinstance(model, QuantLinear):
        raise ValueError("add_lora wraps a model's submodules; wrap a lone QuantLinear with LoRALinear(layer)")

    def matches(n: str) -> bool:
        return target is None or any(n == t or n.endswith("." + t) for t in target)

    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    wrapped = {id(m.base) for m in adapters.values()}     # never nest an adapter on a .base
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)
             and id(m) not in wrapped and matches(n)]
    if not names and not any(matches(n) for n in adapters):
        raise ValueError(f"add_lora: no QuantLinear in the model matches target={target!r}"
                         if target is not None else "add_lora: the model holds no lowbit.nn.QuantLinear")
    keep = {id(p) for m in adapters.values() for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for n in names:
        replace_module(model, n, LoRALinear(model.get_submodule(n), r, alpha, dropout))
    return model
