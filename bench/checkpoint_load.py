"""Size, load time and peak memory of a saved lowbit model (save_quantized_model /
load_quantized_model), the load in a fresh process.

    python bench/checkpoint_load.py --model-dir /tmp/models/gemma3-270m-fp32 --out /tmp/q_gemma3

quantizes the decoder Linears with RTN W4 g128 (lm_head and embeddings stay float), saves the
folder, then loads it in a new process and checks that its logits equal the in-memory model's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save(model_dir, out):
    import torch
    from transformers import AutoModelForCausalLM

    from lowbit.algorithms import RTNConfig, quantize_model
    from lowbit.nn import save_quantized_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    quantize_model(model, RTNConfig(4, 128, False, skip=["lm_head", "*embed*"]), apply="quantized")
    file = save_quantized_model(model, out)
    with torch.no_grad():
        torch.save(model(torch.arange(2, 66).unsqueeze(0)).logits, os.path.join(out, "reference_logits.pt"))
    return file


def load(out):
    import torch

    import lowbit

    before = _peak_rss_gib()
    t = time.perf_counter()
    model = lowbit.load_quantized_model(out)
    seconds = time.perf_counter() - t
    peak = _peak_rss_gib()
    with torch.no_grad():
        logits = model(torch.arange(2, 66).unsqueeze(0)).logits
    return {"load_s": round(seconds, 2), "peak_rss_gib_before": round(before, 3), "peak_rss_gib_after": round(peak, 3),
            "logits_equal": bool(torch.equal(logits, torch.load(os.path.join(out, "reference_logits.pt"))))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", help="an fp32 transformers folder")
    ap.add_argument("--out", required=True, help="folder the quantized model is written to")
    ap.add_argument("--step", choices=["save", "load"], help="(internal) run one step in this process")
    args = ap.parse_args()
    if args.step:
        print(json.dumps(save(args.model_dir, args.out) if args.step == "save" else load(args.out)))
        return
    # each step in its own process, started from this small one: Linux carries a parent's peak RSS
    # over fork+exec, so a loader forked from the saving process would report the saver's peak
    steps = {}
    for step in ("save", "load"):
        cmd = [sys.executable, __file__, "--out", args.out, "--step", step]
        if args.model_dir:
            cmd += ["--model-dir", args.model_dir]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        steps[step] = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps({"file_mb": round(os.path.getsize(steps["save"]) / 1e6, 1), **steps["load"]}))


if __name__ == "__main__":
    main()
