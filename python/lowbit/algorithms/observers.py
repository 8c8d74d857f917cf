"""Observers (range calibration) and calibration hooks.

An observer watches tensors and turns what it saw into lowbit quantization parameters. Ranges are
turned into (scales, zeros) by lowbit.quantize itself — quantizing the two-element rows [lo, hi]
with one group per row — so the parameter rule is lowbit's, never re-implemented here.

Granularity of a 2-D [rows, K] tensor: "tensor" (one scale), "channel"/"token" (one per row: a
weight's output channel, an activation's token), "group" (per row, per group_size columns of K,
ragged last group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import clip_search, dequantize, gram_update, quantize
from ..tensor import QuantizedTensor

GRANULARITIES = ("tensor", "channel", "token", "group")


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def lowbit_group_size(granularity: str, group_size: Optional[int]):
    """The lowbit group_size argument for a granularity."""
    if granularity == "tensor":
        return "tensor"
    if granularity in ("channel", "token"):
        return None
    return group_size


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """lowbit's (scales, zeros) for observed ranges lo/hi (same shape [R, G]), by quantizing the rows
    [lo, hi] with one group per row. zeros is None for symmetric."""
    shape = lo.shape
    pairs = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=1).float().contiguous()
    qt = quantize(pairs, bits, None, symmetric)
    scales = qt.scales.reshape(shape).contiguous()
    zeros = qt.zeros.reshape(shape).contiguous() if qt.zeros is not None else None
    return scales, zeros


def group_reduce(x: torch.Tensor, granularity: str, group_size: Optional[int], fn) -> torch.Tensor:
    """Reduce a 2-D tensor per unit with fn(tensor, dim) -> tensor: [1,1], [rows,1] or [rows,G]."""
    if granularity == "tensor":
        return fn(x.reshape(1, -1), 1).reshape(1, 1)
    if granularity in ("channel", "token"):
        return fn(x, 1).reshape(-1, 1)
    K = x.shape[1]
    return torch.stack([fn(x[:, g:g + group_size], 1) for g in range(0, K, group_size)], dim=1)


def _observed(x, who: str) -> torch.Tensor:
    """x as observers take it: a float torch tensor [..., K], not empty, finite (a NaN would stay in
    a running or averaged range for good), as 2-D rows."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}.update takes a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}.update takes a float tensor, got {x.dtype}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{who}.update needs a non-empty tensor [..., K], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{who}.update: x contains NaN or Inf")
    return _as_2d(x)


class Observer:
    """Base: update(x) with each tensor seen, then qparams() -> (scales, zeros), and quantize(x)."""

    def __init__(self, bits: int = 8, symmetric: bool = True, granularity: str = "tensor",
                 group_size: Optional[int] = None):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity == "group" and (not isinstance(group_size, int) or group_size <= 0 or group_size % 16):
            raise ValueError(f"granularity='group' needs group_size, a positive multiple of 16; got {group_size!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits!r}")
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
        self.bits, self.symmetric = bits, symmetric
        self.granularity, self.group_size = granularity, group_size
        self.lo: Optional[torch.Tensor] = None
        self.hi: Optional[torch.Tensor] = None

    def _range(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r = lambda fn: group_reduce(x, self.granularity, self.group_size, fn)
        return r(lambda t, d: t.amin(d)), r(lambda t, d: t.amax(d))

    def _combine(self, lo, hi) -> None:
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> "Observer":
        x = _observed(x, type(self).__name__)
        lo, hi = self._range(x)
        if self.lo is not None and self.lo.shape != lo.shape:
            raise ValueError(f"{type(self).__name__}: per-{self.granularity} ranges need the same number "
                             f"of rows/groups in every update; got {tuple(lo.shape)} after {tuple(self.lo.shape)}")
        self._combine(lo, hi)
        return self

    def range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError(f"{type(self).__name__} has seen no data; call update(x) first")
        return self.lo, self.hi

    def qparams(self):
        lo, hi = self.range()
        return params_from_range(lo, hi, self.bits, self.symmetric)

    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        scales, zeros = self.qparams()
        x = _as_2d(x).contiguous()
        if self.granularity == "tensor":
            scales = scales.reshape(1, 1)
            zeros = zeros.reshape(1, 1) if zeros is not None else None
        return quantize(x, self.bits, lowbit_group_size(self.granularity, self.group_size),
                        self.symmetric, scales=scales, zeros=zeros)


class MinMaxObserver(Observer):
    """Running min / max over everything seen."""

    def _combine(self, lo, hi):
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min / max (momentum = weight of the new batch)."""

    def __init__(self, *args, momentum: float = 0.1, **kw):
        super().__init__(*args, **kw)
        if not (0.0 < momentum <= 1.0):
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def _combine(self, lo, hi):
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            c = self.momentum
            self.lo = (1 - c) * self.lo + c * lo
            self.hi = (1 - c) * self.hi + c * hi


class PercentileObserver(Observer):
    """Per-batch percentile range (percentile of the values, e.g. 99.9), averaged over batches."""

    def __init__(self, *args, percentile: float = 99.9, **kw):
        super().__init__(*args, **kw)
        if not (50.0 < percentile <= 100.0):
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.count = 0

    def _range(self, x):
        p = self.percentile / 100.0

        def q(t, d, frac):
            n = t.shape[d]
            k = min(n, max(1, int(round(frac * (n - 1))) + 1))
            return t.kthvalue(k, dim=d).values

        r = lambda fn: group_reduce(x, self.granularity, self.group_size, fn)
        return r(lambda t, d: q(t, d, 1 - p)), r(lambda t, d: q(t, d, p))

    def _combine(self, lo, hi):
        if self.lo is None:
            self.lo, self.hi, self.count = lo, hi, 1
        else:
            n = self.count
            self.lo = (self.lo * n + lo) / (n + 1)
            self.hi = (self.hi * n + hi) / (n + 1)
            self.count = n + 1


def search_clip(w: torch.Tensor, bits: int, group_size, symmetric: bool,
                ratios: Sequence[float],
                err_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                col_weight: Optional[torch.Tensor] = None):
    """Per-group clip-ratio search: quantize w with lowbit.quantize(clip_ratio=c) for each candidate c,
    keep per group the candidate with the least error, and return (scales, zeros, best_ratio) with
    scales/zeros [rows, G] ready for lowbit.quantize(w, scales=, zeros=). group_size: int, None
    (per row) or "tensor". The error is the squared round-trip error, each column weighted by
    col_weight [K] when given — lowbit.ops.clip_search, one C++ pass per group (on the CPU) — or
    err_fn(w, w_hat) -> [rows, G] for any other measure (AWQ's output error)."""
    w = w.detach().float().contiguous()
    if err_fn is None:
        s, z, r = clip_search(w.cpu(), bits, group_size, symmetric, ratios,
                              None if col_weight is None else col_weight.detach().float().cpu())
        return s.to(w.device), (z.to(w.device) if z is not None else None), r.to(w.device)
    best_err = best_s = best_z = best_r = None
    for c in ratios:
        qt = quantize(w, bits, group_size, symmetric, clip_ratio=float(c))
        err = err_fn(w, dequantize(qt))
        s, z = qt.scales, qt.zeros
        if best_err is None:
            best_err, best_s = err, s.clone()
            best_z = z.clone() if z is not None else None
            best_r = torch.full_like(err, float(c))
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
        best_r = torch.where(better, torch.full_like(err, float(c)), best_r)
    return best_s.contiguous(), (best_z.contiguous() if best_z is not None else None), best_r


class MSEObserver(Observer):
    """Range with the least quantization MSE: a grid of clip ratios in [min_ratio, 1] applied to the
    min-max range, chosen per unit (tensor/row/group) with lowbit.quantize(clip_ratio=...).
    Keeps the data it observes (weights: one update; activations: rows are concatenated)."""

    def __init__(self, *args, n_grid: int = 20, min_ratio: float = 0.5, max_rows: int = 8192, **kw):
        super().__init__(*args, **kw)
        for name, v in (("n_grid", n_grid), ("max_rows", max_rows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not (0.0 < min_ratio <= 1.0):
            raise ValueError(f"need 0 < min_ratio <= 1, got {min_ratio}")
        self.ratios = torch.linspace(1.0, min_ratio, n_grid).tolist()
        self.max_rows = max_rows
        self.data: Optional[torch.Tensor] = None
        self.best_ratio: Optional[torch.Tensor] = None
        self._params = None

    def update(self, x):
        x = _observed(x, "MSEObserver")
        if self.data is not None and (self.data.shape[1] != x.shape[1] if self.granularity == "tensor"
                                      else self.data.shape != x.shape):
            raise ValueError(f"MSEObserver per-{self.granularity}: every update needs shape "
                             f"{('[rows, %d]' % self.data.shape[1]) if self.granularity == 'tensor' else tuple(self.data.shape)}, "
                             f"got {tuple(x.shape)}")
        if self.granularity == "tensor":    # rows are samples: keep the latest max_rows of them
            self.data = (x if self.data is None else torch.cat([self.data, x]))[-self.max_rows:].clone()
        else:
            self.data = x.clone()
        self._params = None
        return self

    def _search(self):
        if self.data is None:
            raise RuntimeError("MSEObserver has seen no data; call update(x) first")
        if self._params is None:
            s, z, r = search_clip(self.data, self.bits, lowbit_group_size(self.granularity, self.group_size),
                                  self.symmetric, self.ratios)
            self._params, self.best_ratio = (s, z), r
        return self._params

    def range(self):
        self._search()
        lo, hi = MinMaxObserver(self.bits, self.symmetric, self.granularity, self.group_size).update(self.data).range()
        r = self.best_ratio.reshape(lo.shape)
        return lo * r, hi * r

    def qparams(self):
        return self._search()


# ---------------------------------------------------------------- calibration statistics

def _gram_edges(K: int, block: int) -> List[int]:
    nb = max(1, K // block)
    return [K * i // nb for i in range(nb + 1)]


def add_gram_(h: torch.Tensor, x: torch.Tensor, block: int = 256, mirror: bool = True) -> torch.Tensor:
    """h += xᵀx (x: [m, K], h [K, K]). xᵀx is symmetric, so only its upper triangle is computed
    (about half the work; the Hessians are the largest cost of a calibration pass after the
    forwards): on the CPU in float32 by lowbit.ops.gram_update, elsewhere by matmuls on the row
    panels of `block` rows right of the diagonal. mirror=True then copies the upper triangle onto
    the lower; with mirror=False the lower triangle is stale until symmetrize_(h), so a stream of
    updates mirrors only once."""
    if h.device.type == "cpu" and h.dtype == torch.float32 and x.dtype == torch.float32:
        gram_update(h, x if x.stride(-1) == 1 else x.contiguous())
    else:
        add_gram_panels_(h, x, block)
    return symmetrize_(h, block) if mirror else h


def add_gram_panels_(h: torch.Tensor, x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The upper triangle of h += xᵀx with the framework's matmuls: each row panel of `block`
    rows times the columns on and right of its diagonal block (diagonal blocks whole)."""
    edges = _gram_edges(x.shape[1], block)
    for a, b in zip(edges[:-1], edges[1:]):
        h[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
    return h


def symmetrize_(h: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Copy the upper triangle (what add_gram_ keeps up to date) onto the lower, block by block."""
    edges = _gram_edges(h.shape[0], block)
    for a, b in zip(edges[:-1], edges[1:]):
        d = h[a:b, a:b]
        d.copy_(torch.triu(d) + torch.triu(d, 1).t())
        h[b:, a:b] = h[a:b, b:].t()
    return h


@dataclass
class LinearStats:
    """Streaming input statistics of one nn.Linear (float32). hessian is complete once
    finish_stats_ ran (CalibrationHooks does it when its hooks are removed)."""
    n: int = 0                                  # rows (tokens) seen
    abs_sum: Optional[torch.Tensor] = None      # Σ|x| per input channel
    abs_max: Optional[torch.Tensor] = None      # max|x| per input channel
    hessian: Optional[torch.Tensor] = None      # H = 2/n Σ xᵀx
    gram: Optional[torch.Tensor] = None         # Σ xᵀx while accumulating (blocks on/right of the diagonal)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)


def accumulate_stats_(st: LinearStats, x2: torch.Tensor, hessian: bool, abs_stats: bool = True,
                      chunk: int = 8192, where: str = "") -> LinearStats:
    """Add the rows of x2 [m, K] to st, in chunks of rows (bounding the temporaries). The Hessian
    is accumulated as the raw upper-triangle sum st.gram; finish_stats_ turns it into st.hessian.
    Rows with NaN or Inf raise ValueError naming `where`, the Linear they feed; st is then
    unusable. Their test is nearly free: a NaN or Inf in column k makes Σ|x_k| and Σx_k² (the
    Gram diagonal) NaN or Inf, so only when neither statistic is kept is x itself scanned."""
    for c in range(0, x2.shape[0], chunk):
        xc = x2[c:c + chunk]
        finite = True
        if abs_stats:
            a = xc.abs()
            s, mx = a.sum(0), a.amax(0)
            finite = bool(torch.isfinite(s).all())
        elif not hessian:
            finite = bool(torch.isfinite(xc).all())
        if finite and hessian:
            if st.gram is None:     # first rows, or more rows after a finish
                K = xc.shape[1]
                st.gram = (st.hessian * (st.n / 2.0) if st.hessian is not None
                           else torch.zeros(K, K, dtype=torch.float32, device=xc.device))
                st.hessian = None
            add_gram_(st.gram, xc, mirror=False)
            finite = bool(torch.isfinite(st.gram.diagonal()).all())
        if not finite:
            raise ValueError(f"the calibration input of {where or 'a Linear'} contains NaN or Inf (from the "
                             f"calibration batches, or overflow in the model's own activations)")
        if abs_stats:
            st.abs_sum = s if st.abs_sum is None else st.abs_sum + s
            st.abs_max = mx if st.abs_max is None else torch.maximum(st.abs_max, mx)
        st.n += xc.shape[0]
    return st


def finish_stats_(st: LinearStats) -> LinearStats:
    """st.hessian = 2/n Σ xᵀx from the accumulated sum (mirrored once, here)."""
    if st.gram is not None:
        st.hessian = symmetrize_(st.gram).mul_(2.0 / max(st.n, 1))
        st.gram = None
    return st


class CalibrationHooks:
    """Forward hooks on named Linears accumulating LinearStats incrementally, so calibration data is
    streamed batch by batch:

        with CalibrationHooks(linears, hessian=True) as cal:
            for batch in data: model(batch)
        cal.stats["layers.0.q_proj"].hessian

    Linears called one after another on the very same input tensor (q/k/v, gate/up) share one
    LinearStats object: its statistics are accumulated once per batch, not once per Linear.
    """

    def __init__(self, linears: Dict[str, nn.Module], hessian: bool = False, abs_stats: bool = True):
        for name, mod in linears.items():
            if not isinstance(mod, nn.Module) or not hasattr(mod, "in_features"):
                raise TypeError(f"CalibrationHooks collects the inputs of Linear layers; {name} is a "
                                f"{type(mod).__name__}")
        self.linears, self.hessian, self.abs_stats = linears, hessian, abs_stats
        self.stats: Dict[str, LinearStats] = {n: LinearStats() for n in linears}
        self._handles = []
        self._owner: Dict[int, str] = {}   # id(LinearStats) -> the Linear that feeds it its rows
        self._last = None   # (input, its LinearStats, names that read it, version) of the latest call

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} was called without an input tensor (positional or input=)")
            st, last = self.stats[name], self._last
            if last is not None and last[0] is x and last[3] == x._version and name not in last[2]:
                # another Linear reading the very tensor the previous one read (q/k/v): same rows,
                # counted once, as long as it does so from its first batch on
                if st is not last[1]:
                    if st.n:
                        raise ValueError(f"{name} reads the same input as {self._owner[id(last[1])]} "
                                         f"in this batch but not in earlier ones; collect their "
                                         f"statistics with separate CalibrationHooks")
                    self.stats[name] = last[1]
                last[2].add(name)
                return
            owner = self._owner.setdefault(id(st), name)
            if owner != name:
                raise ValueError(f"{name} read {owner}'s input in earlier batches but reads another one "
                                 f"now; collect their statistics with separate CalibrationHooks")
            accumulate_stats_(st, _as_2d(x), self.hessian, self.abs_stats, where=name)
            self._last = (x, st, {name}, x._version)   # the version: x edited in place is new rows
        return hook

    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        """Remove the hooks; the statistics are complete from here on."""
        for h in self._handles:
            h.remove()
        if self._handles:
            for st in {id(st): st for st in self.stats.values()}.values():
                finish_stats_(st)
        self._handles = []
        self._last = None


def run_batches(model: nn.Module, data: Iterable) -> None:
    """Feed calibration batches (a tensor, a tuple of args, or a dict of kwargs) through model."""
    with torch.no_grad():
        for batch in data:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)


def collect_stats(model: nn.Module, linears: Dict[str, nn.Module], data: Iterable,
                  hessian: bool = False) -> Dict[str, LinearStats]:
    with CalibrationHooks(linears, hessian=hessian) as cal:
        run_batches(model, data)
    return cal.stats
