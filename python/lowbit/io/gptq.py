"""GPTQ checkpoints (AutoGPTQ / GPTQModel "GPTQ" layout) <-> QuantizedTensor, without requantizing.

Layout of one Linear with K inputs, N outputs, b bits (b in 2, 4, 8; f = 32 / b codes per word):
  qweight int32 [K/f, N]  codes packed along K: bit field i of qweight[r, n] is q[r*f + i, n]
  qzeros  int32 [G, N/f]  zero points packed along N the same way
  scales  fp16  [G, N]
  g_idx   int32 [K]       group of input channel k (optional; default k // (K/G))
  meaning: w[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]
v1 ("gptq", what AutoGPTQ and GPTQModel write by default) stores z - 1 in qzeros (masked to b bits);
v2 ("gptq_v2") stores z. See docs/format.md for how checkpoint_format="auto" decides.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, NamedTuple, Optional

import numpy as np

from ..tensor import QuantizedTensor
from . import _common as C

FORMATS = ("gptq", "gptq_v2")


class Imported(NamedTuple):
    """qt: the weight [N, K] in lowbit's format, K in the order `perm` gives. perm: int64 [K] or
    None. With act-order, y = x[..., perm] @ dequantize(qt).T (lowbit groups are contiguous along K,
    so the input channels are permuted instead)."""

    qt: QuantizedTensor
    perm: Optional[np.ndarray]


def detect_checkpoint_format(stored_zeros: np.ndarray, bits: int, hint: Optional[str] = None) -> str:
    """v1 ("gptq") or v2 ("gptq_v2") for unpacked stored zero points. hint: a checkpoint_format
    from the checkpoint's metadata / quantize_config, which wins. Otherwise every stored zero equal
    to 2^(b-1) - 1 means v1 (symmetric), every one equal to 2^(b-1) means v2 (symmetric); anything
    else cannot be told apart from the numbers and is read as v1 (the default that AutoGPTQ and
    GPTQModel serialize) with a warning."""
    if hint is not None:
        hint = str(hint).lower()
        if hint not in FORMATS:
            raise ValueError(f"unknown GPTQ checkpoint_format {hint!r}; expected one of {FORMATS}")
        return hint
    mid = 1 << (bits - 1)
    if np.all(stored_zeros == mid - 1):
        return "gptq"
    if np.all(stored_zeros == mid):
        return "gptq_v2"
    warnings.warn("GPTQ checkpoint_format could not be inferred from the zero points; reading them as "
                  "v1 ('gptq': stored zero = zero - 1). Pass checkpoint_format= to be sure.", stacklevel=3)
    return "gptq"


def from_gptq(qweight: Any, qzeros: Any, scales: Any, g_idx: Any = None, *, bits: int = 4,
              checkpoint_format: str = "auto", symmetric: Optional[bool] = None,
              name: str = "weight") -> Imported:
    """Import one GPTQ Linear. checkpoint_format: "gptq" (v1), "gptq_v2" or "auto" (see
    detect_checkpoint_format). symmetric: None imports as lowbit symmetric when every zero is
    2^(b-1) (GPTQ sym=True) and as asymmetric otherwise; True requires that; False always keeps
    explicit zeros. Either way the dequantized values are bit-identical to the checkpoint's."""
    where = f"GPTQ tensor {name!r}"
    if bits not in (2, 4, 8):
        raise ValueError(f"{where}: bits must be 2, 4 or 8 (int32-packed GPTQ), got {bits}")
    qw, qz, sc = C.host(qweight, "qweight"), C.host(qzeros, "qzeros"), C.host(scales, "scales")
    try:
        C.require(qw, "qweight", ("int32", "uint32"), 2)
        C.require(qz, "qzeros", ("int32", "uint32"), 2)
        C.require(sc, "scales", ("float16", "float32", "bfloat16"), 2)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
    C.require_nonempty(where, qweight=qw, scales=sc)
    f = 32 // bits
    K, N = qw.shape[0] * f, qw.shape[1]
    G = sc.shape[0]
    if sc.shape[1] != N:
        raise ValueError(f"{where}: scales {sc.shape} do not match qweight {qw.shape} (want [G, {N}])")
    if qz.shape != (G, (N + f - 1) // f) or N % f:
        raise ValueError(f"{where}: qzeros {qz.shape} do not match scales {sc.shape} (want [{G}, {N // f}], N % {f} == 0)")
    if g_idx is None:
        if G < 1 or K % G:
            raise ValueError(f"{where}: K={K} is not a multiple of {G} groups; pass g_idx")
        g = np.arange(K) // (K // G)
    else:
        g = C.host(g_idx, "g_idx").astype(np.int64).reshape(-1)
        if g.shape[0] != K:
            raise ValueError(f"{where}: g_idx has {g.shape[0]} entries but qweight holds K={K} "
                             f"rows of {bits}-bit codes (is bits={bits} right?)")
        if g.min() < 0 or g.max() >= G:
            raise ValueError(f"{where}: g_idx values must lie in [0, {G})")
    perm = np.argsort(g, kind="stable")
    counts = np.bincount(g, minlength=G)
    gs = int(counts[0])
    if G > 1 and (np.any(counts[:-1] != gs) or counts[-1] > gs or counts[-1] == 0):
        raise ValueError(f"{where}: groups of unequal size {sorted(set(counts.tolist()))}; lowbit groups "
                         f"are contiguous runs of one size (a shorter last one allowed)")
    if G > 1 and gs % 16:
        raise ValueError(f"{where}: group size {gs} is not a multiple of 16, which lowbit requires")

    q = C.unpack_int32(qw, bits, axis=0)                      # [K, N]
    stored = C.unpack_int32(qz, bits, axis=1)                 # [G, N]
    fmt = detect_checkpoint_format(stored, bits, None if checkpoint_format == "auto" else checkpoint_format)
    mask = (1 << bits) - 1
    zeros = (stored + 1) & mask if fmt == "gptq" else stored  # v1 stored z - 1 (wrapped to b bits)
    mid = 1 << (bits - 1)
    all_mid = bool(np.all(zeros == mid))
    if symmetric and not all_mid:
        raise ValueError(f"{where}: symmetric=True but the zero points are not all {mid}")
    sym = all_mid if symmetric is None else bool(symmetric)
    if np.array_equal(perm, np.arange(K)):
        perm_out = None
    else:
        perm_out = perm.astype(np.int64)
        q = q[perm]
    s32 = sc.astype(np.float32)  # fp16 -> fp32 is exact
    qt = C.make_qt(q.T, s32.T, zeros.T, bits, None if G == 1 else gs, sym)
    return Imported(qt, perm_out)


def to_gptq(qt: QuantizedTensor, perm: Any = None, *, checkpoint_format: str = "gptq") -> Dict[str, np.ndarray]:
    """Export a lowbit int2/int4/int8 QuantizedTensor [N, K] as GPTQ arrays {qweight, qzeros,
    scales, g_idx} (numpy). Scales are rounded to float16 (the format's dtype). perm (from an
    act-order import) puts the codes back in the original K order and writes the matching g_idx.
    Symmetric tensors are written with zero 2^(b-1) (GPTQ sym=True)."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")
    if qt.bits not in (2, 4, 8):
        raise ValueError(f"GPTQ export supports 2, 4 and 8 bits, not {qt.bits}")
    q = C.unsigned_codes(qt)                                  # [N, K] in lowbit's K order
    s, z = C.params(qt)                                       # [N, G]
    N, K = qt.shape
    f = 32 // qt.bits
    if K % f or N % f:
        raise ValueError(f"GPTQ packs {f} codes per int32: K={K} and N={N} must be multiples of {f}")
    gs = C.kernel_group_size(qt)
    g_perm = np.arange(K) // gs
    q_orig, g_idx = q, g_perm
    if perm is not None:
        p = C.host(perm, "perm").astype(np.int64).reshape(-1)
        if not np.array_equal(np.sort(p), np.arange(K)):
            raise ValueError(f"perm must be a permutation of range({K})")
        q_orig = np.empty_like(q)
        q_orig[:, p] = q
        g_idx = np.empty(K, np.int64)
        g_idx[p] = g_perm
    stored = (z - 1) & ((1 << qt.bits) - 1) if checkpoint_format == "gptq" else z
    return {
        "qweight": C.pack_int32(q_orig.T, qt.bits, axis=0),
        "qzeros": C.pack_int32(stored.T, qt.bits, axis=1),
        "scales": C.fp16_scales(s.T, "GPTQ export"),
        "g_idx": g_idx.astype(np.int32),
    }


def load_gptq(path: str, *, bits: Optional[int] = None, checkpoint_format: str = "auto",
              symmetric: Optional[bool] = None, quantize_config: Optional[dict] = None) -> Dict[str, Any]:
    """Read a GPTQ safetensors checkpoint: {layer prefix: Imported(qt, perm)} for every
    `<prefix>.qweight`, plus the other tensors (biases, norms, embeddings) as numpy arrays.
    quantize_config: the checkpoint's quantize_config / quantization_config dict (bits,
    checkpoint_format); explicit arguments win over it."""
    from .safetensors_io import read_raw

    cfg = dict(quantize_config or {})
    tensors, meta = read_raw(path)
    bits = C.exact_int(bits or cfg.get("bits", 4), "GPTQ bits", 1)
    hint = checkpoint_format
    if hint == "auto":
        hint = cfg.get("checkpoint_format") or meta.get("checkpoint_format") or "auto"
    out: Dict[str, Any] = {}
    used = set()
    for key in sorted(tensors):
        if not key.endswith(".qweight"):
            continue
        pre = key[: -len(".qweight")]
        parts = {p: tensors.get(f"{pre}.{p}") for p in ("qzeros", "scales", "g_idx")}
        for p in ("qzeros", "scales"):
            if parts[p] is None:
                raise ValueError(f"GPTQ tensor {pre!r}: {pre}.{p} is missing")
        out[pre] = from_gptq(tensors[key], parts["qzeros"], parts["scales"], parts["g_idx"], bits=bits,
                             checkpoint_format=hint, symmetric=symmetric, name=pre)
        used.update({key, f"{pre}.qzeros", f"{pre}.scales", f"{pre}.g_idx"})
    for key, a in tensors.items():
        if key not in used:
            out[key] = a
    return out
