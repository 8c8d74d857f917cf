"""GPU quantize / dequantize / pack_int4 / unpack_int4 (lowbit._cuda) against the CPU path.

Every GPU result must be bit-identical to lowbit on the CPU for the same input (which the other
test files check against the numpy reference): codes, scales, zeros and dequantized values,
compared as raw bits. Shapes are awkward on purpose (1/3/17 rows, K odd or not a multiple of the
group, groups longer than one block's register cache). Also checked: results come back in the
caller's framework on the caller's device, the kernels run on the caller's current stream, and
bad input raises the CPU path's errors.

All tests are marked `cuda` and skip cleanly without torch + a CUDA device (CuPy tests: without
CuPy + a device).
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

try:
    import cupy

    HAVE_CUPY_CUDA = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # ImportError, or CuPy present without a driver/device
    cupy = None
    HAVE_CUPY_CUDA = False

pytestmark = pytest.mark.cuda
needs_torch = pytest.mark.skipif(not HAVE_TORCH_CUDA, reason="needs torch with a CUDA device")
needs_cupy = pytest.mark.skipif(not HAVE_CUPY_CUDA, reason="needs CuPy with a CUDA device")

ROWS = (1, 3, 17)
KS = (16, 100, 576, 4096 + 7)
GROUPS = (32, 64, 128, None, "tensor")
# (bits, symmetric, codebook)
SCHEMES = [(2, False, None), (3, False, None), (4, False, None), (8, False, None),
           (2, True, None), (3, True, None), (4, True, None), (8, True, None), (4, True, "nf4")]
DTYPES = ("float32", "float16", "bfloat16")
SCHEME_IDS = [f"{'nf4' if c else ('sym' if s else 'asym')}{b}" for b, s, c in SCHEMES]


# ---------------------------------------------------------------------------------------------
# helpers

def make_w(rows: int, K: int, dtype: str, seed: int) -> "torch.Tensor":
    """A CPU torch tensor with the cases rounding gets wrong: exact .5 ties, an all-zero row,
    outliers, one-signed rows, tiny values (f16 subnormals)."""
    g = np.random.default_rng(seed)
    w = g.standard_normal((rows, K)).astype(np.float32)
    if rows >= 3:
        w[1] = np.round(g.uniform(-8, 8, K) * 4) / 4  # quarter-integers: many rint ties
        w[2] = 0.0
    if rows >= 17:
        w[5, ::7] *= 1000.0
        w[6] = np.abs(w[6])
        w[7] = -np.abs(w[7])
        w[8] *= 1e-6
        w[9, : K // 2] = 0.0
    return torch.from_numpy(w).to(getattr(torch, dtype))


def bits_view(t: "torch.Tensor") -> "torch.Tensor":
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t


def assert_same_bits(gpu, cpu, what: str) -> None:
    assert gpu is not None and cpu is not None, what
    assert tuple(gpu.shape) == tuple(cpu.shape), f"{what}: shape {tuple(gpu.shape)} vs {tuple(cpu.shape)}"
    assert gpu.dtype == cpu.dtype, f"{what}: dtype {gpu.dtype} vs {cpu.dtype}"
    a, b = bits_view(gpu), bits_view(cpu)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} of {a.numel()} differ; first at {i}: "
                             f"gpu {gpu.detach().cpu()[i].item()!r} vs cpu {cpu[i].item()!r}")


def assert_qt_equal(q_gpu, q_cpu, what: str) -> None:
    assert q_gpu.format == q_cpu.format and tuple(q_gpu.shape) == tuple(q_cpu.shape)
    assert_same_bits(q_gpu.codes, q_cpu.codes, f"{what} codes")
    assert_same_bits(q_gpu.scales, q_cpu.scales, f"{what} scales")
    if q_cpu.zeros is None:
        assert q_gpu.zeros is None, what
    else:
        assert_same_bits(q_gpu.zeros, q_cpu.zeros, f"{what} zeros")


def on_gpu(x, device) -> None:
    assert isinstance(x, torch.Tensor) and x.device == device, f"{type(x)} on {getattr(x, 'device', '?')}"


# ---------------------------------------------------------------------------------------------
# the module itself

@needs_torch
def test_extension_built_and_reports_devices():
    status = lowbit._ext.cuda_status()
    assert status["built"], "a CUDA device is present but lowbit was built without its CUDA extension"
    info = lowbit._ext.cuda().build_info()
    assert info["cudart"] == "static"
    assert info["arch_targets"] and info["cuda_runtime_version"]
    assert len(info["devices"]) == torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability(0)
    assert info["devices"][0]["compute_capability"] == f"{major}.{minor}"
    assert "device_error" not in info
    merged = lowbit.build_info()["cuda"]
    assert merged["loaded"] and merged["devices"] == info["devices"]


# ---------------------------------------------------------------------------------------------
# bit-exact with the CPU

@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_quantize_dequantize_match_cpu(scheme, group, dtype):
    bits, symmetric, codebook = scheme
    dev = torch.device("cuda", 0)
    for rows in ROWS:
        for K in KS:
            what = f"{SCHEME_IDS[SCHEMES.index(scheme)]} g={group} {dtype} [{rows}, {K}]"
            w = make_w(rows, K, dtype, seed_for("q", scheme, group, dtype, rows, K))
            kw = dict(bits=bits, group_size=group, symmetric=symmetric, codebook=codebook)
            q_cpu = lowbit.quantize(w, **kw)
            q_gpu = lowbit.quantize(w.to(dev), **kw)
            for arr in (q_gpu.codes, q_gpu.scales) + ((q_gpu.zeros,) if q_gpu.zeros is not None else ()):
                on_gpu(arr, dev)
            assert_qt_equal(q_gpu, q_cpu, what)
            for out in DTYPES:
                d_gpu = lowbit.dequantize(q_gpu, dtype=out)
                on_gpu(d_gpu, dev)
                assert_same_bits(d_gpu, lowbit.dequantize(q_cpu, dtype=out), f"{what} dequantize->{out}")


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_long_groups_and_clip_ratio(scheme, dtype):
    """Per-row groups longer than a block's register cache (4096 elements) take the re-load
    path; clip_ratio < 1 clamps codes at both ends."""
    bits, symmetric, codebook = scheme
    dev = torch.device("cuda", 0)
    for rows, K, clip in ((1, 12345, 1.0), (3, 8193, 0.9), (2, 520, 0.75)):
        w = make_w(rows, K, dtype, seed_for("long", scheme, dtype, rows, K))
        kw = dict(bits=bits, group_size=None, symmetric=symmetric, codebook=codebook, clip_ratio=clip)
        assert_qt_equal(lowbit.quantize(w.to(dev), **kw), lowbit.quantize(w, **kw),
                        f"[{rows}, {K}] clip={clip} {dtype}")


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_given_scales_and_zeros(scheme, dtype):
    """GPTQ/AWQ-style: caller-chosen parameters (here: the CPU's, shrunk or grown a little so codes
    clamp), given as CUDA tensors and as numpy arrays."""
    bits, symmetric, codebook = scheme
    dev = torch.device("cuda", 0)
    for rows, K, group in ((1, 16, 32), (3, 100, 32), (17, 576, 64), (3, 4103, 128), (17, 4103, None)):
        w = make_w(rows, K, dtype, seed_for("given", scheme, dtype, rows, K))
        kw = dict(bits=bits, group_size=group, symmetric=symmetric, codebook=codebook)
        base = lowbit.quantize(w, **kw)
        g = np.random.default_rng(seed_for("given-scale", scheme, rows, K))
        scales = (base.scales.numpy() * g.uniform(0.7, 1.3, base.scales.shape)).astype(np.float32)
        scales[0, 0] = 0.0  # a zero scale: the group quantizes to its zero point
        zeros = None if base.zeros is None else base.zeros.numpy()
        q_cpu = lowbit.quantize(w, scales=scales, zeros=zeros, **kw)
        for s_arg, z_arg in ((scales, zeros),
                             (torch.from_numpy(scales).to(dev),
                              None if zeros is None else torch.from_numpy(zeros).to(dev))):
            q_gpu = lowbit.quantize(w.to(dev), scales=s_arg, zeros=z_arg, **kw)
            on_gpu(q_gpu.codes, dev)
            assert_qt_equal(q_gpu, q_cpu, f"given [{rows}, {K}] g={group} {dtype}")


@needs_torch
def test_strided_rows_through_the_binding():
    """w with a row stride larger than K (a column slice) goes to the kernel without a copy."""
    dev = torch.device("cuda", 0)
    core, gpu = lowbit._ext.core(), lowbit._ext.cuda()
    for dtype in DTYPES:
        big = make_w(17, 130, dtype, seed_for("strided", dtype))
        w = big[:, 3:103]  # [17, 100], row stride 130, misaligned start
        G = 4
        outs = {}
        stream = torch.cuda.current_stream(dev).cuda_stream or 1
        for name, mod, x, kw in (("cpu", core, w, {}),
                                 ("gpu", gpu, big.to(dev)[:, 3:103], {"stream": stream})):
            assert x.stride(0) == 130
            d = x.device
            scales = torch.empty(17, G, dtype=torch.float32, device=d)
            zeros = torch.empty(17, G, dtype=torch.uint8, device=d)
            codes = torch.empty(17, 50, dtype=torch.uint8, device=d)
            mod.quantize(x, scales, zeros, codes, 4, 0, 32, 1.0, False, **kw)
            outs[name] = (codes, scales, zeros)
        torch.cuda.synchronize()
        for a, b, what in zip(outs["gpu"], outs["cpu"], ("codes", "scales", "zeros")):
            assert_same_bits(a, b, f"strided {dtype} {what}")


@needs_torch
@pytest.mark.parametrize("K", (1, 2, 7, 16, 101, 4103))
@pytest.mark.parametrize("rows", (1, 3, 17))
def test_pack_unpack_match_cpu(rows, K):
    dev = torch.device("cuda", 0)
    g = np.random.default_rng(seed_for("pack", rows, K))
    for codes in (torch.from_numpy(g.integers(0, 16, (rows, K), dtype=np.uint8)),
                  torch.from_numpy(g.integers(-8, 8, (rows, K), dtype=np.int8))):
        p_cpu = lowbit.pack_int4(codes)
        p_gpu = lowbit.pack_int4(codes.to(dev))
        on_gpu(p_gpu, dev)
        assert_same_bits(p_gpu, p_cpu, f"pack {codes.dtype} [{rows}, {K}]")
        signed = codes.dtype == torch.int8
        u_gpu = lowbit.unpack_int4(p_gpu, K=K, signed=signed)
        on_gpu(u_gpu, dev)
        assert_same_bits(u_gpu, lowbit.unpack_int4(p_cpu, K=K, signed=signed), "unpack")
        assert_same_bits(u_gpu, codes, "round trip")
    one_d = torch.from_numpy(g.integers(0, 16, K, dtype=np.uint8))
    assert_same_bits(lowbit.pack_int4(one_d.to(dev)), lowbit.pack_int4(one_d), "pack 1-D")


# ---------------------------------------------------------------------------------------------
# streams and devices

@needs_torch
def test_runs_on_the_callers_stream():
    """On a non-blocking side stream each op's input is written after a long device sleep. A
    kernel launched on any other stream would read the stale (zero) input; on the caller's stream
    it waits for the write."""
    dev = torch.device("cuda", 0)
    K = 4103
    w_cpu = make_w(17, K, "float32", seed_for("stream"))
    q_ref = lowbit.quantize(w_cpu, bits=4, group_size=128)
    src_w, src_codes = w_cpu.to(dev), q_ref.codes.to(dev)
    w, codes = torch.zeros_like(src_w), torch.zeros_like(src_codes)
    q_in = lowbit.QuantizedTensor(codes, q_ref.scales.to(dev), q_ref.zeros.to(dev), (17, K), q_ref.format)
    side = torch.cuda.Stream(device=dev)  # torch's pool streams are cudaStreamNonBlocking
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # ~10 ms of device time before the input exists
        w.copy_(src_w)
        q = lowbit.quantize(w, bits=4, group_size=128)
        torch.cuda._sleep(20_000_000)
        codes.copy_(src_codes)
        out = lowbit.dequantize(q_in)
        unpacked = lowbit.unpack_int4(codes, K=K)
    side.synchronize()
    assert_qt_equal(q, q_ref, "side stream")
    assert_same_bits(out, lowbit.dequantize(q_ref), "side stream dequantize")
    assert_same_bits(unpacked, lowbit.unpack_int4(q_ref.codes, K=K), "side stream unpack")


@needs_torch
def test_no_synchronize_on_dequantize_and_unpack():
    """dequantize / unpack_int4 only enqueue work: they return while the stream is still busy."""
    dev = torch.device("cuda", 0)
    q = lowbit.quantize(make_w(3, 1000, "float32", 1).to(dev), bits=4, group_size=64)
    side = torch.cuda.Stream(device=dev)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        lowbit.dequantize(q)
        lowbit.unpack_int4(q.codes, K=1000)
        busy = not side.query()
    side.synchronize()
    assert busy, "a lowbit call waited for the stream"


@needs_torch
@pytest.mark.skipif(not HAVE_TORCH_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    dev = torch.device("cuda", 1)
    w = make_w(17, 576, "float16", seed_for("dev1"))
    with torch.cuda.device(0):  # current device differs from the data's
        q = lowbit.quantize(w.to(dev), bits=4, group_size=64)
        out = lowbit.dequantize(q, dtype="float16")
    on_gpu(q.codes, dev)
    on_gpu(out, dev)
    q_cpu = lowbit.quantize(w, bits=4, group_size=64)
    assert_qt_equal(q, q_cpu, "cuda:1")
    assert_same_bits(out, lowbit.dequantize(q_cpu, dtype="float16"), "cuda:1 dequantize")


@needs_cupy
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_cupy_arrays(scheme):
    bits, symmetric, codebook = scheme
    g = np.random.default_rng(seed_for("cupy", scheme))
    for dtype in ("float32", "float16"):
        w = g.standard_normal((17, 4103)).astype(dtype)
        kw = dict(bits=bits, group_size=128, symmetric=symmetric, codebook=codebook)
        q_cpu = lowbit.quantize(w, **kw)
        q_gpu = lowbit.quantize(cupy.asarray(w), **kw)
        for a, b in ((q_gpu.codes, q_cpu.codes), (q_gpu.scales, q_cpu.scales),
                     (q_gpu.zeros, q_cpu.zeros)):
            if b is None:
                assert a is None
                continue
            assert isinstance(a, cupy.ndarray) and a.device.id == 0
            np.testing.assert_array_equal(a.get().view(np.uint8), b.view(np.uint8))
        for out in ("float32", "float16"):
            d = lowbit.dequantize(q_gpu, dtype=out)
            assert isinstance(d, cupy.ndarray)
            np.testing.assert_array_equal(d.get().view(np.uint8),
                                          lowbit.dequantize(q_cpu, dtype=out).view(np.uint8))
    codes = g.integers(0, 16, (3, 101), dtype=np.uint8)
    p = lowbit.pack_int4(cupy.asarray(codes))
    assert isinstance(p, cupy.ndarray)
    np.testing.assert_array_equal(p.get(), lowbit.pack_int4(codes))


# ---------------------------------------------------------------------------------------------
# bad input

@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
def test_nan_inf_raise_like_cpu(bad, dtype):
    dev = torch.device("cuda", 0)
    w = make_w(17, 576, dtype, seed_for("nan", dtype))
    w[11, 300] = bad
    w[13, 5] = bad
    for group in (64, None):
        with pytest.raises(ValueError, match=r"NaN or Inf \(first in row 11\)"):
            lowbit.quantize(w, bits=4, group_size=group)  # the CPU message, for reference
        with pytest.raises(ValueError, match=r"NaN or Inf \(first in row 11\)"):
            lowbit.quantize(w.to(dev), bits=4, group_size=group)
    base = lowbit.quantize(make_w(17, 576, dtype, 0), bits=4, group_size=64)
    with pytest.raises(ValueError, match="NaN or Inf"):  # given parameters: checked while coding
        lowbit.quantize(w.to(dev), bits=4, group_size=64, scales=base.scales.to(dev),
                        zeros=base.zeros.to(dev))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowbit.quantize(w.to(dev), bits=4, group_size="tensor")
    # the flag buffer is fresh per call: good input afterwards is fine
    lowbit.quantize(make_w(3, 100, dtype, 1).to(dev), bits=4, group_size=32)


@needs_torch
def test_pack_out_of_range_raises_like_cpu():
    dev = torch.device("cuda", 0)
    for codes, msg in ((torch.tensor([[1, 2, 16]], dtype=torch.uint8), r"\[0, 15\]"),
                       (torch.tensor([[1, -9, 3]], dtype=torch.int8), r"\[-8, 7\]"),
                       (torch.tensor([[8]], dtype=torch.int8), r"\[-8, 7\]")):
        with pytest.raises(ValueError, match=msg):
            lowbit.pack_int4(codes)
        with pytest.raises(ValueError, match=msg):
            lowbit.pack_int4(codes.to(dev))


@needs_torch
def test_api_errors_on_gpu():
    dev = torch.device("cuda", 0)
    w = make_w(3, 100, "float32", 2).to(dev)
    with pytest.raises(ValueError, match="put them on one device"):
        lowbit.quantize(w, bits=4, group_size=32, scales=torch.ones(3, 4), zeros=torch.zeros(3, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"zeros must be .*\[0, (15|2\^bits - 1)\]"):
        lowbit.quantize(w, bits=4, group_size=32, scales=torch.ones(3, 4, device=dev),
                        zeros=torch.full((3, 4), 16, dtype=torch.uint8, device=dev))
    with pytest.raises(ValueError, match="scales must be finite"):
        lowbit.quantize(w, bits=4, group_size=32, scales=-torch.ones(3, 4, device=dev),
                        zeros=torch.zeros(3, 4, dtype=torch.uint8, device=dev))
    with pytest.raises(TypeError):
        lowbit.quantize(w.to(torch.float64), bits=4)
    with pytest.raises(ValueError, match="bits"):
        lowbit.quantize(w, bits=5)


@needs_torch
def test_binding_validation():
    """Direct _cuda calls: same checks as _core, plus device placement and the status buffer."""
    dev = torch.device("cuda", 0)
    m = lowbit._ext.cuda()
    w = torch.randn(3, 100, device=dev)
    scales = torch.empty(3, 4, device=dev)
    zeros = torch.empty(3, 4, dtype=torch.uint8, device=dev)
    codes = torch.empty(3, 50, dtype=torch.uint8, device=dev)
    status = torch.empty(2, dtype=torch.int32, device=dev)
    m.quantize(w, scales, zeros, codes, 4, 0, 32, 1.0, False, stream=1, status=status)
    m.check_status(status.cpu().tolist())
    with pytest.raises(ValueError, match="not in GPU memory"):
        m.quantize(w.cpu(), scales, zeros, codes, 4, 0, 32, 1.0, False)
    with pytest.raises(ValueError, match="not in GPU memory"):
        m.quantize(w, scales.cpu(), zeros, codes, 4, 0, 32, 1.0, False)
    with pytest.raises(ValueError, match="shape"):
        m.quantize(w, scales[:, :3], zeros, codes, 4, 0, 32, 1.0, False)
    with pytest.raises(TypeError, match="int8"):
        m.quantize(w, scales, None, codes, 8, 1, 32, 1.0, False)  # symmetric 8-bit codes are int8
    with pytest.raises(ValueError, match="bits"):
        m.quantize(w, scales, zeros, codes, 5, 0, 32, 1.0, False)
    with pytest.raises(ValueError, match="multiple of 16"):
        m.quantize(w, torch.empty(3, 5, device=dev), torch.empty(3, 5, dtype=torch.uint8, device=dev),
                   codes, 4, 0, 24, 1.0, False)
    with pytest.raises(ValueError, match="nf4"):
        m.quantize(w, scales, None, codes, 8, 2, 32, 1.0, False)
    with pytest.raises(ValueError, match="zeros are only used"):
        m.quantize(w, scales, zeros, codes, 4, 1, 32, 1.0, False)
    with pytest.raises(ValueError, match="status"):
        m.quantize(w, scales, zeros, codes, 4, 0, 32, 1.0, False, status=torch.empty(3, dtype=torch.int32, device=dev))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        m.dequantize(codes, scales, zeros, torch.empty(3, 100, dtype=torch.float64, device=dev), 4, 0, 32)
    with pytest.raises(ValueError, match="stream"):
        m.dequantize(codes, scales, zeros, torch.empty(3, 100, device=dev), 4, 0, 32, stream=-1)
    with pytest.raises(TypeError, match="uint8 or int8"):
        m.pack_int4(torch.zeros(3, 4, dtype=torch.int32, device=dev), torch.empty(3, 2, dtype=torch.uint8, device=dev))
    with pytest.raises(ValueError, match="shape"):
        m.unpack_int4(torch.zeros(3, 3, dtype=torch.uint8, device=dev), torch.empty(3, 8, dtype=torch.uint8, device=dev))
    with pytest.raises(ValueError, match="NaN or Inf"):
        m.check_status([1, 2**31 - 1 - 4])
