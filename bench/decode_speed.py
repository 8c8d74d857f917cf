"""End-to-end greedy decode speed of a real causal LM (transformers), float32 against lowbit's
quantized Linears and torch's own dynamic int8, in one run: what a user of a quantized small
model sees per token, Python overhead of every layer included (not in CI).

    python bench/decode_speed.py --model-dir /tmp/models/smollm2-135m-fp32 --threads 1,2

Methods (each on a fresh copy of the model):
  fp32            the model as loaded
  torch int8 dyn  torch.ao.quantization.quantize_dynamic (W8A8, fbgemm; lm_head too)
  lowbit int8 dyn lowbit.nn.quantize_dynamic (W8A8 per-channel, lowbit kernels; lm_head too)
  lowbit w4 g128  RTN int4 g128 QuantLinear, float activations (lm_head stays float)
  lowbit w4a8     the same with act_bits=8
Each: a warm-up generate, then --repeats generates of --new-tokens tokens after a 16-token prompt;
ms/token is the best repeat's time over the new tokens. torch's and lowbit's thread counts are both
set to the row's thread count.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings


def _methods():
    import torch

    from lowbit.algorithms import RTNConfig, quantize_model
    from lowbit.nn import quantize_dynamic

    def rtn(act_bits):
        def f(m):
            quantize_model(m, RTNConfig(bits=4, group_size=128), apply="quantized", progress=False)
            for mod in m.modules():
                if type(mod).__name__ == "QuantLinear":
                    mod.act_bits = act_bits
            return m
        return f

    return {
        "fp32": lambda m: m,
        "torch int8 dyn": lambda m: torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8),
        "lowbit int8 dyn": quantize_dynamic,
        "lowbit w4 g128": rtn(None),
        "lowbit w4a8 g128": rtn(8),
    }


def _ms_per_token(model, threads, new_tokens, repeats):
    import torch

    import lowbit

    torch.set_num_threads(threads)
    lowbit.set_num_threads(threads)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    with torch.no_grad():
        model.generate(ids, **dict(kw, min_new_tokens=4, max_new_tokens=4))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(ids, **kw)
            best = min(best, time.perf_counter() - t)
    return best / new_tokens * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--threads", default="1", help="comma-separated thread counts")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if args.new_tokens < 1 or args.repeats < 1 or any(t < 1 for t in threads):
        p.error("--new-tokens, --repeats and --threads must be positive")

    import torch
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore", message=".*deprecated.*")   # torch.ao.quantization's notices
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    rows = []
    for name, make in _methods().items():
        model = make(copy.deepcopy(base))
        for t in threads:
            ms = _ms_per_token(model, t, args.new_tokens, args.repeats)
            rows.append(dict(method=name, threads=t, ms_per_token=ms))
            print(f"{name:18s} {t} thread(s): {ms:7.2f} ms/token", flush=True)
        del model
    for t in threads:
        fp = next(r["ms_per_token"] for r in rows if r["method"] == "fp32" and r["threads"] == t)
        print(f"{t} thread(s), speed-up over fp32: " + ", ".join(
            f"{r['method']} {fp / r['ms_per_token']:.2f}x" for r in rows if r["threads"] == t and r["method"] != "fp32"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model_dir=args.model_dir, new_tokens=args.new_tokens, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
