"""How long GPTQ of a model's decoder Linears must take on this machine at the least: the float work
its calibration cannot skip, divided by the machine's fp32 throughput.

Sequential GPTQ runs every calibration token once through every decoder block (with the blocks
before it already quantized) and accumulates each Linear input's Hessian Σ xᵀx. So, per token:
  - the decoder Linears' multiply-adds (in x out each),
  - causal attention: QKᵀ and AV over the earlier positions (inside the sliding window, if any),
  - one symmetric rank-1 update per distinct Linear input (q/k/v share one, gate/up one): K(K+1)/2.
The counts come from hooks on one forward of one calibration-length sequence, scaled to --calib
sequences. Elementwise work (norms, activations, rotary embeddings) and GPTQ's own column solves
come on top and are not counted.

Throughput: lowbit's fp32 FMA microbenchmark on --threads threads (the peak) and torch's float32
matmul on 2048x2048x2048 (the best rate the framework's GEMM reaches here).

    python bench/gptq_time_floor.py --model-dir /tmp/models/gemma3-270m-fp32 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_algorithms as EA  # noqa: E402  (the evaluation's model loader)


def count_macs(model, seqlen: int):
    """Multiply-adds per sequence of seqlen tokens: decoder Linears, Hessian updates (exact
    triangles, one per distinct input tensor) and causal attention."""
    from lowbit.algorithms.sequential import find_blocks

    blocks = find_blocks(model)
    linears = {id(m) for _, b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)}
    lin_macs, inputs = 0, {}
    keep = []

    def hook(mod, args, out):
        nonlocal lin_macs
        x = args[0]
        keep.append(x)              # keeps id(x) unique while the forward runs
        tokens = x.numel() // x.shape[-1]
        lin_macs += tokens * mod.in_features * mod.out_features
        inputs[id(x)] = (tokens, x.shape[-1])

    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) in linears]
    try:
        with torch.no_grad():
            model(input_ids=torch.ones(1, seqlen, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    hess_macs = sum(t * k * (k + 1) // 2 for t, k in inputs.values())

    cfg = getattr(model.config, "text_config", model.config)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(blocks)
    attn_macs = 0
    for kind in layer_types:
        w = window if (kind == "sliding_attention" and window) else seqlen
        keys = sum(min(i + 1, w) for i in range(seqlen))      # earlier positions each query sees
        attn_macs += 2 * heads * head_dim * keys              # QKᵀ and AV
    return {"linear": lin_macs, "hessian": hess_macs, "attention": attn_macs,
            "blocks": len(blocks), "distinct_inputs": len(inputs)}


def fp32_rates(threads: int):
    import lowbit
    from lowbit import _ext

    lowbit.set_num_threads(threads)
    torch.set_num_threads(threads)
    peak = max(_ext.core().microbench("fma", 20_000_000) for _ in range(3))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return peak, 2 * 2048 ** 3 / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True, help="fp32 HF folder (eval_algorithms.py --convert)")
    ap.add_argument("--calib", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()

    _, model = EA.load_folder(args.model_dir)
    per_seq = count_macs(model, args.seqlen)
    tflop = {k: 2 * per_seq[k] * args.calib / 1e12 for k in ("linear", "hessian", "attention")}
    total = sum(tflop.values())
    peak, sgemm = fp32_rates(args.threads)
    row = {"model_dir": args.model_dir, "calib": args.calib, "seqlen": args.seqlen, "threads": args.threads,
           "blocks": per_seq["blocks"], "distinct_linear_inputs_per_forward": per_seq["distinct_inputs"],
           "tflop": tflop, "tflop_total": total, "fma_peak_GFLOPs": peak, "torch_sgemm_2048_GFLOPs": sgemm,
           "floor_s_at_peak": total * 1e3 / peak, "floor_s_at_sgemm": total * 1e3 / sgemm}
    print(f"{args.calib} x {args.seqlen} tokens through {per_seq['blocks']} blocks: "
          + ", ".join(f"{k} {v:.2f}" for k, v in tflop.items()) + f" -> {total:.2f} TFLOP fp32")
    print(f"{args.threads} threads: FMA peak {peak:.0f} GFLOP/s, torch sgemm 2048^3 {sgemm:.0f} GFLOP/s")
    print(f"least time for that work: {row['floor_s_at_peak']:.0f} s at the peak, "
          f"{row['floor_s_at_sgemm']:.0f} s at the sgemm rate (elementwise work and GPTQ's solves not included)")
    print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
