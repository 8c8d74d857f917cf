"""Decode calls (M = 1) of small and mid-sized layers, one thread against several, with the
calling thread busy for a while between calls as a model's other work keeps it: what the decode
split threshold (cpp/common/matmul.cpp) and the pool's spin (cpp/common/dispatch.cpp) are set on.

    python bench/decode_threads.py --threads 2 --gap-us 300            # lowbit's own pool
    python bench/decode_threads.py --threads 2 --gap-us 300 --torch    # OpenMP's team (torch loaded)

Each layer's weight is copied until the copies pass 128 MB (at most 300), so every call reads its
weight from DRAM. Per (layer, thread count) the mean time of a call over one pass of the copies is
taken `--repeats` times, the thread counts alternating, and the min and median reported with the
ratio of medians (one thread / N threads: above 1, the split paid).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

LAYERS = [(576, 576), (2048, 640), (1024, 2048), (2048, 2048), (4096, 4096)]  # (K, N)
FORMATS = {"int4 g128": dict(bits=4, group_size=128), "int8 per-channel": dict(bits=8, group_size=None, symmetric=True)}


def _copies(qt, lowbit):
    n = int(min(300, max(4, 128e6 // qt.codes.nbytes)))
    return [lowbit.QuantizedTensor(np.copy(qt.codes), np.copy(qt.scales), None if qt.zeros is None else np.copy(qt.zeros),
                                   qt.shape, qt.format) for _ in range(n)]


def _pass_us(x, qts, gap_s, lowbit):
    total = 0.0
    for q in qts:
        t = time.perf_counter()
        while time.perf_counter() - t < gap_s:  # the caller busy, as with a model's other ops
            pass
        t = time.perf_counter()
        lowbit.matmul(x, q, act_bits=8)
        total += time.perf_counter() - t
    return total / len(qts) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="the thread count compared with one")
    ap.add_argument("--gap-us", type=float, default=300.0, help="busy time of the caller between calls")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="import torch first (lowbit then runs on OpenMP's team)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.torch:
        import torch

        torch.set_num_threads(args.threads)
    import lowbit

    rng = np.random.default_rng(0)
    rows = []
    print(f"thread runtime: {lowbit.build_info()['thread_runtime']}; {args.gap_us:g} µs between calls; µs a call, min / median")
    print(f"{'layer':>11} {'format':<17} {'1 thread':>15} {f'{args.threads} threads':>15} {'ratio':>6}")
    for K, N in LAYERS:
        w = rng.standard_normal((N, K)).astype(np.float32)
        x = rng.standard_normal((1, K)).astype(np.float32)
        for fmt, kw in FORMATS.items():
            qts = _copies(lowbit.quantize(w, **kw), lowbit)
            times = {1: [], args.threads: []}
            for t in times:  # warm-up: packs every copy
                lowbit.set_num_threads(t)
                _pass_us(x, qts, 0.0, lowbit)
            for _ in range(args.repeats):
                for t in times:
                    lowbit.set_num_threads(t)
                    times[t].append(_pass_us(x, qts, args.gap_us * 1e-6, lowbit))
            one, many = (statistics.median(times[1]), min(times[1])), (statistics.median(times[args.threads]), min(times[args.threads]))
            rows.append({"K": K, "N": N, "format": fmt, "threads": args.threads, "gap_us": args.gap_us,
                         "runtime": lowbit.build_info()["thread_runtime"], "us_1": times[1], f"us_{args.threads}": times[args.threads]})
            print(f"{f'{K}x{N}':>11} {fmt:<17} {one[1]:7.1f} / {one[0]:5.1f} {many[1]:7.1f} / {many[0]:5.1f} {one[0] / many[0]:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
