"""This machine's limits, measured by lowbit's own microbenchmarks, and whether it is idle."""
from __future__ import annotations

import mmap
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from .. import _ext

DEFAULT_L3_BYTES = 32 << 20  # when /sys does not say


def l3_bytes(override_mib: Optional[float] = None) -> int:
    """The last-level cache size: the override, else Linux's cache index3, else DEFAULT_L3_BYTES."""
    if override_mib:
        return int(override_mib * (1 << 20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return DEFAULT_L3_BYTES


def read_buffer(l3: int) -> np.ndarray:
    """The DRAM read microbenchmark's buffer: 8x the L3, so a pass over it streams from DRAM. In
    transparent huge pages where Linux allows them, as lowbit's packed weights are (numpy advises
    them for big arrays too, but only for memory it maps fresh): the limit is the faster of the two
    page sizes (1 thread, Zen 4 VM: 67-68 GB/s with 2 MiB pages, 58-60 with 4 KiB)."""
    try:
        pages = mmap.mmap(-1, 8 * l3, flags=mmap.MAP_PRIVATE)
        pages.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):  # not Linux, or THP unknown to this kernel
        return np.ones(8 * l3, np.uint8)
    buf = np.frombuffer(pages, np.uint8)  # keeps the mapping alive
    buf[:] = 1
    return buf


def dram_probe(buf: np.ndarray) -> Callable[[], float]:
    """One read pass over buf (GB/s, on the current thread count): the bandwidth available now.
    A VM's DRAM rate drifts by tens of percent over a run, so decode rows are compared with this,
    taken between their repeats, rather than only with the rate measured once at the start."""
    core = _ext.core()
    return lambda: core.microbench("read", buf, 1)


def compute_probe(lim: dict, compute: str) -> Callable[[], float]:
    """One short run (a few milliseconds) of the peak microbenchmark a prefill row is compared
    with (int8 dot, bf16 dot where measured, else fp32 FMA; lim: measure_limits' entry for the
    current thread count): the compute rate available now. A VM's rate drifts too (runs at half
    speed for seconds at a time), so prefill rows are compared with this, taken between repeats."""
    core = _ext.core()
    key = {"int8": "int8_dot", "bf16": "bf16_dot"}.get(compute, "fp32_fma")
    if not lim.get(key + "_kind"):
        key = "fp32_fma"
    kind = lim[key + "_kind"]
    iters = 500_000 if kind == "bf16dot512" else 2_000_000
    return lambda: core.microbench(kind, iters)


# Candidates for each limit, fastest first: (microbench kind, instruction); AMX: (kind, key, instruction).
_FMA = [("fma512", "zmm vfmadd"), ("fma", "ymm vfmadd")]
_INT8 = [("vnni512", "zmm vpdpbusd"), ("vnni256", "ymm vpdpbusd (AVX-VNNI)"), ("int8", "ymm vpmaddubsw+vpaddw")]
_BF16 = [("bf16dot512", "zmm vdpbf16ps")]
_INT8_EXACT = [("int8_exact", "ymm vpsignb+vpmaddubsw+vpmaddwd")]
_AMX = [("amx_int8", "amx_int8_GOPs", "AMX tdpbusd"), ("amx_bf16", "amx_bf16_GFLOPs", "AMX tdpbf16ps")]


def _first_runnable(core, candidates, iters: int, runs: int = 3):
    """(rate, instruction, microbench kind): the best of `runs` runs of the first candidate this
    CPU runs (a peak is a maximum, and on a shared VM a run can lose half its rate to a busy
    neighbour on the same core)."""
    for kind, instr in candidates:
        try:
            return max(core.microbench(kind, iters) for _ in range(runs)), instr, kind
        except (RuntimeError, ValueError):
            continue  # this CPU or build lacks it
    return None, "unavailable: this CPU has no " + " / ".join(i for _, i in candidates), None


def measure_limits(threads: List[int], buf: np.ndarray) -> Dict[int, Dict[str, float]]:
    """Per thread count: DRAM read GB/s (best of 5 passes over buf); the fp32 FMA, int8-dot and
    bf16-dot peaks of the widest SIMD instruction this CPU runs (the instruction is named beside
    each); on AVX2, the exact s8×s8 rate (sign trick plus a vpmaddwd per multiply: what an exact
    W8A8 kernel can reach there); and the AMX tile peaks where the CPU and OS allow AMX. The last
    two are reported, not used as limits: the issue's prefill targets are stated against the
    vector peaks."""
    core = _ext.core()
    limits = {}
    for t in threads:
        core.set_num_threads(t)
        lim = {"dram_read_GBps": core.microbench("read", buf)}
        for key, candidates, iters in (("fp32_fma_GFLOPs", _FMA, 20_000_000), ("int8_dot_GOPs", _INT8, 20_000_000),
                                       ("bf16_dot_GFLOPs", _BF16, 5_000_000)):
            value, instr, kind = _first_runnable(core, candidates, iters)
            lim[key] = value
            lim[key.split("_G")[0] + "_instr"] = instr
            lim[key.split("_G")[0] + "_kind"] = kind
        if lim["int8_dot_kind"] == "int8":  # AVX2: also the exact s8×s8 rate, the W8A8 kernels' ceiling
            value, _, _ = _first_runnable(core, _INT8_EXACT, 20_000_000)
            if value is not None:
                lim["int8_exact_dot_GOPs"] = value
        for kind, key, instr in _AMX:
            value, _, _ = _first_runnable(core, [(kind, instr)], 1_000_000)
            if value is not None:
                lim[key] = value
        limits[t] = lim
    return limits


def _cpu_times():
    """(busy, total) jiffies of all CPUs together, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_fraction(window_s: float = 0.5) -> Optional[float]:
    """Share of all CPUs busy with other work over window_s (this process sleeps meanwhile)."""
    a = _cpu_times()
    time.sleep(window_s)
    b = _cpu_times()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_until_idle(max_wait_s: float, threshold: float = 0.1) -> dict:
    """Wait (at most max_wait_s) until other work uses less than `threshold` of the CPUs.
    Returns what was seen, so the report can warn that the numbers were taken on a busy machine."""
    t0 = time.monotonic()
    busy = busy_fraction()
    while busy is not None and busy >= threshold and time.monotonic() - t0 < max_wait_s:
        busy = busy_fraction(1.0)
    return {"busy_fraction": busy, "waited_s": round(time.monotonic() - t0, 1),
            "idle": busy is None or busy < threshold, "threshold": threshold,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
