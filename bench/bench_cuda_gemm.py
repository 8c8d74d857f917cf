"""CUDA W4A16 / W8A8 GEMMs against their peers over an M sweep, on real layer shapes.

    python bench/bench_cuda_gemm.py [--shapes 4096x4096,11008x4096] [--ms 1,2,4,8,16,32,64,128,512,2048]
                                    [--dtype float16] [--json out.json]

Peers (on the same device, same shapes): torch fp16/bf16 matmul (cuBLAS), torch._int_mm (int8,
cuBLASLt; needs M > 16 and K, N multiples of 8), torch._weight_int4pack_mm (tinygemm int4; bf16).
Timing: CUDA events around 10 back-to-back calls, warm-up first, median of repeats. Weights rotate over
enough copies that their total exceeds 4x the L2, so decode (small M) reads weights from DRAM.
The header holds this device's measured device-to-device copy bandwidth (bytes read + written);
each row reports time, effective GB/s (weights + activations + output bytes / time), TFLOP/s,
% of the copy bandwidth, and the ratio to each peer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import lowbit
from lowbit import ops_cuda
from lowbit.ops_cuda import matmul_cuda


def events_time(fn, args_list, repeats, warmup=3, batch=10):
    """Median/min milliseconds per call of fn(*args) with CUDA events around `batch` back-to-back
    calls (cycling through args_list): the steady-state rate of eager calls, which counts the
    host's launch overhead only where it is slower than the GPU."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for j in range(batch):
            fn(*args_list[(i * batch + j) % len(args_list)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return statistics.median(times), min(times)


def copy_bandwidth(dev) -> float:
    """Device-to-device copy GB/s (read + write bytes) on a 1 GiB buffer."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    ms, _ = events_time(lambda: b.copy_(a), [()], 20)
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,14336x4096",
                    help="comma-separated NxK weight shapes")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64,128,512,2048")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 1
    dev = torch.device("cuda", 0)
    dt = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth(dev)
    header = {"device": props.name, "sms": props.multi_processor_count, "l2_bytes": l2,
              "copy_gbps": round(bw, 1), "dtype": args.dtype, "torch": torch.__version__,
              "lowbit": lowbit.__version__}
    print("# " + json.dumps(header))
    rows = []
    cols = ("shape", "M", "kernel", "ms", "GB/s", "%copy", "TFLOP/s", "vs_fp16", "vs_peer")
    print("\t".join(cols))
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        w_fp = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        copies = max(2, int(4 * l2 // (N * K // 2)) + 1)
        q4 = [lowbit.quantize(w_fp + 0.001 * i, bits=4, group_size=128, symmetric=True) for i in range(copies)]
        copies8 = max(2, int(4 * l2 // (N * K)) + 1)
        q8 = [lowbit.quantize(w_fp + 0.001 * i, bits=8, group_size=None, symmetric=True) for i in range(copies8)]
        w16 = [w_fp.clone() for _ in range(max(2, int(4 * l2 // (2 * N * K)) + 1))]
        w8 = [q.codes.t() for q in q8]  # [K, N] int8 view for torch._int_mm
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device=dev, dtype=dt)
            flops = 2.0 * M * N * K
            results = {}
            results["torch_fp16"] = events_time(lambda w: x @ w.T, [(w,) for w in w16], args.repeats)[0]
            results["lowbit_w4a16"] = events_time(lambda q: matmul_cuda(x, q), [(q,) for q in q4], args.repeats)[0]
            if M >= ops_cuda.W4A16_DENSE_MIN_M:  # the fused kernel too, where lowbit_w4a16 went dense
                dense_min, ops_cuda.W4A16_DENSE_MIN_M = ops_cuda.W4A16_DENSE_MIN_M, 1 << 62
                results["lowbit_w4a16_fused"] = events_time(lambda q: matmul_cuda(x, q), [(q,) for q in q4],
                                                            args.repeats)[0]
                ops_cuda.W4A16_DENSE_MIN_M = dense_min
            results["lowbit_w8a8"] = events_time(lambda q: matmul_cuda(x, q, act_bits=8), [(q,) for q in q8],
                                                 args.repeats)[0]
            if M > 16 and K % 8 == 0 and N % 8 == 0:
                xi = torch.randint(-127, 127, (M, K), device=dev, dtype=torch.int8)
                try:
                    results["torch_int_mm"] = events_time(lambda w: torch._int_mm(xi, w), [(w,) for w in w8],
                                                          args.repeats)[0]
                except RuntimeError as e:  # shape rules differ between torch versions
                    print(f"# torch._int_mm skipped: {e}", file=sys.stderr)
            try:
                wi = [torch.ops.aten._convert_weight_to_int4pack(
                    torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8), 8) for _ in range(copies)]
                sz = torch.randn(K // 128, N, 2, device=dev, dtype=torch.bfloat16)
                xb = x.bfloat16()
                results["torch_int4pack"] = events_time(
                    lambda w: torch._weight_int4pack_mm(xb, w, 128, sz), [(w,) for w in wi], args.repeats)[0]
            except (RuntimeError, AttributeError) as e:
                print(f"# torch._weight_int4pack_mm skipped: {e}", file=sys.stderr)
            for name, ms in results.items():
                wbytes = {"lowbit_w4a16": N * K / 2 + N * (K // 128) * 4, "torch_int4pack": N * K / 2,
                          "lowbit_w4a16_fused": N * K / 2 + N * (K // 128) * 4,
                          "lowbit_w8a8": N * K, "torch_int_mm": N * K}.get(name, 2 * N * K)
                io = wbytes + 2 * M * K + 2 * M * N
                gbps = io / (ms * 1e-3) / 1e9
                peer = {"lowbit_w4a16": "torch_int4pack", "lowbit_w4a16_fused": "torch_int4pack",
                        "lowbit_w8a8": "torch_int_mm"}.get(name)
                row = {"shape": shape, "M": M, "kernel": name, "ms": round(ms, 4), "GB/s": round(gbps, 1),
                       "%copy": round(100 * gbps / bw, 1), "TFLOP/s": round(flops / (ms * 1e-3) / 1e12, 2),
                       "vs_fp16": round(results["torch_fp16"] / ms, 2),
                       "vs_peer": round(results[peer] / ms, 2) if peer in results else ""}
                rows.append(row)
                print("\t".join(str(row[c]) for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
