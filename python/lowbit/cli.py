"""The `lowbit` command. Subcommands: `inspect FILE` (more — quantize, bench, eval — can be added
with `add_parser` in main).

    lowbit inspect model.safetensors     lowbit files, GPTQ / AWQ checkpoints, plain safetensors
    lowbit inspect model.gguf            GGUF files
"""
from __future__ import annotations

import argparse
import json
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
        for name, e in json.loads(meta["lowbit.entries"]).items():
            size = sum(nbytes.get(k, 0) for k in e.get("tensors", {}).values())
            if e.get("kind") == "quantized":
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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit", description="lowbit command-line tools")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list the tensors of a lowbit / GPTQ / AWQ safetensors or GGUF file")
    p.add_argument("file")
    args = ap.parse_args(argv)
    if args.command == "inspect":
        try:
            return inspect(args.file)
        except (OSError, ValueError, ImportError) as e:
            print(f"lowbit inspect: {e}", file=sys.stderr)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
