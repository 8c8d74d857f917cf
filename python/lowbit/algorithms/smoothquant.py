"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

For the Linears reading one input x: s_j = max|x_j|^α / max|W_·j|^(1−α) (max over the stage's
weights), x/s folded into the producing norm where exact (else kept as an input scale), weights
W·s quantized int8 per output channel (symmetric), activations quantized dynamically per token to
int8 (simulated with lowbit.quantize/dequantize in a forward pre-hook).
"""
from __future__ import annotations

from typing import Dict

import torch

from .common import LayerResult, find_linears, quantize_weight
from .config import SmoothQuantConfig
from .sequential import Stage, quantize_sequential, try_fold


def smooth_scales(act_absmax: torch.Tensor, weights, alpha: float) -> torch.Tensor:
    wmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)
    amax = act_absmax.float()
    s = amax.clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return torch.where(amax > 0, s.clamp(min=1e-5), torch.ones_like(s))


def smoothquant_stage(stage: Stage, config: SmoothQuantConfig) -> Dict[str, LayerResult]:
    amax = stage.stats[stage.names[0]].abs_max
    s = smooth_scales(amax, [stage.linears[n].weight for n in stage.names], config.alpha)
    folded = config.fold and try_fold(stage, s)
    return {n: LayerResult(quantize_weight(stage.linears[n].weight.detach().float() * s[None, :],
                                           config.weight_bits, None, True),
                           input_scale=s.clone(), scale_folded=folded, act_bits=config.act_bits)
            for n in stage.names}


def smoothquant_quantize(model, calibration_data, config: SmoothQuantConfig) -> Dict[str, LayerResult]:
    return quantize_sequential(model, calibration_data, find_linears(model, config.skip),
                               lambda st: smoothquant_stage(st, config))
