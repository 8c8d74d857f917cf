"""The benchmark's text table and its plot of % of the machine's limit against M."""
from __future__ import annotations

import math
from typing import Dict, List, Optional


def _short(name: str) -> str:
    """'lowbit w4a8 int4 g128' -> 'w4a8', 'lowbit w4a8_g32 int4 g32' -> 'w4a8_g32' (ratio columns)."""
    return name.split()[1]


def print_block(row: dict) -> None:
    """One (threads, K, N, M) block: every method's time, rates, % of limit; for peers, how many
    times slower than each of our kernels they are (peer time / our time)."""
    lim, ours = row["limits"], row["ours"]
    if row["regime"] == "decode":
        probes = sorted(p for r in row["results"].values() for p in r["probe_GBps"])
        what = (f"weights from DRAM; %limit: of the DRAM read rate probed between repeats (median "
                f"{probes[len(probes) // 2]:.1f}, range {probes[0]:.1f}-{probes[-1]:.1f} GB/s; "
                f"{lim['dram_read_GBps']:.1f} GB/s at the start)")
    else:
        bf16 = f", bf16-dot {lim['bf16_dot_GFLOPs']:.0f} GFLOP/s (bf16)" if lim.get("bf16_dot_GFLOPs") else ""
        probed = {}
        for r in row["results"].values():
            key = r["limit"].split(" (")[0]
            probed.setdefault(key, []).extend(r["probe_GOPs"])
        ranges = ", ".join(f"{k} {min(v):.0f}-{max(v):.0f}" for k, v in probed.items())
        what = (f"%limit: of the int8-dot (int8 compute){' / bf16-dot (bf16)' if bf16 else ''} or fp32 FMA "
                f"(float compute) peak probed between repeats ({ranges}; at the start int8-dot "
                f"{lim['int8_dot_GOPs']:.0f} GOP/s{bf16}, fp32 FMA {lim['fp32_fma_GFLOPs']:.0f} GFLOP/s)")
    print(f"\n[{row['threads']} thread(s)] K={row['K']} N={row['N']} M={row['M']}  {row['regime']}: {what}")
    ratio_cols = "".join(f" {'÷' + _short(o):>9s}" for o in ours)
    print(f"  {'method':42s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'GB/s':>6s} {'GOP/s':>6s} "
          f"{'%limit':>6s}{ratio_cols}")
    for name, r in row["results"].items():
        ratios = "".join(f" {r['ratio_vs_ours'][o]:9.2f}" if o in r.get("ratio_vs_ours", {}) else f" {'':9s}"
                         for o in ours)
        print(f"  {name:42s} {r['time_ms']:10.3f} {r['time_ms_min']:8.3f} {r['time_ms_max']:8.3f} "
              f"{r['GBps']:6.1f} {r['GOPs']:6.1f} {r['pct_limit']:5.0f}%{ratios}")
    for name, why in row["skipped"].items():
        print(f"  {name:42s} skipped: {why}")


def print_accuracy(acc: Dict[str, Dict[str, float]], K: int, N: int, M: int) -> None:
    print(f"\naccuracy  K={K} N={N} M={M}, x ~ N(0,1) with a few channels x30: relative error "
          f"||y - x·dequantize(W)ᵀ|| / ||x·dequantize(W)ᵀ||")
    for fmt, errs in acc.items():
        print(f"  weights {fmt}")
        for name, e in errs.items():
            print(f"    {name:52s} {e:9.2e}")


def plot(rows: List[dict], path: str) -> Optional[str]:
    """% of limit vs M, one panel per (threads, shape). Returns why it was skipped, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install matplotlib)"
    panels = sorted({(r["threads"], r["K"], r["N"]) for r in rows}, key=lambda p: (-p[0], p[1], p[2]))
    names = list(dict.fromkeys(name for r in rows for name in r["results"]))
    ours = {name: v["ours"] for r in rows for name, v in r["results"].items()}
    colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(names)}  # one color per method everywhere
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (t, K, N) in zip(axes.flat, panels):
        series: Dict[str, List] = {}
        for r in rows:
            if (r["threads"], r["K"], r["N"]) == (t, K, N):
                for name, v in r["results"].items():
                    series.setdefault(name, []).append((r["M"], v["pct_limit"]))
        for name, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name,
                    color=colors[name], linewidth=2.2 if ours[name] else 1, linestyle="-" if ours[name] else "--")
        ax.axvline(16.5, color="grey", linewidth=0.6, linestyle=":")  # DRAM limit left, compute peak right
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={K} N={N}, {t} thread(s)", fontsize=10)
        ax.set_xlabel("M")
        ax.set_ylabel("% of limit")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("% of this machine's limit: DRAM read rate for M <= 16 (left of the dotted line), "
                 "int8-dot or fp32 FMA peak above", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def summarize(rows: List[dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{"<threads> thread(s), <regime>": {peer: {our mode (w4a8, ...): geometric mean of peer time /
    our time over the shapes and M where both ran}}}."""
    logs: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    for r in rows:
        group = logs.setdefault(f"{r['threads']} thread(s), {r['regime']}", {})
        for peer, v in r["results"].items():
            for o, ratio in v.get("ratio_vs_ours", {}).items():
                group.setdefault(peer, {}).setdefault(_short(o), []).append(math.log(ratio))
    return {g: {p: {o: math.exp(sum(v) / len(v)) for o, v in per.items()} for p, per in peers.items()}
            for g, peers in logs.items()}


def print_summary(summary: Dict[str, Dict[str, Dict[str, float]]]) -> None:
    print("\nsummary: peer time / our time, geometric mean over shapes and M (> 1: ours is faster)")
    for group, peers in summary.items():
        modes = list(dict.fromkeys(o for ratios in peers.values() for o in ratios))
        print(f"  {group:44s}" + "".join(f" {'÷' + o:>9s}" for o in modes))
        for peer, ratios in peers.items():
            print(f"    {peer:42s}" + "".join(f" {ratios[o]:9.2f}" if o in ratios else f" {'':9s}" for o in modes))
