"""CUDA W4A16 / W8A8 tensor-core GEMMs (lowbit.ops_cuda.matmul_cuda) against a float64 CPU reference.

Contract (DESIGN.md §3): y == x @ dequantize(qt).T + bias up to float accumulation error, plus the
per-token activation rounding for W8A8 (the reference quantizes x's rows with lowbit.quantize's
own rule: bits=8, symmetric, one group per row). Errors are measured as ||y - ref|| / ||ref||
over the whole output, with the reference computed in float64 from the *same* fp16/bf16 x the
kernel saw. Outputs are poisoned (NaN) before each call so an unwritten element fails.

Shapes are awkward on purpose: M = 1, 3, 17, 64, 300; N and K not multiples of the 64-wide tiles;
K = 576 with group 128 (a ragged last group of 64); odd K (element-wise activation loads).
All tests are marked `cuda` and skip cleanly without torch + a CUDA device.
"""
from __future__ import annotations

import numpy as np
import pytest

import lowbit
from conftest import seed_for

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

HAVE_TORCH_CUDA = torch is not None and torch.cuda.is_available()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_TORCH_CUDA, reason="needs torch with a CUDA device")]

MS = (1, 3, 17, 64, 300)
# (N, K, group): N, K not tile multiples; K=576 g=128 ragged; odd K; per-row groups
W4_SHAPES = [(72, 576, 128), (200, 576, 32), (130, 1000, 64), (64, 4103, 128), (96, 576, None),
             (33, 100, 32), (257, 2048, 128), (40, 77, None)]
W8_SHAPES = [(72, 576), (200, 1000), (130, 4103), (33, 100), (257, 2048), (40, 77)]
HALF = ("float16", "bfloat16")
# ||y - ref|| / ||ref|| bounds: fp16 weights/activations round at 2^-11, bf16 at 2^-8, and the
# output is rounded to x's dtype once more.
TOL = {"float16": 2e-3, "bfloat16": 1.5e-2}


def dev():
    return torch.device("cuda", 0)


def tdt(name):
    return getattr(torch, name)


def make_x(M, K, dtype, seed):
    g = np.random.default_rng(seed)
    x = g.standard_normal((M, K)).astype(np.float32)
    if M >= 3:
        x[1] *= 20.0  # rows of different scale: per-token activation scales must differ
        x[2, ::3] = 0.0
    return torch.from_numpy(x).to(tdt(dtype)).to(dev())


def make_w(N, K, seed):
    g = np.random.default_rng(seed)
    w = (g.standard_normal((N, K)) * 0.05).astype(np.float32)
    w[0] += 0.02  # one-signed row: a zero point far from the middle
    return torch.from_numpy(w).to(dev())


def ref_matmul(x, qt, bias=None, act_bits=None):
    """float64 CPU reference: x @ dequantize(qt).T (+ bias), x rounded per token for act_bits=8."""
    xd = x.detach().float().cpu()
    if act_bits == 8:
        qx = lowbit.quantize(xd, bits=8, group_size=None, symmetric=True)
        xd = lowbit.dequantize(qx)
    wd = lowbit.dequantize(qt).detach().double().cpu()
    y = xd.double() @ wd.T
    if bias is not None:
        y = y + bias.detach().double().cpu()
    return y


def rel_err(y, ref):
    y = y.detach().double().cpu()
    assert torch.isfinite(y).all(), "non-finite output (unwritten element or overflow)"
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def run(x, qt, bias=None, act_bits=None):
    from lowbit.ops_cuda import matmul_cuda

    torch.cuda.synchronize()
    y = matmul_cuda(x, qt, bias=bias, act_bits=act_bits)
    torch.cuda.synchronize()
    return y


@pytest.fixture(autouse=True)
def _poison_allocator():
    """Fill the caching allocator's free blocks with NaN so unwritten outputs show up."""
    if HAVE_TORCH_CUDA:
        torch.cuda.empty_cache()
        junk = torch.full((1 << 24,), float("nan"), device=dev())
        del junk
    yield


@pytest.fixture(params=("fused", "dense"))
def w4_route(request, monkeypatch):
    """W4A16 on the fused kernel at every M, or on dequantize + cuBLAS at every M (the route
    matmul_cuda takes from W4A16_DENSE_MIN_M rows)."""
    import lowbit.ops_cuda as oc

    monkeypatch.setattr(oc, "W4A16_DENSE_MIN_M", 1 << 62 if request.param == "fused" else 1)
    return request.param


# ---------------------------------------------------------------------------------------------
# W4A16

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("shape", W4_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}-g{s[2]}")
def test_w4a16_matches_reference(shape, symmetric, dtype, w4_route):
    N, K, group = shape
    qt = lowbit.quantize(make_w(N, K, seed_for("w4", shape, symmetric)), bits=4, group_size=group,
                         symmetric=symmetric)
    for M in MS:
        x = make_x(M, K, dtype, seed_for("x4", shape, symmetric, dtype, M))
        y = run(x, qt)
        assert y.dtype == x.dtype and y.device == x.device and tuple(y.shape) == (M, N)
        err = rel_err(y, ref_matmul(x, qt))
        assert err < TOL[dtype], f"M={M} N={N} K={K} g={group} sym={symmetric} {dtype}: rel err {err:.2e}"


@pytest.mark.parametrize("group", (32, 64, 128, None), ids=str)
def test_w4a16_all_group_sizes_and_bias(group, w4_route):
    N, K = 136, 1152
    qt = lowbit.quantize(make_w(N, K, seed_for("w4g", group)), bits=4, group_size=group)
    bias = torch.randn(N, device=dev())
    for dtype in HALF:
        for M in (1, 17):
            x = make_x(M, K, dtype, seed_for("x4g", group, dtype, M))
            err = rel_err(run(x, qt, bias=bias), ref_matmul(x, qt, bias))
            assert err < TOL[dtype], f"g={group} {dtype} M={M}: {err:.2e}"
            # bias given in x's dtype is accepted too
            err = rel_err(run(x, qt, bias=bias.to(tdt(dtype))), ref_matmul(x, qt, bias.to(tdt(dtype))))
            assert err < TOL[dtype]


def test_w4a16_batched_and_strided_input(w4_route):
    """x [..., K] with leading dims; a column slice of a wider tensor (misaligned rows: the
    element-wise activation path) gives the same result as its contiguous copy."""
    N, K = 96, 576
    qt = lowbit.quantize(make_w(N, K, 7), bits=4, group_size=64)
    x3 = make_x(2 * 5, K, "float16", 8).reshape(2, 5, K)
    y3 = run(x3, qt)
    assert tuple(y3.shape) == (2, 5, N)
    assert rel_err(y3.reshape(10, N), ref_matmul(x3.reshape(10, K), qt)) < TOL["float16"]
    wide = make_x(17, K + 3, "float16", 9)
    xs = wide[:, 3:]
    assert rel_err(run(xs, qt), ref_matmul(xs, qt)) < TOL["float16"]
    assert rel_err(run(xs.contiguous(), qt), ref_matmul(xs, qt)) < TOL["float16"]


def test_w4a16_prepack_is_cached():
    qt = lowbit.quantize(make_w(64, 256, 3), bits=4, group_size=128)
    x = make_x(3, 256, "float16", 4)
    run(x, qt)
    cache = qt.__dict__["_lowbit_packed"]
    assert len(cache) == 1
    key = next(iter(cache))
    assert key[0] == lowbit._ext.cuda().W4A16_LAYOUT[0] and key[2] == "cuda:0"
    packed = cache[key]
    run(x, qt)
    assert cache[key] is packed
    run(x.bfloat16(), qt)  # bf16 scales: a second packing beside the first
    assert len(cache) == 2


# ---------------------------------------------------------------------------------------------
# W8A8

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("shape", W8_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_w8a8_matches_reference(shape, symmetric, dtype):
    N, K = shape
    qt = lowbit.quantize(make_w(N, K, seed_for("w8", shape, symmetric)), bits=8, group_size=None,
                         symmetric=symmetric)
    bias = torch.randn(N, device=dev())
    for M in MS:
        x = make_x(M, K, dtype, seed_for("x8", shape, symmetric, dtype, M))
        for b in (None, bias):
            y = run(x, qt, bias=b, act_bits=8)
            assert y.dtype == x.dtype and tuple(y.shape) == (M, N)
            err = rel_err(y, ref_matmul(x, qt, b, act_bits=8))
            # integer products are exact: only the epilogue's float products and the output rounding
            assert err < TOL[dtype], f"M={M} N={N} K={K} sym={symmetric} {dtype}: rel err {err:.2e}"


# ---------------------------------------------------------------------------------------------
# streams

def test_runs_on_the_callers_stream_without_synchronizing():
    """On a non-blocking side stream x is written after a long device sleep: a kernel on any
    other stream would read the stale zeros. The call must also return while the stream is busy."""
    N, K = 200, 4103
    for bits, act_bits in ((4, None), (8, 8)):
        qt = lowbit.quantize(make_w(N, K, 11), bits=bits, group_size=128 if bits == 4 else None)
        src = make_x(17, K, "float16", 12)
        x = torch.zeros_like(src)
        ref = ref_matmul(src, qt, act_bits=act_bits)
        run(src, qt, act_bits=act_bits)  # prepack outside the timed region
        side = torch.cuda.Stream(device=dev())
        torch.cuda.synchronize()
        from lowbit.ops_cuda import matmul_cuda

        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)
            x.copy_(src)
            y = matmul_cuda(x, qt, act_bits=act_bits)
            busy = not side.query()
        side.synchronize()
        assert busy, "matmul_cuda waited for the stream"
        assert rel_err(y, ref) < TOL["float16"]


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_input_raises():
    from lowbit.ops_cuda import matmul_cuda

    qt = lowbit.quantize(make_w(64, 128, 1), bits=4, group_size=32)
    x = make_x(3, 128, "float16", 2)
    with pytest.raises(ValueError, match="CUDA arrays"):
        matmul_cuda(x.cpu(), qt)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        matmul_cuda(x.float(), qt)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 128\]"):
        matmul_cuda(x[:, :100], qt)
    with pytest.raises(ValueError, match="bias must have shape"):
        matmul_cuda(x, qt, bias=torch.zeros(63, device=dev()))
    with pytest.raises(ValueError, match="one device"):
        matmul_cuda(x, lowbit.quantize(make_w(64, 128, 1).cpu(), bits=4, group_size=32))
    with pytest.raises(ValueError, match="act_bits"):
        matmul_cuda(x, qt, act_bits=4)
    with pytest.raises(NotImplementedError, match="W4A8"):
        matmul_cuda(x, qt, act_bits=8)
    q8 = lowbit.quantize(make_w(64, 128, 1), bits=8, group_size=None, symmetric=True)
    with pytest.raises(NotImplementedError, match="act_bits=8"):
        matmul_cuda(x, q8)
    q8g = lowbit.quantize(make_w(64, 128, 1), bits=8, group_size=32, symmetric=True)
    with pytest.raises(NotImplementedError, match="per-channel"):
        matmul_cuda(x, q8g, act_bits=8)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        matmul_cuda(x, x)
    # the binding's own checks (dtype of y, K mismatch)
    mod = lowbit._ext.cuda()
    nw, npar = mod.w4a16_sizes(64, 128, 32)
    w = torch.empty(nw, dtype=torch.int32, device=dev())
    p = torch.empty(npar, dtype=torch.int32, device=dev())
    with pytest.raises(TypeError, match="y must be float16"):
        mod.w4a16_gemm(x, w, p, None, torch.empty(3, 64, device=dev()), None, 64, 128, 32)
    with pytest.raises(ValueError, match="K = 100"):
        mod.w4a16_gemm(x[:, :100].contiguous(), w, p, None, torch.empty(3, 64, dtype=torch.float16,
                       device=dev()), None, 64, 128, 32)
