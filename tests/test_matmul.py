"""lowbit.matmul against a float64 numpy reference of x @ dequantize(qt).T (+ bias), on every
runnable CPU variant; the integer (act_bits=8) paths also against the reference kernel (to float
rounding) and, with integer data and unit scales, exactly."""
import copy
import gc
import pickle
import sys

import numpy as np
import pytest

import lowbit as lb
from lowbit import _ext

VARIANTS = [v["name"] for v in lb.build_info()["cpu_variants"] if v["runnable"]]

FORMATS = {
    "int4-asym-g128": dict(bits=4, group_size=128),
    "int4-asym-g32": dict(bits=4, group_size=32),
    "int4-sym-g64": dict(bits=4, group_size=64, symmetric=True),
    "int4-asym-row": dict(bits=4, group_size=None),
    "nf4-g64": dict(bits=4, codebook="nf4", group_size=64),
    "int8-sym-row": dict(bits=8, group_size=None, symmetric=True),
    "int8-asym-g32": dict(bits=8, group_size=32),
}
# (M, N, K): N, K off the tile sizes, K=576 with g=128 (ragged 64), odd K
SHAPES = [(1, 37, 576), (3, 5, 131), (17, 64, 96), (64, 19, 300)]


@pytest.fixture(params=VARIANTS)
def isa(request):
    _ext.core().set_isa(request.param)
    yield request.param
    _ext.core().set_isa("auto")


def _data(M, N, K, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    return x, w


def _ref(x, qt, bias=None):
    y = np.asarray(x, np.float64) @ lb.dequantize(qt).astype(np.float64).T
    return y if bias is None else y + np.asarray(bias, np.float64)


def _act_steps(x, block=None):
    """The kernels' int8 activation scale of every element: max|x| / 127 over its row (per token)
    or over its block of `block` elements along K (per block), in float32."""
    x = np.asarray(x, np.float32)
    M, K = x.shape
    b = K if block is None else block
    s = np.empty_like(x)
    for k0 in range(0, K, b):
        s[:, k0:k0 + b] = (np.abs(x[:, k0:k0 + b]).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    return s


def _fake_quant(x, block=None):  # the kernels' int8 rule, float32 steps
    x = np.asarray(x, np.float32)
    s = _act_steps(x, block)
    inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    return np.clip(np.rint(x * inv), -127, 127) * s


def _act_block(qt, granularity):
    return qt.format.kernel_group_size(qt.shape[1]) if granularity == "block" else None


def _bound(x, qt, rel=2e-6):
    """float32 accumulation bound: rel · Σ_k |x||w| per output, plus a tiny floor."""
    return rel * (np.abs(np.asarray(x, np.float64)) @ np.abs(lb.dequantize(qt).astype(np.float64)).T) + 1e-6


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float_activations(isa, fmt, shape):
    M, N, K = shape
    x, w = _data(M, N, K)
    qt = lb.quantize(w, **FORMATS[fmt])
    bias = np.linspace(-1, 1, N).astype(np.float32)
    y = lb.matmul(x, qt, bias=bias)
    assert y.shape == (M, N) and y.dtype == np.float32
    err = np.abs(y - _ref(x, qt, bias))
    assert np.all(err <= 8 * _bound(x, qt)), (isa, fmt, shape, err.max())


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("M", [1, 2, 3])
def test_float_activations_far_from_one(isa, fmt, M):
    # Rows of tiny, huge and zero activations keep float accuracy (the AVX2 int4 decode kernel
    # scales x by up to 2^-24 internally and must renormalise the row first).
    x, w = _data(M, 37, 576, seed=5)
    qt = lb.quantize(w, **FORMATS[fmt])
    for scale in (1e-35, 1e30, 0.0):
        xs = (x * np.float32(scale)).astype(np.float32)
        y = lb.matmul(xs, qt)
        # _bound without its absolute floor, which would hide any error at 1e-35
        bound = 16e-6 * (np.abs(xs.astype(np.float64)) @ np.abs(lb.dequantize(qt).astype(np.float64)).T)
        assert np.all(np.abs(y - _ref(xs, qt)) <= bound), (isa, fmt, M, scale)


@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_act_int8(isa, fmt, shape, granularity):
    M, N, K = shape
    x, w = _data(M, N, K, seed=1)
    x[:, 1::7] *= 20  # outlier channels
    qt = lb.quantize(w, **FORMATS[fmt])
    block = _act_block(qt, granularity)
    y = lb.matmul(x, qt, act_bits=8, act_granularity=granularity)
    # exact contract: the rounded x (per token / per block) times dequantize(W) in float
    err = np.abs(y - _ref(_fake_quant(x, block), qt))
    assert np.all(err <= 8 * _bound(x, qt)), (isa, fmt, shape, err.max())
    # and the rounding itself is bounded by half an activation step per element
    step = _act_steps(x, block).astype(np.float64)
    assert np.all(np.abs(y - _ref(x, qt)) <= 0.5 * step @ np.abs(lb.dequantize(qt)).T + 1e-4)


@pytest.mark.parametrize("kw", [dict(bits=8, group_size=None), dict(bits=8, group_size=128),
                                dict(bits=4, group_size=32)], ids=["int8-row", "int8-g128", "int4-g32"])
@pytest.mark.parametrize("M", [1, 4, 7, 16, 40, 64, 300])
def test_act_int8_codes_far_from_their_offset(isa, kw, M):
    # Asymmetric rows with one large negative weight per 128 and the rest positive: the codes sit
    # far from the kernels' offsets (int8 w' = q - 128, int4 u - z), so the exact integer terms the
    # kernels take back out (128·Σw' of x + 128 against w', 128·Σ(u - z) of x + 128 against u - z)
    # are large. Carried through float partial sums they cancelled only to 0.6-7 times _bound here
    # (int8: 3e-3 of max |y| at K = 4128). Now int8 takes the sign-flip path (128·Σx out) and
    # int4 takes its term out in int32, and every result stays within a quarter of the bound.
    rng = np.random.default_rng(seed=M)
    N, K = 24, 4096
    w = np.abs(rng.standard_normal((N, K))).astype(np.float32)
    w[:, 5::128] = -40
    x = rng.standard_normal((M, K)).astype(np.float32)
    qt = lb.quantize(w, **kw)
    y = lb.matmul(x, qt, act_bits=8)
    err = np.abs(y - _ref(_fake_quant(x), qt))
    assert np.all(err <= _bound(x, qt, rel=5e-7)), (isa, kw, M, err.max() / np.abs(y).max())


@pytest.mark.parametrize("fmt", ["int4-asym-g128", "int4-sym-g64", "int8-asym-g32"])
def test_act_per_block_beats_per_token_on_outliers(isa, fmt):
    # A few outlier channels set the per-token step for the whole row; per block they only
    # coarsen their own groups, so the result is closer to the unrounded product.
    x, w = _data(8, 64, 1024, seed=5)
    x[:, [3, 500, 900]] *= 60
    qt = lb.quantize(w, **FORMATS[fmt])
    exact = _ref(x, qt)
    errs = {g: np.linalg.norm(lb.matmul(x, qt, act_bits=8, act_granularity=g) - exact) for g in ("token", "block")}
    assert errs["block"] < 0.5 * errs["token"], errs


def test_per_block_kernel_names():
    # every variant runs per-block int8 activations itself except amx (and its emulated build), which
    # hands them to avx512
    packed = lb.ops._packed_weight(lb.quantize(_data(1, 8, 256)[1], bits=4, group_size=64))
    try:
        for name in VARIANTS:
            _ext.core().set_isa(name)
            assert _ext.core().matmul_kernel(packed, 8, False) == f"{name}:int"
            expected = "avx512" if name in ("amx", "amx_emulated") else name
            assert _ext.core().matmul_kernel(packed, 8, True) == f"{expected}:int"
            assert _ext.core().matmul_kernel(packed, 0, True) == f"{name}:float"
    finally:
        _ext.core().set_isa("auto")


@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("fmt", [f for f in FORMATS if not f.startswith("nf4")])
@pytest.mark.parametrize("shape", [(17, 37, 576), (130, 70, 512), (1, 9, 4099), (3, 200, 1024)],
                         ids=lambda s: "x".join(map(str, s)))
def test_integer_paths_match_reference(fmt, shape, granularity):
    # The SIMD kernels apply the per-group scales lane-wise and sum in their own order, so they
    # match the scalar reference kernel to float rounding: 1e-5 of the output's scale.
    M, N, K = shape
    x, w = _data(M, N, K, seed=2)
    w[: N // 2, :64] = 0.25  # constant groups: scale 0 or a code at the zero point
    qt = lb.quantize(w, **FORMATS[fmt])
    bias = np.arange(N, dtype=np.float32) / 7
    outs = {}
    try:
        for name in VARIANTS:
            _ext.core().set_isa(name)
            outs[name] = lb.matmul(x, qt, bias=bias, act_bits=8, act_granularity=granularity)
    finally:
        _ext.core().set_isa("auto")
    scale = np.abs(outs["ref"]).max()
    for name, y in outs.items():
        np.testing.assert_allclose(y, outs["ref"], rtol=0, atol=1e-5 * scale, err_msg=name)


def _integer_weight(rng, fmt, N, K):
    """A QuantizedTensor with unit scales, so every output is an exact integer dot product."""
    kw = FORMATS[fmt]
    bits, sym, g = kw["bits"], kw.get("symmetric", False), kw["group_size"]
    G = 1 if g is None else -(-K // g)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)
    q = rng.integers(lo, hi + 1, (N, K))
    q[:, :2] = (lo, hi)  # the extreme codes occur
    codes = q.astype(np.int8 if sym else np.uint8)
    if bits == 4:
        codes = lb.pack_int4(codes)
    zeros = None if sym else rng.integers(0, 1 << bits, (N, G)).astype(np.uint8)
    qt = lb.QuantizedTensor(codes, np.ones((N, G), np.float32), zeros, (N, K), lb.QuantFormat(bits, sym, g))
    qt.validate()
    z = 0 if sym else np.repeat(zeros.astype(np.int64), g or K, axis=1)[:, :K]
    return qt, q - z


@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("fmt", [f for f in FORMATS if not f.startswith("nf4")])
@pytest.mark.parametrize("shape", [(1, 37, 576), (2, 64, 4096), (12, 37, 576), (17, 9, 576), (70, 40, 512),
                                   (130, 37, 576), (129, 19, 300),  # several row tiles of the signed int4 GEMM (M >= 48)
                                   (12, 150, 576),  # a decode range of 38 panels: unkept k4 sets, in pairs and one last
                                   (5, 37, 576), (6, 150, 576),  # the most rows on the panel kernel, the fewest on the k4 GEMM
                                   (1, 21, 224), (2, 37, 160)],  # g32 decode folds groups in pairs: an odd count
                         ids=lambda s: "x".join(map(str, s)))
def test_integer_dots_exact(isa, fmt, shape, granularity):
    # Integer activations with max |x| = 127 (in every row, and per block in every group) give
    # activation scales of 1, and unit weight scales make every float step exact (partial sums
    # < 2^24): each output is exactly Σ_k (q - z)·x.
    M, N, K = shape
    if FORMATS[fmt]["bits"] == 8 and K > 1024:
        K = 1024  # 128·127·K must stay below 2^24
    rng = np.random.default_rng(11)
    qt, wint = _integer_weight(rng, fmt, N, K)
    xi = rng.integers(-127, 128, (M, K))
    xi[:, ::qt.format.kernel_group_size(K)] = 127
    y = lb.matmul(xi.astype(np.float32), qt, act_bits=8, act_granularity=granularity)
    np.testing.assert_array_equal(y, (xi @ wint.T).astype(np.float32))


@pytest.mark.parametrize("fmt", ["int8-sym-row", "int8-asym-g32", "int4-asym-g128", "int4-sym-g64", "int4-asym-g32"])
def test_gemm_row_remainders_exact(isa, fmt):
    # The panel kernels take up to 15 rows of X in fours and then the rest in one pass; the GEMMs
    # walk a tile's rows in fours, threes, pairs and ones (32-wide groups: threes and the rest):
    # every count of 1-31 rows (one prefill tile), 97 (a full tile plus one row) and 257 / 259
    # (per-channel int8 takes the k4 scratch from 256 rows, its tail the panel kernel without
    # x + 128) must give each row its own exact dots.
    rng = np.random.default_rng(13)
    qt, wint = _integer_weight(rng, fmt, 20, 576)
    for M in list(range(1, 32)) + [97, 257, 259]:
        xi = rng.integers(-127, 128, (M, 576))
        xi[:, 0] = 127
        y = lb.matmul(xi.astype(np.float32), qt, act_bits=8)
        np.testing.assert_array_equal(y, (xi @ wint.T).astype(np.float32), err_msg=f"M={M}")


@pytest.mark.parametrize("M", [9, 14])
def test_threads_agree_when_a_thread_gets_part_of_a_panel_set(M):
    # 8-16 rows of X: the threads split N into panel ranges that need not be multiples of the
    # AVX2 GEMMs' four-panel sets; each call must write only its own panels' outputs (a write
    # past them races with the neighbouring thread, so the calls are repeated). N = 4·1826 rows:
    # over 2 MB of weights, so that decode splits them at all (at least 1 MiB a thread), and
    # 1826 panels do not halve into whole four-panel sets.
    x, w = _data(M, 4 * 1826, 576, seed=5)
    n = lb.get_num_threads()
    try:
        for gs, act_bits in ((32, 8), (128, 8), (128, None)):
            qt = lb.quantize(w, bits=4, group_size=gs)
            lb.set_num_threads(1)
            want = lb.matmul(x, qt, act_bits=act_bits)
            for t in (2, 3):
                lb.set_num_threads(t)
                for _ in range(30):
                    np.testing.assert_array_equal(lb.matmul(x, qt, act_bits=act_bits), want)
    finally:
        lb.set_num_threads(n)


def test_threads_agree():
    x, w = _data(70, 300, 256, seed=7)
    qt = lb.quantize(w, bits=4, group_size=64)
    n = lb.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            lb.set_num_threads(t)
            outs.append((lb.matmul(x, qt, act_bits=8), lb.matmul(x, qt)))
    finally:
        lb.set_num_threads(n)
    for y8, yf in outs[1:]:
        np.testing.assert_array_equal(y8, outs[0][0])
        np.testing.assert_array_equal(yf, outs[0][1])


@pytest.mark.parametrize("M", [1, 20])
def test_large_int8_group_accumulates_exactly(M):
    # int32 dots near the int16 / float24 edges: all-max codes and activations, one group per row
    # (M = 20: the GEMM, which splits K into chunks)
    K = 4096
    w = np.ones((4, K), np.float32)
    x = np.ones((M, K), np.float32)
    for kw in (dict(bits=8, group_size=None, symmetric=True), dict(bits=4, group_size=None)):
        qt = lb.quantize(w, **kw)
        y = lb.matmul(x, qt, act_bits=8)
        np.testing.assert_allclose(y, _ref(x, qt), rtol=1e-6)


def test_torch_bfloat16_and_batch_dims(isa):
    torch = pytest.importorskip("torch")
    x, w = _data(6, 40, 256, seed=3)
    qt = lb.quantize(w, bits=4, group_size=128)
    xt = torch.from_numpy(x).to(torch.bfloat16).reshape(2, 3, 256)
    bias = torch.linspace(-1, 1, 40, dtype=torch.bfloat16)
    for act_bits in (None, 8):
        y = lb.matmul(xt, qt, bias=bias, act_bits=act_bits)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == (2, 3, 40)
        xr = xt.float().reshape(6, 256).numpy()
        if act_bits:
            xr = _fake_quant(xr)
        want = _ref(xr, qt, bias.float().numpy())
        got = y.float().reshape(6, 40).numpy()
        assert np.all(np.abs(got - want) <= 8 * _bound(xr, qt) + 2 ** -8 * np.abs(want) + 1e-3)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if not f.startswith("nf4")])
@pytest.mark.parametrize("shape", [(1, 37, 576), (2, 16, 8192), (3, 50, 300), (7, 33, 1000),
                                   (16, 16, 32), (35, 37, 576), (70, 50, 300), (48, 33, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,act_bits", [("bfloat16", None), ("bfloat16", 8), ("float16", 8)])
def test_half_precision_x(isa, fmt, shape, dtype, act_bits):
    """bf16 / fp16 activations, decode (M < 8: AVX-512's vdpbf16ps panel kernel, whose codes carry
    a +128 offset) and prefill (M >= 16: the AMX tiles where the CPU has them, bf16 x times the
    codes as bf16, exact, fp32 sums; AVX-512's k4 GEMM; or int8 x), every format the tiles take,
    K off the 32/64 steps, partial tiles in M and N, outputs stored in x's dtype. Against the
    float64 reference: the output's rounding plus fp32 sums (plus the per-token int8 rounding of
    x with act_bits=8)."""
    torch = pytest.importorskip("torch")
    M, N, K = shape
    kw = FORMATS[fmt]
    x, w = _data(M, N, K, seed=5)
    qt = lb.quantize(w, **kw)
    tdtype = getattr(torch, dtype)
    xt = torch.from_numpy(x).to(tdtype)
    bias = torch.linspace(-1, 1, N, dtype=tdtype)
    y = lb.matmul(xt, qt, bias=bias, act_bits=act_bits)
    assert y.dtype == tdtype and y.shape == (M, N)
    xr = xt.float().numpy()
    if act_bits:
        xr = _fake_quant(xr)
    want = _ref(xr, qt, bias.float().numpy())
    got = y.float().numpy()
    assert np.all(np.abs(got - want) <= 8 * _bound(xr, qt) + 2 ** -8 * np.abs(want) + 1e-6), fmt


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act_bits", [8, None], ids=["int8-x", "bf16-x"])
def test_decode_pieces_split_mid_tile(isa, act_bits, bits, restore_threads):
    """M = 16 is still decode: its panels are cut into one piece a thread, and a piece need not
    start on a tile of 4 panels. Each piece must write only its own columns (the AMX kernel
    stored whole 16-column tiles, and with 2 threads one piece's zeros overwrote the next
    piece's first columns: found by the amx_emulated build)."""
    torch = pytest.importorskip("torch")
    lb.set_num_threads(2)
    # enough weight bytes (per row of X) for two pieces, over panel counts that split mid-tile
    K, Ns = (1024, (180, 196, 212)) if act_bits else (598, (44, 56, 59))
    if bits == 4:  # (int4 g32 takes the k4 GEMMs from 8 rows: sets of 16 rows of W)
        Ns = tuple(2 * n for n in Ns)
    for N in Ns:
        x, w = _data(16, N, K, seed=N)
        qt = lb.quantize(w, bits=bits, group_size=32, symmetric=bits == 8)
        xt = torch.from_numpy(x).bfloat16()
        xr = xt.float().numpy()
        if act_bits:
            xr = _fake_quant(xr)
        want = _ref(xr, qt)
        for _ in range(3):  # the overwrite was a race between the two pieces' stores
            got = lb.matmul(xt, qt, act_bits=act_bits).float().numpy()
            assert np.all(np.abs(got - want) <= 8 * _bound(xr, qt) + 2 ** -8 * np.abs(want) + 1e-6), (isa, N)


def test_per_tensor_scale_torch():
    # (torch weights: per-tensor quantize of a numpy array trips a foundation bug in ops.py)
    torch = pytest.importorskip("torch")
    x, w = _data(3, 10, 160, seed=6)
    qt = lb.quantize(torch.from_numpy(w), bits=4, group_size="tensor", symmetric=True)
    xt = torch.from_numpy(x)
    want = x.astype(np.float64) @ lb.dequantize(qt).double().numpy().T
    for ab in (None, 8):
        y = lb.matmul(xt, qt, act_bits=ab).double().numpy()
        assert np.allclose(y, want, rtol=0.05 if ab else 1e-5, atol=0.05 * np.abs(want).max() if ab else 1e-4)


def test_torch_requires_grad_and_strided():
    torch = pytest.importorskip("torch")
    x, w = _data(4, 12, 128, seed=8)
    qt = lb.quantize(w, bits=4, group_size=64)
    xt = torch.from_numpy(np.ascontiguousarray(x.T)).T.requires_grad_(True)  # non-contiguous
    y = lb.matmul(xt, qt)
    np.testing.assert_allclose(y.numpy(), _ref(x, qt), rtol=1e-5, atol=1e-4)


def test_torch_views_read_in_place():
    # torch tensors are read through their own attributes: a slice's storage offset counts, a
    # negative-bit view (whose storage holds the un-negated values) is refused, not misread
    torch = pytest.importorskip("torch")
    x, w = _data(7, 12, 128, seed=9)
    qt = lb.quantize(w, bits=4, group_size=64)
    xt = torch.from_numpy(x)
    for ab in (None, 8):
        want = lb.matmul(np.ascontiguousarray(x[3:]), qt, act_bits=ab)
        np.testing.assert_array_equal(lb.matmul(xt[3:], qt, act_bits=ab).numpy(), want)
        out = lb.matmul(xt.bfloat16()[3:], qt, act_bits=ab).float().numpy()
        np.testing.assert_array_equal(out, lb.matmul(xt.bfloat16()[3:].contiguous(), qt, act_bits=ab).float().numpy())
    with pytest.raises(ValueError, match="resolve_neg"):
        lb.matmul(torch._neg_view(xt), qt)


def test_torch_float16_and_float32_with_bias():
    # torch float32/float16 are read in place by the C++ side
    torch = pytest.importorskip("torch")
    x, w = _data(5, 24, 128, seed=10)
    qt = lb.quantize(w, bits=4, group_size=64)
    for dt, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        xt = torch.from_numpy(x).to(dt)
        bias = torch.linspace(-1, 1, 24, dtype=dt)
        for ab in (None, 8):
            y = lb.matmul(xt, qt, bias=bias, act_bits=ab)
            assert isinstance(y, torch.Tensor) and y.dtype == dt and y.shape == (5, 24)
            xr = xt.float().numpy()
            want = _ref(_fake_quant(xr) if ab else xr, qt, bias.float().numpy())
            np.testing.assert_allclose(y.float().numpy(), want, rtol=tol, atol=tol)


def test_validate_rechecks_replaced_arrays():
    # validate() remembers a passed check only for the same array objects
    x, w = _data(2, 8, 64)
    qt = lb.quantize(w, bits=4, group_size=32)
    lb.matmul(x, qt)
    qt.codes = qt.codes[:, :-1].copy()
    with pytest.raises(ValueError, match="codes must have shape"):
        lb.matmul(x, qt)
    # and the same array object reshaped in place
    qt = lb.quantize(w, bits=4, group_size=32)
    lb.matmul(x, qt)
    qt.scales.shape = (qt.scales.size,)
    with pytest.raises(ValueError, match="scales must have shape"):
        lb.matmul(x, qt)


def test_one_dimensional_x():
    x, w = _data(1, 10, 64, seed=9)
    qt = lb.quantize(w, bits=8, group_size=32)
    y = lb.matmul(x[0], qt)
    assert y.shape == (10,)
    np.testing.assert_allclose(y, _ref(x, qt)[0], rtol=1e-5, atol=1e-4)


def test_float16_numpy():
    x, w = _data(2, 12, 64, seed=4)
    qt = lb.quantize(w, bits=8, group_size=None, symmetric=True)
    x16 = x.astype(np.float16)
    y = lb.matmul(x16, qt)
    assert y.dtype == np.float16
    want = _ref(x16.astype(np.float32), qt)
    assert np.all(np.abs(y.astype(np.float64) - want) <= 2 ** -10 * np.abs(want) + 1e-2)


def test_pack_once_and_cached():
    x, w = _data(1, 8, 64)
    qt = lb.quantize(w, bits=4, group_size=32)
    lb.matmul(x, qt)
    layout = _ext.core().packed_layout()
    packed = qt._lowbit_packed[layout]
    lb.matmul(x, qt, act_bits=8)
    assert qt._lowbit_packed[layout] is packed
    # 64-byte aligned, so the 64-byte int4 blocks after the 128-byte header are whole cache lines
    for n in (8, 37, 300):
        p = lb.ops._packed_weight(lb.quantize(_data(1, n, 64)[1], bits=4, group_size=32))
        assert p.ctypes.data % 64 == 0 and p.flags["C_CONTIGUOUS"]


def test_pickle_and_copy_drop_the_packed_cache():
    x, w = _data(2, 40, 256, seed=4)
    qt = lb.quantize(w, bits=4, group_size=64)
    y = lb.matmul(x, qt)
    for clone in (pickle.loads(pickle.dumps(qt)), copy.deepcopy(qt), copy.copy(qt)):
        assert "_lowbit_packed" not in clone.__dict__ and clone.shape == qt.shape
        np.testing.assert_array_equal(lb.matmul(x, clone), y)
        assert lb.ops._packed_weight(clone).ctypes.data % 64 == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="own huge-page mappings are Linux only")
def test_large_packed_weight_has_its_own_mapping():
    # 2 MiB or more: a mapping of its own, 2 MiB aligned and advised into transparent huge pages
    # (decode streams it from DRAM); it computes what the same bytes in a numpy buffer compute, and
    # is unmapped with its last reference
    x, w = _data(3, 1024, 4096, seed=9)
    qt = lb.quantize(w, bits=4, group_size=128)
    packed = lb.ops._packed_weight(qt)
    addr = packed.ctypes.data
    assert packed.nbytes >= 2 << 20 and addr % (2 << 20) == 0
    y_mapped, y_numpy = np.empty((3, 1024), np.float32), np.empty((3, 1024), np.float32)
    _ext.core().matmul(x, packed, None, y_mapped, 0, False)
    _ext.core().matmul(x, np.array(packed), None, y_numpy, 0, False)
    np.testing.assert_array_equal(y_mapped, y_numpy)

    def mapped():
        with open("/proc/self/maps") as f:
            return any(int(line.split("-")[0], 16) == addr for line in f)

    assert mapped()
    del packed, qt
    gc.collect()
    assert not mapped()


@pytest.mark.parametrize("kw, zero_bytes", [(dict(symmetric=True), 0), (dict(codebook="nf4"), 0), ({}, 1)])
def test_packed_bytes_store_zero_points_only_when_they_vary(kw, zero_bytes):
    # 128-byte header, 64 rows x 64 codes of 4 bits, then per (row, group of 32) a float scale and,
    # for asymmetric weights only, an int8 zero point (each array 64-byte aligned)
    qt = lb.quantize(_data(1, 64, 64)[1], bits=4, group_size=32, **kw)
    assert lb.ops._packed_weight(qt).nbytes == 128 + 64 * 64 // 2 + 64 * 2 * 4 + zero_bytes * 64 * 2


@pytest.mark.parametrize("group_size", [None, 32])
def test_packed_int8_weight_sums(group_size):
    # symmetric int8 weights carry Σ q per (row, group) as int32 [N/4][G][4] at the header's
    # wsum_offset (bytes 104..111): the AVX-512 kernel takes 128·Σq back out of its dots against
    # x + 128. Asymmetric ones carry none (see test_act_int8_zero_point_far_from_the_middle).
    N, K = 10, 96
    w = _data(1, N, K, seed=3)[1]
    qt = lb.quantize(w, bits=8, group_size=group_size, symmetric=True)
    packed = lb.ops._packed_weight(qt)
    G = 1 if group_size is None else K // group_size
    off = int(packed[104:112].view(np.int64)[0])
    wsum = packed[off:off + 12 * G * 4].view(np.int32).reshape(3, G, 4).transpose(0, 2, 1).reshape(12, G)
    want = qt.codes.view(np.int8).astype(np.int64).reshape(N, G, K // G).sum(-1)
    assert np.array_equal(wsum[:N], want) and not wsum[N:].any()
    assert packed.nbytes == off + -(-12 * G * 4 // 64) * 64  # the last array, 64-byte aligned
    asym = lb.ops._packed_weight(lb.quantize(w, bits=8, group_size=group_size))
    assert int(asym[104:112].view(np.int64)[0]) == 0
    assert asym.nbytes == off + -(-12 * G // 64) * 64  # its int8 zero points in place of wsum


@pytest.mark.parametrize("field, value", [(8, 3), (12, 7), (16, 1 << 20), (24, 1 << 40), (64, 64), (80, 0),
                                          (96, 8.0), (100, -1.0), (100, float("nan")), (104, 1)])
def test_packed_header_is_checked(field, value):
    # a packed buffer whose header disagrees with its own sizes (bits, scheme, N, K, group size,
    # an offset, the zero point, a max scale below 0 or NaN, a reserved word) is refused before
    # any kernel reads it
    x, w = _data(2, 8, 64)
    packed = lb.ops._packed_weight(lb.quantize(w, bits=4, group_size=32)).copy()
    if isinstance(value, float):
        packed[field:field + 4] = np.frombuffer(np.float32(value).tobytes(), np.uint8)
    else:
        packed[field:field + 8] = np.frombuffer(np.int64(value).tobytes(), np.uint8) if field >= 16 else \
            np.concatenate([np.frombuffer(np.int32(value).tobytes(), np.uint8), packed[field + 4:field + 8]])
    with pytest.raises(ValueError, match="packed weight|out must have shape"):  # N: the output's shape
        _ext.core().matmul(x, packed, None, np.empty((2, 8), np.float32), 0, False)


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=16), dict(bits=2, group_size=32),
                                dict(bits=4, group_size=48, symmetric=True)])
def test_unpacked_formats_fall_back(kw):
    x, w = _data(3, 9, 96, seed=5)
    qt = lb.quantize(w, **kw)
    np.testing.assert_allclose(lb.matmul(x, qt), _ref(x, qt), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(lb.matmul(x, qt, act_bits=8), _ref(_fake_quant(x), qt), rtol=1e-5, atol=1e-4)


def test_zero_rows_and_zero_weight():
    x, w = _data(3, 8, 64)
    x[1] = 0
    w[2] = 0
    qt = lb.quantize(w, bits=4, group_size=32)
    for ab in (None, 8):
        y = lb.matmul(x, qt, act_bits=ab)
        assert np.all(y[1] == 0) and np.all(y[:, 2] == 0)


def test_bad_inputs():
    x, w = _data(2, 8, 64)
    qt = lb.quantize(w, bits=4, group_size=32)
    with pytest.raises(ValueError, match="K=64"):
        lb.matmul(x[:, :63], qt)
    with pytest.raises(TypeError, match="float32"):
        lb.matmul(x.astype(np.int32), qt)
    with pytest.raises(ValueError, match="empty"):
        lb.matmul(x[:0], qt)
    with pytest.raises(ValueError, match="act_bits"):
        lb.matmul(x, qt, act_bits=4)
    with pytest.raises(ValueError, match="act_granularity"):
        lb.matmul(x, qt, act_bits=8, act_granularity="channel")
    with pytest.raises(ValueError, match="needs act_bits=8"):
        lb.matmul(x, qt, act_granularity="block")
    with pytest.raises(ValueError, match="per-block activation scales need act_bits=8"):  # the C++ check
        _ext.core().matmul(x, lb.ops._packed_weight(qt), None, np.empty((2, 8), np.float32), 0, True)
    with pytest.raises(ValueError, match="bias"):
        lb.matmul(x, qt, bias=np.zeros(7, np.float32))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        lb.matmul(x, w)
    xn = x.copy()
    xn[1, 5] = np.nan
    for kw in (dict(), dict(act_bits=8), dict(act_bits=8, act_granularity="block")):
        with pytest.raises(ValueError, match="NaN"):
            lb.matmul(xn, qt, **kw)
