"""The `lowbit` command.

    lowbit inspect model.safetensors     lowbit files, GPTQ / AWQ checkpoints, plain safetensors
    lowbit inspect model.gguf            GGUF files
    lowbit quantize MODEL_DIR OUT --method rtn|gptq|awq --bits 4 --group-size 128 --calib TEXT
                                         a transformers causal LM -> a lowbit model folder
    lowbit eval MODEL --text FILE        perplexity over non-overlapping windows
    lowbit bench [ARGS...]               the matmul benchmark (python -m lowbit.bench ARGS)

quantize / eval need torch and transformers. Text is tokenized with the model folder's tokenizer
when it has one, else byte-wise (token = byte % vocab_size; enough for tests and toy models).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

import numpy as np

Row = Tuple[str, str, str, str, int]  # name, format, shape, bits, bytes


def _gguf_rows(path: str) -> List[Row]:
    from .io.gguf import _gguf, _reader

    T = _gguf().GGMLQuantizationType
    bits = {"Q4_0": "4", "Q8_0": "8", "F32": "32", "F16": "16", "BF16": "16", "Q4_K": "4", "Q5_K": "5",
            "Q6_K": "6", "Q2_K": "2", "Q3_K": "3", "Q8_K": "8", "Q4_1": "4", "Q5_0": "5", "Q5_1": "5"}
    rows = []
    for t in _reader(path).tensors:
        kind = T(t.tensor_type).name
        shape = "x".join(str(int(v)) for v in reversed(list(t.shape)))
        rows.append((t.name, f"gguf {kind}", shape, bits.get(kind, "?"), int(t.n_bytes)))
    return rows


def _safetensors_rows(path: str) -> List[Row]:
    from .io.safetensors_io import read_header, _read_tensor
    from .tensor import QuantFormat

    header, meta, start = read_header(path)
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    rows: List[Row] = []
    if meta.get("format") == "lowbit" and "lowbit.entries" in meta:
        entries = json.loads(meta["lowbit.entries"])
        for name, e in entries.items():
            size = sum(nbytes.get(k, 0) for k in e.get("tensors", {}).values())
            if e.get("kind") == "alias":     # stored once under the entry it aliases
                key = entries[e["of"]]["tensors"]["data"]
                rows.append((name, f"alias of {e['of']}", "x".join(map(str, header[key]["shape"])),
                             str(8 * np.dtype(_dtype(header[key]["dtype"])).itemsize), 0))
            elif e.get("kind") == "quantized":
                g = e.get("group_size")
                fmt = QuantFormat(int(e["bits"]), e["scheme"] != "asymmetric", g,
                                  "nf4" if e["scheme"] == "nf4" else None)
                rows.append((name, f"lowbit {fmt.name}", "x".join(map(str, e["shape"])), str(e["bits"]), size))
            else:
                key = e["tensors"]["data"]
                rows.append((name, f"dense {e.get('dtype')}", "x".join(map(str, header[key]["shape"])),
                             str(8 * np.dtype(_dtype(header[key]["dtype"])).itemsize), size))
        return rows
    used = set()
    for key in sorted(header):
        if not key.endswith(".qweight"):
            continue
        pre = key[:-8]
        qw, sc = header[key], header.get(f"{pre}.scales")
        if sc is None or len(qw["shape"]) != 2 or len(sc["shape"]) != 2:
            continue
        parts = [k for k in (key, f"{pre}.qzeros", f"{pre}.scales", f"{pre}.g_idx") if k in header]
        used.update(parts)
        size = sum(nbytes[k] for k in parts)
        G, N = sc["shape"]
        if f"{pre}.g_idx" in header or qw["shape"][1] == N:
            K = header[f"{pre}.g_idx"]["shape"][0] if f"{pre}.g_idx" in header else None
            bits = 32 * qw["shape"][0] // K if K else 4
            K = K or qw["shape"][0] * 8
            act = ""
            if f"{pre}.g_idx" in header:
                with open(path, "rb") as f:
                    g = _read_tensor(f, path, f"{pre}.g_idx", header[f"{pre}.g_idx"], start)
                act = " act-order" if np.any(np.diff(g.astype(np.int64)) < 0) else ""
            name = f"gptq int{bits} g{K // G}{act}"
        else:
            K, bits = qw["shape"][0], 4
            name = f"awq int4 g{K // G}"
        rows.append((pre, name, f"{N}x{K}", str(bits), size))
    for key in sorted(header):
        if key not in used:
            dt = header[key]["dtype"]
            rows.append((key, f"dense {dt}", "x".join(map(str, header[key]["shape"])),
                         str(8 * np.dtype(_dtype(dt)).itemsize), nbytes[key]))
    return rows


def _dtype(st: str):
    from .io.safetensors_io import _ST_DTYPES

    return _ST_DTYPES[st]


def inspect(path: str, out=None) -> int:
    out = out or sys.stdout
    with open(path, "rb") as f:
        magic = f.read(4)
    rows = _gguf_rows(path) if magic == b"GGUF" else _safetensors_rows(path)
    w = max([len(r[0]) for r in rows] + [6])
    wf = max([len(r[1]) for r in rows] + [6])
    print(f"{'tensor':{w}s}  {'format':{wf}s}  {'shape':>14s}  {'bits':>4s}  {'bytes':>12s}", file=out)
    for name, fmt, shape, bits, size in rows:
        print(f"{name:{w}s}  {fmt:{wf}s}  {shape:>14s}  {bits:>4s}  {size:12d}", file=out)
    print(f"{len(rows)} tensors, {sum(r[4] for r in rows)} bytes", file=out)
    return 0


def _tokenize(folder: str, text: str, vocab_size: int):
    """Token ids (a python list) of text: the folder's tokenizer, or bytes % vocab_size."""
    import os

    if any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                             "tokenizer_config.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder).encode(text)
    return [b % vocab_size for b in text.encode("utf-8")]


def _load_any(model_dir: str):
    """A lowbit model folder (model.lowbit.safetensors) or a transformers one, in float32, eval mode."""
    import os

    import torch
    from .nn import MODEL_FILE, load_quantized_model

    if os.path.exists(os.path.join(model_dir, MODEL_FILE)):
        return load_quantized_model(model_dir)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def quantize_cmd(args, out=None) -> int:
    import os
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from ._progress import Progress
    from .algorithms import AWQConfig, GPTQConfig, RTNConfig, apply_quantized, quantize_model
    from .nn import save_quantized_model

    out = out or sys.stdout
    steps = Progress(5, f"lowbit quantize ({args.method})")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    steps.update("loaded")
    g = args.group_size or None  # 0 = one group per row
    common = dict(bits=args.bits, group_size=g, symmetric=args.symmetric, skip=tuple(args.skip))
    calib = None
    if args.method == "rtn":
        cfg = RTNConfig(**common)
    else:
        if not args.calib:
            print(f"lowbit quantize: --method {args.method} needs --calib TEXT_FILE", file=sys.stderr)
            return 2
        with open(args.calib, encoding="utf-8", errors="replace") as f:
            ids = _tokenize(args.model_dir, f.read(), model.config.vocab_size)
        L = args.seq_len
        calib = [torch.tensor([ids[i:i + L]]) for i in range(0, len(ids) - L + 1, L)][: args.n_samples]
        if not calib:
            print(f"lowbit quantize: {args.calib} holds fewer than --seq-len={L} tokens", file=sys.stderr)
            return 2
        cfg = (GPTQConfig(act_order=args.act_order, **common) if args.method == "gptq" else AWQConfig(**common))
    steps.update(f"{len(calib or [])} calibration windows")
    with torch.no_grad():
        results = quantize_model(model, cfg, calib, apply=False, progress=True)
    steps.update(f"{len(results)} Linears quantized")
    apply_quantized(model, results)
    steps.update("QuantLinear swapped in")
    file = save_quantized_model(model, args.out)
    for name in os.listdir(args.model_dir):  # tokenizer files etc.; not the float weights or config
        src = os.path.join(args.model_dir, name)
        if os.path.isfile(src) and (name.startswith("tokenizer") or name == "special_tokens_map.json"):
            shutil.copy(src, os.path.join(args.out, name))
    steps.update("saved")
    steps.close()
    print(f"wrote {file}: {len(results)} Linears as {cfg.bits}-bit g{g or 'row'} ({args.method})", file=out)
    return 0


def perplexity(model, ids, seq_len: int, max_windows: Optional[int] = None) -> Tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows of seq_len tokens (a shorter tail
    window is scored too); returns (perplexity, tokens scored)."""
    import math

    import torch

    if seq_len < 2 or (max_windows is not None and max_windows < 1):  # [:-1] drops the last window
        raise ValueError(f"need seq_len >= 2 and max_windows >= 1, got {seq_len} and {max_windows}")
    nll, count = 0.0, 0
    starts = list(range(0, max(len(ids) - 1, 0), seq_len))[: max_windows]
    with torch.no_grad():
        for s in starts:
            w = ids[s:s + seq_len]
            if len(w) < 2:
                continue
            t = torch.tensor([w])
            logits = model(t).logits.float()[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum"))
            count += len(w) - 1
    if count == 0:
        raise ValueError("the text is too short to score (needs at least 2 tokens)")
    return math.exp(nll / count), count


def eval_cmd(args, out=None) -> int:
    out = out or sys.stdout
    model = _load_any(args.model)
    with open(args.text, encoding="utf-8", errors="replace") as f:
        ids = _tokenize(args.model, f.read(), model.config.vocab_size)
    ppl, n = perplexity(model, ids, args.seq_len, args.max_windows)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": n, "seq_len": args.seq_len}), file=out)
    else:
        print(f"perplexity {ppl:.4f} over {n} tokens (windows of {args.seq_len})", file=out)
    return 0


def bench_cmd(rest: List[str]) -> int:
    from . import bench

    bench.main(rest)
    return 0


def _int_at_least(low: int):
    """An argparse type: an int >= low. A bad count is a usage error naming the option, not a
    range() error later or a silently shorter calibration / evaluation (x[:-1] drops an item)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit", description="lowbit command-line tools")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list the tensors of a lowbit / GPTQ / AWQ safetensors or GGUF file")
    p.add_argument("file")
    pq = p = sub.add_parser("quantize", help="quantize a transformers causal LM folder into a lowbit model folder")
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--method", choices=("rtn", "gptq", "awq"), default="rtn")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=_int_at_least(0), default=128, help="elements per group; 0 = one per row")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order")
    p.add_argument("--calib", help="calibration text file (gptq, awq)")
    p.add_argument("--seq-len", type=_int_at_least(1), default=512, help="calibration window length in tokens")
    p.add_argument("--n-samples", type=_int_at_least(1), default=128, help="calibration windows at most")
    p.add_argument("--skip", nargs="*", default=["lm_head"], help="Linear name patterns left in float")
    pe = p = sub.add_parser("eval", help="perplexity of a lowbit or transformers model folder on a text file")
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--seq-len", type=_int_at_least(2), default=512, help="window length; 2 or more (one scored token)")
    p.add_argument("--max-windows", type=_int_at_least(1), default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("bench", help="the matmul benchmark; arguments go to python -m lowbit.bench",
                   add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return bench_cmd(argv[1:])
    args = ap.parse_args(argv)
    # a folder, not a hub id: a missing one fails here, not after ~20 s of hub retries
    if args.command in ("quantize", "eval"):
        parser, folder = (pq, args.model_dir) if args.command == "quantize" else (pe, args.model)
        if not os.path.isdir(folder):
            parser.error(f"no such model folder: {folder}")
    if args.command == "quantize" and os.path.realpath(args.out) == os.path.realpath(args.model_dir):
        # the lowbit file would land beside the float weights, and eval MODEL_DIR would load it
        pq.error(f"OUT must not be MODEL_DIR ({args.out}); write the lowbit model to another folder")
    handlers = {"inspect": lambda: inspect(args.file), "quantize": lambda: quantize_cmd(args),
                "eval": lambda: eval_cmd(args)}
    try:
        return handlers[args.command]()
    except (OSError, ValueError, ImportError) as e:
        print(f"lowbit {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
