"""The benchmark run: limits, then for each thread count and layer shape every method over the M
sweep, then accuracy; printed as tables, written as JSON and a PNG plot."""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from typing import Dict, List

import numpy as np

from .. import _ext
from . import accuracy, machine, ours, peers_llama_cpp, peers_onnxruntime, peers_torch, report
from .measure import Method, Unavailable, copies_for_dram, time_calls

# (K, N): Llama-2/3-7B-class attention and MLP layers (N = 11008, 14336) and a small model's MLP
# (SmolLM2-135M, hidden 576: K=576 takes group 64, as 128 does not divide it)
FULL_SHAPES = [(4096, 4096), (4096, 11008), (4096, 14336), (576, 1536), (1536, 576)]
FULL_M = [1, 2, 4, 8, 16, 32, 128, 512, 2048]
ONE_THREAD_M = [1, 4, 16]   # the default 1-thread pass: decode only, fewer M (run time)
QUICK_SHAPES = [(4096, 4096), (576, 1536)]
QUICK_M = [1, 16, 128]
DECODE_MAX_M = 16    # M up to this: memory-bound, weights rotated from DRAM, % of DRAM read rate
SLOW_CALL_S = 1.0    # a peer slower than this per call is not run at larger M
SETTLE_S = 0.1       # pause between methods, so the last library's spinning worker threads sleep


def _parse_shapes(text):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def _parse_ints(text):
    return [int(v) for v in text.split(",")]


def _args(argv):
    from . import __doc__ as doc

    ap = argparse.ArgumentParser(prog="python -m lowbit.bench", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"shapes {QUICK_SHAPES}, M {QUICK_M}, all threads only, shorter timing")
    ap.add_argument("--json", default="bench_matmul.json", help="results file (default %(default)s)")
    ap.add_argument("--plot", help="PNG of %% of limit vs M (default: the JSON path with .png)")
    ap.add_argument("--shapes", type=_parse_shapes,
                    help="KxN,KxN,... (default " + ",".join(f"{k}x{n}" for k, n in FULL_SHAPES) + ")")
    ap.add_argument("--M", type=_parse_ints, help="comma-separated M values (default "
                    + ",".join(map(str, FULL_M)) + "; above --max-gflop skipped)")
    ap.add_argument("--threads", type=_parse_ints,
                    help=f"thread counts, each over all M (default: all threads, and 1 thread for M={ONE_THREAD_M})")
    ap.add_argument("--budget", type=float, help="seconds of repeats per measurement (default 0.2, quick 0.15)")
    ap.add_argument("--max-gflop", type=float, default=100.0,
                    help="skip (shape, M) pairs above this many GFLOP per call (default %(default)s)")
    ap.add_argument("--l3-mib", type=float, help="last-level cache size (default: read from /sys)")
    ap.add_argument("--idle-wait", type=float, default=60.0,
                    help="seconds to wait for the machine to be idle before measuring (default %(default)s)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the accuracy section")
    return ap.parse_args(argv)


def _set_threads(t: int) -> None:
    _ext.core().set_num_threads(t)
    try:
        import torch
        torch.set_num_threads(t)
    except ImportError:
        pass


def _entries(case, threads) -> List:
    return (ours.methods(case) + peers_torch.methods(case) + peers_onnxruntime.methods(case, threads)
            + peers_llama_cpp.methods(case, threads))


def _measure_method(m: Method, xs: Dict[int, np.ndarray], l3: int, budget: float, probe, lim: dict):
    """{M: Stats} over the sweep, and {M: why skipped}. Decode rows probe the DRAM read rate
    after every repeat, prefill rows the compute peak the method is compared with."""
    compute_probe = machine.compute_probe(lim, m.compute)
    stats, skipped = {}, {}
    decode = any(M <= DECODE_MAX_M for M in xs)
    cold = [m.make_weight() for _ in range(copies_for_dram(m.weight_bytes, l3))] if decode else []
    hot = cold[:1] or [m.make_weight()]
    too_slow_at = None
    for M, x in xs.items():
        if too_slow_at is not None:
            skipped[M] = f"> {SLOW_CALL_S:g} s per call at M={too_slow_at}"
            continue
        weights = cold if M <= DECODE_MAX_M else hot
        try:
            xp = m.prepare_x(x)
            stats[M] = time_calls([functools.partial(m.run, xp, w) for w in weights], budget,
                                  probe=probe if M <= DECODE_MAX_M else compute_probe)
        except Exception as e:  # noqa: BLE001  (a peer failing on one shape is reported, ours raise)
            if m.ours:
                raise
            skipped[M] = f"failed: {type(e).__name__}: {e}"
            continue
        if not m.ours and stats[M].median_s > SLOW_CALL_S:
            too_slow_at = M
    return stats, skipped


def _limit(lim: dict, M: int, compute: str):
    if M <= DECODE_MAX_M:
        return "DRAM read GB/s, probed between repeats", lim["dram_read_GBps"]
    if compute == "int8":
        return f"int8-dot GOP/s ({lim['int8_dot_instr']}), probed between repeats", lim["int8_dot_GOPs"]
    if compute == "bf16" and lim.get("bf16_dot_GFLOPs"):
        return f"bf16-dot GFLOP/s ({lim['bf16_dot_instr']}), probed between repeats", lim["bf16_dot_GFLOPs"]
    return f"fp32 FMA GFLOP/s ({lim['fp32_fma_instr']}), probed between repeats", lim["fp32_fma_GFLOPs"]


def _rows(t, case, methods, measured, lim) -> List[dict]:
    """One row per M: each method's times, rates, % of its limit; our rows carry ratio_vs_peers and
    peer rows ratio_vs_ours (always peer time / our time)."""
    K, N = case.K, case.N
    rows = []
    for M in sorted({M for stats, skipped in measured.values() for M in list(stats) + list(skipped)}):
        res, skipped = {}, {}
        for m in methods:
            stats, why = measured[m.name]
            if M in why:
                skipped[m.name] = why[M]
                continue
            s = stats[M]
            gbps, gops = m.weight_bytes / s.median_s / 1e9, 2 * M * N * K / s.median_s / 1e9
            limit_name, limit = _limit(lim, M, m.compute)
            r = {"time_ms": s.median_s * 1e3, "time_ms_min": s.min_s * 1e3, "time_ms_max": s.max_s * 1e3,
                 "repeats": s.repeats, "calls_per_repeat": s.calls_per_repeat, "weight_copies": s.copies,
                 "weight_bytes": m.weight_bytes, "GBps": gbps, "GOPs": gops, "limit": limit_name,
                 "ours": m.ours, "compute": m.compute}
            # each repeat against the limit's rate probed right after it; the median of those ratios
            done = m.weight_bytes if M <= DECODE_MAX_M else 2 * M * N * K
            paired = [done / t / 1e9 / p for t, p in zip(s.per_call_s, s.probe_rates)]
            r.update(pct_limit=100 * statistics.median(paired), pct_start_limit=100 * (gbps if M <= DECODE_MAX_M else gops) / limit)
            r["probe_GBps" if M <= DECODE_MAX_M else "probe_GOPs"] = s.probe_rates
            res[m.name] = r
        our_names = [n for n, r in res.items() if r["ours"]]
        for r in res.values():
            if r["ours"]:
                r["ratio_vs_peers"] = {p: res[p]["time_ms"] / r["time_ms"] for p in res if not res[p]["ours"]}
            else:
                r["ratio_vs_ours"] = {o: r["time_ms"] / res[o]["time_ms"] for o in our_names}
        rows.append({"threads": t, "K": K, "N": N, "M": M, "regime": "decode" if M <= DECODE_MAX_M else "prefill",
                     "limits": lim, "results": res, "skipped": skipped, "ours": our_names})
    return rows


def main(argv=None) -> dict:
    args = _args(argv)
    core = _ext.core()
    all_threads = core.get_num_threads()
    threads = args.threads or ([all_threads] if args.quick else sorted({1, all_threads}))
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    Ms = args.M or (QUICK_M if args.quick else FULL_M)
    budget = args.budget or (0.15 if args.quick else 0.2)
    l3 = machine.l3_bytes(args.l3_mib)
    plot_path = args.plot or os.path.splitext(args.json)[0] + ".png"
    t_start = time.monotonic()

    idle = machine.wait_until_idle(args.idle_wait)
    read_buf = machine.read_buffer(l3)
    limits = machine.measure_limits(threads, read_buf)
    probe = machine.dram_probe(read_buf)
    print(f"lowbit matmul bench  isa={core.get_isa()}  L3={l3 / (1 << 20):g} MiB  threads={threads}")
    if not idle["idle"]:
        print(f"  WARNING: the machine is busy ({100 * idle['busy_fraction']:.0f}% of the CPUs used by other "
              f"work after waiting {idle['waited_s']} s): numbers are pessimistic and noisy")
    for t, lim in limits.items():
        bf16 = (f"{lim['bf16_dot_GFLOPs']:.0f} GFLOP/s ({lim['bf16_dot_instr']})" if lim["bf16_dot_GFLOPs"]
                else lim["bf16_dot_instr"])
        amx = "".join(f", {k.replace('_', ' ')[:-1]}/s {lim[k]:.0f}" for k in ("amx_int8_GOPs", "amx_bf16_GFLOPs")
                      if k in lim)
        if "int8_exact_dot_GOPs" in lim:
            amx = f", exact s8×s8 dot {lim['int8_exact_dot_GOPs']:.0f} GOP/s (ymm vpsignb+vpmaddubsw+vpmaddwd){amx}"
        print(f"  limits @ {t} thread(s): DRAM read {lim['dram_read_GBps']:.1f} GB/s, fp32 FMA "
              f"{lim['fp32_fma_GFLOPs']:.0f} GFLOP/s ({lim['fp32_fma_instr']}), int8 dot "
              f"{lim['int8_dot_GOPs']:.0f} GOP/s ({lim['int8_dot_instr']}), bf16 dot {bf16}{amx}")
    print(f"  decode (M <= {DECODE_MAX_M}): weight copies totalling >= 4x L3 rotated; %limit = median over "
          f"repeats of the weight GB/s over a DRAM read pass run right after that repeat; "
          f"prefill: % of the int8-dot (A8 / int8-compute), bf16-dot (bf16 activations) or fp32 FMA peak. Times: median, min, max.")

    rows, unavailable, accuracy_report = [], {}, None
    for t in threads:
        _set_threads(t)
        for K, N in shapes:
            Ms_here = [M for M in (Ms if args.threads or args.M or t == all_threads else ONE_THREAD_M)
                       if 2 * M * N * K <= args.max_gflop * 1e9]
            if not Ms_here:
                continue
            case = ours.Case(K, N)
            entries = _entries(case, t)
            methods = [e for e in entries if isinstance(e, Method)]
            unavailable.update({e.name: e.reason for e in entries if isinstance(e, Unavailable)})
            rng = np.random.default_rng(2)
            xs = {M: rng.standard_normal((M, K)).astype(np.float32) for M in Ms_here}
            measured = {}
            for m in methods:
                measured[m.name] = _measure_method(m, xs, l3, budget, probe, limits[t])
                time.sleep(min(SETTLE_S, budget))
            for r in _rows(t, case, methods, measured, limits[t]):
                report.print_block(r)
                rows.append(r)
            if accuracy_report is None and not args.no_accuracy and t == threads[-1]:
                accuracy_report = {"K": K, "N": N, "M": 16, "errors": accuracy.measure(case, methods, 16)}
                report.print_accuracy(accuracy_report["errors"], K, N, 16)
    summary = report.summarize(rows)
    report.print_summary(summary)
    if unavailable:
        print("\nnot measured:")
    for name, why in unavailable.items():
        print(f"  {name}: {why}")

    plot_skipped = report.plot(rows, plot_path) if rows else "no rows"
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "l3_bytes": l3, "isa": core.get_isa(),
                       "build": core.build_info().get("cpu_features")},
           "idle_check": idle, "limits": {str(t): v for t, v in limits.items()},
           "config": {"threads": threads, "shapes": shapes, "M": Ms, "one_thread_M": ONE_THREAD_M, "budget_s": budget,
                      "decode_max_M": DECODE_MAX_M, "slow_call_s": SLOW_CALL_S},
           "unavailable": unavailable, "summary": summary, "rows": rows, "accuracy": accuracy_report,
           "plot": plot_skipped or plot_path, "wall_s": round(time.monotonic() - t_start, 1)}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.json}; plot: {'skipped, ' + plot_skipped if plot_skipped else plot_path}; "
          f"{out['wall_s']} s")
    core.set_num_threads(all_threads)
    return out
