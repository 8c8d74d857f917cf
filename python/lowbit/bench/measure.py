"""What one benchmarked method is (ours or a peer's) and how it is timed."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import numpy as np

from ..tensor import QuantizedTensor


@dataclass
class Method:
    """One way to compute y = x @ W.T for a fixed weight W [N, K].

    make_weight() builds one independent copy of the prepared weight (decode rows rotate several so
    they come from DRAM); prepare_x turns the float32 numpy activations into what run() takes, outside
    the timed region; run(xp, weight) is the timed call; to_numpy(run's result) gives y as numpy.
    """
    name: str
    weight_bytes: int                # bytes of the weight format this method streams per call
    compute: str                     # prefill limit: the "int8", "bf16" dot or "fp32" FMA peak
    make_weight: Callable[[], Any]
    run: Callable[[Any, Any], Any]
    prepare_x: Callable[[np.ndarray], Any] = lambda x: x
    to_numpy: Callable[[Any], np.ndarray] = np.asarray
    ours: bool = False
    # the weight this method multiplies by, as a lowbit QuantizedTensor (accuracy section: y is
    # compared with x @ dequantize(reference).T); None when the method returns something other than y
    reference: Optional[QuantizedTensor] = None
    reference_origin: str = "lowbit's codes"


@dataclass
class Unavailable:
    """A peer that could not be set up here, and why."""
    name: str
    reason: str


@dataclass
class Stats:
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    calls_per_repeat: int
    copies: int  # weight copies rotated
    # with a probe: the limit's rate (DRAM read GB/s for decode, the compute peak's GOP/s for
    # prefill) measured right after each repeat, and that repeat's seconds per call, so each
    # repeat is compared with the rate available at that moment
    probe_rates: List[float] = field(default_factory=list)
    per_call_s: List[float] = field(default_factory=list)


MIN_REPEAT_S = 2e-3  # a repeat this long at least, so the timer and Python overhead do not dominate


def time_calls(calls: List[Callable[[], Any]], budget_s: float, max_repeats: int = 10,
               probe: Optional[Callable[[], float]] = None) -> Stats:
    """Seconds per call of `calls` (one per weight copy): a warm-up pass over all of them, then
    repeats of whole passes (several per repeat when a pass is shorter than MIN_REPEAT_S), as many
    as fit in budget_s, at least 3 (so slow calls run 1 + 3 passes) and at most max_repeats.
    probe (one DRAM read pass, or a short compute-peak run, returning its rate) runs after every
    repeat, untimed."""
    t0 = time.perf_counter()
    for c in calls:
        c()
    first_pass = max(time.perf_counter() - t0, 1e-7)
    passes = max(1, math.ceil(MIN_REPEAT_S / first_pass))
    repeats = int(min(max_repeats, max(3, budget_s // (first_pass * passes))))
    per_call, probed = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(passes):
            for c in calls:
                c()
        per_call.append((time.perf_counter() - t0) / (passes * len(calls)))
        if probe is not None:
            probed.append(probe())
    return Stats(statistics.median(per_call), min(per_call), max(per_call), repeats, passes * len(calls),
                 len(calls), probed, per_call if probe is not None else [])


def copies_for_dram(weight_bytes: int, l3_bytes: int) -> int:
    """How many weight copies to rotate so that together they are >= 4x the L3."""
    return max(1, math.ceil(4 * l3_bytes / max(weight_bytes, 1)))
