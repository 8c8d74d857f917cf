"""lowbit matmul benchmark: our CPU kernels against this machine's own limits and every peer
installed here, in one run.  `python -m lowbit.bench [--quick] [--json out.json]`
(also `lowbit bench ...` and bench/bench_matmul.py).

Limits, measured by lowbit's microbenchmarks for 1 and all threads: DRAM read bandwidth (streaming
loads over a buffer 8x the L3); peak fp32 FMA, int8-dot and bf16-dot throughput of the widest
instruction the CPU has (zmm vfmadd / vpdpbusd / vdpbf16ps with AVX-512, else ymm vfmadd and
ymm vpdpbusd with AVX-VNNI or vpmaddubsw into int16 sums, the u8 x s8 multiply rate; bf16
reported unavailable without
avx512_bf16), named beside each; and, where the CPU
and OS allow AMX, the tdpbusd / tdpbf16ps tile peaks (reported; the % of limit stays against the
vector peaks, so an AMX kernel can exceed 100%).

Methods: lowbit w4a8 (int4 g128 and g32, asymmetric; g128 also with activations per K-block of
128, "w4a8_xblk"), w4a32 and w4a16 (int4 g128, float32 and
bfloat16 activations; the latter where torch is installed), w8a8 and w8a32 (int8 per-channel,
int8 and float32 activations), all on numpy
arrays, plus w4a8 g128 through the lowbit.nn.QuantLinear torch module (listed like a peer: its ratio
is the module's per-call cost); torch fp32/bf16
F.linear, torch dynamic int8 (fbgemm and onednn engines), torch int4pack_mm and int8pack_mm
(weight-only, bf16 activations); onnxruntime
MatMulInteger, DynamicQuantizeMatMul and MatMulNBits (int4, blocks 128 and 32, accuracy levels 0
and 4); llama.cpp Q4_0/Q8_0 through ggml. Peers take our exact codes where their format allows, and
a missing peer is listed as unavailable with the reason.

Shapes: K x N = 4096x4096, 4096x11008, 4096x14336, 576x1536, 1536x576; M = 1 ... 2048 with all
threads (M = 2048 only where a call is <= 100 GFLOP) and M = 1, 4, 16 with 1 thread.
Decode rows (M <= 16) rotate weight copies totalling >= 4x the L3, so weights stream from DRAM;
% of limit = weight bytes (codes + scales + zeros as the method stores them) per second over the
DRAM read rate, taken per repeat against a read pass run right after it (the median of those
ratios), because a VM's DRAM rate drifts by tens of percent during a run; the JSON also keeps the
% of the rate measured once at the start (pct_start_limit). Prefill rows are compute-bound: % of
limit = GOP/s over the int8-dot peak (int8 compute), the bf16-dot peak (bf16 activations) or the
fp32 FMA peak (float compute), likewise per repeat against a short run of that peak's
microbenchmark right after it (a VM's compute rate drifts too: runs at half speed for seconds),
and pct_start_limit against the peak measured at the start. Each measurement: a warm-up pass, then repeats within
a time budget; median, min and max per call. Ratio = peer time / our time (> 1: ours is faster).
Accuracy: relative error of each method against x @ dequantize(W).T on activations with outlier
channels, beside the error that rounding x to int8 alone causes.
"""
from .runner import main

__all__ = ["main"]
