"""llama.cpp peer: one ggml mul_mat with Q4_0 and Q8_0 weights, driven through ctypes from the ggml
shared libraries that llama-cpp-python builds and bundles (or those in $LOWBIT_BENCH_GGML_DIR).

The weights are quantized by ggml itself (Q4_0: blocks of 32, one fp16 scale, codes - 8; Q8_0:
blocks of 32, one fp16 scale), from the same float matrix as ours. As llama.cpp does when it loads
a model, a weight goes into the CPU backend's repack buffer (interleaved layout, e.g. Q4_0 8x8 on
AVX2) when the backend says it supports the mul_mat there, else into plain memory.
"""
from __future__ import annotations

import ctypes
import os
from typing import List

import numpy as np

from .. import ops
from ..tensor import QuantFormat, QuantizedTensor
from .measure import Method, Unavailable
from .ours import Case

GGML_TYPE_F32, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0 = 0, 2, 8
_lib = None
_LogCallback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SILENT = _LogCallback(lambda level, text, user_data: None)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _library_dir():
    if os.environ.get("LOWBIT_BENCH_GGML_DIR"):
        return os.environ["LOWBIT_BENCH_GGML_DIR"]
    import llama_cpp

    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib")


def _ggml():
    """libggml-base + libggml-cpu with the few signatures used here (loaded once)."""
    global _lib
    if _lib is None:
        d = _library_dir()
        base = ctypes.CDLL(os.path.join(d, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(os.path.join(d, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        P, S, I64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
        for lib, name, res, args in [
                (base, "ggml_init", P, [_InitParams]), (base, "ggml_free", None, [P]),
                (base, "ggml_reset", None, [P]), (base, "ggml_tensor_overhead", S, []),
                (base, "ggml_graph_overhead", S, []), (base, "ggml_row_size", S, [ctypes.c_int, I64]),
                (base, "ggml_new_tensor_2d", P, [P, ctypes.c_int, I64, I64]), (base, "ggml_get_data", P, [P]),
                (base, "ggml_mul_mat", P, [P, P, P]), (base, "ggml_new_graph", P, [P]),
                (base, "ggml_build_forward_expand", None, [P, P]),
                (base, "ggml_quantize_chunk", S, [ctypes.c_int, P, P, I64, I64, I64, P]),
                (base, "ggml_backend_reg_dev_get", P, [P, S]),
                (base, "ggml_backend_reg_get_proc_address", P, [P, ctypes.c_char_p]),
                (base, "ggml_backend_buft_name", ctypes.c_char_p, [P]),
                (base, "ggml_backend_alloc_ctx_tensors_from_buft", P, [P, P]),
                (base, "ggml_backend_tensor_set", None, [P, P, S, S]),
                (base, "ggml_backend_buffer_free", None, [P]),
                (base, "ggml_backend_dev_supports_op", ctypes.c_bool, [P, P]),
                (base, "ggml_log_set", None, [_LogCallback, P]),
                (cpu, "ggml_cpu_init", None, []), (cpu, "ggml_backend_cpu_reg", P, []),
                (cpu, "ggml_graph_compute_with_ctx", ctypes.c_int, [P, P, ctypes.c_int])]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
            setattr(base, name, fn)
        base.ggml_log_set(_SILENT, None)  # ggml reports each repack on stderr
        base.ggml_cpu_init()
        _lib = base
    return _lib


def _context(lib, nbytes, no_alloc=False):
    ctx = lib.ggml_init(_InitParams(nbytes, None, no_alloc))
    if not ctx:
        raise MemoryError(f"ggml_init could not allocate {nbytes} bytes")
    return ctx


def _repack_buffer_type(lib):
    """The CPU backend's "CPU_REPACK" buffer type, or None."""
    reg = lib.ggml_backend_cpu_reg()
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return None
    extra_bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    bufts = extra_bufts(lib.ggml_backend_reg_dev_get(reg, 0))
    i = 0
    while bufts and bufts[i]:
        if lib.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


class _Weight:
    """One copy of the quantized weight in its own ggml context (and backend buffer when repacked),
    plus a graph per M (built on the first call with that M, i.e. in the untimed warm-up) with its
    input, output and work memory."""

    def __init__(self, lib, ggml_type, data: np.ndarray, K: int, N: int, threads: int):
        self.lib, self.K, self.N, self.threads = lib, K, N, threads
        self.graphs, self.buffer, self.repacked = {}, None, False
        buft = _repack_buffer_type(lib)
        if buft:
            self.ctx = _context(lib, 3 * lib.ggml_tensor_overhead(), no_alloc=True)
            self.tensor = lib.ggml_new_tensor_2d(self.ctx, ggml_type, K, N)
            self.buffer = lib.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx, buft)
            probe = lib.ggml_mul_mat(self.ctx, self.tensor, lib.ggml_new_tensor_2d(self.ctx, GGML_TYPE_F32, K, 1))
            self.repacked = bool(self.buffer) and lib.ggml_backend_dev_supports_op(
                lib.ggml_backend_reg_dev_get(lib.ggml_backend_cpu_reg(), 0), probe)
            if self.repacked:
                lib.ggml_backend_tensor_set(self.tensor, data.ctypes.data, 0, data.nbytes)  # repacks
                return
            self._free_weight()
        self.ctx = _context(lib, data.nbytes + lib.ggml_tensor_overhead() + 1024)
        self.tensor = lib.ggml_new_tensor_2d(self.ctx, ggml_type, K, N)
        ctypes.memmove(lib.ggml_get_data(self.tensor), data.ctypes.data, data.nbytes)

    def _free_weight(self):
        if self.buffer:
            self.lib.ggml_backend_buffer_free(self.buffer)
            self.buffer = None
        self.lib.ggml_free(self.ctx)

    def graph(self, M):
        if M not in self.graphs:
            lib = self.lib
            ctx = _context(lib, 3 * lib.ggml_tensor_overhead() + lib.ggml_graph_overhead()
                           + 4 * M * (self.K + self.N) + 4096)
            x = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, self.K, M)
            y = lib.ggml_mul_mat(ctx, self.tensor, x)
            g = lib.ggml_new_graph(ctx)
            lib.ggml_build_forward_expand(g, y)
            # the work buffer holds x converted to the weights' dot type (at most 4 bytes a value)
            work = _context(lib, 4 * M * self.K + (4 << 20))
            self.graphs[M] = (ctx, work, g, lib.ggml_get_data(x), lib.ggml_get_data(y))
        return self.graphs[M]

    def __call__(self, x: np.ndarray):
        _, work, g, x_data, y_data = self.graph(x.shape[0])
        ctypes.memmove(x_data, x.ctypes.data, x.nbytes)
        self.lib.ggml_reset(work)  # compute_with_ctx takes its work buffer from this context
        if self.lib.ggml_graph_compute_with_ctx(work, g, self.threads) != 0:
            raise RuntimeError("ggml_graph_compute failed")
        return y_data, x.shape[0], self.N

    def __del__(self):
        for ctx, work, *_ in self.graphs.values():
            self.lib.ggml_free(ctx)
            self.lib.ggml_free(work)
        self._free_weight()


def _output(result) -> np.ndarray:
    y_data, M, N = result
    return np.ctypeslib.as_array(ctypes.cast(y_data, ctypes.POINTER(ctypes.c_float)), (M, N)).copy()


def _as_quantized_tensor(ggml_type, data: np.ndarray, K: int, N: int) -> QuantizedTensor:
    """ggml's blocks of 32 as the equivalent lowbit format, for the accuracy reference. A block is an
    fp16 scale then the codes: Q8_0 32 int8; Q4_0 16 bytes, element j in the low nibble of byte j and
    element j + 16 in its high nibble, value (code - 8) * scale (lowbit: asymmetric, zero 8)."""
    blocks = data.reshape(N, K // 32, -1)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:]
    if ggml_type == GGML_TYPE_Q8_0:
        return QuantizedTensor(np.ascontiguousarray(codes.view(np.int8).reshape(N, K)), scales, None, (N, K),
                               QuantFormat(bits=8, symmetric=True, group_size=32))
    codes = np.concatenate([codes & 15, codes >> 4], axis=-1).reshape(N, K)
    return QuantizedTensor(ops.pack_int4(codes), scales, np.full(scales.shape, 8, np.uint8), (N, K),
                           QuantFormat(bits=4, symmetric=False, group_size=32))


def _method(lib, name, ggml_type, case: Case, threads) -> Method:
    nbytes = lib.ggml_row_size(ggml_type, case.K) * case.N
    data = np.empty(nbytes, np.uint8)
    w = np.ascontiguousarray(case.w)
    lib.ggml_quantize_chunk(ggml_type, w.ctypes.data, data.ctypes.data, 0, case.N, case.K, None)
    layout = "repacked" if _Weight(lib, ggml_type, data, case.K, case.N, threads).repacked else "plain"
    return Method(f"{name} ({layout})", nbytes, "int8", lambda: _Weight(lib, ggml_type, data, case.K, case.N, threads),
                  run=lambda x, weight: weight(x), to_numpy=_output,
                  reference=_as_quantized_tensor(ggml_type, data, case.K, case.N), reference_origin="ggml's codes")


def methods(case: Case, threads: int) -> List:
    try:
        lib = _ggml()
    except ImportError:
        return [Unavailable("llama.cpp", "not installed (pip install llama-cpp-python, which compiles "
                                         "llama.cpp; or set LOWBIT_BENCH_GGML_DIR to a folder with libggml-*.so)")]
    except (OSError, AttributeError) as e:
        return [Unavailable("llama.cpp", f"its ggml library could not be used: {e}")]
    if case.K % 32:
        return [Unavailable("llama.cpp", f"Q4_0/Q8_0 need K divisible by 32 (K={case.K})")]
    return [_method(lib, "llama.cpp Q4_0", GGML_TYPE_Q4_0, case, threads),
            _method(lib, "llama.cpp Q8_0", GGML_TYPE_Q8_0, case, threads)]
