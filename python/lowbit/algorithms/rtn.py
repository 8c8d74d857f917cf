"""Round-to-nearest baseline: lowbit.quantize on each weight, nothing else."""
from __future__ import annotations

from typing import Dict

from torch import nn

from .common import LayerResult, find_linears, quantize_weight
from .config import RTNConfig


def rtn_quantize_layer(linear: nn.Linear, config: RTNConfig) -> LayerResult:
    return LayerResult(quantize_weight(linear.weight, config.bits, config.group_size, config.symmetric))


def rtn_quantize(model: nn.Module, config: RTNConfig) -> Dict[str, LayerResult]:
    return {name: rtn_quantize_layer(lin, config) for name, lin in find_linears(model, config.skip).items()}
