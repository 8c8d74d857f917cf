"""Configs for the quantization algorithms: small dataclasses, validated on construction so a
bad value fails where it was written, with a message that says what would work."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple, Union

GroupSize = Union[int, None]
_BITS = (2, 3, 4, 8)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# field annotation -> (test, what it needs): a string for a bool would count as True, 8.0 act_bits
# would reach the kernels, a float n_grid would fail inside torch.linspace
_FIELD_KINDS = {
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "int": (_is_int, "an int"),
    "Optional[int]": (lambda v: v is None or _is_int(v), "an int or None"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
}
_FIELD_KINDS["Optional[float]"] = (lambda v: v is None or _FIELD_KINDS["float"][0](v), "a finite number or None")


def _check_field_types(cfg) -> None:
    for f in fields(cfg):
        kind = _FIELD_KINDS.get(f.type)
        if kind is not None and not kind[0](getattr(cfg, f.name)):
            raise TypeError(f"{type(cfg).__name__}.{f.name} must be {kind[1]}, got {getattr(cfg, f.name)!r}")


def _check_weight_format(name: str, bits, group_size, symmetric) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _BITS:
        raise ValueError(f"{name}.bits must be one of {_BITS}, got {bits!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{name}.group_size must be an int or None (one group per output "
                            f"channel), got {group_size!r}")
        if group_size <= 0 or group_size % 16:
            raise ValueError(f"{name}.group_size must be a positive multiple of 16 (e.g. 32, 64, "
                             f"128) or None (per output channel); got {group_size}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"{name}.symmetric must be True or False, got {symmetric!r}")


def _check_skip(name: str, skip) -> Tuple[str, ...]:
    if isinstance(skip, str):
        raise TypeError(f"{name}.skip must be a list of name patterns (fnmatch style, e.g. "
                        f"['lm_head', '*.gate']), not a single string {skip!r}")
    skip = tuple(skip)
    for p in skip:
        if not isinstance(p, str):
            raise TypeError(f"{name}.skip patterns must be strings, got {p!r}")
    return skip


def _check_lockstep_max_gib(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0):
        raise ValueError(f"{name}.lockstep_max_gib must be a positive number of GiB or None, got {value!r}")


def _check_fraction(name: str, value, lo_open: bool = False) -> None:
    ok = (0.0 < value <= 1.0) if lo_open else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if lo_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


@dataclass
class RTNConfig:
    """Round-to-nearest: lowbit.quantize on each Linear weight, nothing else."""
    bits: int = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    skip: Sequence[str] = ("lm_head",)

    def __post_init__(self):
        _check_field_types(self)
        _check_weight_format("RTNConfig", self.bits, self.group_size, self.symmetric)
        self.skip = _check_skip("RTNConfig", self.skip)


@dataclass
class GPTQConfig:
    """GPTQ (Frantar et al. 2022). percdamp: dampening as a fraction of the mean Hessian diagonal.
    block_size: columns per lazy batch update. act_order: quantize columns by decreasing Hessian
    diagonal (the result carries a permutation / g_idx). static_groups: group scales fixed from the
    original weights before any update (keeps groups in original column order with act_order).
    sequential: each block is calibrated on the outputs of the already-quantized blocks before it;
    true_sequential: also, inside a block, each group of Linears sharing an input (q/k/v, o,
    gate/up, down) on the outputs of those quantized before it (one block forward per group
    instead of one for the whole block).
    lockstep: with true_sequential, run each block once per calibration batch, all batches' forwards
    in lock-step, pausing at each group of Linears until it is calibrated on every batch and
    quantized (same result, one block forward per batch instead of one per group plus one); holds
    one block's activations for every calibration batch in memory. lockstep_max_gib: lockstep
    only while that memory (bounded from a probe forward of one batch) fits in this many GiB;
    None: half the memory available at the time. Otherwise calibration streams, with a warning.
    clip_search: each group's scale/zero is the clip ratio in [min_clip, 1] (n_clip_grid points)
    with the least squared rounding error of the group's columns when it is reached, instead of
    plain min-max. clip_hessian_weighted: weigh each column's squared error by GPTQ's own loss
    for rounding it, 1 / U_jj² (U the Cholesky factor of H⁻¹); dynamic groups only.
    awq_scales: before GPTQ, rescale each stage's input by AWQ's activation-aware scales (searched
    on up to awq_max_tokens calibration rows, folded into the producing norm where exact), as
    AWQ-then-GPTQ recipes do."""
    bits: int = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    sequential: bool = True
    true_sequential: bool = True
    lockstep: bool = True
    lockstep_max_gib: Optional[float] = None
    clip_search: bool = False
    n_clip_grid: int = 20
    min_clip: float = 0.5
    clip_hessian_weighted: bool = False
    awq_scales: bool = False
    awq_max_tokens: int = 4096
    skip: Sequence[str] = ("lm_head",)

    def __post_init__(self):
        _check_field_types(self)
        _check_lockstep_max_gib("GPTQConfig", self.lockstep_max_gib)
        _check_weight_format("GPTQConfig", self.bits, self.group_size, self.symmetric)
        if not (0.0 < self.percdamp <= 1.0):
            raise ValueError(f"GPTQConfig.percdamp must be in (0, 1] (typical 0.01), got {self.percdamp}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"GPTQConfig.block_size must be a positive int, got {self.block_size!r}")
        if self.n_clip_grid < 1 or self.awq_max_tokens < 1:
            raise ValueError(f"GPTQConfig.n_clip_grid and awq_max_tokens must be >= 1, got "
                             f"{self.n_clip_grid}, {self.awq_max_tokens}")
        _check_fraction("GPTQConfig.min_clip", self.min_clip, lo_open=True)
        if self.clip_hessian_weighted and not (self.clip_search and self.group_size is not None
                                               and not self.static_groups):
            raise ValueError("GPTQConfig.clip_hessian_weighted weighs the clip search of groups chosen "
                             "as GPTQ reaches them: it needs clip_search=True, a group_size and "
                             "static_groups=False")
        self.skip = _check_skip("GPTQConfig", self.skip)


@dataclass
class AWQConfig:
    """AWQ (Lin et al. 2023). Per-input-channel scales s = mean|x|^alpha, alpha searched over
    n_grid points in [0, 1); then a per-group clip search over clip ratios in [min_clip, 1].
    duo_scaling: True divides s by the weight term (mean |W| relative to its group max)^(1-alpha);
    "both" searches the two families and keeps the lower output error (on the calibration rows;
    in perplexity it helped SmolLM2 at g64 and hurt it and Gemma3 at g128, bench/results_eval).
    lockstep, lockstep_max_gib: calibrate each block in one forward per batch, batches in
    lock-step, within a memory limit (see GPTQConfig)."""
    bits: int = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    n_grid: int = 20
    duo_scaling: Union[bool, str] = False
    clip_search: bool = True
    n_clip_grid: int = 20
    min_clip: float = 0.5
    fold: bool = True
    max_tokens: int = 4096
    lockstep: bool = True
    lockstep_max_gib: Optional[float] = None
    skip: Sequence[str] = ("lm_head",)

    def __post_init__(self):
        _check_field_types(self)
        _check_lockstep_max_gib("AWQConfig", self.lockstep_max_gib)
        _check_weight_format("AWQConfig", self.bits, self.group_size, self.symmetric)
        if self.n_grid < 1 or self.n_clip_grid < 1 or self.max_tokens < 1:
            raise ValueError(f"AWQConfig.n_grid, n_clip_grid and max_tokens must be >= 1, got "
                             f"{self.n_grid}, {self.n_clip_grid}, {self.max_tokens}")
        _check_fraction("AWQConfig.min_clip", self.min_clip, lo_open=True)
        if not (isinstance(self.duo_scaling, bool) or self.duo_scaling == "both"):
            raise ValueError(f"AWQConfig.duo_scaling must be True, False or 'both', got "
                             f"{self.duo_scaling!r}")
        self.skip = _check_skip("AWQConfig", self.skip)


@dataclass
class SmoothQuantConfig:
    """SmoothQuant (Xiao et al. 2022): s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded into the
    preceding norm where possible; then int8 per-channel weights and dynamic per-token int8
    activations (simulated). search_alpha: per stage, the α of least W8A8 output error among
    n_grid points in [0, 1] (and alpha itself), measured on up to max_tokens calibration rows.
    lockstep, lockstep_max_gib: calibrate each block in one forward per batch, batches in
    lock-step, within a memory limit (see GPTQConfig)."""
    alpha: float = 0.5
    weight_bits: int = 8
    act_bits: Optional[int] = 8
    fold: bool = True
    search_alpha: bool = False
    n_grid: int = 11
    max_tokens: int = 2048
    lockstep: bool = True
    lockstep_max_gib: Optional[float] = None
    skip: Sequence[str] = ("lm_head",)

    def __post_init__(self):
        _check_field_types(self)
        _check_lockstep_max_gib("SmoothQuantConfig", self.lockstep_max_gib)
        _check_fraction("SmoothQuantConfig.alpha", self.alpha)
        if self.n_grid < 2 or self.max_tokens < 1:
            raise ValueError(f"SmoothQuantConfig.n_grid must be >= 2 and max_tokens >= 1, got "
                             f"{self.n_grid}, {self.max_tokens}")
        _check_weight_format("SmoothQuantConfig", self.weight_bits, None, True)
        if self.act_bits not in (None, 8):
            raise ValueError(f"SmoothQuantConfig.act_bits must be 8 or None, got {self.act_bits!r}")
        self.skip = _check_skip("SmoothQuantConfig", self.skip)


@dataclass
class QATConfig:
    """Quantization-aware training: fake-quantized weights (and optional dynamic per-token
    activations) with a straight-through estimator; learnable_scales=True trains the group scales
    LSQ-style (zero points stay fixed at their initial integer values)."""
    bits: int = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    act_bits: Optional[int] = None
    learnable_scales: bool = False
    skip: Sequence[str] = ("lm_head",)

    def __post_init__(self):
        _check_field_types(self)
        _check_weight_format("QATConfig", self.bits, self.group_size, self.symmetric)
        if self.act_bits not in (None, 8):
            raise ValueError(f"QATConfig.act_bits must be 8 or None, got {self.act_bits!r}")
        self.skip = _check_skip("QATConfig", self.skip)


_MIXED_ALGOS = (RTNConfig, GPTQConfig, AWQConfig, SmoothQuantConfig)


def _check_algo_config(where: str, cfg) -> None:
    if not isinstance(cfg, _MIXED_ALGOS):
        raise TypeError(f"{where} must be an RTNConfig, GPTQConfig, AWQConfig or SmoothQuantConfig "
                        f"(QAT and nested MixedPrecisionConfig are not per-layer choices), got "
                        f"{type(cfg).__name__}")


@dataclass
class MixedPrecisionConfig:
    """A config per Linear, chosen by name. rules: (pattern, config) pairs, fnmatch style, first
    match wins (a pattern also matches any name ending in '.'+pattern, and a leading '*.' may match
    nothing: see algorithms.mixed.matches; skip patterns match the same way). Linears no
    rule matches get `default` (None: left in float). `skip` wins over every rule; the rules'
    own configs' skip lists are ignored (the rule says which layers they get)."""
    rules: Sequence[Tuple[str, object]] = ()
    default: Optional[object] = None
    skip: Sequence[str] = ("lm_head",)

    def __post_init__(self):
        if isinstance(self.rules, (str, tuple)) and len(self.rules) == 2 and isinstance(self.rules[0], str) \
                and not isinstance(self.rules[1], str):
            raise TypeError("MixedPrecisionConfig.rules must be a list of (pattern, config) pairs; "
                            "wrap a single rule in a list: rules=[(pattern, config)]")
        rules = []
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, (tuple, list)) or len(rule) != 2:
                raise TypeError(f"MixedPrecisionConfig.rules[{i}] must be a (pattern, config) pair, "
                                f"got {rule!r}")
            pattern, cfg = rule
            if not isinstance(pattern, str) or not pattern.strip():
                raise ValueError(f"MixedPrecisionConfig.rules[{i}] pattern must be a non-empty "
                                 f"string such as '*.self_attn.*', got {pattern!r}")
            if pattern.count("[") != pattern.count("]"):
                raise ValueError(f"MixedPrecisionConfig.rules[{i}] pattern {pattern!r} has an "
                                 f"unbalanced '[' / ']' (fnmatch character class)")
            _check_algo_config(f"MixedPrecisionConfig.rules[{i}] config", cfg)
            rules.append((pattern, cfg))
        seen = [p for p, _ in rules]
        dup = sorted({p for p in seen if seen.count(p) > 1})
        if dup:
            raise ValueError(f"MixedPrecisionConfig.rules repeat the pattern(s) {dup}: with first "
                             f"match wins the later ones could never apply")
        self.rules = tuple(rules)
        if self.default is not None:
            _check_algo_config("MixedPrecisionConfig.default", self.default)
        self.skip = _check_skip("MixedPrecisionConfig", self.skip)


_KV_GRANULARITY = ("token", "head", "group", "channel")


@dataclass
class KVCacheConfig:
    """Key/value cache quantization. granularity: "token" (one scale (+zero) per token per head,
    over head_dim), "group" (group_size elements of head_dim per scale), "head" (one scale per
    batch row and head for each block of tokens quantized together), "channel" (one scale per
    head_dim channel over each block of residual_length tokens: KIVI's choice for keys, whose
    outlier channels ruin per-token scales). key_granularity: the keys' granularity when it
    differs from the values' (e.g. key_granularity="channel", granularity="token").
    residual_length: the most recent tokens kept in float (quantized once they leave that window;
    with "channel", in whole blocks of residual_length tokens, so 0 to residual_length - 1 stay)."""
    bits: int = 8
    granularity: str = "token"
    group_size: GroupSize = None
    symmetric: bool = False
    residual_length: int = 0
    key_granularity: Optional[str] = None

    def __post_init__(self):
        _check_field_types(self)
        if self.key_granularity is None:
            self.key_granularity = self.granularity
        grans = (self.granularity, self.key_granularity)
        for what, g in zip(("granularity", "key_granularity"), grans):
            if g not in _KV_GRANULARITY:
                raise ValueError(f"KVCacheConfig.{what} must be one of {_KV_GRANULARITY}, got {g!r}")
        if "group" in grans and self.group_size is None:
            raise ValueError("KVCacheConfig.granularity='group' needs group_size (a multiple of 16 "
                             "dividing head_dim, e.g. 32 or 64)")
        if "group" not in grans and self.group_size is not None:
            raise ValueError(f"KVCacheConfig.group_size is only used with granularity='group', "
                             f"not {self.granularity!r}")
        _check_weight_format("KVCacheConfig", self.bits, self.group_size, self.symmetric)
        r = self.residual_length
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"KVCacheConfig.residual_length must be an int >= 0 (tokens kept in "
                             f"float, e.g. 0-128), got {r!r}")
        if "channel" in grans and r < 1:
            raise ValueError("KVCacheConfig granularity 'channel' quantizes blocks of residual_length "
                             "tokens per channel: set residual_length (e.g. 32-128)")
