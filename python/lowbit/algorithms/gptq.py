"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

Per layer: H = 2/n Σ xᵀx (from calibration), dampened by percdamp · mean(diag H); dead inputs
(diag 0) get weight 0. We use the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row i of U gives the
update direction for column i once columns < i are fixed. Columns are processed in lazy blocks: the
error of a block is applied to the columns after it with one matmul.

Rounding is lowbit's: at the start of each group, lowbit.quantize on the group's current
(error-updated) columns chooses that group's scales/zeros (min-max, or the least-error clip ratio
with clip_search); each column is then rounded by lowbit.fake_quantize(col, scales=, zeros=)
with those parameters (no rounding code here). The final codes come from lowbit.quantize on the result, whose values lie exactly on each
group's grid.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..ops import fake_quantize, quantize
from .common import LayerResult
from .config import GPTQConfig
from .observers import search_clip


def _group_params(Wg: torch.Tensor, config: GPTQConfig):
    """Scales/zeros [N, 1] for one group's current (error-updated) columns Wg [N, gs]: lowbit's
    min-max rule, or with config.clip_search the per-row clip ratio of least squared error."""
    if config.clip_search:
        ratios = torch.linspace(1.0, config.min_clip, config.n_clip_grid).tolist()
        s, z, _ = search_clip(Wg, config.bits, None, config.symmetric, ratios)
        return s, z
    qg = quantize(Wg, config.bits, None, config.symmetric)
    return qg.scales, qg.zeros


def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, config: GPTQConfig) -> LayerResult:
    """GPTQ on one weight [N, K] with its input Hessian H [K, K]. Returns a LayerResult whose qt is
    in act-order column order when config.act_order and not config.static_groups (perm set)."""
    bits, gs, sym = config.bits, config.group_size, config.symmetric
    W = weight.detach().float().clone()
    N, K = W.shape
    H = H.detach().float().clone()
    if H.shape != (K, K):
        raise ValueError(f"Hessian must be [{K}, {K}] for a weight with K={K}, got {tuple(H.shape)}")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    per_row = gs is None
    G = 1 if per_row else (K + gs - 1) // gs
    static_s = static_z = None
    if per_row or config.static_groups:
        # parameters fixed up front from the original weights (per row: the whole row is one group)
        static_s, static_z = _group_params(W, config) if per_row else _static_params(W, config)

    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    damp = config.percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    u_diag = torch.diagonal(U).tolist()

    # Work on Wᵀ [K, N]: weight column k is the contiguous row Wt[k], so every per-column step
    # (round, error, rank-1 update of the block's later columns) reads and writes whole rows.
    Wt = W.t().contiguous()
    Qt = torch.empty_like(Wt)
    S = torch.zeros(N, G, dtype=torch.float32)
    Z = torch.zeros(N, G, dtype=torch.uint8) if not sym else None
    # lazy block: a multiple of the group size so a group never straddles two blocks
    B = config.block_size if per_row else max(1, -(-config.block_size // gs)) * gs
    cur_s, cur_z = static_s, static_z
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = Wt[i1:i2]                    # a view: updated in place
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if config.static_groups and not per_row:
                g = int(perm[col]) // gs if perm is not None else col // gs
                cur_s = static_s[:, g:g + 1].contiguous()
                cur_z = static_z[:, g:g + 1].contiguous() if static_z is not None else None
            elif not per_row and col % gs == 0:
                cur_s, cur_z = _group_params(W1[i:i + gs].t().contiguous(), config)
                S[:, col // gs] = cur_s[:, 0]
                if Z is not None:
                    Z[:, col // gs] = cur_z[:, 0]
            w = W1[i]
            q = fake_quantize(w.view(N, 1), bits, None, sym, scales=cur_s, zeros=cur_z).view(N)
            Qt[col] = q
            torch.sub(w, q, out=E1[i]).div_(u_diag[col])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], E1[i], alpha=-1.0)
        if i2 < K:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    Q = Qt.t()

    if per_row or config.static_groups:
        # groups (or rows) are in original column order: store unpermuted, no perm needed
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        qt = quantize(Q.contiguous(), bits, gs, sym, scales=static_s, zeros=static_z)
        return LayerResult(qt)
    # Q holds values on each group's grid; re-quantizing with the same parameters returns the codes
    qt = quantize(Q.contiguous(), bits, gs, sym, scales=S, zeros=Z)
    return LayerResult(qt, perm=perm)


def _static_params(W: torch.Tensor, config: GPTQConfig):
    """Group scales/zeros [N, G] of the original weight (static_groups)."""
    if config.clip_search:
        ratios = torch.linspace(1.0, config.min_clip, config.n_clip_grid).tolist()
        s, z, _ = search_clip(W, config.bits, config.group_size, config.symmetric, ratios)
        return s, z
    qt = quantize(W.contiguous(), config.bits, config.group_size, config.symmetric)
    return qt.scales, qt.zeros


def _activation_scales(stage, config: GPTQConfig):
    """AWQ's per-input-channel scales s for the stage (searched on its sampled input rows by the
    round-to-nearest output error), 1/s folded into the input's producer where exact."""
    from .awq import search_scales
    from .config import AWQConfig
    from .sequential import try_fold

    weights = {n: stage.linears[n].weight.detach().float() for n in stage.names}
    awq = AWQConfig(config.bits, config.group_size, config.symmetric, clip_search=False)
    s, _, _ = search_scales(stage.x, stage.stats[stage.names[0]].abs_mean, weights, awq)
    return s, try_fold(stage, s)


def gptq_stage(stage, config: GPTQConfig) -> Dict[str, LayerResult]:
    """GPTQ on each Linear of a calibrated stage. With config.awq_scales the stage's input is first
    rescaled as AWQ does (x/s, W·s): GPTQ then runs on W·s with the Hessian of x/s,
    diag(1/s) H diag(1/s), and the result keeps s as its input scale."""
    s = folded = None
    if config.awq_scales:
        s, folded = _activation_scales(stage, config)
    out = {}
    for n in stage.names:
        W, H = stage.linears[n].weight.detach().float(), stage.stats[n].hessian
        if s is not None:
            W, H = W * s[None, :], H / s[:, None] / s[None, :]
        r = gptq_quantize_weight(W, H, config)
        if s is not None:
            r.input_scale, r.scale_folded = s.clone(), folded
        out[n] = r
    return out


def gptq_quantize(model, calibration_data, config: GPTQConfig) -> Dict[str, LayerResult]:
    """GPTQ over every Linear of the model (minus config.skip), block by block; with
    config.sequential each layer is calibrated on inputs from the already-quantized layers."""
    from .common import find_linears
    from .sequential import quantize_sequential

    return quantize_sequential(model, calibration_data, find_linears(model, config.skip),
                               lambda st: gptq_stage(st, config), hessian=True,
                               sample_rows=config.awq_max_tokens if config.awq_scales else 0,
                               sequential=config.sequential, true_sequential=config.true_sequential)
