"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

Per layer: H = 2/n Σ xᵀx (from calibration), dampened by percdamp · mean(diag H); dead inputs
(diag 0) get weight 0. We use the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row i of U gives the
update direction for column i once columns < i are fixed. Columns are processed in lazy blocks: the
error of a block is applied to the columns after it with one matmul.

Rounding is lowbit's: at the start of each group, lowbit.quantize on the group's current
(error-updated) columns chooses that group's scales/zeros; each column is then rounded by
lowbit.quantize(col, scales=, zeros=) + lowbit.dequantize with those parameters (no rounding code
here). The final codes come from lowbit.quantize on the result, whose values lie exactly on each
group's grid.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..ops import dequantize, quantize
from .common import LayerResult
from .config import GPTQConfig


def _qdq_column(col: torch.Tensor, bits: int, symmetric: bool, scale, zero) -> torch.Tensor:
    """Reference: one column through lowbit.quantize/dequantize with given parameters."""
    qt = quantize(col.reshape(-1, 1).contiguous(), bits, None, symmetric, scales=scale, zeros=zero)
    return dequantize(qt).reshape(-1)


def _column_rounder(bits: int, symmetric: bool, scale, zero):
    """Rounds a column [N] onto the grid of per-row parameters scale/zero [N, 1] through lowbit."""
    return lambda w: _qdq_column(w.contiguous(), bits, symmetric, scale, zero)


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
        qt0 = quantize(W.contiguous(), bits, gs, sym)
        static_s, static_z = qt0.scales, qt0.zeros

    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    damp = config.percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)

    Q = torch.zeros_like(W)
    S = torch.zeros(N, G, dtype=torch.float32)
    Z = torch.zeros(N, G, dtype=torch.uint8) if not sym else None
    # lazy block: a multiple of the group size so a group never straddles two blocks
    B = config.block_size if per_row else max(1, -(-config.block_size // gs)) * gs
    cur_s = cur_z = None
    rounder = None
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if per_row:
                if rounder is None:
                    rounder = _column_rounder(bits, sym, static_s, static_z)
            elif config.static_groups:
                g = int(perm[col]) // gs if perm is not None else col // gs
                cur_s = static_s[:, g:g + 1].contiguous()
                cur_z = static_z[:, g:g + 1].contiguous() if static_z is not None else None
                rounder = _column_rounder(bits, sym, cur_s, cur_z)
            elif col % gs == 0:
                qg = quantize(W1[:, i:i + gs].contiguous(), bits, None, sym)
                cur_s, cur_z = qg.scales, qg.zeros
                S[:, col // gs] = cur_s[:, 0]
                if Z is not None:
                    Z[:, col // gs] = cur_z[:, 0]
                rounder = _column_rounder(bits, sym, cur_s, cur_z)
            w = W1[:, i]
            q = rounder(w)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    if per_row or config.static_groups:
        # groups (or rows) are in original column order: store unpermuted, no perm needed
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        qt = quantize(Q.contiguous(), bits, gs, sym, scales=static_s, zeros=static_z)
        return LayerResult(qt)
    # Q holds values on each group's grid; re-quantizing with the same parameters returns the codes
    qt = quantize(Q.contiguous(), bits, gs, sym, scales=S, zeros=Z)
    return LayerResult(qt, perm=perm)


def gptq_quantize(model, calibration_data, config: GPTQConfig) -> Dict[str, LayerResult]:
    """GPTQ over every Linear of the model (minus config.skip), block by block; with
    config.sequential each layer is calibrated on inputs from the already-quantized layers."""
    from .common import find_linears
    from .sequential import quantize_sequential

    def stage_fn(stage):
        return {n: gptq_quantize_weight(stage.linears[n].weight, stage.stats[n].hessian, config)
                for n in stage.names}

    return quantize_sequential(model, calibration_data, find_linears(model, config.skip), stage_fn,
                               hessian=True, sequential=config.sequential)
