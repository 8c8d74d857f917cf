"""Small-batch calls (M of a few to a few hundred rows) with the weight read from DRAM, as in a
model whose layers do not fit in the last-level cache: the harness (python -m lowbit.bench)
rotates weight copies only for decode (M <= 16), so its prefill rows time a weight in cache.

    python bench/prefill_dram.py --shapes 576x1536,2048x2048 --formats 8:0,4:128 --M 24,32,64

Each weight is copied until the copies pass --mib MB; per (shape, format, M) the mean time of a
call over one pass of the copies is taken --repeats times and the min and median printed.
Formats are bits:group (group 0: per channel; int8 symmetric, int4 asymmetric), act_bits=8.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import lowbit as lb


def _pairs(text: str, sep: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(sep)) for item in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x1536,2048x2048", help="KxN,... (default %(default)s)")
    ap.add_argument("--formats", default="8:0,4:128", help="bits:group,... (default %(default)s)")
    ap.add_argument("--M", default="24,32,64,128", help="rows of x (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mib", type=float, default=120.0, help="total size of the weight copies")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lb.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'K x N':>11} {'format':>8} {'M':>5} {'min ms':>8} {'median':>8}")
    for K, N in _pairs(args.shapes, "x"):
        for bits, group in _pairs(args.formats, ":"):
            w = rng.standard_normal((N, K)).astype(np.float32)
            qt = lb.quantize(w, bits=bits, group_size=group or None, symmetric=bits == 8)
            copies = max(2, int(args.mib * 2**20 // (N * K * bits // 8)))
            qts = [lb.QuantizedTensor(*[None if a is None else np.copy(a) for a in (qt.codes, qt.scales, qt.zeros)],
                                      qt.shape, qt.format) for _ in range(copies)]
            for M in (int(v) for v in args.M.split(",")):
                x = rng.standard_normal((M, K)).astype(np.float32)
                for q in qts:  # packs each copy once (cached on it) and warms up
                    lb.matmul(x, q, act_bits=8)
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    for q in qts:
                        lb.matmul(x, q, act_bits=8)
                    times.append((time.perf_counter() - t) / len(qts) * 1e3)
                fmt = f"int{bits} " + (f"g{group}" if group else "ch")
                print(f"{K:>5} x {N:<5} {fmt:>8} {M:>5} {min(times):8.3f} {statistics.median(times):8.3f}")


if __name__ == "__main__":
    main()
