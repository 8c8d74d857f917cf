"""What every algorithm produces (a LayerResult per Linear), the one function that applies results
to a torch model, and small shared helpers. All quantization goes through lowbit.ops."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..ops import dequantize, fake_quantize, quantize
from ..tensor import QuantizedTensor


@dataclass
class LayerResult:
    """The quantized form of one nn.Linear.

    qt          : the QuantizedTensor of the weight, in the layer's *input* domain described below.
    perm        : act-order permutation or None. qt's column k holds original input column perm[k].
    input_scale : per-input-channel s or None: the layer computes (x / s) @ dequantize(qt)ᵀ.
    scale_folded: True when 1/s was folded into the module producing x (the model's x is already
                  divided by s), so only the weight changes when applied.
    act_bits    : dynamic per-token activation bits (simulated), or None for weight-only.
    """
    qt: QuantizedTensor
    perm: Optional[torch.Tensor] = None
    input_scale: Optional[torch.Tensor] = None
    scale_folded: bool = False
    act_bits: Optional[int] = None

    @property
    def g_idx(self) -> Optional[torch.Tensor]:
        """Group index of each original input column (act-order export format), or None."""
        if self.perm is None or self.qt.group_size in (None, "tensor"):
            return None
        pos = torch.empty_like(self.perm)
        pos[self.perm] = torch.arange(self.perm.numel(), device=self.perm.device)
        return pos // int(self.qt.group_size)

    def weight(self) -> torch.Tensor:
        """dequantize(qt) with act-order undone: the weight the layer multiplies x/s by."""
        w = dequantize(self.qt)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        return w

    def effective_weight(self) -> torch.Tensor:
        """The float weight in the original input domain: y = x @ effective_weight()ᵀ (+ bias),
        up to activation rounding. Used to measure error against the unquantized layer."""
        w = self.weight()
        if self.input_scale is not None:
            w = w / self.input_scale.to(w)[None, :]
        return w


def fake_quant_tokens(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token symmetric quantize+dequantize of activations [..., K] via lowbit."""
    shape, dtype = x.shape, x.dtype
    x2 = x.detach().reshape(-1, shape[-1]).float().contiguous()
    return fake_quantize(x2, bits, None, True).reshape(shape).to(dtype)


def _input_hook(scale: Optional[torch.Tensor], act_bits: Optional[int]):
    def hook(module, args):
        x = args[0]
        if scale is not None:
            x = x / scale.to(x)
        if act_bits is not None:
            x = fake_quant_tokens(x, act_bits)
        return (x,) + tuple(args[1:])
    return hook


def apply_simulated(model: nn.Module, results: Dict[str, LayerResult]) -> nn.Module:
    """Replace each named Linear's weight by its dequantized weight (in place) and, where a result
    keeps an unfolded input scale or quantizes activations, add a forward pre-hook doing it.
    apply_quantized is the sibling that swaps in real quantized modules (lowbit.nn.QuantLinear)."""
    modules = dict(model.named_modules())
    for name, res in results.items():
        lin = modules[name]
        with torch.no_grad():
            lin.weight.copy_(res.weight().to(lin.weight))
        old = getattr(lin, "_lowbit_sim_hook", None)
        if old is not None:
            old.remove()
            lin._lowbit_sim_hook = None
        hook = simulated_input_hook(res)
        if hook is not None:
            lin._lowbit_sim_hook = lin.register_forward_pre_hook(hook)
    return model


def simulated_input_hook(res: LayerResult):
    """The forward pre-hook apply_simulated gives a Linear for res (unfolded input scale and/or
    activation rounding), or None when its input is used as is."""
    scale = None if (res.input_scale is None or res.scale_folded) else res.input_scale.detach().clone()
    if scale is None and res.act_bits is None:
        return None
    return _input_hook(scale, res.act_bits)


def apply_quantized(model: nn.Module, results: Dict[str, LayerResult]) -> nn.Module:
    """Replace each named Linear by a lowbit.nn.QuantLinear holding its result (codes, scales,
    zeros, act-order perm, unfolded input scale, act_bits) and the Linear's bias, in place. The
    forward runs lowbit's quantized matmul kernels instead of a dequantized float weight."""
    from ..nn import QuantLinear, replace_module

    for name, res in results.items():
        lin = model.get_submodule(name) if name else model
        q = QuantLinear.from_layer_result(res, lin)
        if name == "":
            return q
        replace_module(model, name, q)
    return model


def find_linears(module: nn.Module, skip: Sequence[str] = (), prefix: str = "") -> Dict[str, nn.Linear]:
    """Named nn.Linear submodules (names relative to `module`, prefixed), minus those whose full
    name matches a skip pattern (fnmatch; a pattern also matches any name ending in '.'+pattern)."""
    out = {}
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if any(fnmatch.fnmatch(full, p) or fnmatch.fnmatch(full, "*." + p) for p in skip):
            continue
        out[full] = m
    return out


def quantize_weight(w: torch.Tensor, bits: int, group_size, symmetric: bool, **kw) -> QuantizedTensor:
    return quantize(w.detach().float().contiguous(), bits, group_size, symmetric, **kw)


def group_index(K: int, group_size, device=None) -> torch.Tensor:
    """Group of each of K columns (ragged last group), for broadcasting [rows, G] -> [rows, K]."""
    g = K if group_size is None else int(group_size)
    return torch.arange(K, device=device) // g


def model_size_report(model: nn.Module, results: Dict[str, LayerResult]) -> dict:
    """Bytes of the model's parameters in float32 vs with the quantized Linear weights stored as
    codes + scales + zeros (other parameters, biases and input scales counted as float32). A weight
    tied to a module that stays in float (an embedding) stays counted in float32. Layers already
    swapped for lowbit.nn.QuantLinear (apply="quantized") count their own codes + scales + zeros +
    input scale, and out_features * in_features float32 on the float side. Result names must name
    Linear or QuantLinear layers of the model (ValueError otherwise)."""
    from ..nn import QuantLinear

    modules = dict(model.named_modules(remove_duplicate=False))
    bad = [n for n in results if not isinstance(modules.get(n), (nn.Linear, QuantLinear))]
    if bad:
        raise ValueError(f"results name layers that are not Linear / QuantLinear layers of the model: {bad}")

    def qbytes_of(qt, input_scale):
        return qt.nbytes + (input_scale.numel() * 4 if input_scale is not None else 0)

    layer_bytes = {n: qbytes_of(m.quantized_tensor(), m.input_scale) if isinstance(m, QuantLinear)
                   else qbytes_of(results[n].qt, None if results[n].scale_folded else results[n].input_scale)
                   for n, m in ((n, modules[n]) for n in results)}
    # a parameter leaves the float count only when every module holding it is a quantized Linear
    kept = {id(p) for n, m in modules.items() for pn, p in m.named_parameters(recurse=False)
            if not (n in results and pn == "weight" and isinstance(m, nn.Linear))}
    qlinears = {id(m): m for m in modules.values() if isinstance(m, QuantLinear)}
    float_bytes = (sum(p.numel() * 4 for p in model.parameters())
                   + sum(m.out_features * m.in_features * 4 for m in qlinears.values()))
    other = sum(p.numel() * 4 for p in model.parameters() if id(p) in kept)
    linear_bytes = {id(modules[n]): b for n, b in layer_bytes.items() if isinstance(modules[n], nn.Linear)}
    qbytes = (sum(linear_bytes.values())   # one entry per Linear, however many names it has
              + sum(qbytes_of(m.quantized_tensor(), m.input_scale) for m in qlinears.values()))
    layers = {n: {"format": r.qt.format.name, "shape": tuple(r.qt.shape), "bytes": layer_bytes[n],
                  "float32_bytes": r.qt.shape[0] * r.qt.shape[1] * 4} for n, r in results.items()}
    total = other + qbytes
    return {"float_bytes": float_bytes, "quantized_bytes": total,
            "compression": float_bytes / max(total, 1), "layers": layers}
