"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

Per layer: H = 2/n Σ xᵀx (from calibration), dampened by percdamp · mean(diag H); dead inputs
(diag 0) get weight 0. We use the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row i of U gives the
update direction for column i once columns < i are fixed. Columns are processed in lazy blocks: the
error of a block is applied to the columns after it with one matmul.

Rounding is lowbit's: at the start of each group, lowbit.quantize on the group's current
(error-updated) columns chooses that group's scales/zeros (min-max, or the least-error clip ratio
with clip_search); lowbit.ops.gptq_columns (C++) then rounds the group's columns one by one with
those parameters and pushes each one's error onto the block's later columns. The final codes come
from lowbit.quantize on the result, whose values lie exactly on each group's grid.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..ops import gptq_columns, quantize
from .common import LayerResult
from .config import GPTQConfig
from .observers import search_clip


def _group_params(Wg: torch.Tensor, config: GPTQConfig, col_weight=None):
    """Scales/zeros [N, 1] for one group's current (error-updated) columns Wg [N, gs]: lowbit's
    min-max rule, or with config.clip_search the per-row clip ratio of least squared error
    (each column's error weighted by col_weight [gs] when given)."""
    if config.clip_search:
        ratios = torch.linspace(1.0, config.min_clip, config.n_clip_grid).tolist()
        s, z, _ = search_clip(Wg, config.bits, None, config.symmetric, ratios, col_weight=col_weight)
        return s, z
    qg = quantize(Wg, config.bits, None, config.symmetric)
    return qg.scales, qg.zeros


def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, config: GPTQConfig) -> LayerResult:
    """GPTQ on one weight [N, K] with its input Hessian H [K, K]. Returns a LayerResult whose qt is
    in act-order column order when config.act_order and not config.static_groups (perm set)."""
    return gptq_quantize_weights([weight], H, config)[0]


def gptq_quantize_weights(weights: List[torch.Tensor], H: torch.Tensor, config: GPTQConfig) -> List[LayerResult]:
    """GPTQ on several weights [N_i, K] reading the same input (Hessian H): GPTQ treats rows
    independently, so they are stacked and run as one (one column loop instead of one each)."""
    bits, gs, sym = config.bits, config.group_size, config.symmetric
    # on the CPU, in float32 (the column loop is lowbit's CPU kernel)
    W = torch.cat([w.detach().float().cpu() for w in weights])
    N, K = W.shape
    bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
    rows = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    H = H.detach().float().cpu().clone()
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
    U = _inverse_upper_factor(H)

    # Work on Wᵀ [K, N]: weight column k is the contiguous row Wt[k]. Inside a lazy block,
    # lowbit.ops.gptq_columns rounds the columns one by one and updates the block's later ones;
    # group parameters are chosen here when a group starts, from its error-updated columns.
    Wt = W.t().contiguous()
    Qt = torch.empty_like(Wt)
    S = torch.zeros(N, G, dtype=torch.float32)
    Z = torch.zeros(N, G, dtype=torch.uint8) if not sym else None
    # lazy block: a multiple of the group size so a group never straddles two blocks
    B = config.block_size if per_row else max(1, -(-config.block_size // gs)) * gs
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1, Q1 = Wt[i1:i2], Qt[i1:i2]     # views: written in place
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2].contiguous()
        # fixed parameters: the whole block in one call; else one call per group
        spans = ([(0, i2 - i1)] if per_row or config.static_groups
                 else [(c, min(c + gs, i2 - i1)) for c in range(0, i2 - i1, gs)])
        for c0, c1 in spans:
            if per_row:
                s, z = static_s[:, 0], (static_z[:, 0] if static_z is not None else None)
            elif config.static_groups:     # one parameter row per column: groups may be permuted
                g = (perm[i1:i2] if perm is not None else torch.arange(i1, i2)) // gs
                s, z = static_s[:, g].t(), (static_z[:, g].t() if static_z is not None else None)
            else:
                # GPTQ's loss for rounding column j (earlier ones fixed) is err_j² / U_jj²
                cw = U1.diagonal()[c0:c1].square().reciprocal() if config.clip_hessian_weighted else None
                s, z = _group_params(W1[c0:c1].t().contiguous(), config, cw)
                S[:, (i1 + c0) // gs] = s[:, 0]
                if Z is not None:
                    Z[:, (i1 + c0) // gs] = z[:, 0]
                s, z = s[:, 0], (z[:, 0] if z is not None else None)
            gptq_columns(W1, Q1, E1, U1, c0, c1, s.contiguous(), None if z is None else z.contiguous(),
                         bits, sym)
        if i2 < K:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    Q = Qt.t()

    if per_row or config.static_groups:
        # groups (or rows) are in original column order: store unpermuted, no perm needed
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        S, Z, perm = static_s, static_z, None
    # Q holds values on each group's grid; re-quantizing with the same parameters returns the codes
    return [LayerResult(quantize(Q[r].contiguous(), bits, gs, sym, scales=S[r].contiguous(),
                                 zeros=Z[r].contiguous() if Z is not None else None),
                        perm=None if perm is None else perm.clone())
            for r in rows]


def _inverse_upper_factor(H: torch.Tensor) -> torch.Tensor:
    """The upper U with H⁻¹ = UᵀU. With J the order reversal and JHJ = LLᵀ (Cholesky),
    H⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J) and J L⁻¹ J is upper triangular with a positive diagonal, so it is U:
    one Cholesky and one triangular inverse, where the usual route (Cholesky, the inverse from it,
    a second Cholesky) does about twice the work and rounds more."""
    return _lower_inverse(torch.linalg.cholesky(H.flip(0, 1))).flip(0, 1)


def _lower_inverse(L: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """L⁻¹ of a lower-triangular L by halves, [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]:
    a third of the multiply-adds of a triangular solve against the identity, nearly all in matmuls."""
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    out = torch.zeros_like(L)
    Ai, Ci = _lower_inverse(L[:h, :h], leaf), _lower_inverse(L[h:, h:], leaf)
    out[:h, :h], out[h:, h:] = Ai, Ci
    torch.mm(Ci, L[h:, :h] @ Ai, out=out[h:, :h])
    out[h:, :h].neg_()
    return out


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
    # the stage's Linears share one input, hence one Hessian: quantize them together
    H = stage.stats[stage.names[0]].hessian
    Ws = [stage.linears[n].weight.detach().float() for n in stage.names]
    if s is not None:
        Ws, H = [W * s[None, :] for W in Ws], H / s[:, None] / s[None, :]
    out = {}
    for n, r in zip(stage.names, gptq_quantize_weights(Ws, H, config)):
        if s is not None:
            r.input_scale, r.scale_folded = s.clone(), folded
        out[n] = r
    return out


def gptq_quantize(model, calibration_data, config: GPTQConfig, progress=None) -> Dict[str, LayerResult]:
    """GPTQ over every Linear of the model (minus config.skip), block by block; with
    config.sequential each layer is calibrated on inputs from the already-quantized layers."""
    from .common import find_linears
    from .sequential import quantize_sequential

    return quantize_sequential(model, calibration_data, find_linears(model, config.skip),
                               lambda st: gptq_stage(st, config), hessian=True,
                               sample_rows=config.awq_max_tokens if config.awq_scales else 0,
                               abs_stats=config.awq_scales,     # only AWQ's scale search reads them
                               sequential=config.sequential, true_sequential=config.true_sequential,
                               lockstep=config.lockstep,
                               lockstep_max_gib=config.lockstep_max_gib,
                               progress=progress, desc="GPTQ")
