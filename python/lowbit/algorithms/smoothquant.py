"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

For the Linears reading one input x: s_j = max|x_j|^α / max|W_·j|^(1−α) (max over the stage's
weights), x/s folded into the producing norm where exact (else kept as an input scale), weights
W·s quantized int8 per output channel (symmetric), activations quantized dynamically per token to
int8 (simulated with lowbit.fake_quantize in a forward pre-hook). With search_alpha, each stage
picks its own α from a grid by the W8A8 output error on sampled calibration rows (α = config.alpha
is on the grid's candidates, so the search never does worse there than the fixed α).
"""
from __future__ import annotations

from typing import Dict

import torch

from ..ops import fake_quantize
from .common import LayerResult, fake_quant_tokens, find_linears, quantize_weight
from .config import SmoothQuantConfig
from .sequential import Stage, quantize_sequential, try_fold


def smooth_scales(act_absmax: torch.Tensor, weights, alpha: float) -> torch.Tensor:
    wmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)
    amax = act_absmax.float()
    s = amax.clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return torch.where(amax > 0, s.clamp(min=1e-5), torch.ones_like(s))


def w8a8_error(x: torch.Tensor, weights, s: torch.Tensor, config: SmoothQuantConfig) -> float:
    """Σ over the stage's Linears of ‖Q_tok(x/s) Q_w(W·s)ᵀ − x Wᵀ‖² on rows x [m, K]."""
    xq = x / s[None, :]
    if config.act_bits is not None:
        xq = fake_quant_tokens(xq, config.act_bits)
    err = 0.0
    for w in weights:
        wq = fake_quantize((w * s[None, :]).contiguous(), config.weight_bits, None, True)
        err += float((xq @ wq.t() - x @ w.t()).square().sum(dtype=torch.float64))
    return err


def choose_alpha(stage: Stage, amax: torch.Tensor, weights, config: SmoothQuantConfig) -> float:
    if not config.search_alpha or stage.x is None:
        return config.alpha
    grid = sorted(set(torch.linspace(0.0, 1.0, config.n_grid).tolist()) | {config.alpha})
    errs = {a: w8a8_error(stage.x, weights, smooth_scales(amax, weights, a), config) for a in grid}
    return min(errs, key=errs.get)


def smoothquant_stage(stage: Stage, config: SmoothQuantConfig) -> Dict[str, LayerResult]:
    amax = stage.stats[stage.names[0]].abs_max
    weights = [stage.linears[n].weight.detach().float() for n in stage.names]
    s = smooth_scales(amax, weights, choose_alpha(stage, amax, weights, config))
    folded = config.fold and try_fold(stage, s)
    return {n: LayerResult(quantize_weight(w * s[None, :], config.weight_bits, None, True),
                           input_scale=s.clone(), scale_folded=folded, act_bits=config.act_bits)
            for n, w in zip(stage.names, weights)}


def smoothquant_quantize(model, calibration_data, config: SmoothQuantConfig,
                         progress=None) -> Dict[str, LayerResult]:
    return quantize_sequential(model, calibration_data, find_linears(model, config.skip),
                               lambda st: smoothquant_stage(st, config),
                               sample_rows=config.max_tokens if config.search_alpha else 0,
                               lockstep=config.lockstep,
                               lockstep_max_gib=config.lockstep_max_gib,
                               progress=progress, desc="SmoothQuant")
