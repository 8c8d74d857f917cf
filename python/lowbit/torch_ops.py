"""lowbit's primitives as torch.library custom ops, so torch.compile / torch.export see one opaque
node per quantized matmul (no graph break) and autograd reaches the input.

    torch.ops.lowbit.matmul(x, codes, scales, zeros, bias, bits, scheme, group_size, act_bits,
                            act_per_block=False, in_features=0)
        y = x @ dequantize(W).T (+ bias); differentiable w.r.t. x (and bias); weights frozen.
        in_features > 0 is checked against x's last axis (0: K is taken from x; packed int4
        codes cannot tell K from K - 1).
    torch.ops.lowbit.dequantize(codes, scales, zeros, bits, scheme, group_size, K) -> float32 [N, K]
    torch.ops.lowbit.quantize(w, bits, group_size, symmetric, nf4) -> (codes, scales, zeros)
        zeros is an empty uint8 tensor for symmetric / nf4 formats (an op cannot return None).

The ops take a QuantizedTensor's *buffers* (what QuantLinear registers), not the dataclass, so a
compiled graph holds plain tensors. group_size is encoded as an int: -1 one group per row,
0 one scale for the whole tensor, g > 0 elements per group. scheme: 0 asymmetric, 1 symmetric,
2 nf4 (tensor.SCHEMES). act_bits 0 means weight-only; act_per_block: one activation scale per
weight group instead of per token (lowbit.matmul's act_granularity="block").

Prepacking: the CPU kernels want the weight in a packed layout (ops._packed_weight), the CUDA
kernels in theirs (ops_cuda). Packing once per *buffer set* is done here: the packed copies are
cached keyed on the buffers' storage, data pointer and version counter (an in-place update such
as load_state_dict bumps the version, so the next call re-packs), and an entry dies with its
buffers' storage (weak storage references: the cache never keeps a model's weights alive).
This module imports torch; `import lowbit` does not import it.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import ops
from .tensor import _VALID_ATTR, FIELD_NAMES, SCHEMES, QuantFormat, QuantizedTensor

_SCHEME_NAMES = {v: k for k, v in SCHEMES.items()}

# key -> (weak refs to the buffers' storages, {qt.__dict__ extras: the packed copies})
_PACK_CACHE: Dict[tuple, Tuple[tuple, dict]] = {}
STATS = {"hits": 0, "misses": 0}  # packing cache statistics (tests check that compiled graphs hit)


def encode_group_size(g) -> int:
    return -1 if g is None else 0 if g == "tensor" else int(g)


def decode_group_size(g: int):
    return None if g == -1 else "tensor" if g == 0 else int(g)


@functools.lru_cache(maxsize=None)
def make_format(bits: int, scheme: int, group_size: int) -> QuantFormat:
    """One QuantFormat object per argument set (QuantizedTensor.validate's memo compares formats
    by identity: a new object per call would re-validate the arrays on every matmul)."""
    name = _SCHEME_NAMES.get(int(scheme))
    if name is None:
        raise ValueError(f"scheme must be one of {sorted(_SCHEME_NAMES)} ({SCHEMES}), got {scheme}")
    return QuantFormat(int(bits), name != "asymmetric", decode_group_size(group_size),
                       "nf4" if name == "nf4" else None)


def _key_part(t: Optional[torch.Tensor]):
    if t is None:
        return None
    return (t.device.type, t.device.index, t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype)


def _qt_from_buffers(codes, scales, zeros, bits, scheme, group_size, K) -> Tuple[QuantizedTensor, tuple]:
    """A QuantizedTensor over the buffers, with the cached packed copies attached (packed on
    the first call for this buffer set), and its cache key (for _remember)."""
    fmt = make_format(bits, scheme, group_size)
    qt = QuantizedTensor(codes, scales, zeros, (int(codes.shape[0]), int(K)), fmt)
    key = (_key_part(codes), _key_part(scales), _key_part(zeros), fmt, int(K))
    hit = _PACK_CACHE.get(key)
    if hit is not None and not any(r is not None and r.expired() for r in hit[0]):
        STATS["hits"] += 1
        qt.__dict__.update(hit[1])
        qt._trust()     # the same buffers passed validate() on the call that made this entry
        return qt, key
    STATS["misses"] += 1
    return qt, key


def _remember(qt: QuantizedTensor, key: tuple) -> None:
    """After a successful call (qt validated), store what the kernels cached on qt (packed layouts)
    for the next call on the same buffers. Not the validation memo: it refers to the buffers,
    which the cache must not keep alive."""
    entry = _PACK_CACHE.get(key)
    if entry is None:
        # drop entries whose buffers are gone (their data pointers may be reused by new tensors)
        for k in [k for k, (refs, _) in _PACK_CACHE.items() if any(r is not None and r.expired() for r in refs)]:
            del _PACK_CACHE[k]
        refs = tuple(None if t is None else StorageWeakRef(t.untyped_storage()) for t in (qt.codes, qt.scales, qt.zeros))
        entry = _PACK_CACHE[key] = (refs, {})
    entry[1].update({k: v for k, v in qt.__dict__.items() if k not in FIELD_NAMES and k != _VALID_ATTR})


def clear_cache() -> None:
    _PACK_CACHE.clear()


# ------------------------------------------------------------------------------------------ matmul
def check_features(x, in_features: int) -> None:
    # packed int4 codes hold K and K - 1 columns alike: only the caller knows which
    if in_features and x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features (last axis) but the weight expects "
                         f"in_features={in_features}")


@torch.library.custom_op("lowbit::matmul", mutates_args=())
def matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], bits: int, scheme: int, group_size: int, act_bits: int,
           act_per_block: bool = False, in_features: int = 0) -> torch.Tensor:
    check_features(x, in_features)
    qt, key = _qt_from_buffers(codes, scales, zeros, bits, scheme, group_size, int(x.shape[-1]))
    # the kernels read through DLPack, which refuses tensors that require grad: hand them plain views
    y = ops.matmul(x.detach(), qt, bias=None if bias is None else bias.detach(), act_bits=act_bits or None,
                   act_granularity="block" if act_per_block else "token")
    _remember(qt, key)
    return y


def skips_dispatch(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether a QuantLinear may call lowbit.matmul directly instead of this op, saving its
    dispatch and buffer lookup (~50 µs a call; a 4096² int4 decode step takes 300–600 µs): eager
    mode (no torch.compile, export or jit trace), a plain tensor, nothing that needs autograd."""
    return (type(x) is torch.Tensor
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


@matmul.register_fake
def _(x, codes, scales, zeros, bias, bits, scheme, group_size, act_bits, act_per_block=False, in_features=0):
    check_features(x, in_features)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _matmul_setup(ctx, inputs, output):
    x, codes, scales, zeros, bias, bits, scheme, group_size = inputs[:8]
    ctx.save_for_backward(codes, scales, zeros)
    ctx.fmt = (bits, scheme, group_size, int(x.shape[-1]))
    ctx.has_bias = bias is not None


def _matmul_backward(ctx, grad):
    codes, scales, zeros = ctx.saved_tensors
    bits, scheme, group_size, K = ctx.fmt
    gx = gb = None
    if ctx.needs_input_grad[0]:
        # act_bits rounding is treated as identity (straight-through), as in QAT
        w = torch.ops.lowbit.dequantize(codes, scales, zeros, bits, scheme, group_size, K)
        gx = grad @ w.to(grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, gb, None, None, None, None, None, None


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)


# -------------------------------------------------------------------------------------- dequantize
@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
               scheme: int, group_size: int, K: int) -> torch.Tensor:
    fmt = make_format(bits, scheme, group_size)
    return ops.dequantize(QuantizedTensor(codes, scales, zeros, (int(codes.shape[0]), int(K)), fmt))


@dequantize.register_fake
def _(codes, scales, zeros, bits, scheme, group_size, K):
    return codes.new_empty((codes.shape[0], K), dtype=torch.float32)


# ---------------------------------------------------------------------------------------- quantize
@torch.library.custom_op("lowbit::quantize", mutates_args=())
def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
             nf4: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qt = ops.quantize(w, bits, decode_group_size(group_size), symmetric, codebook="nf4" if nf4 else None)
    zeros = qt.zeros.clone() if qt.zeros is not None else w.new_empty((0,), dtype=torch.uint8)
    return qt.codes, qt.scales.clone(), zeros  # per-tensor scales are a view of a larger buffer: copy


@quantize.register_fake
def _(w, bits, group_size, symmetric, nf4):
    rows, K = w.shape
    g = decode_group_size(group_size)
    G = 1 if g == "tensor" else (1 if g is None else -(-K // g))
    nf4_or_sym = nf4 or symmetric
    code_dtype = torch.int8 if (bits == 8 and symmetric and not nf4) else torch.uint8
    codes = w.new_empty((rows, K if bits == 8 else (K + 1) // 2), dtype=code_dtype)
    srows = 1 if g == "tensor" else rows
    scales = w.new_empty((srows, G), dtype=torch.float32)
    zeros = w.new_empty((0,) if nf4_or_sym else (srows, G), dtype=torch.uint8)
    return codes, scales, zeros


def quantized_tensor(codes, scales, zeros, bits, scheme, group_size, K) -> QuantizedTensor:
    """The QuantizedTensor the op arguments stand for (no packing)."""
    return QuantizedTensor(codes, scales, zeros, (int(codes.shape[0]), int(K)), make_format(bits, scheme, group_size))
