"""lowbit matmul benchmark: our CPU kernels against this machine's own limits and the peers
installed here.  `python -m lowbit.bench [--quick] [--json out.json]` (or bench/bench_matmul.py).

Limits, measured by the harness itself: DRAM read bandwidth (AVX2 streaming loads over a buffer
8× the L3), peak fp32 FMA and int8-dot (vpmaddubsw) throughput, each for 1 and all threads.
Decode rows (M <= 16) rotate several weight copies totalling >= 4× L3 so every call streams its
weights from DRAM; % of limit is GB/s over the DRAM read rate. Prefill rows (M > 16) are
compute-bound; % of limit is GOP/s over the int8 (A8 modes) or fp32 FMA (float modes) peak.
Times are medians of repeats after a warm-up; ratio = peer time / our time (> 1: we are faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np

import lowbit as lb
from lowbit import _ext

L3_BYTES = 32 << 20  # this machine's L3; override with LOWBIT_BENCH_L3_MB


def _l3():
    return int(os.environ.get("LOWBIT_BENCH_L3_MB", L3_BYTES >> 20)) << 20


def measure_limits(threads):
    core = _ext.core()
    buf = np.ones(8 * _l3(), np.uint8)
    out = {}
    for t in threads:
        core.set_num_threads(t)
        out[t] = {"dram_read_GBps": core.microbench("read", buf),
                  "fp32_fma_GFLOPs": core.microbench("fma", 20_000_000),
                  "int8_dot_GOPs": core.microbench("int8", 20_000_000)}
    return out


def _time(fn_list, budget_s=0.6, max_reps=15):
    """Median seconds per call of fn_list[i % len] calls (each rep walks all copies once).
    Calls slower than 0.3 s get 2 repeats (the warm-up is not counted)."""
    t0 = time.perf_counter()
    fn_list[0]()
    first = time.perf_counter() - t0
    for f in fn_list[1:]:
        f()
    reps = 2 if first > 0.3 else int(max(3, min(max_reps, budget_s / max(first * len(fn_list), 1e-6))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in fn_list:
            f()
        ts.append((time.perf_counter() - t0) / len(fn_list))
    return statistics.median(ts)


def _copies(nbytes):
    return max(1, -(-4 * _l3() // max(nbytes, 1)))


def bench_shape(K, N, Ms, torch, quick):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    qt4 = lb.quantize(w, bits=4, group_size=128)
    qt8 = lb.quantize(w, bits=8, group_size=None, symmetric=True)
    ours = {}

    def lowbit_method(qt, act_bits):
        base = [np.copy(a) if a is not None else None for a in (qt.codes, qt.scales, qt.zeros)]
        nb = None

        def make(n):
            nonlocal nb
            qs = []
            for _ in range(n):
                q = lb.QuantizedTensor(*[None if a is None else np.copy(a) for a in base], qt.shape, qt.format)
                lb.matmul(np.zeros((1, K), np.float32), q)  # prepack (cached on q)
                qs.append(q)
            nb = next(iter(qs[0]._lowbit_packed.values())).nbytes
            return qs
        qs1 = make(1)
        qsd = make(_copies(nb))  # decode: weights from DRAM
        return {"bytes": nb, "a8": act_bits == 8,
                "run": lambda x, qs: [lambda q=q: lb.matmul(x, q, act_bits=act_bits) for q in qs],
                "hot": qs1, "cold": qsd}

    ours["lowbit w4a8 (int4 g128)"] = lowbit_method(qt4, 8)
    ours["lowbit w4a32 (int4 g128)"] = lowbit_method(qt4, None)
    ours["lowbit w8a8 (int8 per-ch)"] = lowbit_method(qt8, 8)
    peers = {}
    if torch is not None:
        import torch.nn.functional as F
        wt = torch.from_numpy(w)

        def torch_method(weights, prep_x, call, nbytes, a8=False):
            ws1 = [weights()]
            wsd = [weights() for _ in range(_copies(nbytes))]
            return {"bytes": nbytes, "a8": a8, "hot": ws1, "cold": wsd,
                    "run": lambda x, ws: [lambda wq=wq, xx=prep_x(x): call(xx, wq) for wq in ws]}

        peers["torch fp32 F.linear"] = torch_method(lambda: wt.clone(), lambda x: torch.from_numpy(x),
                                                    F.linear, N * K * 4)
        peers["torch bf16 F.linear"] = torch_method(lambda: wt.to(torch.bfloat16),
                                                    lambda x: torch.from_numpy(x).to(torch.bfloat16),
                                                    F.linear, N * K * 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")

                def dyn():
                    lin = torch.nn.Linear(K, N, bias=False)
                    lin.weight.data.copy_(wt)
                    return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                                  dtype=torch.qint8)
                dyn()
            peers["torch.ao dynamic int8"] = torch_method(dyn, lambda x: torch.from_numpy(x),
                                                          lambda x, m: m(x), N * K, a8=True)
        except Exception as e:  # noqa: BLE001
            print(f"  (torch.ao dynamic int8 unavailable: {e})")
        try:
            g = 128 if K % 128 == 0 else 64
            wi = torch.from_numpy(np.asarray(lb.unpack_int4(qt4.codes, K), np.int32))
            sz = torch.zeros(K // g, N, 2, dtype=torch.bfloat16)

            def i4():
                return torch.ops.aten._convert_weight_to_int4pack_for_cpu(wi.clone(), 2)
            i4()
            peers["torch int4pack_mm (bf16)"] = torch_method(
                i4, lambda x: torch.from_numpy(x).to(torch.bfloat16),
                lambda x, p: torch._weight_int4pack_mm_for_cpu(x, p, g, sz), N * K // 2)
        except Exception as e:  # noqa: BLE001
            print(f"  (torch._weight_int4pack_mm_for_cpu unavailable: {e})")
    rows = []
    too_slow = set()  # a peer that took > 1 s per call is not run at larger M (said in the table)
    for M in Ms:
        x = rng.standard_normal((M, K)).astype(np.float32)
        res = {}
        for name, m in list(ours.items()) + list(peers.items()):
            if name in too_slow:
                print(f"  (skipping {name} at M={M}: > 1 s per call at a smaller M)")
                continue
            ws = m["cold"] if M <= 16 else m["hot"]
            t = _time(m["run"](x, ws), budget_s=0.25 if quick else 0.5)
            res[name] = {"time_ms": t * 1e3, "GBps": m["bytes"] / t / 1e9, "GOPs": 2 * M * N * K / t / 1e9,
                         "a8": m["a8"], "ours": name in ours}
            if t > 1.0 and name in peers:
                too_slow.add(name)
        rows.append({"K": K, "N": N, "M": M, "results": res})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes, all threads only")
    ap.add_argument("--json", default="bench_matmul.json", help="where to write the results")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    core = _ext.core()
    all_t = core.get_num_threads()
    threads = [all_t] if args.quick else sorted({1, all_t})
    limits = measure_limits(threads)
    shapes = [(4096, 4096), (576, 1536)] if args.quick else [(4096, 4096), (4096, 11008), (576, 1536)]
    Ms = [1, 16, 128] if args.quick else [1, 4, 16, 128, 512]
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "l3_bytes": _l3(),
                          "isa": core.get_isa(), "torch": getattr(torch, "__version__", None)},
              "limits": {str(k): v for k, v in limits.items()}, "rows": []}
    print(f"lowbit matmul bench  isa={core.get_isa()}  L3={_l3() >> 20} MiB")
    for t, lim in limits.items():
        print(f"  limits @ {t} thread(s): DRAM read {lim['dram_read_GBps']:.1f} GB/s, fp32 FMA "
              f"{lim['fp32_fma_GFLOPs']:.0f} GFLOP/s, int8 dot {lim['int8_dot_GOPs']:.0f} GOP/s")
    for t in threads:
        core.set_num_threads(t)
        if torch is not None:
            torch.set_num_threads(t)
        lim = limits[t]
        for K, N in shapes:
            Ms_t = Ms if t == all_t else [m for m in Ms if m <= 16]  # 1 thread: decode rows
            rows = bench_shape(K, N, Ms_t, torch, args.quick)
            for r in rows:
                r["threads"] = t
                peers = {k: v for k, v in r["results"].items() if not v["ours"]}
                print(f"\n[threads={t}] K={K} N={N} M={r['M']}")
                print(f"  {'method':28s} {'ms':>9s} {'GB/s':>7s} {'GOP/s':>8s} {'%limit':>7s}  ratio vs peers")
                for name, v in r["results"].items():
                    if r["M"] <= 16:
                        pct = 100 * v["GBps"] / lim["dram_read_GBps"]
                    else:
                        pct = 100 * v["GOPs"] / (lim["int8_dot_GOPs"] if v["a8"] else lim["fp32_fma_GFLOPs"])
                    v["pct_limit"] = pct
                    ratios = {p: pv["time_ms"] / v["time_ms"] for p, pv in peers.items()} if v["ours"] else {}
                    v["ratio_vs_peers"] = ratios
                    rs = "  ".join(f"{p.split(' (')[0]}:{q:.2f}x" for p, q in ratios.items())
                    print(f"  {name:28s} {v['time_ms']:9.3f} {v['GBps']:7.1f} {v['GOPs']:8.1f} {pct:6.0f}%  {rs}")
                report["rows"].append(r)
    core.set_num_threads(all_t)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
