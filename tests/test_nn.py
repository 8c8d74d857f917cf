"""lowbit.nn: QuantLinear, the torch.library custom ops (torch.compile / torch.export / opcheck),
quantize_dynamic, apply_quantized, and whole-model save / load. Skipped without torch."""
from __future__ import annotations

import copy
import gc
import io

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lowbit as lb  # noqa: E402
from lowbit import torch_ops  # noqa: E402
from lowbit.nn import QuantLinear, quantize_dynamic  # noqa: E402

FORMATS = [
    dict(bits=8, group_size=None, symmetric=True),
    dict(bits=8, group_size=32, symmetric=False),
    dict(bits=4, group_size=32, symmetric=False),
    dict(bits=4, group_size=64, symmetric=True),
    dict(bits=4, group_size=32, codebook="nf4"),
    dict(bits=8, group_size=None, symmetric=True, act_bits=8),
    dict(bits=4, group_size=32, act_bits=8),
]


def _linear(K=96, N=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias)


def _fake_act(x):
    """Per-token symmetric int8 rounding (the kernels' rule)."""
    s = x.abs().amax(-1, keepdim=True) / 127
    return torch.clamp(torch.round(x / s), -127, 127) * s


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_forward_matches_dequantized_reference(fmt):
    lin = _linear()
    q = QuantLinear.from_linear(lin, **fmt)
    qt = lb.quantize(lin.weight.detach(), fmt["bits"], fmt["group_size"], fmt.get("symmetric", False),
                     codebook=fmt.get("codebook"))
    w = lb.dequantize(qt)
    assert torch.equal(q.dequantized_weight(), w)          # the layer holds exactly lowbit.quantize's result
    x = torch.randn(2, 7, 96)
    y = q(x)
    assert y.shape == (2, 7, 40) and y.dtype == torch.float32
    xr = _fake_act(x) if fmt.get("act_bits") else x
    ref = xr.double() @ w.double().T + lin.bias.double()
    tol = 2e-2 if fmt.get("act_bits") else 1e-4
    assert torch.allclose(y.double(), ref, atol=tol, rtol=0), (y.double() - ref).abs().max()
    # and close to the float layer (quantization error only)
    err = (y - lin(x)).norm() / lin(x).norm()
    assert err < (0.02 if fmt["bits"] == 8 else 0.15)
    r = repr(q)
    assert f"bits={fmt['bits']}" in r and f"act_bits={fmt.get('act_bits')}" in r and "scheme=" in r


def test_input_gradient_is_grad_y_times_dequantized_weight():
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits=4, group_size=32)
    x = torch.randn(5, 96, requires_grad=True)
    g = torch.randn(5, 40)
    q(x).backward(g)
    assert torch.allclose(x.grad, g @ q.dequantized_weight(), atol=1e-5)
    assert all(not p.requires_grad for p in q.parameters())  # weights frozen
    # a bias that is made trainable gets its gradient too
    q.bias.requires_grad_(True)
    q(torch.randn(5, 96)).backward(g)
    assert torch.allclose(q.bias.grad, g.sum(0), atol=1e-5)


def test_act_order_perm_and_input_scale():
    """y = ((x / s)[perm]) @ dequantize(W)ᵀ + b, as GPTQ act-order / AWQ unfolded results ask."""
    lin = _linear(K=64, N=24)
    perm = torch.randperm(64)
    s = torch.rand(64) + 0.5
    w_dom = (lin.weight.detach() * s[None, :])[:, perm].contiguous()   # weight in the (x/s)[perm] domain
    qt = lb.quantize(w_dom, 4, 32)
    q = QuantLinear.from_quantized(qt, lin.bias, perm=perm, input_scale=s)
    x = torch.randn(3, 64)
    ref = (x / s)[:, perm] @ lb.dequantize(qt).T + lin.bias
    assert torch.allclose(q(x), ref, atol=1e-4)
    assert torch.allclose(x @ q.dequantized_weight().T + lin.bias, ref, atol=1e-4)
    assert "act_order=True" in repr(q) and "input_scale=True" in repr(q)


def test_state_dict_round_trip_and_dtype_casts():
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits=4, group_size=32)
    sd = q.state_dict()
    assert set(sd) == {"codes", "scales", "zeros", "bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = QuantLinear(96, 40, bias=True, bits=4, group_size=32)   # zero skeleton of the same format
    x = torch.randn(4, 96)
    y0 = fresh(x)                                                   # packs the zero buffers
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), q(x)) and not torch.equal(y0, q(x))  # re-packed after the in-place load
    # casting the module keeps the format's float32 scales
    h = copy.deepcopy(q).to(torch.bfloat16)
    assert h.scales.dtype == torch.float32 and h.bias.dtype == torch.bfloat16
    yb = h(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), q(x), atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias_dtype", [None, "same", torch.float32])
def test_eager_call_matches_lowbit_matmul(dtype, bias_dtype):
    # the module's direct call to the packed kernel (x and bias in one dtype) and lowbit.matmul
    # (every other case) give the same bits
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=32, act_bits=8)
    if bias_dtype is None:
        q.bias = None
    else:
        q.bias = nn.Parameter(torch.randn(q.out_features).to(dtype if bias_dtype == "same" else bias_dtype),
                              requires_grad=False)
    x = torch.randn(3, 5, q.in_features).to(dtype)
    with torch.no_grad():
        y = q(x)
    want = lb.matmul(x, q.quantized_tensor(), bias=None if q.bias is None else q.bias.to(dtype), act_bits=8)
    assert y.dtype == dtype and y.shape == (3, 5, q.out_features) and torch.equal(y, want)


def test_packing_is_cached_per_buffer_set():
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=32)
    x = torch.randn(2, 96, requires_grad=True)     # autograd: through torch.ops.lowbit.matmul
    q(x)
    before = dict(torch_ops.STATS)
    for _ in range(3):
        q(x)
    assert torch_ops.STATS["misses"] == before["misses"] and torch_ops.STATS["hits"] == before["hits"] + 3
    with torch.no_grad():                          # eager inference: lowbit.matmul on the layer's qt
        q(x)
        qt = q._eager_plan()[0]
        packed = dict(qt.__dict__["_lowbit_packed"])
        for _ in range(3):
            q(x)
        assert q._eager_plan()[0] is qt and all(qt.__dict__["_lowbit_packed"][k] is v for k, v in packed.items())


def test_custom_ops_opcheck():
    q = QuantLinear.from_linear(_linear(K=64, N=32), bits=4, group_size=32)
    codes, scales, zeros, bits, scheme, g = q.op_args()
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.lowbit.matmul.default, (x, codes, scales, zeros, q.bias, bits, scheme, g, 0))
    torch.library.opcheck(torch.ops.lowbit.dequantize.default, (codes, scales, zeros, bits, scheme, g, 64))
    w = torch.randn(16, 64)
    torch.library.opcheck(torch.ops.lowbit.quantize.default, (w, 4, 32, False, False))
    c, s, z = torch.ops.lowbit.quantize(w, 4, 32, False, False)
    ref = lb.quantize(w, 4, 32, False)
    assert torch.equal(c, ref.codes) and torch.equal(s, ref.scales) and torch.equal(z, ref.zeros)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _quantized_mlp():
    m = _MLP().eval()
    m.fc1 = QuantLinear.from_linear(m.fc1, bits=4, group_size=32, act_bits=8, act_granularity="block")
    m.fc2 = QuantLinear.from_linear(m.fc2, bits=8, group_size=None, symmetric=True, act_bits=8)
    return m


def test_per_block_activations_forward():
    # QuantLinear(act_granularity="block") runs lowbit.matmul's per-block int8 activations
    q = _quantized_mlp().fc1
    x = torch.randn(3, 5, 64)
    y = q(x)
    ref = lb.matmul(x, q.quantized_tensor(), bias=q.bias.detach(), act_bits=8, act_granularity="block")
    assert torch.equal(y, ref)
    assert not torch.equal(y, lb.matmul(x, q.quantized_tensor(), bias=q.bias.detach(), act_bits=8))
    assert "act_granularity=block" in repr(q)
    with pytest.raises(ValueError, match="act_granularity"):
        QuantLinear(64, 8, act_granularity="block")  # needs act_bits=8


def test_torch_compile_fullgraph_no_repacking():
    torch._dynamo.reset()
    m = _quantized_mlp()
    x = torch.randn(3, 64)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)  # fullgraph: any graph break raises
    y = compiled(x)
    assert torch.allclose(y, eager, atol=1e-5)
    before = dict(torch_ops.STATS)
    for _ in range(3):
        y = compiled(x)
    assert torch_ops.STATS["misses"] == before["misses"]  # prepacked weights reused inside the graph
    assert torch_ops.STATS["hits"] >= before["hits"] + 6
    # autograd through a compiled graph reaches the input (aot_eager: the same AOT-autograd
    # tracing of the op's backward, without inductor's C++ compile time)
    xg = torch.randn(3, 64, requires_grad=True)
    torch.compile(m, fullgraph=True, backend="aot_eager")(xg).sum().backward()
    xe = xg.detach().clone().requires_grad_(True)
    m(xe).sum().backward()
    assert torch.allclose(xg.grad, xe.grad, atol=1e-4)


def test_torch_export():
    m = _quantized_mlp()
    x = torch.randn(3, 64)
    ep = torch.export.export(m, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.lowbit.matmul.default) == 2
    x2 = torch.randn(3, 64)
    assert torch.allclose(ep.module()(x2), m(x2), atol=1e-5)


@torch.no_grad()
def test_quantize_dynamic_against_torch_and_float():
    m = _MLP().eval()
    x = torch.randn(16, 64)
    ref = m(x)
    ql = quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    assert isinstance(ql.fc1, QuantLinear) and ql.fc1.act_bits == 8 and ql.fc1.bits == 8
    assert isinstance(m.fc1, nn.Linear)  # not in place by default, like torch
    y = ql(x)
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 0.02
    try:
        tq = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
        yt = tq(x)
    except Exception as e:  # noqa: BLE001 - torch built without a quantized engine
        pytest.skip(f"torch quantize_dynamic unavailable: {e}")
    rel_t = float((yt - ref).norm() / ref.norm())
    assert float((y - yt).norm() / yt.norm()) < 0.03   # close to torch's, not equal
    assert not torch.equal(y, yt)
    assert rel <= 2 * rel_t + 1e-3                      # per-channel / per-token is not worse than torch's
    # names select modules; other dtypes are refused
    only2 = quantize_dynamic(m, {"fc2"})
    assert isinstance(only2.fc1, nn.Linear) and isinstance(only2.fc2, QuantLinear)
    with pytest.raises(ValueError, match="qint8"):
        quantize_dynamic(m, dtype=torch.float16)


def test_apply_quantized_matches_apply_simulated():
    from lowbit.algorithms import GPTQConfig, RTNConfig, apply_quantized, quantize_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    x = torch.randn(8, 64)
    for cfg, data in [(RTNConfig(bits=4, group_size=32), None),
                      (GPTQConfig(bits=4, group_size=32, act_order=True), [torch.randn(16, 64) for _ in range(2)])]:
        sim, real = copy.deepcopy(base), copy.deepcopy(base)
        res = quantize_model(sim, cfg, data)                       # default: simulated
        res_q = quantize_model(real, cfg, data, apply="quantized")
        assert isinstance(real[0], QuantLinear) and isinstance(sim[0], nn.Linear)
        assert torch.allclose(real(x), sim(x), atol=1e-4)
        if isinstance(cfg, GPTQConfig):
            assert any(r.perm is not None for r in res_q.values()) and real[0].perm is not None
        again = apply_quantized(copy.deepcopy(base), res)
        assert torch.allclose(again(x), sim(x), atol=1e-4)


def test_save_load_quantized_model_fresh_module(tmp_path):
    from lowbit.nn import load_quantized_model, save_quantized_model

    m = _quantized_mlp()
    x = torch.randn(4, 64)
    f = save_quantized_model(m, str(tmp_path / "m.safetensors"))
    assert set(lb.load(f)) >= {"fc1.weight", "fc2.weight", "fc1.bias", "fc2.lowbit_act_bits"}
    back = load_quantized_model(f, _MLP())
    assert isinstance(back.fc2, QuantLinear) and back.fc2.act_bits == 8
    assert back.fc1.act_granularity == "block" and back.fc2.act_granularity == "token"
    assert torch.equal(back(x), m(x))


def test_import_lowbit_stays_torch_free():
    import subprocess
    import sys

    code = "import sys, lowbit; assert 'torch' not in sys.modules; print(lowbit.__all__[-1])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", ["eager", "op"])
def test_packing_cache_does_not_keep_weights_alive(path):
    # the packing cache refers to buffers weakly: a deleted layer's weights must be freed
    from torch.multiprocessing.reductions import StorageWeakRef
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=32)
    with torch.no_grad():
        if path == "eager":
            q(torch.randn(2, 96))
            q(torch.randn(2, 96))      # a cache hit
        else:
            codes, scales, zeros, bits, scheme, g = q.op_args()
            for _ in range(2):
                torch.ops.lowbit.matmul(torch.randn(2, 96), codes, scales, zeros, None, bits, scheme, g, 0)
            del codes, scales, zeros
    refs = [StorageWeakRef(t.untyped_storage()) for t in (q.codes, q.scales, q.zeros)]
    del q
    gc.collect()
    assert all(r.expired() for r in refs)


def test_eager_call_skips_the_op_dispatch_only_when_nothing_needs_it(monkeypatch):
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=32)
    calls = []
    real = QuantLinear._eager_plan
    monkeypatch.setattr(QuantLinear, "_eager_plan", lambda self: calls.append(1) or real(self))
    x = torch.randn(2, 96)
    y = q(x)                                   # grad mode on, but nothing requires grad
    assert calls == [1]
    xg = x.clone().requires_grad_(True)
    yg = q(xg)                                 # autograd needs the op
    assert calls == [1] and yg.requires_grad and torch.equal(yg.detach(), y)
    with torch.no_grad():
        q(xg)
    assert calls == [1, 1]
    # the eager QuantizedTensor follows the buffers: an in-place load re-packs, a new tensor too
    with torch.no_grad():
        q.scales.mul_(2)
        torch.testing.assert_close(q(x), x @ q.dequantized_weight().T + q.bias, rtol=1e-4, atol=1e-4)
        q.codes = torch.zeros_like(q.codes)
        torch.testing.assert_close(q(x), x @ q.dequantized_weight().T + q.bias, rtol=1e-4, atol=1e-4)
    assert "_qt_cache" not in copy.copy(q).__getstate__() and "_qt_cache" in q.__dict__


@pytest.mark.parametrize("act", [(None, "token"), (8, "token"), (8, "block")])
def test_eager_float32_call_equals_lowbit_matmul(act, monkeypatch):
    # Inference on float32 CPU tensors goes straight to the packed kernel; every other input takes
    # lowbit.matmul. Both must give the same numbers, follow in-place edits of the bias, and
    # raise the same errors.
    act_bits, gran = act
    general = []
    real = lb.ops.matmul
    monkeypatch.setattr(lb.ops, "matmul", lambda *a, **k: general.append(1) or real(*a, **k))
    q = QuantLinear.from_linear(_linear(K=96, N=40), bits=4, group_size=32, act_bits=act_bits,
                                act_granularity=gran)
    qt = q.quantized_tensor()
    rng = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for shape in [(96,), (5, 96), (2, 3, 96), (17, 96)]:
            x = torch.randn(*shape, generator=rng)
            want = real(x, qt, bias=q.bias, act_bits=act_bits, act_granularity=gran)
            assert torch.equal(q(x), want), shape
        assert not general                                     # the direct call was taken
        x = torch.randn(6, 96, generator=rng)
        xs = torch.randn(96, 6, generator=rng).t()              # not contiguous
        xg = x.clone().requires_grad_(True)                    # requires grad, under no_grad
        for xi in (xs, xg, x.half()):
            want = real(xi.detach(), qt, bias=q.bias, act_bits=act_bits, act_granularity=gran)
            assert torch.equal(q(xi), want)
        assert len(general) == 3
        q.bias.add_(1.0)                                       # in place: the next call sees it
        assert torch.equal(q(x), lb.matmul(x, qt, bias=q.bias, act_bits=act_bits, act_granularity=gran))
        q.bias = None
        assert torch.equal(q(x), lb.matmul(x, qt, act_bits=act_bits, act_granularity=gran))
        bad = x.clone()
        bad[2, 7] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            q(bad)
        with pytest.raises(ValueError):
            q(torch.empty(0, 96))


def test_quantize_dynamic_shared_linear_becomes_one_quantlinear_everywhere():
    l = nn.Linear(32, 32)
    q = quantize_dynamic(nn.Sequential(l, nn.ReLU(), l))
    assert isinstance(q[0], QuantLinear) and q[2] is q[0]
    q = quantize_dynamic(nn.Sequential(l, nn.ReLU(), l), {"2"})   # chosen by one name: all references
    assert isinstance(q[0], QuantLinear) and q[2] is q[0]


def test_quantize_dynamic_refuses_bad_qconfig_spec():
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(32, 32))
    m.add_module("f", nn.Linear(32, 32))
    for spec in ("fc", nn.Linear, {3, None}, {int}):
        with pytest.raises(TypeError, match="qconfig_spec"):
            quantize_dynamic(m, spec)
    q = quantize_dynamic(m, {"fc"})
    assert isinstance(q.fc, QuantLinear) and type(q.f) is nn.Linear


def test_quantize_dynamic_refuses_float64_weights_naming_the_layer():
    m = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4).double())
    with pytest.raises(TypeError, match="'2'.*float64"):
        quantize_dynamic(m)
    assert type(quantize_dynamic(m, {"0"})[0]) is QuantLinear   # the float64 layer not chosen: fine


def _rtn(m, apply=False):
    from lowbit.algorithms import RTNConfig, quantize_model
    return quantize_model(m, RTNConfig(bits=4, group_size=64), apply=apply)


def test_model_size_report_counts_tied_float_weights_and_fp16_as_float32():
    from lowbit.algorithms import model_size_report

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(1000, 64)
            self.head = nn.Linear(64, 1000, bias=False)
            self.head.weight = self.emb.weight

    m = M()
    res = _rtn(m)
    rep = model_size_report(m, res)
    assert rep["float_bytes"] == 1000 * 64 * 4
    assert rep["quantized_bytes"] == 1000 * 64 * 4 + res["head"].qt.nbytes
    h = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)).half()
    rep = model_size_report(h, _rtn(h))
    assert rep["float_bytes"] == sum(p.numel() * 4 for p in h.parameters())


def test_model_size_report_refuses_unknown_names_and_handles_quantlinear():
    from lowbit.algorithms import model_size_report

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="'1'"):
        model_size_report(m, _rtn(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))))
    before = model_size_report(m, _rtn(m))
    res = _rtn(m, apply="quantized")
    assert isinstance(m[0], QuantLinear)
    assert model_size_report(m, res) == before
