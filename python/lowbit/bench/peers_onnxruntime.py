"""ONNX Runtime peers: one-node models built in memory around our codes.

MatMulInteger (activations quantized to u8 per tensor before the call, s8 weights, int32 out:
the integer kernel alone), DynamicQuantizeMatMul (com.microsoft: float in, per-tensor u8
activations inside the call, float out) and MatMulNBits (com.microsoft: int4 blocks of 128 and 32
with zero points; accuracy_level 0 computes in fp32, 4 quantizes activations to int8 per block and
uses integer dots).
"""
from __future__ import annotations

from typing import List, Union

import numpy as np

from .measure import Method, Unavailable
from .ours import Case

Entry = Union[Method, Unavailable]
IR_VERSION = 10  # onnx writes a newer IR than onnxruntime 1.23 reads by default


def methods(case: Case, threads: int) -> List[Entry]:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return [Unavailable("onnxruntime", "not installed (pip install onnxruntime onnx)")]
    out: List[Entry] = []
    for name, build in [("ort MatMulInteger (u8 x given)", _matmul_integer),
                        ("ort DynamicQuantizeMatMul", _dynamic_quantize_matmul)]:
        out.append(_guard(name, lambda b=build, n=name: b(n, case, threads)))
    for block in (128, 32):
        for level in (0, 4):
            name = f"ort MatMulNBits int4 g{case.group(block)} acc{level}"
            out.append(_guard(name, lambda b=block, lv=level, n=name: _matmul_nbits(n, case, threads, b, lv)))
    return out


def _guard(name, build) -> Entry:
    try:
        return build()
    except Exception as e:  # noqa: BLE001  (an op missing from this onnxruntime build, say)
        return Unavailable(name, f"{type(e).__name__}: {e}")


def _session_factory(node, x_type, y_type, K, N, initializers, threads):
    """A function building a fresh session (its own copy of the initializers) for the one-node model."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = helper.make_graph([node], "bench", [helper.make_tensor_value_info("x", x_type, ["M", K])],
                              [helper.make_tensor_value_info("y", y_type, ["M", N])],
                              [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    blob = model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Decode rows rotate hundreds of sessions (one per weight copy), each with its own pool: idle
    # pools that spin would starve the session being timed (measured: 12.8 ms instead of ~0.8 ms
    # at M=1, 4096x4096, 2 threads), so the pool threads sleep between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def make_weight():
        return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])

    make_weight()  # fails here, not mid-run, when the op or a shape is not supported
    return make_weight


def _run(x, session):
    return session.run(None, {"x": x})


def _matmul_integer(name, case: Case, threads) -> Method:
    from onnx import TensorProto, helper

    qt = case.int8_per_channel
    b = np.ascontiguousarray(np.asarray(qt.codes).T)  # [K, N] int8
    node = helper.make_node("MatMulInteger", ["x", "B", "x_zero"], ["y"])
    make = _session_factory(node, TensorProto.UINT8, TensorProto.INT32, case.K, case.N,
                            {"B": b, "x_zero": np.array(128, np.uint8)}, threads)

    def quantize_x(x):  # per tensor, symmetric around the zero point 128
        scale = max(float(np.abs(x).max()) / 127, 1e-30)
        return np.clip(np.rint(x / scale) + 128, 0, 255).astype(np.uint8)

    return Method(name, b.nbytes, "int8", make, _run, prepare_x=quantize_x, to_numpy=lambda y: y[0])


def _dynamic_quantize_matmul(name, case: Case, threads) -> Method:
    from onnx import TensorProto, helper

    qt = case.int8_per_channel
    b = np.ascontiguousarray(np.asarray(qt.codes).T)
    scales = np.asarray(qt.scales, np.float32).reshape(-1)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "B", "b_scale"], ["y"], domain="com.microsoft")
    make = _session_factory(node, TensorProto.FLOAT, TensorProto.FLOAT, case.K, case.N,
                            {"B": b, "b_scale": scales}, threads)
    return Method(name, b.nbytes + scales.nbytes, "int8", make, _run, to_numpy=lambda y: y[0], reference=qt)


def _matmul_nbits(name, case: Case, threads, block, level) -> Method:
    """Our asymmetric int4 codes: MatMulNBits packs each column's K codes in blocks, two per byte with
    the first in the low nibble (lowbit's order too), and zero points two per byte likewise."""
    from onnx import TensorProto, helper

    qt = case.int4_g128 if block == 128 else case.int4_g32
    g = qt.format.kernel_group_size(case.K)
    blocks = case.K // g
    b = np.asarray(qt.codes).reshape(case.N, blocks, g // 2)
    zeros = np.asarray(qt.zeros)
    if blocks % 2:
        zeros = np.concatenate([zeros, np.zeros((case.N, 1), np.uint8)], axis=1)
    zero_points = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)
    scales = np.asarray(qt.scales, np.float32).reshape(-1)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zero_points"], ["y"], domain="com.microsoft",
                            K=case.K, N=case.N, bits=4, block_size=g, accuracy_level=level)
    make = _session_factory(node, TensorProto.FLOAT, TensorProto.FLOAT, case.K, case.N,
                            {"B": b, "scales": scales, "zero_points": zero_points}, threads)
    return Method(name, b.nbytes + scales.nbytes + zero_points.nbytes, "int8" if level == 4 else "fp32", make, _run,
                  to_numpy=lambda y: y[0], reference=qt)
