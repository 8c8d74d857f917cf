"""Quantization algorithms on lowbit's primitives (needs torch): observers and calibration hooks,
RTN, GPTQ, AWQ, SmoothQuant, QAT, and quantize_model. Results are one LayerResult (a
QuantizedTensor + input scale / permutation) per nn.Linear; apply_simulated writes them into a
torch model as dequantized weights."""
from .api import quantize_model
from .awq import awq_quantize
from .common import LayerResult, apply_simulated, find_linears, model_size_report
from .config import AWQConfig, GPTQConfig, QATConfig, RTNConfig, SmoothQuantConfig
from .gptq import gptq_quantize, gptq_quantize_weight
from .observers import (CalibrationHooks, LinearStats, MinMaxObserver, MovingAverageMinMaxObserver,
                        MSEObserver, Observer, PercentileObserver, collect_stats, search_clip)
from .qat import QATLinear, convert, prepare_qat
from .rtn import rtn_quantize
from .smoothquant import smoothquant_quantize

__all__ = ["quantize_model", "LayerResult", "apply_simulated", "find_linears", "model_size_report",
           "RTNConfig", "GPTQConfig", "AWQConfig", "SmoothQuantConfig", "QATConfig",
           "rtn_quantize", "gptq_quantize", "gptq_quantize_weight", "awq_quantize",
           "smoothquant_quantize", "prepare_qat", "convert", "QATLinear",
           "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver",
           "MSEObserver", "search_clip", "CalibrationHooks", "LinearStats", "collect_stats"]
