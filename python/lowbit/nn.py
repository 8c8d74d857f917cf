"""torch.nn integration: QuantLinear (a drop-in for nn.Linear over a QuantizedTensor),
quantize_dynamic (torch.ao.quantization.quantize_dynamic's call shape, backed by lowbit W8A8), and
saving / loading whole quantized models.

    from lowbit.nn import QuantLinear
    q = QuantLinear.from_linear(linear, bits=4, group_size=128)        # int4 g128 asym
    q = QuantLinear.from_linear(linear, bits=8, group_size=None, symmetric=True, act_bits=8)  # W8A8
    y = q(x)                           # torch.ops.lowbit.matmul: CPU kernels or CUDA tensor cores

The weight is stored as buffers (codes, scales[, zeros][, perm][, input_scale]) so `.to(device)`,
`state_dict` / `load_state_dict` and torch.compile / torch.export work. In eager inference the
layer keeps its QuantizedTensor (validated, packed) while the buffers are the same tensors at the
same version, and a float32 CPU call goes straight to the packed kernel; autograd and
torch.compile go through torch.ops.lowbit.matmul, whose packed layouts are cached per buffer set
by lowbit.torch_ops. The layer computes
    y = ((x / input_scale)[..., perm]) @ dequantize(W)ᵀ + bias
with input_scale (AWQ-style unfolded scales) and perm (act-order imports) optional.
Gradients flow to x (and to a bias that requires grad); the quantized weight is frozen.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from . import ops, torch_ops  # noqa: F401  (torch_ops registers torch.ops.lowbit.*)
from .tensor import SCHEMES, QuantFormat, QuantizedTensor

__all__ = ["QuantLinear", "quantize_dynamic", "quantized_state_dict", "save_quantized_model",
           "load_quantized_model", "replace_module"]

_FLOAT_KEEP = ("scales", "input_scale")  # float32 buffers that dtype casts (model.half()) must not touch


def _as_torch(a, device=None):
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    elif not isinstance(a, torch.Tensor):
        raise TypeError(f"expected a torch tensor or numpy array, got {type(a).__name__}")
    a = a.detach()
    return a if device is None else a.to(device)


class QuantLinear(nn.Module):
    """y = x @ dequantize(W)ᵀ + bias with W a lowbit QuantizedTensor [out_features, in_features].

    Construct an empty (zero) layer of a given format — e.g. as a skeleton for load_state_dict —
    with QuantLinear(in_features, out_features, bias, bits=, group_size=, symmetric=, codebook=,
    act_bits=, act_order=, input_scale=), or fill one with from_linear / from_quantized /
    from_layer_result. act_bits=8: dynamic int8 activations (W8A8 / W4A8 kernels), one scale per
    token, or per token and weight group with act_granularity="block" (see lowbit.matmul)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 group_size=128, symmetric: bool = False, codebook: Optional[str] = None,
                 act_bits: Optional[int] = None, act_granularity: str = "token", act_order: bool = False,
                 input_scale: bool = False, device=None):
        super().__init__()
        fmt = ops._format(bits, group_size, symmetric, codebook)  # validates like lowbit.quantize
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if act_bits is not None and (isinstance(act_bits, bool) or not isinstance(act_bits, (int, np.integer))
                                     or act_bits != 8):
            raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
        act_bits = None if act_bits is None else 8
        if act_granularity not in ops.ACT_GRANULARITIES or (act_granularity == "block" and act_bits is None):
            raise ValueError(f"act_granularity must be one of {ops.ACT_GRANULARITIES} ('block' with act_bits=8), "
                             f"got {act_granularity!r} with act_bits={act_bits!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.format = fmt
        self.act_bits = act_bits
        self.act_granularity = act_granularity
        K, N = self.in_features, self.out_features
        rows = 1 if fmt.group_size == "tensor" else N
        G = fmt.num_groups(K)
        code_dtype = torch.int8 if (fmt.bits == 8 and fmt.scheme == "symmetric") else torch.uint8
        self.register_buffer("codes", torch.zeros((N, K if fmt.bits == 8 else (K + 1) // 2), dtype=code_dtype,
                                                  device=device))
        self.register_buffer("scales", torch.zeros((rows, G), dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros((rows, G), dtype=torch.uint8, device=device)
                             if fmt.scheme == "asymmetric" else None)
        self.register_buffer("perm", torch.arange(K, device=device) if act_order else None)
        self.register_buffer("input_scale", torch.ones(K, device=device) if input_scale else None)
        self.bias = nn.Parameter(torch.zeros(N, device=device), requires_grad=False) if bias else None

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias=None, *, perm=None, input_scale=None,
                       act_bits: Optional[int] = None, act_granularity: str = "token") -> "QuantLinear":
        """A layer over an existing QuantizedTensor (numpy or torch arrays), e.g. a lowbit.load
        entry or a lowbit.io.from_gptq import (pass its perm)."""
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
        qt.validate()
        N, K = qt.shape
        f = qt.format
        dev = qt.codes.device if isinstance(qt.codes, torch.Tensor) else None
        m = cls(K, N, bias is not None, bits=f.bits, group_size=f.group_size, symmetric=f.symmetric,
                codebook=f.codebook, act_bits=act_bits, act_granularity=act_granularity,
                act_order=perm is not None,
                input_scale=input_scale is not None, device=dev)
        m.codes = _as_torch(qt.codes, dev).contiguous()
        m.scales = _as_torch(qt.scales, dev).contiguous()
        m.zeros = None if qt.zeros is None else _as_torch(qt.zeros, dev).contiguous()
        if perm is not None:
            p = _as_torch(perm, dev)
            if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                raise TypeError(f"perm must hold integer column indices, got {p.dtype}")
            p = p.to(torch.int64).reshape(-1)
            if p.numel() != K or not torch.equal(torch.sort(p.cpu()).values, torch.arange(K)):
                raise ValueError(f"perm must be a permutation of range({K})")
            m.perm = p
        if input_scale is not None:
            s = _as_torch(input_scale, dev).float().reshape(-1).contiguous()
            if s.numel() != K:
                raise ValueError(f"input_scale must have {K} entries, got {s.numel()}")
            if not (torch.isfinite(s).all() and (s != 0).all()):
                raise ValueError("input_scale must be finite and non-zero (x is divided by it)")
            m.input_scale = s
        if bias is not None:
            m.bias = nn.Parameter(_as_torch(bias, dev).float().clone().reshape(N), requires_grad=False)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size=128, symmetric: bool = False,
                    codebook: Optional[str] = None, act_bits: Optional[int] = None,
                    act_granularity: str = "token", clip_ratio: float = 1.0) -> "QuantLinear":
        """Round-to-nearest quantization of linear.weight with lowbit.quantize (on its device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float().contiguous()
        qt = ops.quantize(w, bits, group_size, symmetric, codebook=codebook, clip_ratio=clip_ratio)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_quantized(qt, bias, act_bits=act_bits, act_granularity=act_granularity)

    @classmethod
    def from_layer_result(cls, result, linear: Optional[nn.Module] = None, bias=None) -> "QuantLinear":
        """The layer a lowbit.algorithms LayerResult stands for: its QuantizedTensor, act-order perm,
        unfolded input scale (ignored when scale_folded: the model already divides x by it) and
        act_bits. The bias comes from `linear` (the float layer being replaced) or `bias`."""
        if bias is None and linear is not None and getattr(linear, "bias", None) is not None:
            bias = linear.bias.detach()
        scale = None if (result.input_scale is None or result.scale_folded) else result.input_scale
        return cls.from_quantized(result.qt, bias, perm=result.perm, input_scale=scale,
                                  act_bits=result.act_bits)

    # ---------------------------------------------------------------------------------- queries
    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def group_size(self):
        return self.format.group_size

    @property
    def scheme(self) -> str:
        return self.format.scheme

    def op_args(self):
        """(codes, scales, zeros, bits, scheme, group_size) as torch.ops.lowbit.* take them."""
        return (self.codes, self.scales, self.zeros, self.format.bits, SCHEMES[self.format.scheme],
                torch_ops.encode_group_size(self.format.group_size))

    def quantized_tensor(self) -> QuantizedTensor:
        """The QuantizedTensor over this layer's buffers (in perm / input-scale domain)."""
        return QuantizedTensor(self.codes, self.scales, self.zeros, (self.out_features, self.in_features),
                               self.format)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight in the original input domain: y = x @ dequantized_weight()ᵀ + bias
        (up to activation rounding when act_bits is set)."""
        w = ops.dequantize(self.quantized_tensor())
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        if self.input_scale is not None:
            w = w / self.input_scale[None, :]
        return w

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch_ops.check_features(x, self.in_features)   # before perm's index_select could drop extra columns
        b = self._buffers   # (not self.perm etc.: nn.Module's __getattr__ costs ~0.5 µs a name)
        if b["input_scale"] is not None:
            x = x / b["input_scale"].to(x.dtype)
        if b["perm"] is not None:
            x = x.index_select(-1, b["perm"])
        bias = self.bias
        if torch_ops.skips_dispatch(x, bias):
            qt, packed, bias_in = self._eager_plan()
            x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            if (packed is not None and ops._plain_cpu_x(x2, self.in_features)
                    and (bias is None or (bias_in is not None and bias_in.dtype is x.dtype))):
                # a float32 / bfloat16 / float16 x on the CPU, the common inference call: straight to the
                # packed kernel (~5 µs of Python less per call than lowbit.matmul's checks of every argument)
                y = ops._matmul_packed(x2, packed, bias_in, self.out_features, self.act_bits or None,
                                       self.act_granularity == "block")
                return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
            return ops.matmul(x, qt, bias=bias, act_bits=self.act_bits or None,
                              act_granularity=self.act_granularity)
        codes, scales, zeros, bits, scheme, g = self.op_args()
        return torch.ops.lowbit.matmul(x, codes, scales, zeros, bias, bits, scheme, g, self.act_bits or 0,
                                       self.act_granularity == "block", self.in_features)

    def _eager_plan(self):
        """(quantized_tensor(), its packed CPU layout or None, the bias detached when it is a
        contiguous CPU tensor else None), kept while the buffers and bias are the same tensors at the
        same version (so validation and packing are reused; load_state_dict's in-place copy or
        .to() make new ones). A QuantizedTensor on another device, or a format no packed kernel
        takes, has no packed layout here."""
        b = self._buffers
        codes, scales, zeros, bias = b["codes"], b["scales"], b["zeros"], self.bias
        hit = self.__dict__.get("_qt_cache")
        if (hit is not None and hit[0] is codes and hit[1] is scales and hit[2] is zeros and hit[3] is bias
                and hit[4] == (codes._version, scales._version, zeros is None or zeros._version,
                               bias is None or bias._version)):
            return hit[5]
        qt = self.quantized_tensor()
        cpu = codes.device.type == "cpu"
        if cpu:
            qt.validate()
        plan = (qt, ops._packed_weight(qt) if cpu else None,
                bias.detach() if bias is not None and bias.is_cpu and bias.is_contiguous() else None)
        self.__dict__["_qt_cache"] = (codes, scales, zeros, bias, (
            codes._version, scales._version, zeros is None or zeros._version, bias is None or bias._version), plan)
        return plan

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_qt_cache", None)     # packed copies: rebuilt on first use
        return state

    def _apply(self, fn, recurse=True):
        # model.half() / .to(torch.bfloat16) would cast the float32 scales, which the format fixes
        # at float32: keep their dtype (device moves still apply).
        keep = {n: self._buffers[n] for n in _FLOAT_KEEP if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        g = self.format.group_size
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"bits={self.bits}, group_size={'per_row' if g is None else g}, scheme={self.scheme}, "
             f"act_bits={self.act_bits}")
        if self.act_granularity != "token":
            s += f", act_granularity={self.act_granularity}"
        if self.perm is not None:
            s += ", act_order=True"
        if self.input_scale is not None:
            s += ", input_scale=True"
        return s


# ------------------------------------------------------------------------------------- helpers
def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule called `name` (dotted path) of model to `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_dynamic(model: nn.Module, qconfig_spec=None, dtype=None, mapping=None,
                     inplace: bool = False) -> nn.Module:
    """torch.ao.quantization.quantize_dynamic's call shape for nn.Linear, backed by lowbit W8A8:
    int8 symmetric per-output-channel weights and int8 symmetric per-token activations quantized
    on the fly (torch's default: per-tensor weights, per-tensor asymmetric uint8 activations with
    reduce_range). qconfig_spec: a set of module types (only nn.Linear and subclasses are
    converted; others are left in float) and/or module names (a name converts that module and the
    Linears inside it), or a dict whose keys are used the same way (its qconfig values are
    ignored); a bare string or type is refused (TypeError), pass {"fc"}. A Linear shared by several
    parents becomes one QuantLinear in all of them. Linear weights must be float32, float16 or
    bfloat16 (the kernels' dtypes; float64 is refused, not converted). dtype must be torch.qint8.
    mapping is not supported. Returns the converted model (a deep copy unless inplace)."""
    if dtype is None:
        dtype = torch.qint8
    if dtype != torch.qint8:
        raise ValueError(f"lowbit.quantize_dynamic supports dtype=torch.qint8 (W8A8) only, got {dtype}; "
                         f"for weight-only int4 use QuantLinear.from_linear(..., bits=4)")
    if mapping is not None:
        raise ValueError("lowbit.quantize_dynamic does not take a mapping: nn.Linear always maps to "
                         "lowbit.nn.QuantLinear")
    from ._interop import FLOAT_DTYPES, dtype_name

    if isinstance(qconfig_spec, (str, bytes, type)):
        raise TypeError(f"qconfig_spec must be a set (or dict) of module types and/or module names, got "
                        f"{qconfig_spec!r}; wrap a single one in a set: {{{qconfig_spec!r}}}")
    spec = {nn.Linear} if qconfig_spec is None else set(qconfig_spec)
    bad = [s for s in spec if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module)))]
    if bad:
        raise TypeError(f"qconfig_spec items must be nn.Module subclasses or module names (str), got {bad!r}")
    types = tuple(t for t in spec if isinstance(t, type))
    names = {s for s in spec if isinstance(s, str)}
    if not inplace:
        model = copy.deepcopy(model)
    # every path (a Linear shared by several parents is one module under several names)
    refs = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)]
    chosen = {}
    for name, m in refs:
        by_type = any(issubclass(type(m), t) for t in types)
        by_name = any(name == n or name.startswith(n + ".") or n == "" for n in names)
        if by_type or by_name:
            chosen.setdefault(id(m), (name, m))
    for name, m in chosen.values():   # refuse here, not at the first call ("x must be float32, ...")
        dt = dtype_name(m.weight)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"quantize_dynamic: Linear {name!r} has {dt} weights; the lowbit kernels take "
                            f"float32, float16 or bfloat16 (convert the model, e.g. model.float())")
    quantized, replaced = {}, []
    for name, m in refs:
        if id(m) not in chosen or any(name.startswith(r + ".") for r in replaced):
            continue   # not selected, or inside a Linear (subclass) already replaced
        if id(m) not in quantized:   # quantize once: every reference gets the same QuantLinear
            quantized[id(m)] = QuantLinear.from_linear(m, bits=8, group_size=None, symmetric=True, act_bits=8)
        if name == "":
            return quantized[id(m)]
        replace_module(model, name, quantized[id(m)])
        replaced.append(name)
    return model


# ---------------------------------------------------------------------------- whole-model files
MODEL_FILE = "model.lowbit.safetensors"
_QL_BUFFERS = ("codes", "scales", "zeros", "perm", "input_scale")


def quantized_state_dict(model: nn.Module) -> Dict[str, Any]:
    """model.state_dict() with each QuantLinear's buffers replaced by one QuantizedTensor under
    '<name>.weight' (plus '<name>.perm', '<name>.input_scale', '<name>.lowbit_act_bits' and
    '<name>.lowbit_act_per_block' where set) — the dict lowbit.save writes and
    load_quantized_model reads."""
    out: Dict[str, Any] = {}
    qnames = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            qnames.add(name)
            pre = f"{name}." if name else ""
            out[pre + "weight"] = m.quantized_tensor()
            if m.perm is not None:
                out[pre + "perm"] = m.perm
            if m.input_scale is not None:
                out[pre + "input_scale"] = m.input_scale
            if m.act_bits is not None:
                out[pre + "lowbit_act_bits"] = torch.tensor([m.act_bits], dtype=torch.int64)
            if m.act_granularity == "block":
                out[pre + "lowbit_act_per_block"] = torch.tensor([1], dtype=torch.int64)
    skip = {f"{n}.{b}" if n else b for n in qnames for b in _QL_BUFFERS}
    for k, v in model.state_dict().items():
        if k not in skip:
            out[k] = v
    return out


def save_quantized_model(model: nn.Module, path: str) -> str:
    """Save a model holding QuantLinears with lowbit.save. path: a .safetensors file, or a folder
    (created) that receives model.lowbit.safetensors and, for a transformers model, its config
    (so load_quantized_model(folder) needs nothing else). Returns the file written."""
    from .io import save

    if str(path).endswith(".safetensors"):
        file = str(path)
    else:
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, MODEL_FILE)
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "save_pretrained"):
            cfg.save_pretrained(path)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            try:
                gen.save_pretrained(path)
            except Exception:  # noqa: BLE001 - a generation config is optional
                pass
    save(quantized_state_dict(model), file)
    return file


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no random init)
    while buffers stay real: non-persistent ones, such as rotary frequencies, are computed in
    __init__ and are not in the file."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(model_or_config, folder: Optional[str]) -> nn.Module:
    """The model to load into: the caller's module, or one built from a transformers config with
    its parameters on the meta device (the float weights are never allocated)."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    cfg = model_or_config
    if cfg is None or isinstance(cfg, (str, os.PathLike)):
        src = folder if cfg is None else cfg
        if src is None:
            raise ValueError("load_quantized_model needs a model, a transformers config, or a folder "
                             "holding config.json")
        cfg = AutoConfig.from_pretrained(src)
    if not isinstance(cfg, PretrainedConfig):
        raise TypeError(f"expected an nn.Module, a transformers PretrainedConfig or a config folder, "
                        f"got {type(model_or_config).__name__}")
    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(cfg)


def load_quantized_model(path: str, model_or_config=None) -> nn.Module:
    """Rebuild a model saved by save_quantized_model. path: the folder or the .safetensors file.
    model_or_config: an nn.Module skeleton (its float Linears named in the file are replaced by
    QuantLinears; the other weights are loaded into it), a transformers config or config folder
    (AutoModelForCausalLM.from_config builds the skeleton), or None to use path's config.json.
    Returns the model in eval mode. A skeleton built here holds no float weights: the file's
    tensors become its parameters; a caller's module gets them copied in."""
    from .io import load

    folder = None
    file = path
    if os.path.isdir(path):
        folder, file = path, os.path.join(path, MODEL_FILE)
    model = _skeleton(model_or_config, folder)
    built_here = model is not model_or_config
    sd = load(file, framework="torch")
    quantized = {k[: -len(".weight")] if k != "weight" else "": v for k, v in sd.items()
                 if isinstance(v, QuantizedTensor)}
    for name, qt in quantized.items():
        if name:    # the layer it replaces must be there, with the file's shape
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{file}: the model has no module {name!r} for this quantized weight") from None
            have = (getattr(old, "out_features", None), getattr(old, "in_features", None))
            if have != tuple(qt.shape):
                raise ValueError(f"{file}: {name} is {type(old).__name__} with (out, in) features {have} "
                                 f"in the model but {tuple(qt.shape)} in the file")
        pre = f"{name}." if name else ""
        act = sd.pop(pre + "lowbit_act_bits", None)
        per_block = sd.pop(pre + "lowbit_act_per_block", None) is not None
        q = QuantLinear.from_quantized(qt, sd.pop(pre + "bias", None), perm=sd.pop(pre + "perm", None),
                                       input_scale=sd.pop(pre + "input_scale", None),
                                       act_bits=None if act is None else int(act.reshape(-1)[0]),
                                       act_granularity="block" if per_block else "token")
        del sd[pre + "weight"]
        if name == "":
            return q.eval()
        replace_module(model, name, q)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=built_here)
    if built_here:
        model.tie_weights()     # assign replaced the tied Parameter on one side only (older files)
    ql = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantLinear)
          for b in _QL_BUFFERS + ("bias",)}
    missing = [k for k in missing if k not in ql]
    missing += [n for n, p in model.named_parameters(remove_duplicate=False)
                if p.is_meta and n not in missing]
    if missing or unexpected:
        raise ValueError(f"{file}: does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval()
