"""Mixed precision: a config per Linear, chosen by name pattern, plus the tools to choose them.

- assign_configs / mixed_quantize: route each Linear to the config of the first rule matching
  its name (MixedPrecisionConfig) and run every group through quantize_model with that config,
  restricted to the group's Linears (the algorithms themselves are not duplicated here). Groups
  run in this order: RTN groups first (they need no data), then the others in rule order, each
  calibrated on the model as the groups before it left it (their results applied).
- sensitivity_report: for each Linear and each candidate config, the change of a metric when only
  that Linear is quantized (default metric: relative output error of the model on calibration
  batches; any callable metric(model) -> float, e.g. perplexity, works too), with the bytes the
  layer then takes (model_size_report's accounting).
- choose_configs: given candidates ordered cheap -> accurate and a byte budget, greedily give the
  most sensitive Linears the most accurate candidate that still fits; returns a
  MixedPrecisionConfig for quantize_model.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .common import LayerResult, apply_simulated, find_linears, model_size_report
from .config import MixedPrecisionConfig, RTNConfig, _check_algo_config
from .rtn import rtn_quantize_layer
from .sequential import _normalize

Metric = Callable[[nn.Module], float]


def matches(name: str, pattern: str) -> bool:
    """fnmatch, where a pattern also matches any name ending in '.'+pattern (as find_linears' skip)
    and a leading '*.' may match nothing ('*.layers.0.*' matches 'layers.0.q' of a bare model as
    well as 'model.layers.0.q' of a wrapped one)."""
    return (fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(name, "*." + pattern)
            or (pattern.startswith("*.") and fnmatch.fnmatch(name, pattern[2:])))


def assign_configs(model: nn.Module, config: MixedPrecisionConfig) -> Dict[str, object]:
    """{Linear name: its config} for the Linears that get quantized (skipped ones and, with
    default=None, unmatched ones are absent). Raises when a rule matches no Linear at all (a
    mistyped pattern would otherwise silently leave layers in float)."""
    if not isinstance(config, MixedPrecisionConfig):
        raise TypeError(f"config must be a MixedPrecisionConfig, got {type(config).__name__}")
    names = list(find_linears(model))
    used = [False] * len(config.rules)
    out = {}
    for name in names:
        if any(matches(name, p) for p in config.skip):
            continue
        for i, (pattern, cfg) in enumerate(config.rules):
            if matches(name, pattern):
                used[i] = True
                out[name] = cfg
                break
        else:
            if config.default is not None:
                out[name] = config.default
    unused = [config.rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
        # a rule may match only skipped Linears or only Linears an earlier rule took: say which
        shadowed = [p for p in unused if any(matches(n, p) for n in names)]
        example = ", ".join(repr(n) for n in names[:3]) or "none"
        detail = (f"; {shadowed} match only Linears that skip or an earlier rule already took"
                  if shadowed else "")
        raise ValueError(f"MixedPrecisionConfig rule pattern(s) {unused} matched no Linear to "
                         f"quantize (Linear names look like {example}){detail}")
    return out


def _restricted(cfg, names: Sequence[str], all_names: Sequence[str]):
    """cfg whose skip list leaves exactly `names` (skip = every other Linear, by its full name)."""
    keep = set(names)
    return dataclasses.replace(cfg, skip=tuple(n for n in all_names if n not in keep))


def mixed_quantize(model: nn.Module, config: MixedPrecisionConfig,
                   calibration_data: Optional[Iterable] = None,
                   apply: bool = True, progress: Optional[bool] = None) -> Dict[str, LayerResult]:
    """Quantize each group of Linears sharing a config through quantize_model (see module
    docstring for the order). Returns {Linear name: LayerResult} over all groups."""
    from .api import quantize_model

    assigned = assign_configs(model, config)
    all_names = list(find_linears(model))
    groups: List[tuple] = []   # (config, [names]) keyed by config identity, in first-use order
    for name, cfg in assigned.items():
        for g in groups:
            if g[0] is cfg:
                g[1].append(name)
                break
        else:
            groups.append((cfg, [name]))
    groups.sort(key=lambda g: not isinstance(g[0], RTNConfig))   # stable: RTN first
    data = list(calibration_data) if calibration_data is not None else None
    results: Dict[str, LayerResult] = {}
    for cfg, names in groups:
        results.update(quantize_model(model, _restricted(cfg, names, all_names), data, apply=apply,
                                      progress=progress))
    return results


# ------------------------------------------------------------------ sensitivity

def _output_tensor(out) -> torch.Tensor:
    """The main output of a forward: a tensor, .logits of a model output, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}; pass metric=")


def _forward_all(model: nn.Module, data: List) -> List[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for batch in data:
            a, k = _normalize(batch)
            outs.append(_output_tensor(model(*a, **k)).detach().float())
    return outs


def output_error_metric(model: nn.Module, data: Iterable) -> Metric:
    """metric(m) = Σ‖m(x) − model(x)‖² / Σ‖model(x)‖² over the batches, against the outputs
    `model` gives now (call before quantizing it)."""
    data = list(data)
    refs = _forward_all(model, data)
    energy = sum(float(r.square().sum()) for r in refs) or 1.0

    def metric(m: nn.Module) -> float:
        return sum(float((o - r).square().sum()) for o, r in zip(_forward_all(m, data), refs)) / energy
    return metric


def _layer_bytes(res: LayerResult) -> int:
    """A quantized Linear's bytes as model_size_report counts them."""
    extra = res.input_scale.numel() * 4 if res.input_scale is not None and not res.scale_folded else 0
    return res.qt.nbytes + extra


@dataclass
class SensitivityReport:
    """deltas[name][i]: metric change when only Linear `name` is quantized with candidates[i]
    (None = left in float: 0). layer_bytes[name][i]: that Linear's bytes then;
    weight_float_bytes[name]: its weight in float32. float_bytes: model_size_report's size of the
    all-float model."""
    candidates: List[object]
    baseline: float
    deltas: Dict[str, List[float]] = field(default_factory=dict)
    layer_bytes: Dict[str, List[int]] = field(default_factory=dict)
    weight_float_bytes: Dict[str, int] = field(default_factory=dict)
    float_bytes: int = 0

    def ranking(self, candidate: int = 0) -> List[str]:
        """Linear names, most sensitive (largest metric change under candidates[candidate]) first."""
        return sorted(self.deltas, key=lambda n: self.deltas[n][candidate], reverse=True)

    def table(self) -> str:
        """A plain-text table: one row per Linear (most sensitive first), one column per candidate."""
        heads = [_short(c) for c in self.candidates]
        width = max([len(n) for n in self.deltas] + [5])
        lines = [f"{'layer':<{width}}  " + "  ".join(f"{h:>14}" for h in heads)]
        for n in self.ranking():
            lines.append(f"{n:<{width}}  " + "  ".join(f"{d:>14.4e}" for d in self.deltas[n]))
        return "\n".join(lines)


def _short(cfg) -> str:
    if cfg is None:
        return "float"
    bits = getattr(cfg, "bits", getattr(cfg, "weight_bits", "?"))
    gs = getattr(cfg, "group_size", None)
    return f"{type(cfg).__name__[:-6]} w{bits}" + (f"g{gs}" if gs else "")


def _quantize_only(model: nn.Module, name: str, cfg, data, all_names) -> tuple:
    """(model with only `name` quantized by cfg, its LayerResult, restore callable)."""
    if isinstance(cfg, RTNConfig):
        # cheap path: swap the weight in place and put it back afterwards
        lin = dict(model.named_modules())[name]
        saved = lin.weight.detach().clone()
        res = rtn_quantize_layer(lin, cfg)
        apply_simulated(model, {name: res})

        def restore():
            with torch.no_grad():
                lin.weight.copy_(saved)
        return model, res, restore
    from .api import quantize_model
    m = copy.deepcopy(model)   # data-driven algorithms may fold scales into other modules
    res = quantize_model(m, _restricted(cfg, [name], all_names), data)
    return m, res[name], lambda: None


def sensitivity_report(model: nn.Module, candidates: Sequence, calibration_data: Optional[Iterable] = None,
                       metric: Optional[Metric] = None, skip: Sequence[str] = ("lm_head",)) -> SensitivityReport:
    """For each Linear (minus skip) and each candidate config (None = float), the metric change
    when only that Linear is quantized with it. metric(model) -> float, larger = worse; default:
    output_error_metric(model, calibration_data). The model is left as it was."""
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty; pass configs ordered cheap -> accurate")
    for i, c in enumerate(candidates):
        if c is not None:
            _check_algo_config(f"candidates[{i}]", c)
    data = list(calibration_data) if calibration_data is not None else None
    if metric is None:
        if not data:
            raise ValueError("the default metric (model output error) needs calibration_data")
        metric = output_error_metric(model, data)
    elif not callable(metric):
        raise TypeError(f"metric must be a callable metric(model) -> float, got {type(metric).__name__}")
    all_names = list(find_linears(model))
    baseline = float(metric(model))
    report = SensitivityReport(candidates, baseline,
                               float_bytes=model_size_report(model, {})["quantized_bytes"])
    for name, lin in find_linears(model, skip).items():
        fbytes = lin.weight.numel() * 4
        deltas, sizes = [], []
        for cfg in candidates:
            if cfg is None:
                deltas.append(0.0)
                sizes.append(fbytes)
                continue
            m, res, restore = _quantize_only(model, name, cfg, data, all_names)
            try:
                deltas.append(float(metric(m)) - baseline)
            finally:
                restore()
            sizes.append(_layer_bytes(res))
        report.deltas[name] = deltas
        report.weight_float_bytes[name] = fbytes
        report.layer_bytes[name] = sizes
    return report


def choose_configs(report: SensitivityReport, budget_bytes: int,
                   skip: Sequence[str] = ("lm_head",)) -> MixedPrecisionConfig:
    """Per-Linear configs within budget_bytes (the model's total as model_size_report counts it).
    Every Linear starts at candidates[0] (the cheapest); then, most sensitive first (largest metric
    change under candidates[0]), each gets the most accurate candidate that keeps the total within
    the budget. Raises when even all-cheapest does not fit."""
    cands = report.candidates
    names = report.ranking(0)
    base = report.float_bytes - sum(report.weight_float_bytes[n] for n in names)
    choice = {n: 0 for n in names}
    total = base + sum(report.layer_bytes[n][0] for n in names)
    if total > budget_bytes:
        raise ValueError(f"budget of {budget_bytes} bytes is below the smallest size the candidates "
                         f"reach ({total} bytes with {_short(cands[0])} everywhere)")
    for n in names:
        for i in range(len(cands) - 1, 0, -1):
            extra = report.layer_bytes[n][i] - report.layer_bytes[n][choice[n]]
            if total + extra <= budget_bytes:
                total += extra
                choice[n] = i
                break
    rules = [(n, cands[i]) for n, i in choice.items() if cands[i] is not None]
    floats = tuple(n for n, i in choice.items() if cands[i] is None)
    return MixedPrecisionConfig(rules=rules, default=None, skip=tuple(skip) + floats)

