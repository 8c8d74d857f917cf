"""Saving, loading and checkpoint interop (see docs/format.md).

    lowbit.io.save / load                 lowbit's own safetensors files (versioned schema)
    lowbit.io.from_gptq / to_gptq / load_gptq    AutoGPTQ / GPTQModel tensors and checkpoints
    lowbit.io.from_awq / to_awq / load_awq       AutoAWQ GEMM tensors and checkpoints
    lowbit.io.load_gguf / save_gguf              GGUF Q4_0 / Q8_0 / F32 / F16

safetensors and gguf are imported only when a function that needs them runs.
"""
from __future__ import annotations

from .awq import from_awq, load_awq, to_awq
from .gguf import load_gguf, save_gguf
from .gptq import Imported, detect_checkpoint_format, from_gptq, load_gptq, to_gptq
from .safetensors_io import SCHEMA_VERSION, load, save

__all__ = ["save", "load", "SCHEMA_VERSION", "from_gptq", "to_gptq", "load_gptq", "Imported",
           "detect_checkpoint_format", "from_awq", "to_awq", "load_awq", "load_gguf", "save_gguf"]
