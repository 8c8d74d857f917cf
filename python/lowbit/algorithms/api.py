"""quantize_model: one entry point over the algorithms, chosen by the config's type."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

from torch import nn

from .awq import awq_quantize
from .common import LayerResult, apply_quantized, apply_simulated
from .config import AWQConfig, GPTQConfig, MixedPrecisionConfig, RTNConfig, SmoothQuantConfig
from .gptq import gptq_quantize
from .rtn import rtn_quantize
from .smoothquant import smoothquant_quantize

_NEEDS_DATA = (GPTQConfig, AWQConfig, SmoothQuantConfig)


def quantize_model(model: nn.Module, config, calibration_data: Optional[Iterable] = None,
                   apply=True, progress: Optional[bool] = None) -> Dict[str, LayerResult]:
    """Quantize the model's Linears with the algorithm named by the config's type and apply the
    result in place. Returns {linear name: LayerResult}.
    apply: True or "simulated" (default; dequantized float weights, apply_simulated), "quantized"
    (swap the Linears for lowbit.nn.QuantLinear: real quantized kernels, apply_quantized), or
    False (return the results only). With False, RTN leaves the model as it is; GPTQ, AWQ and
    SmoothQuant cannot: each block is calibrated on the outputs of the blocks quantized before it,
    so they return with the model already in the simulated form (and AWQ/SmoothQuant scales
    folded into its norms). Apply their results to this model, not to a copy of the original;
    quantize a copy (copy.deepcopy(model)) to keep the float model.
    calibration_data: batches (tensors, arg tuples or kwarg dicts) for GPTQ/AWQ/SmoothQuant.
    A MixedPrecisionConfig routes each Linear to its rule's config (see algorithms.mixed).
    progress: a progress bar over the decoder blocks of GPTQ/AWQ/SmoothQuant calibration (tqdm
    when installed, else a line per block on stderr); None shows it when stderr is a terminal."""
    if apply not in (True, False, "simulated", "quantized"):
        raise ValueError(f"apply must be True/'simulated', 'quantized' or False, got {apply!r}")
    if isinstance(config, MixedPrecisionConfig):
        from .mixed import mixed_quantize
        if calibration_data is None and any(not isinstance(c, RTNConfig) for c in
                                            [c for _, c in config.rules] + [config.default] if c is not None):
            raise ValueError("a MixedPrecisionConfig using GPTQ/AWQ/SmoothQuant needs calibration_data "
                             "(a list of input batches)")
        results = mixed_quantize(model, config, calibration_data, apply=bool(apply), progress=progress)
        if apply == "quantized":
            apply_quantized(model, results)
        return results
    if not isinstance(config, (RTNConfig,) + _NEEDS_DATA):
        raise TypeError(f"config must be RTNConfig, GPTQConfig, AWQConfig, SmoothQuantConfig or "
                        f"MixedPrecisionConfig, "
                        f"got {type(config).__name__}")
    if isinstance(config, _NEEDS_DATA) and calibration_data is None:
        raise ValueError(f"{type(config).__name__} needs calibration_data (a list of input batches)")
    if isinstance(config, RTNConfig):
        results = rtn_quantize(model, config)
    elif isinstance(config, GPTQConfig):
        results = gptq_quantize(model, calibration_data, config, progress)
    elif isinstance(config, AWQConfig):
        results = awq_quantize(model, calibration_data, config, progress)
    else:
        results = smoothquant_quantize(model, calibration_data, config, progress)
    if apply == "quantized":
        apply_quantized(model, results)
    elif apply:
        apply_simulated(model, results)
    return results
