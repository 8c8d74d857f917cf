"""Quantized key/value cache: int8 / int4 (or 2/3-bit) keys and values through lowbit.quantize.

Keys and values arrive as [batch, heads, seq, head_dim]. They are quantized as 2-D rows:
  granularity "token": rows [batch·heads·seq, head_dim], one scale (+zero) per token per head;
  granularity "group": the same rows, group_size elements of head_dim per scale;
  granularity "head" : rows [batch·heads, seq·head_dim] for each block of tokens quantized
                       together, one scale per batch row and head per block;
  granularity "channel": rows [batch·heads·blocks·head_dim, R] for blocks of R = residual_length
                       tokens, one scale per channel per block (KIVI's per-channel keys).
Keys may use another granularity than values (KVCacheConfig.key_granularity).
The most recent `residual_length` tokens stay in float; older tokens are quantized when they leave
that window ("channel": in whole R-token blocks, so 0..R-1 tokens stay float). For "token"/"group"
every token, for "channel" every R-token block, is quantized on its own, so appending step by
step gives exactly the codes of quantizing the whole sequence at once; the blocks are
concatenated into one QuantizedTensor. For "head" each flushed block keeps its own scales
(prefill is one block; decode steps with residual_length=0 are one-token blocks).

KVLayerCache is one layer's store, QuantizedKVStore a list of them with append(layer_idx, k, v),
and QuantizedKVCache (importable when transformers is) is a transformers Cache over the same
layers, for model.generate(..., past_key_values=QuantizedKVCache(config)).
Memory is counted like QuantizedTensor.nbytes: codes + float32 scales + uint8 zeros, plus the
float residual window at its element size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..ops import dequantize, quantize
from ..tensor import QuantizedTensor
from .config import _KV_GRANULARITY, KVCacheConfig


@dataclass
class QuantizedKV:
    """A quantized [batch, heads, seq, head_dim] tensor: qt holds it as 2-D rows (module docstring)."""
    qt: QuantizedTensor
    shape: Tuple[int, int, int, int]
    granularity: str

    @property
    def nbytes(self) -> int:
        return self.qt.nbytes

    @property
    def seq_units(self) -> int:
        """Independently quantized units along seq: tokens, or R-token blocks for "channel"."""
        return self.shape[2] // self.qt.shape[1] if self.granularity == "channel" else self.shape[2]

    def dequantize(self, dtype=None) -> torch.Tensor:
        x = dequantize(self.qt, dtype)
        if self.granularity == "channel":
            B, H, S, D = self.shape
            return x.reshape(B, H, self.seq_units, D, -1).transpose(-1, -2).reshape(self.shape)
        return x.reshape(self.shape)

    def element_scales(self) -> torch.Tensor:
        """The scale applying to each element, [batch, heads, seq, head_dim] (for error bounds)."""
        B, H, S, D = self.shape
        s = self.qt.scales
        if self.granularity == "head":
            return s.reshape(B, H, 1, 1).expand(B, H, S, D)
        if self.granularity == "channel":
            n = self.seq_units
            return s.reshape(B, H, n, 1, D).expand(B, H, n, S // n, D).reshape(B, H, S, D)
        g = D if self.qt.group_size is None else int(self.qt.group_size)
        idx = torch.arange(D, device=s.device) // g
        return s.reshape(B, H, S, -1)[..., idx]


def _check_config(config) -> KVCacheConfig:
    if not isinstance(config, KVCacheConfig):
        raise TypeError(f"config must be a KVCacheConfig, got {type(config).__name__}")
    return config


def _check_states(name: str, x) -> None:
    """x must be what lowbit.quantize takes, as [batch, heads, seq, head_dim] (seq may be 0)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor [batch, heads, seq, head_dim], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if 0 in (x.shape[0], x.shape[1], x.shape[3]):
        raise ValueError(f"{name} has an empty batch, heads or head_dim: {tuple(x.shape)}")


def _check_granularity(config: KVCacheConfig, gran, head_dim: int) -> None:
    """Checked before anything is stored: a bad format found only when tokens leave the float
    window would make every later append fail."""
    if gran not in _KV_GRANULARITY:
        raise ValueError(f"granularity must be one of {_KV_GRANULARITY}, got {gran!r}")
    if gran == "group" and config.group_size is None:
        raise ValueError("granularity 'group' needs a KVCacheConfig with group_size (e.g. 32)")
    if gran == "group" and head_dim % config.group_size:
        raise ValueError(f"KVCacheConfig.group_size={config.group_size} does not divide head_dim={head_dim}; "
                         f"use a divisor of {head_dim} that is a multiple of 16, or granularity='token'")
    if gran == "channel" and config.residual_length < 1:
        raise ValueError("granularity 'channel' quantizes blocks of residual_length tokens: it needs a "
                         "KVCacheConfig with residual_length >= 1")


def _rows(x: torch.Tensor, granularity: str, block: int) -> torch.Tensor:
    B, H, S, D = x.shape
    if granularity == "channel":   # [B, H, blocks, R, D] -> rows of one channel's R tokens
        return x.reshape(B, H, S // block, block, D).transpose(-1, -2).reshape(-1, block)
    return x.reshape(B * H, S * D) if granularity == "head" else x.reshape(B * H * S, D)


def kv_quantize(x: torch.Tensor, config: KVCacheConfig, granularity: Optional[str] = None) -> QuantizedKV:
    """Quantize keys or values [batch, heads, seq, head_dim] (float32/float16/bfloat16) with
    `granularity` (default config.granularity, the values'; pass config.key_granularity for keys)."""
    _check_config(config)
    _check_states("key/value states", x)
    gran = config.granularity if granularity is None else granularity
    S = x.shape[2]
    _check_granularity(config, gran, x.shape[3])
    if gran == "channel" and S % config.residual_length:
        raise ValueError(f"granularity 'channel' quantizes whole blocks of residual_length="
                         f"{config.residual_length} tokens; got {S} tokens")
    gs = config.group_size if gran == "group" else None
    qt = quantize(_rows(x.detach(), gran, config.residual_length).contiguous(), config.bits, gs, config.symmetric)
    return QuantizedKV(qt, tuple(x.shape), gran)


def _cat_seq(a: QuantizedKV, b: QuantizedKV) -> QuantizedKV:
    """Concatenate two "token"/"group"/"channel" blocks along seq without touching the codes."""
    B, H, Sa, D = a.shape
    ua, ub = a.seq_units, b.seq_units

    def cat(x, y):
        if x is None:
            return None
        return torch.cat([x.reshape(B, H, ua, -1), y.reshape(B, H, ub, -1)], dim=2).reshape(-1, x.shape[-1])

    codes = cat(a.qt.codes, b.qt.codes)
    qt = QuantizedTensor(codes, cat(a.qt.scales, b.qt.scales), cat(a.qt.zeros, b.qt.zeros),
                         (codes.shape[0], a.qt.shape[1]), a.qt.format)
    return QuantizedKV(qt, (B, H, Sa + b.shape[2], D), a.granularity)


def _select_batch(q: QuantizedKV, idx: torch.Tensor) -> QuantizedKV:
    B, H, S, D = q.shape
    n = idx.numel()

    def sel(x):
        return None if x is None else x.reshape(B, -1, x.shape[-1])[idx].reshape(-1, x.shape[-1])

    rows = q.qt.shape[0] // B * n
    qt = QuantizedTensor(sel(q.qt.codes), sel(q.qt.scales), sel(q.qt.zeros), (rows, q.qt.shape[1]), q.qt.format)
    return QuantizedKV(qt, (n, H, S, D), q.granularity)


class _Stream:
    """Keys (or values) of one layer: quantized blocks, then the float residual window."""

    def __init__(self, config: KVCacheConfig, granularity: str):
        self.config, self.granularity = config, granularity
        self.blocks: List[QuantizedKV] = []
        self.residual: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        n = sum(b.shape[2] for b in self.blocks)
        return n + (self.residual.shape[2] if self.residual is not None else 0)

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Add x [batch, heads, new, head_dim]; return the whole sequence, dequantized, in x's dtype."""
        res = x if self.residual is None else torch.cat([self.residual, x], dim=2)
        R = self.config.residual_length
        overflow = res.shape[2] // R * R if self.granularity == "channel" else res.shape[2] - R
        if overflow > 0:
            q = kv_quantize(res[:, :, :overflow], self.config, self.granularity)
            if self.blocks and self.granularity != "head":
                self.blocks[-1] = _cat_seq(self.blocks[-1], q)
            else:
                self.blocks.append(q)
            res = res[:, :, overflow:]
        self.residual = res.detach().clone() if res.shape[2] else None
        parts = [b.dequantize(x.dtype) for b in self.blocks]
        if self.residual is not None:
            parts.append(self.residual)
        if not parts:              # nothing stored and x has no tokens
            return x
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def nbytes(self) -> int:
        r = self.residual
        return sum(b.nbytes for b in self.blocks) + (r.numel() * r.element_size() if r is not None else 0)

    def select_batch(self, idx: torch.Tensor) -> None:
        self.blocks = [_select_batch(b, idx.to(b.qt.codes.device)) for b in self.blocks]
        if self.residual is not None:
            self.residual = self.residual.index_select(0, idx.to(self.residual.device))


class KVLayerCache:
    """One attention layer's quantized keys and values."""

    def __init__(self, config: KVCacheConfig):
        self.config = _check_config(config)
        self.keys = _Stream(config, config.key_granularity)
        self.values = _Stream(config, config.granularity)
        # (batch, heads, key head_dim, value head_dim, dtype, device) of the stored tokens, which
        # every later append must match; None while nothing is stored
        self.spec: Optional[tuple] = None

    @property
    def batch(self) -> int:
        return self.spec[0] if self.spec else 0

    @property
    def heads(self) -> int:
        return self.spec[1] if self.spec else 0

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens; return all keys and values. A 0-token append stores nothing (on an
        empty layer it returns its inputs). Bad input raises and leaves the layer as it was."""
        k, v = key_states, value_states
        _check_states("key_states", k)
        _check_states("value_states", v)
        if k.shape[:3] != v.shape[:3] or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"key and value states must agree on [batch, heads, seq], dtype and device, got "
                             f"{tuple(k.shape)} {k.dtype} on {k.device} and {tuple(v.shape)} {v.dtype} on {v.device}")
        _check_granularity(self.config, self.keys.granularity, k.shape[3])
        _check_granularity(self.config, self.values.granularity, v.shape[3])
        spec = (k.shape[0], k.shape[1], k.shape[3], v.shape[3], k.dtype, k.device)
        if self.spec is not None and spec != self.spec:
            B, H, dk, dv, dtype, device = self.spec
            S = self.seq_length()
            raise ValueError(f"new key_states {tuple(k.shape)} and value_states {tuple(v.shape)} ({k.dtype} on "
                             f"{k.device}) do not fit this layer's keys {(B, H, S, dk)} and values {(B, H, S, dv)} "
                             f"({dtype} on {device}): only seq may differ (reorder the batch with select_batch)")
        # _Stream.append rebinds blocks[-1] and residual without touching the old ones, so this
        # shallow copy is enough to undo a failure (e.g. NaN) in either stream
        saved = [(list(s.blocks), s.residual) for s in (self.keys, self.values)]
        try:
            out = self.keys.append(k), self.values.append(v)
        except BaseException:
            for s, (blocks, residual) in zip((self.keys, self.values), saved):
                s.blocks, s.residual = blocks, residual
            raise
        if self.seq_length():
            self.spec = spec
        return out

    def seq_length(self) -> int:
        return len(self.keys)

    def memory_bytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()

    def float_bytes(self) -> int:
        """Bytes the same keys and values take in an unquantized cache (their own dtype)."""
        if self.spec is None:
            return 0
        B, H, dk, dv, dtype, _ = self.spec
        return B * H * self.seq_length() * (dk + dv) * dtype.itemsize

    def select_batch(self, idx) -> None:
        """Keep batch rows idx (a 1-D integer tensor, list or tuple; in that order; repeats allowed):
        beam search reordering."""
        try:
            idx = torch.as_tensor(idx)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"batch indices must be a 1-D integer tensor, list or tuple, got {idx!r}") from None
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError(f"batch indices must be a non-empty 1-D sequence, got shape {tuple(idx.shape)}")
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"batch indices must be integers, got {idx.dtype}")
        if self.spec is None:      # nothing stored to select from
            return
        if int(idx.min()) < 0 or int(idx.max()) >= self.batch:
            raise ValueError(f"batch indices must be in [0, {self.batch}) (this layer's batch size), "
                             f"got {idx.tolist()}")
        idx = idx.long()
        self.keys.select_batch(idx)
        self.values.select_batch(idx)
        self.spec = (idx.numel(),) + self.spec[1:]


class QuantizedKVStore:
    """Quantized KV cache for any attention code: append(layer_idx, k, v) stores the new tokens and
    returns the layer's full keys and values (dequantized) for attention."""

    def __init__(self, config: Optional[KVCacheConfig] = None):
        self.config = _check_config(config if config is not None else KVCacheConfig())
        self.layers: List[KVLayerCache] = []

    def append(self, layer_idx: int, key_states, value_states):
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        # new layers join only once the append succeeded: a failed call leaves the store as it was
        new = [KVLayerCache(self.config) for _ in range(len(self.layers), layer_idx + 1)]
        out = (new[-1] if new else self.layers[layer_idx]).append(key_states, value_states)
        self.layers += new
        return out

    def seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seq_length() if layer_idx < len(self.layers) else 0

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    def float_bytes(self) -> int:
        return sum(layer.float_bytes() for layer in self.layers)


# ------------------------------------------------------------------ transformers integration

_HF = {}


def _hf_classes():
    """Build the transformers Cache classes on first use (transformers is an optional import)."""
    if _HF:
        return _HF["cache"]
    from transformers.cache_utils import Cache, DynamicLayer

    class LowbitKVLayer(DynamicLayer):
        """A transformers cache layer storing its states in a KVLayerCache."""
        is_croppable = False

        def __init__(self, config: KVCacheConfig):
            super().__init__()
            self.store = KVLayerCache(config)

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return self.store.append(key_states, value_states)

        def get_seq_length(self) -> int:
            return self.store.seq_length()

        def reset(self) -> None:
            self.store = KVLayerCache(self.store.config)
            self.is_initialized = False

        def offload(self):
            pass

        def prefetch(self):
            pass

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a quantized KV cache cannot be cropped")

        def reorder_cache(self, beam_idx) -> None:
            if self.get_seq_length() > 0:
                self.store.select_batch(beam_idx)

        def batch_select_indices(self, indices) -> None:
            if self.get_seq_length() > 0:
                self.store.select_batch(indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.get_seq_length() > 0:
                self.store.select_batch(torch.arange(self.store.batch).repeat_interleave(repeats))

    class QuantizedKVCache(Cache):
        """transformers Cache whose layers keep keys/values quantized with lowbit (KVCacheConfig).
        Also offers append(layer_idx, k, v), memory_bytes() and float_bytes()."""

        def __init__(self, config: Optional[KVCacheConfig] = None, num_layers: Optional[int] = None):
            self.kv_config = _check_config(config if config is not None else KVCacheConfig())
            if num_layers is None:
                super().__init__(layer_class_to_replicate=lambda: LowbitKVLayer(self.kv_config))
            else:
                super().__init__(layers=[LowbitKVLayer(self.kv_config) for _ in range(num_layers)])

        def append(self, layer_idx: int, key_states, value_states):
            return self.update(key_states, value_states, layer_idx)

        def memory_bytes(self) -> int:
            return sum(layer.store.memory_bytes() for layer in self.layers)

        def float_bytes(self) -> int:
            return sum(layer.store.float_bytes() for layer in self.layers)

    _HF["layer"], _HF["cache"] = LowbitKVLayer, QuantizedKVCache
    return QuantizedKVCache


def __getattr__(name):
    if name == "QuantizedKVCache":
        return _hf_classes()
    if name == "LowbitKVLayer":
        _hf_classes()
        return _HF["layer"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
