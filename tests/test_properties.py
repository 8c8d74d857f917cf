"""Property tests (hypothesis): round-trip error bounds, bit-exactness against the numpy twin on
generated inputs, pack/unpack and to_dict/from_dict round trips. Every example runs on one of the
runnable CPU variants, drawn by hypothesis, so all of them are covered."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit
import reference as R
from conftest import CPU_VARIANTS, have_torch

FLT_MIN = float(np.finfo(np.float32).tiny)
SETTINGS = settings(deadline=None, max_examples=60, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

isas = st.sampled_from(CPU_VARIANTS)
uniform_formats = st.sampled_from([(b, s) for b in (2, 3, 4, 8) for s in ("asymmetric", "symmetric")])
all_formats = st.sampled_from([(b, s) for b in (2, 3, 4, 8) for s in ("asymmetric", "symmetric")]
                              + [(4, "nf4")])
group_sizes = st.sampled_from([16, 32, 48, None, "tensor"])


@st.composite
def weights(draw, max_rows=5, max_k=80):
    rows = draw(st.integers(1, max_rows))
    K = draw(st.integers(1, max_k))
    mag = float(np.float32(draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))))
    elems = st.floats(-mag, mag, width=32, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float32, (rows, K), elements=elems))


def kwargs(bits, scheme, group_size, clip=1.0):
    kw = dict(bits=bits, group_size=group_size, clip_ratio=clip)
    if scheme == "nf4":
        kw["codebook"] = "nf4"
    else:
        kw["symmetric"] = scheme == "symmetric"
    return kw


def with_isa(name, fn):
    core = lowbit._ext.core()
    core.set_isa(name)
    try:
        return fn()
    finally:
        core.set_isa("auto")


def per_element(a, K, group_size):
    """[rows, G] (or [1, 1]) per-group values broadcast to [rows, K]."""
    a = np.asarray(a)
    if group_size == "tensor":
        return np.full((1, K), a.reshape(-1)[0])
    g = K if group_size is None else group_size
    return np.repeat(a, g, axis=1)[:, :K]


@SETTINGS
@given(isa=isas, w=weights(), fmt=uniform_formats, group_size=group_sizes)
def test_round_trip_error_within_half_a_step(isa, w, fmt, group_size):
    bits, scheme = fmt
    qt = with_isa(isa, lambda: lowbit.quantize(w, **kwargs(bits, scheme, group_size)))
    out = with_isa(isa, lambda: lowbit.dequantize(qt))
    assert out.dtype == np.float32 and out.shape == w.shape
    assert np.all(np.isfinite(out))
    s = per_element(qt.scales, w.shape[1], group_size).astype(np.float64)
    w64 = w.astype(np.float64)
    err = np.abs(w64 - out.astype(np.float64))
    # Half a step, plus float32 rounding of w * inv_scale, of 1/scale and of the product
    # (relative), plus, for groups whose scale underflowed to 0, their whole (tiny) range.
    bound = s * (0.5 + 2.0 ** -14) + np.abs(w64) * 2.0 ** -20 + 256 * FLT_MIN
    bad = np.argwhere(err > bound)
    assert bad.size == 0, (f"{isa} {scheme}{bits} g={group_size}: at {tuple(bad[0])} w={w[tuple(bad[0])]!r} "
                           f"got {out[tuple(bad[0])]!r}, scale {s[tuple(bad[0])]!r}")


@SETTINGS
@given(isa=isas, w=weights(), fmt=uniform_formats, group_size=group_sizes,
       clip=st.sampled_from([0.5, 0.8, 0.95]))
def test_clipped_round_trip_inside_the_clipped_range(isa, w, fmt, group_size, clip):
    """With clip_ratio < 1, values inside the clipped range keep the half-step bound (values
    outside it are clamped to the grid's end); the whole result matches the numpy twin."""
    bits, scheme = fmt
    qt = with_isa(isa, lambda: lowbit.quantize(w, **kwargs(bits, scheme, group_size, clip)))
    out = with_isa(isa, lambda: lowbit.dequantize(qt)).astype(np.float64)
    w64 = w.astype(np.float64)
    s = per_element(qt.scales, w.shape[1], group_size).astype(np.float64)
    ref = R.quantize(w, bits, group_size, scheme, clip)
    # the clipped range of each group, as the reference computes it
    if group_size == "tensor":
        lo = np.full(w.shape, min(w.min(), 0) * clip)
        hi = np.full(w.shape, max(w.max(), 0) * clip)
        amax = np.full(w.shape, np.abs(w).max() * clip)
    else:
        g = w.shape[1] if group_size is None else group_size
        glo, ghi, gam = R.group_ranges(w, g)
        lo = per_element(np.minimum(glo, 0) * clip, w.shape[1], group_size)
        hi = per_element(np.maximum(ghi, 0) * clip, w.shape[1], group_size)
        amax = per_element(gam * clip, w.shape[1], group_size)
    if scheme == "symmetric":  # the grid runs -qmax-1 .. qmax, so [-amax, amax] is covered
        inside = np.abs(w64) <= amax
    else:
        inside = (w64 >= lo) & (w64 <= hi)
    bound = s * (0.5 + 2.0 ** -14) + np.abs(w64) * 2.0 ** -20 + 256 * FLT_MIN
    err = np.abs(w64 - out)
    assert np.all(err[inside] <= bound[inside])
    np.testing.assert_array_equal(R.dequantize(ref), out.astype(np.float32))


@SETTINGS
@given(isa=isas, w=weights(max_rows=4, max_k=100), fmt=all_formats, group_size=group_sizes,
       dtype=st.sampled_from(["float32", "float16"]))
def test_generated_inputs_bit_exact_with_reference(isa, w, fmt, group_size, dtype):
    bits, scheme = fmt
    with np.errstate(over="ignore"):
        wi = w.astype(np.float16) if dtype == "float16" else w
    if not np.all(np.isfinite(wi)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            with_isa(isa, lambda: lowbit.quantize(wi, **kwargs(bits, scheme, group_size)))
        return
    qt = with_isa(isa, lambda: lowbit.quantize(wi, **kwargs(bits, scheme, group_size)))
    ref = R.quantize(R.to_f32(wi, dtype), bits, group_size, scheme)
    np.testing.assert_array_equal(qt.codes, ref.stored_codes())
    np.testing.assert_array_equal(qt.scales.view(np.uint32), ref.scales.view(np.uint32))
    if ref.zeros is not None:
        np.testing.assert_array_equal(qt.zeros, ref.zeros)
    for out_dtype in ("float32", "float16"):
        out = with_isa(isa, lambda: lowbit.dequantize(qt, dtype=out_dtype))
        want = R.dequantize_as(ref, out_dtype)
        np.testing.assert_array_equal(out.view(np.uint32 if out_dtype == "float32" else np.uint16),
                                      want.view(np.uint32 if out_dtype == "float32" else np.uint16))


@SETTINGS
@given(rows=st.integers(1, 6), K=st.integers(1, 77), signed=st.booleans(), one_d=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1))
def test_pack_unpack_round_trip(rows, K, signed, one_d, seed):
    rng = np.random.default_rng(seed)
    codes = (rng.integers(-8, 8, size=(rows, K)).astype(np.int8) if signed
             else rng.integers(0, 16, size=(rows, K)).astype(np.uint8))
    if one_d:
        codes = codes[0]
    packed = lowbit.pack_int4(codes)
    c2 = codes.reshape(1, -1) if one_d else codes
    assert packed.dtype == np.uint8
    assert packed.shape == ((K + 1) // 2,) if one_d else (rows, (K + 1) // 2)
    np.testing.assert_array_equal(packed.reshape(c2.shape[0], -1), R.pack_nibbles(c2))
    back = lowbit.unpack_int4(packed, K=K, signed=signed)
    assert back.dtype == codes.dtype and back.shape == codes.shape
    np.testing.assert_array_equal(back, codes)
    if K % 2 == 0:  # K defaults to twice the packed width
        np.testing.assert_array_equal(lowbit.unpack_int4(packed, signed=signed), codes)


@SETTINGS
@given(rows=st.integers(1, 4), nbytes=st.integers(1, 40), seed=st.integers(0, 2 ** 32 - 1))
def test_unpack_pack_round_trip_any_bytes(rows, nbytes, seed):
    packed = np.random.default_rng(seed).integers(0, 256, size=(rows, nbytes)).astype(np.uint8)
    for signed in (False, True):
        codes = lowbit.unpack_int4(packed, signed=signed)
        np.testing.assert_array_equal(codes, R.unpack_nibbles(packed, 2 * nbytes, signed))
        np.testing.assert_array_equal(lowbit.pack_int4(codes), packed)


@SETTINGS
@given(isa=isas, w=weights(max_rows=4, max_k=70), fmt=all_formats, group_size=group_sizes,
       use_torch=st.booleans() if have_torch() else st.just(False))
def test_to_dict_from_dict_round_trip(isa, w, fmt, group_size, use_torch):
    bits, scheme = fmt
    if use_torch:
        import torch

        w = torch.from_numpy(w)
    qt = with_isa(isa, lambda: lowbit.quantize(w, **kwargs(bits, scheme, group_size)))
    d = qt.to_dict()
    assert set(d) == ({"codes", "scales", "meta", "zeros"} if scheme == "asymmetric"
                      else {"codes", "scales", "meta"})
    # through plain numpy arrays, as a file format would store them
    stored = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)).copy() for k, v in d.items()}
    back = lowbit.QuantizedTensor.from_dict(stored)
    assert back.shape == qt.shape and back.format == qt.format
    assert back.bits == bits and back.group_size == group_size
    for name in ("codes", "scales", "zeros"):
        a, b = getattr(qt, name), getattr(back, name)
        if a is None:
            assert b is None
            continue
        a = a.numpy() if hasattr(a, "numpy") else a
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(lowbit.dequantize(back)),
                                  np.asarray(lowbit.dequantize(qt)))
    same = lowbit.QuantizedTensor.from_dict(d)  # straight from to_dict, same framework
    assert type(same.codes) is type(qt.codes)
