"""Sequential calibration driver shared by GPTQ, AWQ and SmoothQuant.

The model is walked block by block (the children of its largest nn.ModuleList holding Linears,
e.g. decoder layers). The inputs of the first block are captured once (a pre-hook that stops the
forward); each block is then run alone on the stored inputs, so a block sees the outputs of the
already-quantized blocks before it. Inside a block, Linears are processed in *stages*: Linears
reading the very same input tensor (q/k/v, gate/up) form one stage, in call order; each stage is
calibrated with the earlier stages already quantized. A probe forward also finds, for each stage,
the module that produced its input (a norm, say) so algorithms can fold input scales into it.
Linears outside the blocks are handled last, from full-model forwards.

With lockstep (the default with true_sequential), each block runs once per batch: the batches'
forwards run in lock-step (one greenlet each, on this thread), all pausing at each stage until it
has been calibrated on every batch and quantized, so the rest of each forward already sees it
quantized. That is the streaming true-sequential result with one block forward per batch instead
of one per stage plus one, at the memory of one block's activations for every calibration batch.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .._progress import Progress, wanted
from .common import LayerResult, apply_simulated, simulated_input_hook
from .observers import CalibrationHooks, LinearStats, _as_2d, accumulate_stats_, finish_stats_


class _Stop(Exception):
    pass


class Collect(NamedTuple):
    """What calibration gathers for each stage's input."""
    hessian: bool = False       # Σ xᵀx (GPTQ)
    abs_stats: bool = True      # per-channel mean/max |x| (AWQ, SmoothQuant)
    sample_rows: int = 0        # this many input rows kept as stage.x (AWQ's search), 0: none


@dataclass
class Stage:
    """Linears of one block that read the same input, and what produced that input."""
    names: List[str]                       # full names in the model
    linears: Dict[str, nn.Linear]
    producer: Optional[nn.Module] = None   # module whose output is exactly this input, if any
    producer_name: Optional[str] = None
    producer_args: Optional[tuple] = None  # the producer's inputs on the probe batch (fold checks)
    stats: Dict[str, LinearStats] = field(default_factory=dict)
    quantized: frozenset = frozenset()     # names of Linears already quantized (never fold into them)
    x: Optional[torch.Tensor] = None       # sampled input rows [m, K] (when asked for)


def find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(prefix, block) for the children of the nn.ModuleList holding the most Linears; [] if none."""
    best, best_count = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            count = sum(isinstance(x, nn.Linear) for x in m.modules())
            if count > best_count:
                best, best_count = (name, m), count
    if best is None:
        return []
    prefix, ml = best
    return [(f"{prefix}.{i}" if prefix else str(i), blk) for i, blk in enumerate(ml)]


def _normalize(batch) -> Tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _no_cache(kwargs: dict) -> dict:
    """Blocks are re-run several times on the same stored inputs: a KV cache passed along (e.g. a
    transformers DynamicCache) would grow on every run, so calibration never uses one."""
    kwargs = dict(kwargs)
    if "past_key_values" in kwargs:
        kwargs["past_key_values"] = None
    if "past_key_value" in kwargs:
        kwargs["past_key_value"] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _capture_inputs(model, blocks, data) -> Tuple[List[Tuple[tuple, dict]], List[List[Tuple[tuple, dict]]]]:
    """Inputs of the first block per batch, and every block's *other* arguments per batch.

    Blocks may get different arguments (Gemma-3 passes sliding- vs full-attention masks and local
    vs global rotary embeddings per layer), so they are recorded per block. To keep this cheap the
    blocks are not computed: each block's forward is swapped for a stub that records its arguments
    and passes the hidden state through (the model's own mask/position code still runs). Stored
    tensors are shared between blocks, as the model shares them.
    Returns (first-block inputs, extras[block][batch] = (args[1:], kwargs without hidden state))."""
    firsts: List[Tuple[tuple, dict]] = []
    extras: List[List[Tuple[tuple, dict]]] = [[] for _ in blocks]
    template = {}
    originals = []

    def make_stub(i, block, orig):
        def stub(*args, **kwargs):
            if "out" not in template:
                # learn the block's output structure once (one real forward on the first batch)
                template["out"] = orig(*args, **kwargs)
            kwargs = _no_cache(kwargs)
            if args:
                h, rest = args[0], tuple(args[1:])
            else:
                h, rest = kwargs.get("hidden_states"), ()
            if i == 0:
                firsts.append(((h,) + rest, dict(kwargs)) if args else ((), dict(kwargs)))
            extras[i].append((rest, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if i == len(blocks) - 1:
                raise _Stop
            out = template["out"]
            if isinstance(out, torch.Tensor):
                return h
            if isinstance(out, (tuple, list)):
                return (h,) + (None,) * (len(out) - 1)
            raise TypeError(f"cannot pass a block output of type {type(out).__name__} through")
        return stub

    for i, (_, blk) in enumerate(blocks):
        originals.append(blk.__dict__.get("forward"))
        blk.forward = make_stub(i, blk, type(blk).forward.__get__(blk))
    try:
        with torch.no_grad():
            for batch in data:
                a, k = _normalize(batch)
                try:
                    model(*a, **k)
                except _Stop:
                    pass
    finally:
        for (_, blk), orig in zip(blocks, originals):
            if orig is None:
                del blk.forward
            else:
                blk.forward = orig
    if len(firsts) != len(data) or any(len(e) != len(data) for e in extras):
        raise RuntimeError("calibration forward did not reach every block once per batch; the "
                           "blocks found are not called in sequence by the model")
    return firsts, extras


def _run(block, inputs):
    outs = []
    with torch.no_grad():
        for a, k in inputs:
            outs.append(block(*a, **k))
    return outs


def _run_until(block, inputs, stop_after: List[nn.Module]) -> None:
    """Forward each batch through the block (or whole model) only until every module in stop_after
    has run (their forward hooks registered earlier, e.g. calibration hooks, still fire); the rest
    is skipped. A module called again after that point in the same forward is not seen again."""
    pending = {id(m) for m in stop_after}
    seen = set()

    def hook(module, args, out):
        seen.add(id(module))
        if seen >= pending:
            raise _Stop

    handles = [m.register_forward_hook(hook) for m in stop_after]
    try:
        with torch.no_grad():
            for a, k in inputs:
                seen.clear()
                try:
                    block(*a, **k)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def _hidden_of(outputs):
    return [out[0] if isinstance(out, (tuple, list)) else out for out in outputs]


def _greenlet():
    """The greenlet module, or None (lockstep calibration then falls back to streaming)."""
    try:
        import greenlet
    except ImportError:
        warnings.warn("lowbit: the 'greenlet' package is not installed, so calibration streams each "
                      "block once per stage instead of running it once (pip install greenlet)",
                      RuntimeWarning, stacklevel=3)
        return None
    return greenlet


def _quantize_in_lockstep(model, block, inputs, stages: List["Stage"], stage_fn, results,
                          want: Collect, greenlet) -> list:
    """Run the block once per batch, each batch's forward in its own greenlet (a coroutine on this
    thread: no extra OS threads next to torch's). A pre-hook on each stage's first Linear adds the
    batch's input to the stage's statistics and parks the forward. Once every batch is parked, the
    earliest stage with parked batches is calibrated and quantized, and those batches resume with
    it quantized. Every stage thus sees all batches with the stages before it quantized, as in
    streaming true-sequential calibration, while each batch goes through the block once.
    Returns the block outputs, one per batch."""
    driver = greenlet.getcurrent()
    stats: Dict[int, LinearStats] = {}
    samples: Dict[int, List[torch.Tensor]] = {}
    done: Dict[int, Optional[LayerResult]] = {}     # stage -> result of its first Linear
    producer_inputs = {}            # (stage, greenlet) -> the producer's latest (args, kwargs)
    outs = [None] * len(inputs)

    def make_producer_hook(k):
        def pre(mod, args, kwargs):
            g = greenlet.getcurrent()
            if g in mine and k not in done:
                producer_inputs[(k, g)] = (args, kwargs)
        return pre

    def make_hook(k):
        def pre(mod, args):
            if greenlet.getcurrent() not in mine or k in done:   # not ours, or called again
                return None
            x = args[0]
            accumulate_stats_(stats.setdefault(k, LinearStats()), _as_2d(x), want.hessian, want.abs_stats,
                              where=stages[k].names[0])
            if want.sample_rows:
                samples.setdefault(k, []).append(_sample_rows(x, want.sample_rows))
            driver.switch(k)                # parked until stage k is quantized
            r, made_by = done[k], producer_inputs.pop((k, greenlet.getcurrent()), None)
            if r is None:
                return None
            if r.scale_folded:
                # x was made before the fold: recompute it with the folded producer, as a streaming
                # re-run would (x feeds this stage's Linears only, or the fold would be refused)
                x.copy_(stages[k].producer(*made_by[0], **made_by[1]))
            # apply_simulated's hook on this Linear only runs from its next call: apply it now
            hook = simulated_input_hook(r)
            return hook(mod, args) if hook is not None else None
        return pre

    def quantize_stage(k):
        stage = stages[k]
        st = finish_stats_(stats.pop(k))
        stage.stats = {name: st for name in stage.names}
        stage.x = _sample_rows(torch.cat(samples.pop(k)), want.sample_rows) if want.sample_rows else None
        stage.quantized = frozenset(results)
        res = stage_fn(stage)
        stage.x = None
        apply_simulated(model, res)
        results.update(res)
        done[k] = res.get(stage.names[0])

    def forward(i):
        a, kw = inputs[i]
        outs[i] = block(*a, **kw)

    lets = [greenlet.greenlet(lambda i=i: forward(i)) for i in range(len(inputs))]
    mine = set(lets)
    handles = [st.linears[st.names[0]].register_forward_pre_hook(make_hook(k)) for k, st in enumerate(stages)]
    handles += [st.producer.register_forward_pre_hook(make_producer_hook(k), with_kwargs=True)
                for k, st in enumerate(stages) if st.producer is not None]
    try:
        with torch.no_grad():
            runnable = list(range(len(inputs)))
            parked: Dict[int, List[int]] = {}   # stage -> batches waiting for it, in arrival order
            while True:
                for i in runnable:
                    k = lets[i].switch()    # a stage index when parked, None when finished
                    if k is not None:
                        parked.setdefault(k, []).append(i)
                if not parked:
                    break
                k = min(parked)
                quantize_stage(k)
                runnable = parked.pop(k)
    finally:
        for h in handles:
            h.remove()
        for g in lets:                      # after an error: unwind the parked forwards
            if not g.dead:
                g.throw(greenlet.GreenletExit)
    return _hidden_of(outs)


def _probe(block, prefix, linears: Dict[str, nn.Linear], first_input) -> Tuple[List[Stage], int]:
    """One forward of the block recording which Linears share an input tensor and who made it.
    Also returns the bytes of every tensor the block's leaf modules produced in that forward: an
    upper bound of the activations one parked lockstep forward can hold."""
    out_of: Dict[int, Tuple[str, nn.Module]] = {}
    args_of: Dict[str, tuple] = {}
    keep = []          # hold tensors so their id()s stay unique during the probe
    order: List[Tuple[str, int]] = []
    produced: List[int] = []
    consumers: Dict[int, set] = {}
    lin_ids = {id(m): n for n, m in linears.items()}
    handles = []
    for n, m in block.named_modules():
        full = f"{prefix}.{n}" if n else prefix

        leaf = next(m.children(), None) is None

        def pre(mod, args, full=full, leaf=leaf):
            if args and isinstance(args[0], torch.Tensor):
                keep.append(args[0])
                if leaf:  # containers (an attention module) pass tensors on; count leaves only
                    consumers.setdefault(id(args[0]), set()).add(full)
                args_of[full] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                if id(mod) in lin_ids:
                    order.append((lin_ids[id(mod)], id(args[0])))

        def post(mod, args, out, full=full, leaf=leaf):
            if leaf and isinstance(out, torch.Tensor):
                keep.append(out)
                out_of[id(out)] = (full, mod)
                produced.append(out.numel() * out.element_size())

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        _run(block, [first_input])
    finally:
        for h in handles:
            h.remove()
    stages: List[Stage] = []
    by_input: Dict[int, Stage] = {}
    seen = set()
    for name, xid in order:
        if name in seen:
            continue
        seen.add(name)
        if xid not in by_input:
            st = Stage([], {})
            if xid in out_of:
                pname, pmod = out_of[xid]
                # foldable only if the producer's output goes to this stage's Linears alone
                st.producer_name, st.producer = pname, pmod
                st.producer_args = args_of.get(pname)
                st._consumers = consumers.get(xid, set())
            by_input[xid] = st
            stages.append(st)
        st = by_input[xid]
        st.names.append(name)
        st.linears[name] = linears[name]
    for st in stages:
        if st.producer is not None and getattr(st, "_consumers", set()) != set(st.names):
            st.producer = st.producer_name = st.producer_args = None
    return stages, sum(produced)


def _input_numel(inp) -> int:
    a, kw = inp
    h = a[0] if a else kw["hidden_states"]
    return h.numel()


def _available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lockstep_fits(per_probe_bytes: int, inputs, max_gib: Optional[float]) -> Tuple[bool, int, int]:
    """Whether lockstep's parked activations (the probe's bound, scaled to each batch's tokens)
    fit in max_gib (None: half the memory available now; no limit where that is unknown).
    Returns (fits, estimate, limit) in bytes."""
    n0 = _input_numel(inputs[0])
    estimate = sum(per_probe_bytes * _input_numel(i) // n0 for i in inputs)
    max_bytes = None if max_gib is None else int(max_gib * 2**30)
    if max_bytes is None:
        avail = _available_bytes()
        max_bytes = avail // 2 if avail is not None else estimate
    return estimate <= max_bytes, estimate, max_bytes


def _sample_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    x = x.detach().float().reshape(-1, x.shape[-1])
    if x.shape[0] > max_rows:
        idx = torch.linspace(0, x.shape[0] - 1, max_rows).long()
        x = x[idx]
    return x


class _StageCalibration:
    """Context: while active, hooks fill stage.stats (and stage.x, sampled input rows); finish()
    stores them on the stage."""

    def __init__(self, stage: Stage, want: Collect):
        self.stage, self.want = stage, want
        self.xs: List[torch.Tensor] = []

    def __enter__(self):
        st = self.stage
        self.handle = None
        rows = self.want.sample_rows
        if rows:
            first = st.linears[st.names[0]]
            self.handle = first.register_forward_hook(
                lambda m, a, o: self.xs.append(_sample_rows(a[0], rows)))
        self.cal = CalibrationHooks(st.linears, self.want.hessian, self.want.abs_stats).__enter__()
        return self

    def __exit__(self, *exc):
        self.cal.__exit__(*exc)
        if self.handle is not None:
            self.handle.remove()

    def finish(self) -> None:
        self.stage.stats = self.cal.stats
        if self.xs:
            self.stage.x = _sample_rows(torch.cat(self.xs), self.want.sample_rows)


StageFn = Callable[[Stage], Dict[str, LayerResult]]


def _calibrate_stages(run_fn, stages: List[Stage], want: Collect) -> None:
    """One run_fn() filling the statistics of several stages at once (their Linears' inputs)."""
    with contextlib.ExitStack() as stack:
        fills = []
        for st in stages:
            fills.append(stack.enter_context(_StageCalibration(st, want)))
        run_fn()
    for f in fills:
        f.finish()


def quantize_sequential(model: nn.Module, data: Iterable, linears: Dict[str, nn.Linear],
                        stage_fn: StageFn, hessian: bool = False, sample_rows: int = 0,
                        abs_stats: bool = True, sequential: bool = True, true_sequential: bool = True,
                        lockstep: bool = True, lockstep_max_gib: Optional[float] = None,
                        progress: Optional[bool] = None, desc: str = "calibration"
                        ) -> Dict[str, LayerResult]:
    """Drive stage_fn over the model's Linears (see module docstring). stage_fn gets a calibrated
    Stage and returns LayerResults for its Linears; they are applied (simulated) at once so later
    stages and blocks see quantized inputs. Stage statistics hold the Hessian when hessian, the
    per-channel |x| mean/max when abs_stats, and stage.x holds sample_rows input rows when > 0.
    true_sequential=False calibrates all stages of a block
    in one forward (block inputs from the quantized blocks before it, but the block's own Linears
    still float): two block forwards instead of one per stage plus one. sequential=False
    calibrates every stage on the float model (all statistics from one pass of full-model
    forwards). lockstep (with true_sequential): one forward per block and batch, all batches in
    lock-step (see the module docstring) instead of one forward per stage plus one, as long as a
    block's parked activations (bounded from the probe forward) fit in lockstep_max_gib (None:
    half the memory available when the block starts); from the first block that does not fit on,
    calibration streams, with a warning. progress: a progress bar over the blocks (and the
    Linears outside them), see lowbit._progress."""
    data = list(data)
    if not data:
        raise ValueError("calibration_data is empty; pass a list of input batches")
    want = Collect(hessian, abs_stats, sample_rows)
    results: Dict[str, LayerResult] = {}
    seen_ids: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen_ids[id(m)] = seen_ids.get(id(m), 0) + 1
    shared = {i for i, n in seen_ids.items() if n > 1}
    blocks = find_blocks(model) if sequential else []
    gl = _greenlet() if (blocks and true_sequential and lockstep) else None
    done = set()
    outside = [n for n in linears if not any(n.startswith(p + ".") for p, _ in blocks)]
    bar = Progress(len(blocks) + bool(outside), f"lowbit {desc}") if wanted(progress) else None
    if blocks:
        firsts, extras = _capture_inputs(model, blocks, data)
        kw_hidden = not firsts[0][0]      # the model passes the hidden state by keyword
        inputs = firsts
        for bi, (prefix, block) in enumerate(blocks):
            if bi > 0:
                if kw_hidden:
                    inputs = [((), dict(k, hidden_states=h)) for h, (_, k) in zip(hidden, extras[bi])]
                else:
                    inputs = [((h,) + tuple(r), dict(k)) for h, (r, k) in zip(hidden, extras[bi])]
            blk_lin = {n: m for n, m in linears.items() if n.startswith(prefix + ".")}
            if blk_lin:
                stages, probe_bytes = _probe(block, prefix, blk_lin, inputs[0])
                for st in stages:
                    # a module that runs in several places (a Linear or norm shared between blocks)
                    # cannot take a fold: its other inputs would not be divided by s
                    if {id(st.producer), *map(id, st.linears.values())} & shared:
                        st.producer = st.producer_name = st.producer_args = None
                if true_sequential and lockstep and gl is not None:
                    fits, need, limit = _lockstep_fits(probe_bytes, inputs, lockstep_max_gib)
                    if not fits:
                        warnings.warn(f"lowbit: lockstep calibration of {prefix} would hold up to "
                                      f"{need / 2**30:.2f} GiB of activations (limit {limit / 2**30:.2f} "
                                      f"GiB), so it streams each block once per stage instead",
                                      RuntimeWarning, stacklevel=3)
                        gl = None
                if true_sequential and lockstep and gl is not None:
                    hidden = _quantize_in_lockstep(model, block, inputs, stages, stage_fn, results,
                                                   want, gl)
                    done.update(blk_lin)
                    if bar is not None:
                        bar.update(prefix)
                    continue
                if not true_sequential:
                    _calibrate_stages(lambda: _run_until(block, inputs, list(blk_lin.values())), stages,
                                      want)
                for stage in stages:
                    if true_sequential:
                        mods = list(stage.linears.values())
                        _calibrate_stages(lambda: _run_until(block, inputs, mods), [stage], want)
                    stage.quantized = frozenset(results)
                    res = stage_fn(stage)
                    apply_simulated(model, res)
                    results.update(res)
                done.update(blk_lin)
            hidden = _hidden_of(_run(block, inputs))
            if bar is not None:
                bar.update(prefix)
    rest = {n: m for n, m in linears.items() if n not in done}
    if rest:
        # one stage per Linear, calibrated from full-model forwards, each stopped once the Linears
        # being calibrated have run (what follows, e.g. a 262k-vocabulary lm_head, is not needed)
        stages = [Stage([n], {n: m}) for n, m in rest.items()]
        batches = [_normalize(b) for b in data]
        if sequential:
            for st in stages:
                _calibrate_stages(lambda: _run_until(model, batches, list(st.linears.values())), [st],
                                  want)
                res = stage_fn(st)
                apply_simulated(model, res)
                results.update(res)
        else:
            # all statistics from the float model, in one pass over the data
            _calibrate_stages(lambda: _run_until(model, batches, list(rest.values())), stages, want)
            for st in stages:
                results.update(stage_fn(st))
            apply_simulated(model, results)
        if bar is not None:
            bar.update(f"{len(rest)} Linears outside the blocks")
    if bar is not None:
        bar.close()
    return results


def try_fold(stage: Stage, s: torch.Tensor) -> bool:
    """Fold 1/s into the module producing the stage's input (its output channels divided by s),
    checked numerically on the probe batch; reverts and returns False when the producer does not
    scale that way (e.g. a norm computing x·(1 + w), or a producer that is not per-channel affine)."""
    p = stage.producer
    if p is None or stage.producer_args is None or stage.producer_name in stage.quantized:
        return False
    w = getattr(p, "weight", None)
    b = getattr(p, "bias", None)
    K = s.numel()
    if not isinstance(w, torch.Tensor):
        return False
    if isinstance(p, nn.Linear):
        if w.shape[0] != K:
            return False
    elif w.dim() != 1 or w.numel() != K:
        return False
    with torch.no_grad():
        ref = p(*stage.producer_args)
        if not isinstance(ref, torch.Tensor):
            return False
        w0 = w.detach().clone()
        b0 = b.detach().clone() if isinstance(b, torch.Tensor) else None
        sv = s.to(w)
        w.div_(sv[:, None] if w.dim() == 2 else sv)
        if b0 is not None:
            b.div_(sv)
        got = p(*stage.producer_args)
        expected = ref / sv
        ok = torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-12)
        if not ok:
            w.copy_(w0)
            if b0 is not None:
                b.copy_(b0)
    return bool(ok)
