"""quantize / dequantize are bit-exact with the numpy twin (tests/reference.py) on every runnable
CPU variant: codes, scales and zeros on awkward shapes, every bits/scheme/group size, clipping,
float32/float16/bfloat16 inputs, caller-supplied parameters, degenerate groups, outliers and
non-contiguous inputs; dequantize to float32/float16/bfloat16 bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

import lowbit
import reference as R
from conftest import is_slow, rng_for

# (bits, scheme) pairs lowbit supports.
FORMATS = [(2, "asymmetric"), (3, "asymmetric"), (4, "asymmetric"), (8, "asymmetric"),
           (2, "symmetric"), (3, "symmetric"), (4, "symmetric"), (8, "symmetric"), (4, "nf4")]
FORMAT_IDS = [f"{s[:4]}{b}" for b, s in FORMATS]
GROUPS = [16, 32, 64, 128, 256, None, "tensor"]
# rows in {1, 3, 17, 64} x K in {1, 15, 16, 17, 100, 576, 1000, 4099}, each K with two row counts.
SHAPES = [(1, 1), (17, 1), (3, 15), (64, 15), (1, 16), (17, 16), (3, 17), (64, 17), (17, 100),
          (1, 100), (3, 576), (64, 576), (1, 1000), (17, 1000), (3, 4099), (64, 4099)]
SHAPES_SLOW = [s if s[0] * s[1] < 20000 else (3, s[1]) for s in SHAPES]


def lb_kwargs(bits, scheme, group_size, clip=1.0):
    kw = dict(bits=bits, group_size=group_size, clip_ratio=clip)
    if scheme == "nf4":
        kw["codebook"] = "nf4"
    else:
        kw["symmetric"] = scheme == "symmetric"
    return kw


def to_np(a):
    """numpy view/copy of a lowbit result (numpy or torch), keeping the exact bits."""
    if isinstance(a, np.ndarray):
        return a
    import torch

    if a.dtype == torch.bfloat16:
        return a.view(torch.int16).numpy().view(np.uint16)
    return a.numpy()


def random_weights(rng, rows, K, kind="normal"):
    w = rng.standard_normal((rows, K)).astype(np.float32) * np.float32(rng.choice([0.01, 1.0, 30.0]))
    if kind == "outliers":
        n = max(1, rows * K // 50)
        idx = rng.integers(0, rows * K, size=n)
        w.reshape(-1)[idx] *= np.float32(rng.choice([1e3, 1e5], size=n))
    elif kind == "positive":
        w = np.abs(w) + np.float32(0.5)
    elif kind == "negative":
        w = -np.abs(w) - np.float32(0.5)
    return w


def assert_same_quant(qt, ref: R.RefQuant, case: str):
    codes, want = to_np(qt.codes), ref.stored_codes()
    assert codes.dtype == want.dtype, f"{case}: codes dtype {codes.dtype}, expected {want.dtype}"
    assert codes.shape == want.shape, f"{case}: codes shape {codes.shape}, expected {want.shape}"
    bad = np.argwhere(codes != want)
    assert bad.size == 0, (f"{case}: {len(bad)} code bytes differ, first at {tuple(bad[0])}: "
                           f"got {codes[tuple(bad[0])]}, expected {want[tuple(bad[0])]}")
    scales = to_np(qt.scales)
    assert scales.dtype == np.float32 and scales.shape == ref.scales.shape, case
    bad = np.argwhere(scales.view(np.uint32) != ref.scales.view(np.uint32))
    assert bad.size == 0, (f"{case}: scales differ at {tuple(bad[0])}: got {scales[tuple(bad[0])]!r}, "
                           f"expected {ref.scales[tuple(bad[0])]!r}")
    if ref.zeros is None:
        assert qt.zeros is None, case
    else:
        zeros = to_np(qt.zeros)
        assert zeros.dtype == np.uint8 and zeros.shape == ref.zeros.shape, case
        bad = np.argwhere(zeros != ref.zeros)
        assert bad.size == 0, (f"{case}: zeros differ at {tuple(bad[0])}: got {zeros[tuple(bad[0])]}, "
                               f"expected {ref.zeros[tuple(bad[0])]}")


def assert_same_bits(got, want, case):
    got = to_np(got)
    assert got.shape == want.shape, f"{case}: shape {got.shape}, expected {want.shape}"
    u = {4: np.uint32, 2: np.uint16}[want.dtype.itemsize]
    g, w = np.ascontiguousarray(got).view(u), np.ascontiguousarray(want).view(u)
    bad = np.argwhere(g != w)
    assert bad.size == 0, (f"{case}: {len(bad)} values differ, first at {tuple(bad[0])}: "
                           f"got bits {g[tuple(bad[0])]:#x}, expected {w[tuple(bad[0])]:#x}")


_REF_CACHE = {}


def ref_quant(key, w32, bits, scheme, group_size, clip=1.0):
    """Reference results are the same for every variant: compute each case once."""
    k = (key, bits, scheme, group_size, clip)
    if k not in _REF_CACHE:
        _REF_CACHE[k] = R.quantize(w32, bits, group_size, scheme, clip)
    return _REF_CACHE[k]


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_float32_codes_scales_zeros_bit_exact(isa, fmt, group_size):
    bits, scheme = fmt
    for rows, K in (SHAPES_SLOW if is_slow(isa) else SHAPES):
        key = ("f32", rows, K, bits, scheme, str(group_size))
        w = random_weights(rng_for(*key), rows, K)
        qt = lowbit.quantize(w, **lb_kwargs(bits, scheme, group_size))
        case = f"{isa} {scheme}{bits} g={group_size} shape=({rows}, {K})"
        assert qt.shape == (rows, K) and qt.bits == bits and qt.group_size == group_size, case
        assert_same_quant(qt, ref_quant(key, w, bits, scheme, group_size), case)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_clip_ratio_and_outliers(isa, fmt):
    bits, scheme = fmt
    for (rows, K), group_size, clip, kind in [((17, 576), 128, 0.8, "normal"),
                                              ((3, 1000), 64, 0.8, "outliers"),
                                              ((64, 100), None, 1.0, "outliers"),
                                              ((17, 17), 16, 0.8, "positive"),
                                              ((3, 300), 32, 0.8, "negative"),
                                              ((3, 4099), "tensor", 0.8, "outliers")]:
        key = ("clip", rows, K, bits, scheme, str(group_size), clip, kind)
        w = random_weights(rng_for(*key), rows, K, kind)
        qt = lowbit.quantize(w, **lb_kwargs(bits, scheme, group_size, clip))
        case = f"{isa} {scheme}{bits} g={group_size} clip={clip} {kind} shape=({rows}, {K})"
        assert_same_quant(qt, ref_quant(key, w, bits, scheme, group_size, clip), case)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_float16_input(isa, fmt):
    bits, scheme = fmt
    for (rows, K), group_size in [((17, 576), 128), ((3, 1000), 256), ((64, 15), None),
                                  ((1, 4099), 32), ((17, 100), "tensor")]:
        key = ("f16", rows, K, bits, scheme, str(group_size))
        w16 = random_weights(rng_for(*key), rows, K).astype(np.float16)
        qt = lowbit.quantize(w16, **lb_kwargs(bits, scheme, group_size))
        assert isinstance(qt.codes, np.ndarray)
        case = f"{isa} f16 {scheme}{bits} g={group_size} shape=({rows}, {K})"
        assert_same_quant(qt, ref_quant(key, R.to_f32(w16, "float16"), bits, scheme, group_size), case)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_bfloat16_input(isa, fmt):
    torch = pytest.importorskip("torch")
    bits, scheme = fmt
    for (rows, K), group_size in [((17, 576), 128), ((3, 1000), 64), ((64, 17), None),
                                  ((1, 4099), 16), ((3, 100), "tensor")]:
        key = ("bf16", rows, K, bits, scheme, str(group_size))
        wt = torch.from_numpy(random_weights(rng_for(*key), rows, K, "outliers")).to(torch.bfloat16)
        w32 = R.to_f32(wt.view(torch.int16).numpy().view(np.uint16), "bfloat16")
        qt = lowbit.quantize(wt, **lb_kwargs(bits, scheme, group_size))
        assert isinstance(qt.codes, torch.Tensor) and isinstance(qt.scales, torch.Tensor)
        case = f"{isa} bf16 {scheme}{bits} g={group_size} shape=({rows}, {K})"
        assert_same_quant(qt, ref_quant(key, w32, bits, scheme, group_size), case)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_dequantize_bit_exact_all_output_dtypes(isa, fmt):
    bits, scheme = fmt
    torch = None
    try:
        import torch
    except ImportError:
        pass
    for (rows, K), group_size in [((17, 576), 128), ((3, 1000), 32), ((64, 17), None),
                                  ((1, 4099), 256), ((3, 100), "tensor"), ((17, 1), 16)]:
        key = ("deq", rows, K, bits, scheme, str(group_size))
        w = random_weights(rng_for(*key), rows, K, "outliers")
        qt = lowbit.quantize(w, **lb_kwargs(bits, scheme, group_size))
        ref = ref_quant(key, w, bits, scheme, group_size)
        case = f"{isa} {scheme}{bits} g={group_size} shape=({rows}, {K})"
        assert_same_quant(qt, ref, case)
        for dt in ("float32", "float16"):
            out = lowbit.dequantize(qt, dtype=None if dt == "float32" else dt)
            assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dt), case
            assert_same_bits(out, R.dequantize_as(ref, dt), f"{case} -> {dt}")
        if torch is not None:  # bfloat16 output needs a torch QuantizedTensor
            tq = lowbit.QuantizedTensor(torch.from_numpy(qt.codes), torch.from_numpy(qt.scales),
                                        None if qt.zeros is None else torch.from_numpy(qt.zeros),
                                        qt.shape, qt.format)
            for dt in ("bfloat16", torch.bfloat16, torch.float16, "float32"):
                out = lowbit.dequantize(tq, dtype=dt)
                name = str(dt).replace("torch.", "")
                assert isinstance(out, torch.Tensor) and str(out.dtype) == f"torch.{name}", case
                assert_same_bits(out, R.dequantize_as(ref, name), f"{case} -> torch {name}")


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_caller_supplied_scales_and_zeros(isa, fmt):
    bits, scheme = fmt
    for (rows, K), group_size in [((17, 576), 128), ((3, 100), 16), ((64, 33), None),
                                  ((3, 1000), "tensor")]:
        key = ("given", rows, K, bits, scheme, str(group_size))
        rng = rng_for(*key)
        w = random_weights(rng, rows, K, "outliers")
        G = 1 if group_size == "tensor" else R.Fmt(bits, scheme, group_size).num_groups(K)
        n = rows if group_size != "tensor" else 1
        scales = (rng.random((n, G)) * 0.2 + 0.001).astype(np.float32)
        if group_size != "tensor":  # a zero scale and a subnormal one: codes are the zero point
            scales.reshape(-1)[0] = 0.0
            scales.reshape(-1)[-1] = 1e-40
        zeros = None
        if scheme == "asymmetric":
            zeros = rng.integers(0, 2 ** bits, size=(n, G)).astype(np.uint8)
        given_s = scales.reshape(()) if group_size == "tensor" else scales
        given_z = None if zeros is None else (int(zeros.reshape(-1)[0]) if group_size == "tensor" else zeros)
        qt = lowbit.quantize(w, scales=given_s, zeros=given_z, **lb_kwargs(bits, scheme, group_size))
        ref = R.quantize(w, bits, group_size, scheme, scales=scales, zeros=zeros)
        case = f"{isa} given {scheme}{bits} g={group_size} shape=({rows}, {K})"
        assert_same_quant(qt, ref, case)
        out = lowbit.dequantize(qt)
        assert np.all(np.isfinite(out)), case
        assert_same_bits(out, R.dequantize(ref), case)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_fake_quantize_is_dequantize_of_quantize(isa, fmt):
    bits, scheme = fmt
    for (rows, K), group_size in [((17, 576), 128), ((3, 100), 16), ((64, 33), None), ((3, 1000), "tensor")]:
        w = random_weights(rng_for("fq", rows, K, bits, scheme, str(group_size)), rows, K, "outliers")
        kw = lb_kwargs(bits, scheme, group_size, clip=0.9)
        qt = lowbit.quantize(w, **kw)
        assert_same_bits(lowbit.fake_quantize(w, **kw), lowbit.dequantize(qt), f"{isa} {fmt} g={group_size}")
        if group_size not in (None, "tensor"):
            continue
        # with caller parameters (GPTQ rounds one column at a time this way)
        p = dict(scales=qt.scales, zeros=qt.zeros) if scheme == "asymmetric" else dict(scales=qt.scales)
        assert_same_bits(lowbit.fake_quantize(w, **lb_kwargs(bits, scheme, group_size), **p),
                         lowbit.dequantize(lowbit.quantize(w, **lb_kwargs(bits, scheme, group_size), **p)),
                         f"{isa} {fmt} g={group_size} given")


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_constant_and_zero_groups(isa, fmt):
    """All-equal and all-zero groups (scale 0 must give codes = zero point and no NaN/Inf)."""
    bits, scheme = fmt
    for group_size in (16, 128, None, "tensor"):
        for rows, K in ((3, 100), (1, 16), (17, 1)):
            rng = rng_for("const", rows, K, bits, scheme, str(group_size))
            for fill in ("zeros", "equal", "negzero"):
                if fill == "zeros":
                    w = np.zeros((rows, K), np.float32)
                elif fill == "negzero":
                    w = np.full((rows, K), -0.0, np.float32)
                else:  # each row constant (a different value per row, incl. negatives)
                    w = np.repeat(rng.standard_normal((rows, 1)).astype(np.float32), K, axis=1)
                if fill == "zeros" and K > 16:  # one live group between dead ones
                    w[:, 16:32] = rng.standard_normal((rows, 16)).astype(np.float32)
                qt = lowbit.quantize(w, **lb_kwargs(bits, scheme, group_size))
                case = f"{isa} {fill} {scheme}{bits} g={group_size} shape=({rows}, {K})"
                ref = R.quantize(w, bits, group_size, scheme)
                assert_same_quant(qt, ref, case)
                scales = to_np(qt.scales)
                assert np.all(np.isfinite(scales)), case
                for dt in ("float32", "float16"):
                    out = lowbit.dequantize(qt, dtype=dt)
                    assert np.all(np.isfinite(out)), f"{case} -> {dt}"
                    assert_same_bits(out, R.dequantize_as(ref, dt), f"{case} -> {dt}")
                if fill != "equal":
                    dead = np.ones(w.shape, bool)
                    if fill == "zeros" and K > 16:
                        dead[:, 16:32] = False
                    if group_size in (None, "tensor") and fill == "zeros" and K > 16:
                        dead[:] = False  # the live values share the group
                    assert np.all(lowbit.dequantize(qt)[dead] == 0), case


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_rounding_ties_go_to_even(isa, fmt):
    """Values that land exactly halfway between two codes round half to even."""
    bits, scheme = fmt
    if scheme == "nf4":
        # Exactly on a midpoint: a value equal to m_i is not above it, so it gets code i.
        w = np.concatenate([R.NF4_MIDPOINTS, [1.0, -1.0], R.NF4_VALUES]).astype(np.float32)[None, :]
        w = np.repeat(w, 3, axis=0)
        qt = lowbit.quantize(w, bits=4, group_size=None, codebook="nf4")
        ref = R.quantize(w, 4, None, "nf4")
        assert_same_quant(qt, ref, f"{isa} nf4 midpoints")
        assert list(ref.codes[0, :15]) == list(range(15))
        return
    if scheme == "symmetric":  # max|w| = qmax -> scale 1: w = k + 0.5
        qmax = (1 << (bits - 1)) - 1
        vals = np.arange(-qmax, qmax, dtype=np.float32) + np.float32(0.5)
        w = np.concatenate([[float(qmax)], vals])
    else:  # range [0, qmax] -> scale 1, zero 0
        qmax = (1 << bits) - 1
        w = np.concatenate([[0.0, float(qmax)], np.arange(0, qmax, dtype=np.float32) + 0.5])
    w = np.resize(w.astype(np.float32), 48)[None, :].repeat(2, axis=0)
    qt = lowbit.quantize(w, **lb_kwargs(bits, scheme, None))
    ref = R.quantize(w, bits, None, scheme)
    assert ref.scales[0, 0] == 1.0
    assert_same_quant(qt, ref, f"{isa} ties {scheme}{bits}")
    q = ref.codes[0] - (0 if ref.zeros is None else ref.zeros[0, 0])
    halves = (w[0] * 2) % 2 == 1
    assert halves.sum() > 4 and np.all(q[halves] % 2 == 0), "reference must round half to even"


@pytest.mark.parametrize("fmt", [(4, "asymmetric"), (8, "symmetric"), (4, "nf4"), (3, "asymmetric")],
                         ids=["asym4", "sym8", "nf4", "asym3"])
def test_non_contiguous_inputs(isa, fmt):
    bits, scheme = fmt
    rng = rng_for("views", bits, scheme)
    base = rng.standard_normal((260, 301)).astype(np.float32)
    views = {"transposed": base.T[:, :200],          # [301, 200], column-major
             "sliced": base[5:40, 3:290],              # row stride > K
             "strided": base[::3, ::2],                # no unit stride anywhere
             "reversed": base[::-1, ::-1][:17],
             "f16_transposed": base[:50].astype(np.float16).T}
    for name, w in views.items():
        for group_size in (32, None):
            qt = lowbit.quantize(w, **lb_kwargs(bits, scheme, group_size))
            ref = R.quantize(np.ascontiguousarray(w).astype(np.float32), bits, group_size, scheme)
            assert_same_quant(qt, ref, f"{isa} {name} {scheme}{bits} g={group_size}")
    try:
        import torch
    except ImportError:
        return
    t = torch.from_numpy(base)
    for name, w in {"torch_T": t.T[:64], "torch_slice": t[2:19, 1:300],
                    "torch_bf16_T": t[:40].to(torch.bfloat16).T}.items():
        qt = lowbit.quantize(w, **lb_kwargs(bits, scheme, 64))
        w32 = w.float().contiguous().numpy()
        ref = R.quantize(w32, bits, 64, scheme)
        assert_same_quant(qt, ref, f"{isa} {name} {scheme}{bits}")


@pytest.mark.parametrize("fmt", [(4, "asymmetric"), (2, "asymmetric"), (8, "asymmetric")],
                         ids=["asym4", "asym2", "asym8"])
def test_range_wider_than_float32_gives_finite_scale(isa, fmt):
    """max - min of finite float32 weights can overflow (e.g. +-3e38): the scale must still be
    finite and dequantize must not produce NaN."""
    bits, scheme = fmt
    w = np.ones((2, 40), np.float32)
    w[0, 0], w[0, 1], w[1, 20] = 3e38, -3e38, -np.finfo(np.float32).max
    w[1, 21] = np.finfo(np.float32).max
    for group_size in (16, None, "tensor"):
        qt = lowbit.quantize(w, **lb_kwargs(bits, scheme, group_size))
        case = f"{isa} {scheme}{bits} g={group_size}"
        assert np.all(np.isfinite(qt.scales)), f"{case}: scales {qt.scales}"
        out = lowbit.dequantize(qt)
        assert not np.any(np.isnan(out)), case
        ref = R.quantize(w, bits, group_size, scheme)
        assert_same_quant(qt, ref, case)
        assert_same_bits(out, R.dequantize(ref), case)
        # Values come back within half a step wherever the grid point is a float32 (a grid point
        # beyond FLT_MAX reads back as +-inf: the zero point's rounding can shift it past it).
        if group_size == 16:
            s = np.repeat(qt.scales, 16, axis=1)[:, :40]
        else:
            s = np.broadcast_to(qt.scales, w.shape)
        fin = np.isfinite(out)
        assert fin.sum() >= w.size - 2, case
        err = np.abs(out.astype(np.float64) - w.astype(np.float64))
        # slack: w * inv_scale is rounded to float32 (relative 2^-24 of |w| / scale <= 2^9)
        assert np.all(err[fin] <= s[fin].astype(np.float64) * (0.5 + 2.0 ** -14)), case


def test_nf4_reference_codebook_is_sane():
    assert np.all(np.diff(R.NF4_VALUES) > 0)
    assert R.NF4_VALUES[0] == -1 and R.NF4_VALUES[7] == 0 and R.NF4_VALUES[15] == 1
    assert np.all((R.NF4_MIDPOINTS > R.NF4_VALUES[:-1]) & (R.NF4_MIDPOINTS < R.NF4_VALUES[1:]))
