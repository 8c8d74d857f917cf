"""Calibration Hessian sums h += xᵀx (the upper triangle) on this CPU: lowbit.ops.gram_update
against torch's matmuls doing the same half-product (row panels right of the diagonal) and the
full product, beside the machine's fp32 FMA peak (lowbit's microbenchmark), in one run.

GFLOP/s count the useful work, K(K+1)/2 · m multiply-adds, for every method (the full product
does twice that). x: m = 512 rows (one calibration sequence), K = the Linear inputs of small
LLMs (Gemma3-270M: 640, 1024, 2048).

    python bench/bench_gram.py --threads 1,2 --json bench/results_bench/gram_epyc.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lowbit
from lowbit import _ext
from lowbit.algorithms.observers import add_gram_panels_
from lowbit.bench.machine import _FMA, _first_runnable


def _times(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", default="1,2")
    p.add_argument("--K", default="640,1024,2048,4096")
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for t in [int(v) for v in args.threads.split(",")]:
        torch.set_num_threads(t)
        lowbit.set_num_threads(t)
        peak, instr, _ = _first_runnable(_ext.core(), _FMA, 20_000_000)
        print(f"{t} thread(s): fp32 FMA peak {peak:.0f} GFLOP/s ({instr}); lowbit runs on "
              f"{lowbit.build_info()['thread_runtime']}")
        for K in [int(v) for v in args.K.split(",")]:
            x, h = torch.randn(args.m, K), torch.zeros(K, K)
            useful = K * (K + 1) * args.m          # flops (2 per multiply-add)
            methods = {"lowbit gram_update": lambda: lowbit.ops.gram_update(h, x),
                       "torch half (panels)": lambda: add_gram_panels_(h, x),
                       "torch full xᵀx": lambda: h.addmm_(x.t(), x)}
            line = []
            for name, fn in methods.items():
                ts = _times(fn, args.repeats)
                gf = useful / statistics.median(ts) / 1e9
                rows.append({"threads": t, "K": K, "m": args.m, "method": name, "median_ms": statistics.median(ts) * 1e3,
                             "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "GFLOPs": gf,
                             "pct_fma_peak": 100 * gf / peak, "fma_peak_GFLOPs": peak})
                line.append(f"{name} {statistics.median(ts) * 1e3:6.2f} ms {gf:4.0f} GFLOP/s ({100 * gf / peak:3.0f}%)")
            print(f"  K={K:5d}: " + " | ".join(line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"m": args.m, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
