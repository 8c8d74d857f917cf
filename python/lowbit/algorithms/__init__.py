"""Quantization algorithms on lowbit's primitives (needs torch): observers and calibration hooks,
RTN, GPTQ, AWQ, SmoothQuant, QAT, mixed precision, a quantized KV cache, and quantize_model.
Results are one LayerResult (a QuantizedTensor + input scale / permutation) per nn.Linear;
apply_simulated writes them into a torch model as dequantized weights."""
from .api import quantize_model
from .awq import awq_quantize
from .common import LayerResult, apply_quantized, apply_simulated, find_linears, model_size_report
from .config import (AWQConfig, GPTQConfig, KVCacheConfig, MixedPrecisionConfig, QATConfig, RTNConfig,
                     SmoothQuantConfig)
from .gptq import gptq_quantize, gptq_quantize_weight
from .lora import LoRALinear, add_lora
from .kv_cache import KVLayerCache, QuantizedKV, QuantizedKVStore, kv_quantize
from .mixed import (SensitivityReport, assign_configs, choose_configs, mixed_quantize,
                    output_error_metric, sensitivity_report)
from .observers import (CalibrationHooks, LinearStats, MinMaxObserver, MovingAverageMinMaxObserver,
                        MSEObserver, Observer, PercentileObserver, collect_stats, search_clip)
from .qat import QATLinear, convert, prepare_qat
from .rtn import rtn_quantize
from .smoothquant import smoothquant_quantize

__all__ = ["quantize_model", "LayerResult", "apply_simulated", "apply_quantized", "LoRALinear", "add_lora", "find_linears", "model_size_report",
           "RTNConfig", "GPTQConfig", "AWQConfig", "SmoothQuantConfig", "QATConfig",
           "rtn_quantize", "gptq_quantize", "gptq_quantize_weight", "awq_quantize",
           "smoothquant_quantize", "prepare_qat", "convert", "QATLinear",
           "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver",
           "MSEObserver", "search_clip", "CalibrationHooks", "LinearStats", "collect_stats",
           "MixedPrecisionConfig", "assign_configs", "mixed_quantize", "sensitivity_report",
           "SensitivityReport", "choose_configs", "output_error_metric",
           "KVCacheConfig", "kv_quantize", "QuantizedKV", "KVLayerCache", "QuantizedKVStore",
           "QuantizedKVCache"]


def __getattr__(name):
    # QuantizedKVCache subclasses transformers' Cache: built on first use, so transformers stays optional
    if name == "QuantizedKVCache":
        from . import kv_cache
        return kv_cache.QuantizedKVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
