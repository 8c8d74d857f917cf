"""AWQ (Lin et al., 2023): activation-aware weight quantization.

For the Linears reading one input x (a stage, e.g. q/k/v after a norm): per-input-channel scales
s = mean|x|^α (normalized), α on a grid in [0, 1), chosen to minimize the summed layer-output error
‖x Wᵀ − (x/s) Q(W·s)ᵀ‖²; with duo scaling also s = mean|x|^α / w^(1−α), w the weights' magnitude
relative to their group's max (one family or both, by config). α = 0 of the first family
is plain round-to-nearest, so the search never does worse on the calibration rows. 1/s is folded into the module producing x when that is exact (checked
numerically), otherwise kept as the layer's input scale. Then, per group, a clip ratio is searched
that minimizes that group's contribution to the output error. All rounding is lowbit.quantize.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..ops import fake_quantize, quantize
from .common import LayerResult, find_linears
from .config import AWQConfig
from .observers import search_clip
from .sequential import Stage, quantize_sequential, try_fold


def _qdq(w, config: AWQConfig, **kw):
    return fake_quantize(w.contiguous(), config.bits, config.group_size, config.symmetric, **kw)


def weight_magnitude(weights: Dict[str, torch.Tensor], group_size) -> torch.Tensor:
    """Mean over the stage's output rows of |W| relative to its group's max|W|, per input channel
    (the weight term of duo scaling): channels whose weights sit near their group's max get
    smaller scales, so scaling them up does not widen the group's range."""
    w = torch.cat(list(weights.values()), dim=0).abs()
    gs = group_size if group_size is not None else w.shape[1]
    rel = torch.empty_like(w)
    for g in range(0, w.shape[1], gs):        # the last group may be shorter (ragged K)
        blk = w[:, g:g + gs]
        rel[:, g:g + gs] = blk / blk.amax(dim=1, keepdim=True).clamp(min=1e-12)
    return rel.mean(0)


def search_scales(x: torch.Tensor, act_mean: torch.Tensor, weights: Dict[str, torch.Tensor],
                  config: AWQConfig):
    """(best s, best (α, duo), {(α, duo): error}) for weights sharing input rows x [m, K].

    Candidates: s = a^α (a = mean|x| per input channel) and, with duo scaling, s = a^α / w^(1−α)
    (w = weight_magnitude); config.duo_scaling picks one family or searches both.
    The output error ‖x Wᵀ − x Ŵᵀ‖² is computed as Σ_rows (D Σ)·D with D = W − Ŵ and the input
    Gram matrix Σ = xᵀx (formed once, when x has more rows than columns): the same quantity as the
    direct form, at N·K² instead of m·K·N flops per candidate (m = up to max_tokens rows, typically
    several times K)."""
    gram = x.shape[0] > x.shape[1]        # Gram form only when it is the cheaper one
    if gram:
        xd = x.double()
        sigma = (xd.t() @ xd).float()
    else:
        refs = {n: x @ w.t() for n, w in weights.items()}
    a = act_mean.float().clamp(min=1e-4)
    duo_modes = {False: (False,), True: (True,), "both": (False, True)}[config.duo_scaling]
    wmag = weight_magnitude(weights, config.group_size).clamp(min=1e-4) if True in duo_modes else None
    best = (None, None, float("inf"))
    errors = {}
    for duo in duo_modes:
        for i in range(config.n_grid):
            alpha = i / config.n_grid
            s = a.pow(alpha) / wmag.pow(1.0 - alpha) if duo else a.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            err = 0.0
            for n, w in weights.items():
                wq = _qdq(w * s[None, :], config) / s[None, :]
                if gram:
                    d = w - wq
                    err += float(((d @ sigma) * d).sum(dtype=torch.float64))
                else:
                    err += float((x @ wq.t() - refs[n]).square().sum())
            errors[(alpha, duo)] = err
            if err < best[2]:
                best = (s, (alpha, duo), err)
    return best[0], best[1], errors


def clip_search(w_scaled: torch.Tensor, x_scaled: torch.Tensor, config: AWQConfig):
    """Per-group clip ratios minimizing each group's output error (x_g (w_g − q_g)ᵀ)² summed over
    rows and tokens; returns (scales, zeros) for lowbit.quantize."""
    K = w_scaled.shape[1]
    gs = config.group_size if config.group_size is not None else K
    sigmas = [x_scaled[:, g:g + gs].t() @ x_scaled[:, g:g + gs] for g in range(0, K, gs)]

    def err_fn(w, wq):
        d = w - wq
        return torch.stack([((d[:, j * gs:(j + 1) * gs] @ sg) * d[:, j * gs:(j + 1) * gs]).sum(1)
                            for j, sg in enumerate(sigmas)], dim=1)

    ratios = torch.linspace(1.0, config.min_clip, config.n_clip_grid).tolist()
    s, z, _ = search_clip(w_scaled, config.bits, config.group_size, config.symmetric, ratios, err_fn)
    return s, z


def awq_stage(stage: Stage, config: AWQConfig) -> Dict[str, LayerResult]:
    x = stage.x
    act_mean = stage.stats[stage.names[0]].abs_mean
    weights = {n: stage.linears[n].weight.detach().float() for n in stage.names}
    s, _, _ = search_scales(x, act_mean, weights, config)
    folded = config.fold and try_fold(stage, s)
    out = {}
    for n, w in weights.items():
        ws = (w * s[None, :]).contiguous()
        if config.clip_search:
            sc, zc = clip_search(ws, x / s[None, :], config)
            qt = quantize(ws, config.bits, config.group_size, config.symmetric, scales=sc, zeros=zc)
        else:
            qt = quantize(ws, config.bits, config.group_size, config.symmetric)
        out[n] = LayerResult(qt, input_scale=s.clone(), scale_folded=folded)
    return out


def awq_quantize(model, calibration_data, config: AWQConfig, progress=None) -> Dict[str, LayerResult]:
    return quantize_sequential(model, calibration_data, find_linears(model, config.skip),
                               lambda st: awq_stage(st, config), hessian=False,
                               sample_rows=config.max_tokens, lockstep=config.lockstep,
                               lockstep_max_gib=config.lockstep_max_gib,
                               progress=progress, desc="AWQ")
