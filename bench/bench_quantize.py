"""Quantize / dequantize throughput against this machine's DRAM read bandwidth (measured here).

    python bench/bench_quantize.py [--threads 1] [--rows 4096 --cols 4096] [--json out.json]

Each case rotates over several copies of the input whose total is > 4x the L3, so every call
reads from DRAM. Reported: median (min, max) time over repeats, GB/s counting bytes read plus
bytes written, and that rate as a percentage of the measured single-pass read bandwidth.
Peers (when torch is installed): torch.quantize_per_channel (int8) on the same input.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import lowbit as lb
from lowbit import _ext

L3_BYTES = 32 << 20  # overridden by --l3-mib; only decides how many copies are rotated


def timed(fn, inputs, repeats):
    """Median/min/max seconds of fn(x) cycling through `inputs` (one warm-up pass first)."""
    for x in inputs:
        fn(x)
    times = []
    for i in range(repeats):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def read_bandwidth(threads: int) -> float:
    """GB/s of a streaming read over a buffer 16x the L3 (the harness's AVX2 microbenchmark)."""
    buf = np.ones(16 * L3_BYTES, dtype=np.uint8)
    lb.set_num_threads(threads)
    return _ext.core().microbench("read", buf)


def copies_for(nbytes: int) -> int:
    return max(2, -(-4 * L3_BYTES // nbytes))


def main(argv=None) -> int:
    global L3_BYTES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--l3-mib", type=int, default=32)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    L3_BYTES = args.l3_mib << 20

    info = lb.build_info()
    bw = read_bandwidth(args.threads)
    print(f"# lowbit {info['version']}  cpu variant: {info['cpu_isa']}  threads: {args.threads}  "
          f"{platform.processor() or platform.machine()}")
    print(f"# DRAM read bandwidth ({args.threads} thread(s)): {bw:.1f} GB/s")
    lb.set_num_threads(args.threads)

    R, K = args.rows, args.cols
    rng = np.random.default_rng(0)
    base = rng.standard_normal((R, K), dtype=np.float32)
    n = copies_for(base.nbytes)
    w32 = [base + np.float32(i) * 1e-3 for i in range(n)]
    cases = [
        ("quantize int4 asym g128 f32", lambda w: lb.quantize(w, 4, 128), w32, 4),
        ("quantize int4 sym g32 f32", lambda w: lb.quantize(w, 4, 32, True), w32, 4),
        ("quantize nf4 g64 f32", lambda w: lb.quantize(w, 4, 64, codebook="nf4"), w32, 4),
        ("quantize int8 per-row f32", lambda w: lb.quantize(w, 8, None, True), w32, 8),
    ]
    w16 = [w.astype(np.float16) for w in w32[: copies_for(base.nbytes // 2)]]
    cases.append(("quantize int4 asym g128 f16", lambda w: lb.quantize(w, 4, 128), w16, 4))
    qts = [lb.quantize(w, 4, 128) for w in w32[: copies_for(R * K // 2)]]
    cases.append(("dequantize int4 g128 -> f32", lambda q: lb.dequantize(q), qts, 4))

    torch = None
    try:
        import torch  # noqa: F811
    except ImportError:
        pass
    if torch is not None:
        torch.set_num_threads(args.threads)
        tw = [torch.from_numpy(w) for w in w32]
        cases.append(("quantize int4 asym g128 torch bf16",
                      lambda w: lb.quantize(w, 4, 128), [w.bfloat16() for w in tw[:copies_for(R * K * 2)]], 4))
        cases.append(("quantize int8 per-row torch f32", lambda w: lb.quantize(w, 8, None, True), tw, 8))

        def torch_per_channel(w):
            s = w.abs().amax(dim=1) / 127
            return torch.quantize_per_channel(w, s, torch.zeros(R, dtype=torch.long), 0, torch.qint8)

        cases.append(("peer: torch.quantize_per_channel int8 (+absmax)", torch_per_channel, tw, 8))

    results = []
    print(f"{'case':50s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'GB/s':>7s} {'% DRAM':>7s}")
    for name, fn, inputs, bits in cases:
        med, lo, hi = timed(fn, inputs, args.repeats)
        x = inputs[0]
        if isinstance(x, lb.QuantizedTensor):
            moved = x.nbytes + R * K * 4
        else:
            in_bytes = R * K * (x.element_size() if hasattr(x, "element_size") else x.itemsize)
            groups = K // 128 if "g128" in name else K // 32 if "g32" in name else K // 64 if "g64" in name else 1
            moved = in_bytes + R * K * bits // 8 + R * groups * 5
        gbs = moved / med / 1e9
        results.append({"case": name, "median_s": med, "min_s": lo, "max_s": hi, "bytes": moved,
                        "gb_per_s": gbs, "pct_dram": 100 * gbs / bw})
        print(f"{name:50s} {med * 1e3:10.2f} {lo * 1e3:8.2f} {hi * 1e3:8.2f} {gbs:7.1f} {100 * gbs / bw:6.0f}%")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": {"dram_read_gb_per_s": bw, "threads": args.threads,
                                   "cpu_isa": info["cpu_isa"], "cpu_features": info["cpu_features"]},
                       "shape": [R, K], "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
