"""Framework interop on the CPU: numpy in -> numpy out, torch in -> torch out (float32, float16,
bfloat16), identical codes from both, zero-copy where promised, and `import lowbit` without torch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lowbit
import reference as R
from conftest import rng_for

FORMATS = [dict(bits=4, group_size=128), dict(bits=8, group_size=None, symmetric=True),
           dict(bits=4, group_size=32, codebook="nf4"), dict(bits=3, group_size="tensor"),
           dict(bits=2, group_size=64, symmetric=True)]
FORMAT_IDS = ["asym4g128", "sym8row", "nf4g32", "asym3tensor", "sym2g64"]


def weights(*key, rows=17, K=300):
    return rng_for(*key).standard_normal((rows, K)).astype(np.float32)


def test_numpy_in_numpy_out(isa):
    w = weights("np", isa)
    qt = lowbit.quantize(w, bits=4, group_size=64)
    for a in (qt.codes, qt.scales, qt.zeros):
        assert isinstance(a, np.ndarray)
    assert qt.device == "cpu"
    for dt in (None, "float32", "float16"):
        out = lowbit.dequantize(qt, dtype=dt)
        assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dt or "float32")
    with pytest.raises(TypeError, match="bfloat16"):
        lowbit.dequantize(qt, dtype="bfloat16")  # numpy has no bfloat16


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_in_torch_out_and_same_codes_as_numpy(isa, dtype, fmt):
    torch = pytest.importorskip("torch")
    w32 = weights("torch", isa, dtype, str(fmt))
    wt = torch.from_numpy(w32).to(getattr(torch, dtype))
    qt = lowbit.quantize(wt, **fmt)
    for a in (qt.codes, qt.scales) + ((qt.zeros,) if qt.zeros is not None else ()):
        assert isinstance(a, torch.Tensor) and a.device.type == "cpu"
    assert qt.device == "cpu"
    # numpy gets the same codes from the same values (bfloat16: through its float32 widening,
    # which is exact)
    wn = wt.float().numpy() if dtype == "bfloat16" else wt.numpy()
    qn = lowbit.quantize(wn, **fmt)
    np.testing.assert_array_equal(qt.codes.numpy(), qn.codes)
    np.testing.assert_array_equal(qt.scales.numpy().view(np.uint32), qn.scales.view(np.uint32))
    if qn.zeros is not None:
        np.testing.assert_array_equal(qt.zeros.numpy(), qn.zeros)
    for out_dt in (None, "float16", "bfloat16", torch.float32, torch.bfloat16):
        out = lowbit.dequantize(qt, dtype=out_dt)
        want = torch.float32 if out_dt is None else getattr(torch, str(out_dt).replace("torch.", ""))
        assert isinstance(out, torch.Tensor) and out.dtype == want and out.shape == wt.shape
    np.testing.assert_array_equal(lowbit.dequantize(qt).numpy(), lowbit.dequantize(qn))


def test_torch_results_are_views_of_lowbit_output(isa):
    """Outputs are allocated by torch and written in place by the kernel (no copy back): they are
    ordinary, contiguous, writable tensors that own their memory."""
    torch = pytest.importorskip("torch")
    wt = torch.from_numpy(weights("zc", isa))
    qt = lowbit.quantize(wt, bits=4, group_size=32)
    out = lowbit.dequantize(qt)
    for t in (qt.codes, qt.scales, qt.zeros, out):
        assert t.is_contiguous() and not t.requires_grad
    out.add_(1)  # writable


def test_contiguous_torch_input_is_not_copied(isa, monkeypatch):
    """The kernel reads a contiguous input in place: lowbit hands the same object to the core."""
    torch = pytest.importorskip("torch")
    wt = torch.from_numpy(weights("nocopy", isa))
    seen = []
    core = lowbit._ext.core()

    class Spy:
        def __getattr__(self, name):
            return getattr(core, name)

        def quantize(self, w, *args, **kw):
            seen.append(w)
            return core.quantize(w, *args, **kw)

    monkeypatch.setattr(lowbit._ext, "core", lambda: Spy())
    lowbit.quantize(wt, bits=4, group_size=64)
    lowbit.quantize(wt.numpy(), bits=4, group_size=64)
    assert seen[0] is wt
    assert seen[1].ctypes.data == wt.data_ptr()  # numpy view of the same memory, not a copy


def test_numpy_input_shares_memory_with_torch_view(isa):
    """A numpy array and a torch tensor over the same memory quantize identically."""
    torch = pytest.importorskip("torch")
    w = weights("shared", isa, rows=64, K=4099)
    t = torch.from_numpy(w)
    assert t.data_ptr() == w.ctypes.data
    a, b = lowbit.quantize(w, bits=8, group_size=256), lowbit.quantize(t, bits=8, group_size=256)
    np.testing.assert_array_equal(a.codes, b.codes.numpy())


def test_given_scales_from_the_other_framework(isa):
    """Caller-supplied scales/zeros from numpy are accepted with a torch w (and vice versa):
    they are CPU arrays, converted into w's framework."""
    torch = pytest.importorskip("torch")
    w = weights("mixed", isa, rows=3, K=100)
    scales = np.full((3, 4), 0.05, np.float32)
    zeros = np.full((3, 4), 8, np.uint8)
    ref = R.quantize(w, 4, 32, "asymmetric", scales=scales, zeros=zeros)
    qt = lowbit.quantize(torch.from_numpy(w), bits=4, group_size=32, scales=scales, zeros=zeros)
    assert isinstance(qt.scales, torch.Tensor) and isinstance(qt.zeros, torch.Tensor)
    np.testing.assert_array_equal(qt.codes.numpy(), ref.stored_codes())
    qn = lowbit.quantize(w, bits=4, group_size=32, scales=torch.from_numpy(scales),
                         zeros=torch.from_numpy(zeros))
    assert isinstance(qn.scales, np.ndarray) and isinstance(qn.zeros, np.ndarray)
    np.testing.assert_array_equal(qn.codes, ref.stored_codes())
    # a torch scales tensor of another float dtype / python lists are converted too
    qs = lowbit.quantize(torch.from_numpy(w), bits=8, group_size=None, symmetric=True,
                         scales=torch.full((3, 1), 0.02, dtype=torch.float64))
    ref8 = R.quantize(w, 8, None, "symmetric", scales=np.full((3, 1), 0.02, np.float32))
    np.testing.assert_array_equal(qs.codes.numpy(), ref8.stored_codes())
    ql = lowbit.quantize(w, bits=8, group_size=None, symmetric=True, scales=[[0.02]] * 3)
    np.testing.assert_array_equal(ql.codes, ref8.stored_codes())


def test_pack_unpack_follow_the_framework():
    torch = pytest.importorskip("torch")
    c = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8)
    p = lowbit.pack_int4(c)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.uint8
    assert p.tolist() == [[0x21, 0x03], [0x0F, 0x07]]
    u = lowbit.unpack_int4(p, K=3)
    assert isinstance(u, torch.Tensor) and torch.equal(u, c)
    s = lowbit.unpack_int4(lowbit.pack_int4(torch.tensor([-8, 7, -1], dtype=torch.int8)), K=3, signed=True)
    assert s.dtype == torch.int8 and s.tolist() == [-8, 7, -1]
    pn = lowbit.pack_int4(np.array([[1, 2, 3], [15, 0, 7]], np.uint8))
    assert isinstance(pn, np.ndarray) and pn.tolist() == p.tolist()


def test_quantizedtensor_with_mixed_cpu_frameworks_dequantizes():
    torch = pytest.importorskip("torch")
    w = weights("mix2")
    qn = lowbit.quantize(w, bits=4, group_size=64)
    bad = lowbit.QuantizedTensor(torch.from_numpy(qn.codes), qn.scales, qn.zeros, qn.shape, qn.format)
    # codes in torch, scales in numpy: both CPU, so the device check passes; the kernel still
    # reads them correctly (both are CPU arrays) -- dequantize follows the codes' framework.
    out = lowbit.dequantize(bad)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), lowbit.dequantize(qn))


def _run_python(code: str, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_import_without_torch():
    r = _run_python("""
        import sys
        sys.modules['torch'] = None     # any `import torch` now raises ImportError
        sys.modules['cupy'] = None
        import numpy as np
        import lowbit
        w = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
        qt = lowbit.quantize(w, bits=4, group_size=16)
        out = lowbit.dequantize(qt, dtype='float16')
        assert out.dtype == np.float16 and out.shape == (5, 40)
        assert lowbit.unpack_int4(lowbit.pack_int4(np.arange(16, dtype=np.uint8)), K=16).tolist() == list(range(16))
        info = lowbit.build_info()
        assert info['cuda']['loaded'] is False
        assert sys.modules['torch'] is None
        try:
            lowbit.quantize([[1.0, 2.0]], bits=4)
        except TypeError as e:
            assert 'w must be a numpy array, torch tensor or CuPy array' in str(e), e
        else:
            raise AssertionError('a list must be rejected')
        print('OK')
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"


def test_import_does_not_import_torch():
    r = _run_python("""
        import sys, lowbit
        print('torch' in sys.modules, 'cupy' in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
