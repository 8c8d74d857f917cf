"""`python -m lowbit`: a small built-in demo on random data.

Quantizes a [N, K] weight matrix in several formats and prints, for each: its size against the
float32 original, the reconstruction error, how long quantization took, and the time and error of
y = lowbit.matmul(x, W) against the float32 matmul (numpy).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import lowbit as lb

# (name, quantize arguments, matmul arguments: float activations, or int8 per token / per block)
A8_TOKEN, A8_BLOCK = dict(act_bits=8), dict(act_bits=8, act_granularity="block")
FORMATS = [
    ("int8 per-channel (W8A8)", dict(bits=8, group_size=None, symmetric=True), A8_TOKEN),
    ("int4 g128 asym (W4A8)", dict(bits=4, group_size=128), A8_TOKEN),
    ("int4 g128 asym (W4A8 blk)", dict(bits=4, group_size=128), A8_BLOCK),
    ("int4 g128 asym (W4A32)", dict(bits=4, group_size=128), {}),
    ("int4 g32 sym (W4A32)", dict(bits=4, group_size=32, symmetric=True), {}),
    ("nf4 g64 (W4A32)", dict(bits=4, group_size=64, codebook="nf4"), {}),
]


def best_of(fn, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowbit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="output features (rows of W)")
    ap.add_argument("--k", type=int, default=4096, help="input features (columns of W)")
    ap.add_argument("--m", type=int, default=1, help="rows of x for the matmul (1 = decode)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    info = lb.build_info()
    print(f"lowbit {info['version']}: CPU variant {info['cpu_isa']} "
          f"(compiled: {', '.join(v['name'] for v in info['cpu_variants'])}), "
          f"{info['num_threads']} threads, CUDA extension built: {info['cuda']['built']}")
    rng = np.random.default_rng(args.seed)
    # Weights and activations with a few outlier columns / channels, as in real LLM layers.
    w = rng.standard_normal((args.n, args.k), dtype=np.float32) * np.float32(0.02)
    w[:, rng.choice(args.k, size=max(1, args.k // 256), replace=False)] *= 8
    x = rng.standard_normal((args.m, args.k), dtype=np.float32)
    x[:, rng.choice(args.k, size=max(1, args.k // 512), replace=False)] *= 20
    y_ref = x @ w.T
    t_float = best_of(lambda: x @ w.T)

    print(f"W: {args.n} x {args.k} float32 = {w.nbytes / 2**20:.1f} MiB;  x: {args.m} x {args.k};  "
          f"float32 matmul (numpy): {t_float * 1e3:.2f} ms")
    head = f"{'format':26s} {'MiB':>7s} {'ratio':>6s} {'rel.err W':>10s} {'quantize ms':>12s}"
    head += f" {'matmul ms':>10s} {'vs float':>9s} {'rel.err y':>10s}"
    print(head)
    for name, kw, mm in FORMATS:
        t_q = best_of(lambda: lb.quantize(w, **kw), repeats=3)
        qt = lb.quantize(w, **kw)
        w_hat = lb.dequantize(qt)
        err = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
        line = (f"{name:26s} {qt.nbytes / 2**20:7.2f} {w.nbytes / qt.nbytes:5.1f}x {err:10.4f} "
                f"{t_q * 1e3:12.2f}")
        t_mm = best_of(lambda: lb.matmul(x, qt, **mm))
        y = lb.matmul(x, qt, **mm)
        yerr = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
        line += f" {t_mm * 1e3:10.2f} {t_float / t_mm:8.2f}x {yerr:10.4f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
