"""Bad input never crashes: each gets a Python exception whose message names the argument."""
from __future__ import annotations

import numpy as np
import pytest

import lowbit
from conftest import rng_for


def W(rows=4, K=100, key="w"):
    return rng_for("bad", key, rows, K).standard_normal((rows, K)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# quantize: w

@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.int8, np.uint8, np.bool_, np.complex64])
def test_w_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"^w must be float32, float16 or bfloat16, got"):
        lowbit.quantize(W().astype(dtype))


def test_w_wrong_dtype_torch():
    torch = pytest.importorskip("torch")
    for dt in (torch.float64, torch.int32, torch.int8):
        with pytest.raises(TypeError, match=r"^w must be float32, float16 or bfloat16, got"):
            lowbit.quantize(torch.zeros(3, 32, dtype=dt))


@pytest.mark.parametrize("shape", [(100,), (2, 4, 100), (1, 1, 1, 16), ()])
def test_w_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"^w must be 2-D \[rows, K\], got shape"):
        lowbit.quantize(np.ones(shape, np.float32))


@pytest.mark.parametrize("value", [[[1.0, 2.0]], 3.0, None, "w", (1.0,)])
def test_w_not_an_array(value):
    with pytest.raises(TypeError, match=r"^w must be a numpy array, torch tensor or CuPy array"):
        lowbit.quantize(value)


@pytest.mark.parametrize("shape", [(0, 100), (4, 0), (0, 0)])
def test_w_empty(shape):
    with pytest.raises(ValueError, match=r"^w is empty"):
        lowbit.quantize(np.ones(shape, np.float32))


@pytest.mark.parametrize("shape", [(0, 100), (4, 0), (0, 0)])
def test_w_empty_torch(shape):
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"^w is empty"):
        lowbit.quantize(torch.ones(shape))


# ------------------------------------------------------------------------------------------------
# quantize: format arguments

@pytest.mark.parametrize("bits", [1, 5, 16, 0, -4, 6, 7, True, 4.0, "4", None])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=r"^bits must be one of \(2, 3, 4, 8\)"):
        lowbit.quantize(W(), bits=bits)


def test_numpy_integer_bits_are_fine():
    qt = lowbit.quantize(W(), bits=np.int64(4), group_size=np.int32(32))
    assert qt.bits == 4 and qt.group_size == 32


@pytest.mark.parametrize("group_size", [0, -16, 24, 8, 1, 100, -128])
def test_bad_group_size_value(group_size):
    with pytest.raises(ValueError, match=r"^group_size must be a positive multiple of 16"):
        lowbit.quantize(W(), group_size=group_size)


@pytest.mark.parametrize("group_size", ["foo", 1.5, 32.0, True, "row", [32]])
def test_bad_group_size_type(group_size):
    with pytest.raises(TypeError, match=r"^group_size must be an int, None \(per row\) or 'tensor'"):
        lowbit.quantize(W(), group_size=group_size)


@pytest.mark.parametrize("clip", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_bad_clip_ratio(clip):
    with pytest.raises(ValueError, match=r"^clip_ratio must be in \(0, 1\]"):
        lowbit.quantize(W(), clip_ratio=clip)


def test_bad_codebook():
    with pytest.raises(ValueError, match=r"^codebook must be None or 'nf4'"):
        lowbit.quantize(W(), codebook="fp4")
    with pytest.raises(ValueError, match=r"nf4 codebook has 4-bit codes; got bits=8"):
        lowbit.quantize(W(), bits=8, codebook="nf4")


# ------------------------------------------------------------------------------------------------
# NaN / Inf, on every CPU variant, in every position

def _positions(rows, K):
    return {"first": (0, 0), "middle": (rows // 2, K // 2), "last": (rows - 1, K - 1),
            "vector_part_last_row": (rows - 1, 5)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("scheme", ["asym", "sym", "nf4"])
def test_nan_inf_raise_everywhere(isa, bad, scheme):
    fmt = dict(asym=dict(bits=4), sym=dict(bits=8, symmetric=True), nf4=dict(bits=4, codebook="nf4"))[scheme]
    torch = None
    try:
        import torch
    except ImportError:
        pass
    # K=100 with g=32: a ragged last group (96..99), the tail an AVX2 kernel does in scalar code
    for rows, K, g in [(3, 100, 32), (5, 17, None), (1, 1, 16), (2, 300, "tensor"), (17, 40, 16)]:
        for where, (r, k) in {**_positions(rows, K), "ragged_tail": (rows - 1, K - 1),
                              "ragged_tail_first": (0, (K // 16) * 16 if K > 16 else 0)}.items():
            if k >= K:
                continue
            w = W(rows, K, key=f"nan{rows}{K}")
            w[r, k] = bad
            variants = [("f32", w), ("f16", w.astype(np.float16))]
            if torch is not None:
                variants.append(("bf16", torch.from_numpy(w).to(torch.bfloat16)))
            for name, wi in variants:
                case = f"{isa} {scheme} {name} shape=({rows}, {K}) g={g} at {where} ({r}, {k})"
                with pytest.raises(ValueError, match=r"w contains NaN or Inf"):
                    lowbit.quantize(wi, group_size=g, **fmt)
                    pytest.fail(f"no error for {case}")
            # and with caller-supplied parameters (the kernel still checks w)
            if g != "tensor":
                G = 1 if g is None else -(-K // g)
                kw = dict(scales=np.full((rows, G), 0.1, np.float32))
                if scheme == "asym":
                    kw["zeros"] = np.full((rows, G), 8, np.uint8)
                with pytest.raises(ValueError, match=r"w contains NaN or Inf"):
                    lowbit.quantize(w, group_size=g, **fmt, **kw)
                    pytest.fail(f"no error for given params {case}")


def test_nan_error_names_the_row(isa):
    w = W(6, 64)
    w[4, 10] = np.nan
    with pytest.raises(ValueError, match=r"first in row 4"):
        lowbit.quantize(w, group_size=32)


def test_large_finite_values_are_not_mistaken_for_inf(isa):
    w = W(3, 100)
    w[1, 3] = np.finfo(np.float32).max
    w[2, 99] = -np.finfo(np.float32).max
    qt = lowbit.quantize(w, bits=8, symmetric=True, group_size=32)
    assert np.all(np.isfinite(qt.scales))
    w16 = W(3, 100).astype(np.float16)
    w16[0, 0] = np.finfo(np.float16).max
    assert np.all(np.isfinite(lowbit.quantize(w16, bits=4).scales))


# ------------------------------------------------------------------------------------------------
# caller-supplied scales / zeros

def test_zeros_out_of_range():
    w = W()
    s = np.full((4, 1), 0.1, np.float32)
    for z in (16, -1, 2.5, np.nan, 255, 1e9):
        with pytest.raises(ValueError, match=r"^zeros must be integers in \[0, 15\] for 4-bit codes"):
            lowbit.quantize(w, bits=4, group_size=None, scales=s, zeros=np.full((4, 1), z))
    with pytest.raises(ValueError, match=r"^zeros must be integers in \[0, 3\] for 2-bit codes"):
        lowbit.quantize(w, bits=2, group_size=None, scales=s, zeros=np.full((4, 1), 4, np.uint8))
    # 255 is fine for 8 bits
    lowbit.quantize(w, bits=8, group_size=None, scales=s, zeros=np.full((4, 1), 255, np.uint8))


def test_zeros_without_scales_or_with_a_symmetric_format():
    w = W()
    with pytest.raises(ValueError, match=r"^zeros were given without scales"):
        lowbit.quantize(w, zeros=np.zeros((4, 1), np.uint8))
    with pytest.raises(ValueError, match=r"^zeros are only used by asymmetric formats, not symmetric"):
        lowbit.quantize(w, symmetric=True, group_size=None, scales=np.ones((4, 1)), zeros=np.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"^zeros are only used by asymmetric formats, not nf4"):
        lowbit.quantize(w, codebook="nf4", group_size=None, scales=np.ones((4, 1)), zeros=np.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"^asymmetric quantization with given scales needs zeros"):
        lowbit.quantize(w, group_size=None, scales=np.ones((4, 1)))


@pytest.mark.parametrize("shape", [(4, 3), (3, 4), (4,), (16,), (1, 4), (4, 4, 1), (0,)])
def test_wrong_scales_shape(shape):
    with pytest.raises(ValueError, match=r"^scales must have shape \(4, 4\) for w of shape \(4, 100\)"):
        lowbit.quantize(W(), bits=8, symmetric=True, group_size=32, scales=np.ones(shape, np.float32))


def test_wrong_zeros_shape():
    with pytest.raises(ValueError, match=r"^zeros must have shape \(4, 4\)"):
        lowbit.quantize(W(), group_size=32, scales=np.ones((4, 4)), zeros=np.zeros((4, 3)))


def test_per_tensor_given_scale_must_be_one_value():
    with pytest.raises(ValueError, match=r"^scales of a per-tensor format must hold one value, got 2"):
        lowbit.quantize(W(), symmetric=True, group_size="tensor", scales=np.ones(2))
    with pytest.raises(ValueError, match=r"^zeros of a per-tensor format must hold one value"):
        lowbit.quantize(W(), group_size="tensor", scales=1.0, zeros=np.ones(3))


@pytest.mark.parametrize("value", [-1.0, np.inf, -np.inf, np.nan, 1e39])
def test_bad_scale_values(value):
    s = np.full((4, 1), 0.1)
    s[2, 0] = value
    with pytest.raises(ValueError, match=r"^scales must be finite and >= 0"):
        with np.errstate(over="ignore"):
            lowbit.quantize(W(), bits=8, symmetric=True, group_size=None, scales=s)


@pytest.mark.parametrize("value", ["abc", {"a": 1}, object()])
def test_scales_not_numbers(value):
    with pytest.raises((TypeError, ValueError), match=r"^scales must"):
        lowbit.quantize(W(), bits=8, symmetric=True, group_size=None, scales=value)


def test_scales_from_numpy_with_torch_w_are_accepted():
    """ops.py converts CPU scales of any framework into w's: a numpy scales array with a torch w
    (both CPU) is accepted and the result is in torch."""
    torch = pytest.importorskip("torch")
    qt = lowbit.quantize(torch.from_numpy(W()), bits=8, symmetric=True, group_size=None,
                         scales=np.full((4, 1), 0.1, np.float32))
    assert isinstance(qt.scales, torch.Tensor) and isinstance(qt.codes, torch.Tensor)


# ------------------------------------------------------------------------------------------------
# dequantize / QuantizedTensor

@pytest.mark.parametrize("value", [None, [1, 2], np.zeros((2, 2), np.uint8), "qt", {"codes": 1}])
def test_dequantize_needs_a_quantizedtensor(value):
    with pytest.raises(TypeError, match=r"^qt must be a QuantizedTensor, got"):
        lowbit.dequantize(value)


@pytest.mark.parametrize("dtype", ["float64", "int8", "half", "torch.float64", np.float64, 3])
def test_dequantize_bad_dtype(dtype):
    qt = lowbit.quantize(W(), bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"^dtype must be float32, float16 or bfloat16"):
        lowbit.dequantize(qt, dtype=dtype)


def test_dequantize_rejects_inconsistent_quantizedtensor():
    qt = lowbit.quantize(W(), bits=4, group_size=32)
    QT = lowbit.QuantizedTensor
    with pytest.raises(ValueError, match=r"^codes must have shape \(4, 50\)"):
        lowbit.dequantize(QT(qt.codes[:, :10], qt.scales, qt.zeros, qt.shape, qt.format))
    with pytest.raises(TypeError, match=r"^codes must be uint8, got int8"):
        lowbit.dequantize(QT(qt.codes.view(np.int8), qt.scales, qt.zeros, qt.shape, qt.format))
    with pytest.raises(ValueError, match=r"^scales must have shape \(4, 4\)"):
        lowbit.dequantize(QT(qt.codes, qt.scales[:, :2], qt.zeros, qt.shape, qt.format))
    with pytest.raises(TypeError, match=r"^scales must be float32, got float64"):
        lowbit.dequantize(QT(qt.codes, qt.scales.astype(np.float64), qt.zeros, qt.shape, qt.format))
    with pytest.raises(ValueError, match=r"^an asymmetric QuantizedTensor needs zeros"):
        lowbit.dequantize(QT(qt.codes, qt.scales, None, qt.shape, qt.format))
    with pytest.raises(ValueError, match=r"^zeros must have shape \(4, 4\)"):
        lowbit.dequantize(QT(qt.codes, qt.scales, qt.zeros[:1], qt.shape, qt.format))
    sym = lowbit.quantize(W(), bits=4, symmetric=True, group_size=32)
    with pytest.raises(ValueError, match=r"^a symmetric QuantizedTensor has no zeros"):
        lowbit.dequantize(QT(sym.codes, sym.scales, qt.zeros, sym.shape, sym.format))
    with pytest.raises(TypeError, match=r"^codes must be a numpy array, torch tensor or CuPy array"):
        lowbit.dequantize(QT([[1]], qt.scales, qt.zeros, qt.shape, qt.format))


def test_from_dict_rejects_bad_meta():
    d = lowbit.quantize(W(), bits=4, group_size=32).to_dict()
    bad = dict(d, meta=d["meta"][:5])
    with pytest.raises(ValueError, match=r"^meta must hold 6 integers"):
        lowbit.QuantizedTensor.from_dict(bad)
    newer = dict(d, meta=np.array([99, *d["meta"][1:]]))
    with pytest.raises(ValueError, match=r"dict version 99 is newer"):
        lowbit.QuantizedTensor.from_dict(newer)
    scheme = dict(d, meta=np.array([1, 4, 7, 32, 4, 100]))
    with pytest.raises(ValueError, match=r"^unknown scheme code 7"):
        lowbit.QuantizedTensor.from_dict(scheme)
    shape = dict(d, meta=np.array([1, 4, 0, 32, 4, 102]))
    with pytest.raises(ValueError, match=r"^codes must have shape \(4, 51\)"):
        lowbit.QuantizedTensor.from_dict(shape)
    bits = dict(d, meta=np.array([1, 5, 0, 32, 4, 100]))
    with pytest.raises(ValueError, match=r"^bits must be 2, 3, 4 or 8, got 5"):
        lowbit.QuantizedTensor.from_dict(bits)


# ------------------------------------------------------------------------------------------------
# pack_int4 / unpack_int4

@pytest.mark.parametrize("codes", [np.array([1, 16], np.uint8), np.array([[0, 255]], np.uint8),
                                   np.array([[3] * 33 + [17]], np.uint8)])
def test_pack_uint8_out_of_range(codes):
    with pytest.raises(ValueError, match=r"^codes must be in \[0, 15\] to pack as int4"):
        lowbit.pack_int4(codes)


@pytest.mark.parametrize("codes", [np.array([1, -9], np.int8), np.array([[8, 0]], np.int8),
                                   np.array([[-128, 127, 0]], np.int8)])
def test_pack_int8_out_of_range(codes):
    with pytest.raises(ValueError, match=r"^codes must be in \[-8, 7\] to pack as signed int4"):
        lowbit.pack_int4(codes)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint16, np.int32])
def test_pack_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"^codes must be uint8 or int8, got"):
        lowbit.pack_int4(np.zeros((2, 4), dtype))


def test_pack_bad_shapes_and_types():
    with pytest.raises(ValueError, match=r"^codes must be 1-D or 2-D"):
        lowbit.pack_int4(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"^codes must be 1-D or 2-D"):
        lowbit.pack_int4(np.zeros((), np.uint8))
    for shape in [(0,), (0, 4), (3, 0)]:
        with pytest.raises(ValueError, match=r"^codes is empty"):
            lowbit.pack_int4(np.zeros(shape, np.uint8))
    with pytest.raises(TypeError, match=r"^codes must be a numpy array"):
        lowbit.pack_int4([1, 2, 3])


def test_pack_non_contiguous_codes_work():
    c = np.arange(64, dtype=np.uint8).reshape(8, 8) % 16
    np.testing.assert_array_equal(lowbit.pack_int4(c.T), lowbit.pack_int4(np.ascontiguousarray(c.T)))


@pytest.mark.parametrize("K", [0, -1, 4, 7, 100])
def test_unpack_bad_K(K):
    with pytest.raises(ValueError, match=rf"^K={K} does not match packed rows of 3 bytes \(need K in \{{5, 6\}}\)"):
        lowbit.unpack_int4(np.zeros((2, 3), np.uint8), K=K)


@pytest.mark.parametrize("K", ["a", 5.0, True, [5]])
def test_unpack_K_wrong_type(K):
    with pytest.raises(TypeError, match=r"^K must be an int or None"):
        lowbit.unpack_int4(np.zeros((2, 3), np.uint8), K=K)


def test_unpack_bad_packed():
    with pytest.raises(TypeError, match=r"^packed must be uint8, got int8"):
        lowbit.unpack_int4(np.zeros((2, 3), np.int8))
    with pytest.raises(ValueError, match=r"^packed must be 1-D or 2-D"):
        lowbit.unpack_int4(np.zeros((2, 2, 2), np.uint8))
    for shape in [(0, 3), (2, 0), (0,)]:
        with pytest.raises(ValueError, match=r"^packed is empty"):
            lowbit.unpack_int4(np.zeros(shape, np.uint8))
    with pytest.raises(TypeError, match=r"^packed must be a numpy array"):
        lowbit.unpack_int4(b"\x01\x02")


# ------------------------------------------------------------------------------------------------
# the raw extension validates too (a bad call from inside lowbit must not crash the process)

def test_core_rejects_mismatched_buffers():
    core = lowbit._ext.core()
    w = W(2, 32)
    codes = np.empty((2, 16), np.uint8)
    scales = np.empty((2, 2), np.float32)
    zeros = np.empty((2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"^codes must have shape"):
        core.quantize(w, scales, zeros, np.empty((2, 15), np.uint8), 4, 0, 16, 1.0, False)
    with pytest.raises(TypeError, match=r"^scales must be float32"):
        core.quantize(w, scales.astype(np.float64), zeros, codes, 4, 0, 16, 1.0, False)
    with pytest.raises(ValueError, match=r"group_size must be a multiple of 16"):
        core.quantize(w, np.empty((2, 4), np.float32), np.empty((2, 4), np.uint8), codes, 4, 0, 8, 1.0, False)
    with pytest.raises(ValueError, match=r"^bits must be 2, 3, 4 or 8"):
        core.quantize(w, scales, zeros, codes, 5, 0, 16, 1.0, False)
    with pytest.raises(ValueError, match=r"^scheme must be"):
        core.quantize(w, scales, zeros, codes, 4, 3, 16, 1.0, False)
    with pytest.raises(ValueError, match=r"zeros must be integers in \[0, 15\] for 4-bit codes"):
        core.quantize(w, np.ones((2, 2), np.float32), np.full((2, 2), 16, np.uint8), codes, 4, 0, 16, 1.0, True)
    with pytest.raises(ValueError, match=r"^codes is read-only|^codes must|read-only"):
        ro = np.empty((2, 16), np.uint8)
        ro.flags.writeable = False
        core.quantize(w, scales, zeros, ro, 4, 0, 16, 1.0, False)
    with pytest.raises(TypeError, match=r"^w must be an array"):
        core.quantize([1.0], scales, zeros, codes, 4, 0, 16, 1.0, False)
    with pytest.raises(ValueError, match=r"^out must be a contiguous 2-D array"):
        core.dequantize(codes, scales, zeros, np.empty((2, 64), np.float32)[:, ::2], 4, 0, 16)
    with pytest.raises(ValueError, match=r"^packed must have shape"):
        core.pack_int4(np.zeros((2, 5), np.uint8), np.empty((2, 2), np.uint8))


# ------------------------------------------------------------------------------------------------
# QuantFormat / QuantizedTensor fields and what is cached from them

@pytest.mark.parametrize("kw, msg", [
    (dict(bits=4, symmetric=False, group_size=0), "group_size must be a positive int"),
    (dict(bits=4, symmetric=False, group_size=-32), "group_size must be a positive int"),
    (dict(bits=4, symmetric=False, group_size=16.7), "group_size must be a positive int"),
    (dict(bits=4, symmetric=False, group_size="row"), "group_size must be a positive int"),
    (dict(bits=4.9, symmetric=False, group_size=32), "bits must be 2, 3, 4 or 8"),
    (dict(bits=5, symmetric=False, group_size=32), "bits must be 2, 3, 4 or 8"),
    (dict(bits=True, symmetric=False, group_size=32), "bits must be 2, 3, 4 or 8"),
    (dict(bits=4, symmetric=True, group_size=32, codebook="fp4"), 'codebook must be None or "nf4"'),
    (dict(bits=8, symmetric=True, group_size=32, codebook="nf4"), "nf4 codebook needs bits=4"),
])
def test_format_rejects_bad_fields(kw, msg):
    with pytest.raises(ValueError, match=msg):
        lowbit.QuantFormat(**kw)


def test_format_takes_numpy_ints():
    f = lowbit.QuantFormat(np.int64(4), False, np.int32(64))
    assert type(f.bits) is int and type(f.group_size) is int and f == lowbit.QuantFormat(4, False, 64)


def _qt(bits=4, symmetric=False, group_size=32, K=64, rows=8):
    return lowbit.quantize(W(rows, K, key=f"qt{bits}{symmetric}"), bits=bits, group_size=group_size,
                           symmetric=symmetric)


@pytest.mark.parametrize("shape", [(8, 0), (0, 64), (8,), (8, 64, 1), (8.0, 64)])
def test_qt_bad_shape(shape):
    qt = _qt()
    with pytest.raises(ValueError, match=r"shape must be two positive ints"):
        lowbit.QuantizedTensor(qt.codes, qt.scales, qt.zeros, shape, qt.format).validate()


def test_qt_values_checked():
    qt = _qt()
    for bad in (np.nan, np.inf):
        s = qt.scales.copy()
        s[1, 1] = bad
        with pytest.raises(ValueError, match=r"scales must be finite"):
            lowbit.dequantize(lowbit.QuantizedTensor(qt.codes, s, qt.zeros, qt.shape, qt.format))
    z = qt.zeros.copy()
    z[0, 0] = 200
    with pytest.raises(ValueError, match=r"zeros must be in \[0, 15\] for 4-bit codes"):
        lowbit.matmul(np.ones((1, 64), np.float32), lowbit.QuantizedTensor(qt.codes, qt.scales, z, qt.shape, qt.format))
    with pytest.raises(ValueError, match=r"zeros must be in \[0, 15\] for 4-bit codes, got 200"):  # the C++ check
        lowbit._ext.core().pack_linear(qt.codes, qt.scales, z, qt.shape[0], qt.shape[1], 4, 0, qt.format.group_size)
    neg = lowbit.QuantizedTensor(qt.codes, -qt.scales, qt.zeros, qt.shape, qt.format)   # allowed (ggml Q4_0)
    np.testing.assert_array_equal(lowbit.dequantize(neg), -lowbit.dequantize(qt))
    for symmetric, bad_nibble in ((False, 8), (True, 4), (True, 11)):    # 3-bit: [0, 7] / [-4, 3]
        q3 = _qt(bits=3, symmetric=symmetric, K=63)
        codes = q3.codes.copy()
        codes[2, 5] = (codes[2, 5] & 0xF0) | bad_nibble
        with pytest.raises(ValueError, match=r"codes hold values outside the 3-bit"):
            lowbit.QuantizedTensor(codes, q3.scales, q3.zeros, q3.shape, q3.format).validate()
        codes = q3.codes.copy()
        codes[:, -1] |= 0xF0           # K = 63: the last byte's high nibble is padding, never read
        lowbit.QuantizedTensor(codes, q3.scales, q3.zeros, q3.shape, q3.format).validate()


@pytest.mark.parametrize("field", ["scales", "codes", "zeros", "format"])
def test_qt_field_assignment_drops_the_packed_weight(field):
    # the packed kernel layout is cached on qt: a new field value must not meet a stale one
    qt = _qt()
    x = rng_for("bad", "stale").standard_normal((3, 64)).astype(np.float32)
    lowbit.matmul(x, qt)
    if field == "scales":
        qt.scales = qt.scales * 2
    elif field == "codes":
        qt.codes = np.zeros_like(qt.codes)
    elif field == "zeros":
        qt.zeros = np.full_like(qt.zeros, 3)
    else:
        qt.format = lowbit.QuantFormat(4, False, 64)
        qt.scales, qt.zeros = qt.scales[:, :1].copy(), qt.zeros[:, :1].copy()
    np.testing.assert_allclose(lowbit.matmul(x, qt), x @ lowbit.dequantize(qt).T, rtol=1e-4, atol=1e-4)


def test_numpy_subclasses_as_x(tmp_path):
    qt = _qt()
    mm = np.memmap(tmp_path / "x.bin", np.float32, "w+", shape=(2, 64))
    mm[:] = rng_for("bad", "memmap").standard_normal((2, 64))
    np.testing.assert_array_equal(lowbit.matmul(mm, qt), lowbit.matmul(np.array(mm), qt))
    np.testing.assert_array_equal(lowbit.matmul(np.asmatrix(np.array(mm)), qt), lowbit.matmul(np.array(mm), qt))
    with pytest.raises(TypeError, match=r"x is a masked array"):
        lowbit.matmul(np.ma.masked_array(np.array(mm), mask=np.zeros((2, 64), bool)), qt)


def test_non_native_byte_order():
    with pytest.raises(TypeError, match=r"arrays must be in native byte order"):
        lowbit.quantize(W().astype(">f4"))
    with pytest.raises(TypeError, match=r"arrays must be in native byte order"):
        lowbit.matmul(np.ones((1, 64), ">f4"), _qt())


def test_matmul_bias_with_nan_or_inf():
    for v in (np.nan, np.inf):
        with pytest.raises(ValueError, match=r"bias contains NaN or Inf"):
            lowbit.matmul(np.ones((2, 64), np.float32), _qt(), bias=np.array([0, v] + [0] * 6, np.float32))


def test_matmul_float32_overflow_is_an_error(isa):
    # Finite weights near FLT_MAX (scales ~2e37) against tiny activations: the exact products are
    # ~1e19, but the int8 kernels scale their integer dots by the weight scale before the
    # activation scale, and that overflows float32. A ValueError, never Inf or NaN in y.
    w = np.full((4, 32), 1e37, np.float32)
    w[:, ::2] = -2.9e38
    x = np.full((3, 32), 1e-20, np.float32)
    qt = lowbit.quantize(w, bits=4, group_size=32)
    assert np.isfinite(x.astype(np.float64) @ lowbit.dequantize(qt).astype(np.float64).T).all()
    with pytest.raises(ValueError, match=r"result overflowed float32"):
        lowbit.matmul(x, qt, act_bits=8)


@pytest.mark.parametrize("act_bits", [8.0, True, 4, "8"])
def test_matmul_act_bits_must_be_the_int_8(act_bits):
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match=r"act_bits must be None or 8, got"):
        lowbit.matmul(x, _qt(), act_bits=act_bits)
    np.testing.assert_array_equal(lowbit.matmul(x, _qt(), act_bits=np.int64(8)), lowbit.matmul(x, _qt(), act_bits=8))


def test_tensors_that_require_grad():
    torch = pytest.importorskip("torch")
    w = torch.nn.Linear(64, 8).weight            # requires grad, as every model parameter
    qt = lowbit.quantize(w, bits=4, group_size=32)
    np.testing.assert_array_equal(qt.codes.numpy(), lowbit.quantize(w.detach(), bits=4, group_size=32).codes.numpy())
    lowbit.fake_quantize(w, bits=4, group_size=32)
    qt.scales.requires_grad_(True)
    lowbit.dequantize(qt)
    bias = torch.zeros(8, requires_grad=True)
    y = lowbit.matmul(torch.ones(2, 64), qt, bias=bias)
    assert y.shape == (2, 8) and not y.requires_grad


def test_quantlinear_checks_in_features():
    torch = pytest.importorskip("torch")
    from lowbit.nn import QuantLinear
    for g in (32, 16, None):
        q = QuantLinear.from_linear(torch.nn.Linear(64, 8), bits=4, group_size=g)
        # 63 columns pack into the same bytes and groups as 64: only in_features tells them apart
        for K in (63, 65):
            with pytest.raises(ValueError, match=rf"x has {K} features .* in_features=64"):
                q(torch.ones(2, K))
    q = QuantLinear.from_linear(torch.nn.Linear(64, 8), bits=4, group_size=32)
    q.perm = torch.randperm(64)           # act-order: index_select would drop a 65th column
    with pytest.raises(ValueError, match=r"x has 65 features"):
        q(torch.ones(2, 65))
    with pytest.raises(ValueError, match=r"x has 63 features"):
        torch.compile(q, backend="eager")(torch.ones(2, 63))


def test_torch_op_arguments():
    torch = pytest.importorskip("torch")
    import lowbit.torch_ops  # noqa: F401
    qt = lowbit.quantize(torch.randn(32, 32), bits=8, group_size=None, symmetric=True)
    x = torch.randn(1, 32)
    with pytest.raises(ValueError, match=r"scheme must be one of"):
        torch.ops.lowbit.matmul(x, qt.codes, qt.scales, None, None, 8, 7, -1, 0)
    # a call that failed validation leaves nothing in the packing cache to trust next time
    bad = qt.scales.clone()
    bad[3, 0] = float("nan")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"scales must be finite"):
            torch.ops.lowbit.matmul(x, qt.codes, bad, None, None, 8, 1, -1, 0)
    # the packing cache must tell a transposed view of the codes from the codes
    y = torch.ops.lowbit.matmul(x, qt.codes, qt.scales, None, None, 8, 1, -1, 0)
    torch.testing.assert_close(y, x @ lowbit.dequantize(qt).T, rtol=1e-4, atol=1e-4)
    ct = qt.codes.t()
    yt = torch.ops.lowbit.matmul(x, ct, qt.scales, None, None, 8, 1, -1, 0)
    ref = x @ (ct.float() * qt.scales).T
    torch.testing.assert_close(yt, ref, rtol=1e-4, atol=1e-4)


def test_quantlinear_arguments():
    torch = pytest.importorskip("torch")
    from lowbit.nn import QuantLinear
    for bad in (32.7, -32, 0, True):
        with pytest.raises(ValueError, match=r"in_features must be a positive int"):
            QuantLinear(bad, 8)
    with pytest.raises(ValueError, match=r"act_bits must be None or 8, got 8.0"):
        QuantLinear(64, 8, act_bits=8.0)
    qt = lowbit.quantize(torch.randn(8, 64), bits=4, group_size=32)
    with pytest.raises(TypeError, match=r"perm must hold integer column indices"):
        QuantLinear.from_quantized(qt, perm=torch.arange(64).float() + 0.5)
    for s in (torch.zeros(64), torch.full((64,), float("nan"))):
        with pytest.raises(ValueError, match=r"input_scale must be finite and non-zero"):
            QuantLinear.from_quantized(qt, input_scale=s)


def test_qat_prepared_twice_with_another_config():
    torch = pytest.importorskip("torch")
    import lowbit.algorithms as A
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    A.prepare_qat(m, A.QATConfig(bits=4, group_size=32, skip=()))
    A.prepare_qat(m, A.QATConfig(bits=4, group_size=32, skip=()))     # the same config: no change
    with pytest.raises(ValueError, match=r"already prepared for QAT with another config"):
        A.prepare_qat(m, A.QATConfig(bits=2, group_size=16, skip=()))


def test_load_quantized_model_into_a_skeleton_that_does_not_match(tmp_path):
    torch = pytest.importorskip("torch")
    from lowbit.nn import QuantLinear, load_quantized_model, save_quantized_model
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    m[0] = QuantLinear.from_linear(m[0], bits=4, group_size=32)
    f = save_quantized_model(m, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"the model has no module '0'"):
        load_quantized_model(f, torch.nn.Module())
    with pytest.raises(ValueError, match=r"0 is Linear with \(out, in\) features \(32, 96\) in the model but \(32, 64\)"):
        load_quantized_model(f, torch.nn.Sequential(torch.nn.Linear(96, 32), torch.nn.Linear(32, 8)))
