"""Mixed precision (pattern routing, sensitivity report, budget chooser) and the quantized KV cache
(lowbit.algorithms.mixed / kv_cache), CPU, float32.

The mixed-precision model has transformers-style names (layers.N.self_attn.q_proj, .mlp.up_proj)
so the patterns look like the ones users write; one Linear (layers.2.mlp.down_proj) is made
fragile: large weights with one outlier column, so 4-bit rounding wrecks its groups."""
import copy
import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lowbit  # noqa: E402
from lowbit import algorithms as A  # noqa: E402

H, FF, VOCAB, T, NLAYERS = 64, 128, 96, 16, 3
FRAGILE = "layers.2.mlp.down_proj"
torch.set_num_threads(1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(H, H) for _ in range(4))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (m(x).view(B, L, 4, H // 4).transpose(1, 2) for m in (self.q_proj, self.k_proj, self.v_proj))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H // 4), -1) @ v
        return self.o_proj(a.transpose(1, 2).reshape(B, L, H))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(H, FF), nn.Linear(FF, H)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.self_attn = nn.LayerNorm(H), Attention()
        self.post_attention_layernorm, self.mlp = nn.LayerNorm(H), MLP()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_tokens = nn.Embedding(VOCAB, H)
        self.layers = nn.ModuleList([Layer() for _ in range(NLAYERS)])
        self.lm_head = nn.Linear(H, VOCAB)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                    m.bias.zero_()
            frag = dict(self.named_modules())[FRAGILE].weight
            frag.mul_(3.0)
            frag[:, ::32] *= 25.0          # one outlier column per 32-wide group

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def batches(seed, n=4, bs=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bs, T), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def net():
    return Net().eval()


@pytest.fixture(scope="module")
def calib():
    return batches(1)


INT8 = A.RTNConfig(bits=8, group_size=None, symmetric=True)
INT4 = A.RTNConfig(bits=4, group_size=32, symmetric=False)


# ------------------------------------------------------------------ mixed precision: routing

def test_mixed_routes_patterns_to_algorithms(net, calib):
    gptq = A.GPTQConfig(bits=4, group_size=32)
    cfg = A.MixedPrecisionConfig(rules=[("*.self_attn.*", INT8), ("*.mlp.*", gptq)],
                                 skip=("lm_head", "*.layers.0.*"))
    assigned = A.assign_configs(net, cfg)
    assert sorted(assigned) == sorted(n for n in A.find_linears(net) if not n.startswith(("layers.0.", "lm_head")))
    for n, c in assigned.items():
        assert c is (INT8 if ".self_attn." in n else gptq)

    m = copy.deepcopy(net)
    res = A.quantize_model(m, cfg, calib)
    assert set(res) == set(assigned)
    orig = dict(net.named_modules())
    mods = dict(m.named_modules())
    for n, r in res.items():
        w = orig[n].weight.detach()
        if ".self_attn." in n:   # RTN: exactly lowbit.quantize of the original weight
            want = lowbit.quantize(w, 8, None, True)
            assert r.qt.format == want.format and torch.equal(r.qt.codes, want.codes)
        else:                    # GPTQ: same format as RTN int4 g32, but error-compensated codes
            rtn = lowbit.quantize(w, 4, 32, False)
            assert r.qt.format == rtn.format and not torch.equal(r.qt.codes, rtn.codes)
        assert torch.allclose(mods[n].weight, r.weight())
    for n in list(orig):           # skipped Linears are untouched
        if n.startswith("layers.0.") and isinstance(orig[n], nn.Linear) or n == "lm_head":
            assert torch.equal(mods[n].weight, orig[n].weight)


def test_mixed_default_and_first_match_wins(net):
    cfg = A.MixedPrecisionConfig(rules=[("layers.1.mlp.up_proj", INT8), ("*.mlp.*", INT4)], default=INT4)
    assigned = A.assign_configs(net, cfg)
    assert assigned["layers.1.mlp.up_proj"] is INT8
    assert assigned["layers.1.mlp.down_proj"] is INT4 and assigned["layers.0.self_attn.q_proj"] is INT4
    assert "lm_head" not in assigned
    res = A.quantize_model(copy.deepcopy(net), cfg)   # all RTN: no calibration data needed
    assert res["layers.1.mlp.up_proj"].qt.bits == 8 and res["layers.2.self_attn.o_proj"].qt.bits == 4


def test_mixed_bad_rules_error(net):
    with pytest.raises(TypeError, match="list of \\(pattern, config\\) pairs"):
        A.MixedPrecisionConfig(rules=("*.mlp.*", INT4))
    with pytest.raises(TypeError, match="must be a \\(pattern, config\\) pair"):
        A.MixedPrecisionConfig(rules=[("*.mlp.*", INT4, 3)])
    with pytest.raises(ValueError, match="non-empty string"):
        A.MixedPrecisionConfig(rules=[("", INT4)])
    with pytest.raises(ValueError, match="unbalanced"):
        A.MixedPrecisionConfig(rules=[("*.layers.[01.*", INT4)])
    with pytest.raises(TypeError, match="QATConfig"):
        A.MixedPrecisionConfig(rules=[("*.mlp.*", A.QATConfig())])
    with pytest.raises(TypeError, match="default"):
        A.MixedPrecisionConfig(default="int4")
    with pytest.raises(ValueError, match="repeat the pattern"):
        A.MixedPrecisionConfig(rules=[("*.mlp.*", INT4), ("*.mlp.*", INT8)])
    with pytest.raises(TypeError, match="list of name patterns"):
        A.MixedPrecisionConfig(skip="lm_head")
    with pytest.raises(ValueError, match=r"\['\*\.self_atn\.\*'\] matched no Linear"):
        A.quantize_model(copy.deepcopy(net), A.MixedPrecisionConfig(rules=[("*.self_atn.*", INT8)]))
    with pytest.raises(ValueError, match="match only Linears that skip or an earlier rule"):
        A.assign_configs(net, A.MixedPrecisionConfig(rules=[("*.mlp.*", INT4), ("*.down_proj", INT8)]))
    with pytest.raises(ValueError, match="needs calibration_data"):
        A.quantize_model(copy.deepcopy(net), A.MixedPrecisionConfig(rules=[("*.mlp.*", A.GPTQConfig())]))


# ------------------------------------------------------------------ sensitivity and budget

@pytest.fixture(scope="module")
def report(net, calib):
    return A.sensitivity_report(net, [INT4, INT8], calib)


def test_sensitivity_ranks_fragile_layer_first(net, calib, report):
    before = {n: p.detach().clone() for n, p in net.state_dict().items()}
    assert report.ranking(0)[0] == FRAGILE
    assert set(report.deltas) == set(A.find_linears(net, ["lm_head"]))
    for n, (d4, d8) in report.deltas.items():
        assert d4 > 0 and d8 < d4, n
    assert report.layer_bytes[FRAGILE][0] < report.layer_bytes[FRAGILE][1] < report.weight_float_bytes[FRAGILE]
    assert FRAGILE in report.table().splitlines()[1]
    # a user metric: KL(float model || this model) of the next-token distributions on held-out ids
    held = batches(3, n=2)
    with torch.no_grad():
        ref_logp = [torch.log_softmax(net(b), -1) for b in held]

    def kl(m):
        with torch.no_grad():
            return float(sum(nn.functional.kl_div(torch.log_softmax(m(b), -1), r, log_target=True,
                                                  reduction="batchmean") for b, r in zip(held, ref_logp)))
    rep2 = A.sensitivity_report(net, [INT4], metric=kl)
    assert rep2.ranking(0)[0] == FRAGILE and rep2.baseline == pytest.approx(0.0, abs=1e-6)
    # the model is left as it was
    for n, p in net.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_budget_chooser_meets_budget(net, report):
    def size_with(cfg):
        m = copy.deepcopy(net)
        res = A.quantize_model(m, cfg)
        return A.model_size_report(m, res)["quantized_bytes"]

    lo = size_with(A.MixedPrecisionConfig(default=INT4))
    hi = size_with(A.MixedPrecisionConfig(default=INT8))
    budget = (lo + hi) // 2
    cfg = A.choose_configs(report, budget)
    chosen = A.assign_configs(net, cfg)
    assert len(chosen) == len(report.deltas)
    assert chosen[FRAGILE] is INT8                                   # most sensitive gets precision
    assert {c.bits for c in chosen.values()} == {4, 8}
    got = size_with(cfg)
    assert got <= budget
    # greedy: no remaining int4 Linear could be upgraded within the budget
    spare = budget - got
    for n, c in chosen.items():
        if c is INT4:
            assert report.layer_bytes[n][1] - report.layer_bytes[n][0] > spare
    assert A.assign_configs(net, A.choose_configs(report, hi + 1)) == {n: INT8 for n in chosen}
    with pytest.raises(ValueError, match="below the smallest size"):
        A.choose_configs(report, lo - 1)
    # None as a candidate keeps a Linear in float
    rep_f = A.SensitivityReport([INT4, None], report.baseline, {n: [d[0], 0.0] for n, d in report.deltas.items()},
                                {n: [b[0], report.weight_float_bytes[n]] for n, b in report.layer_bytes.items()},
                                report.weight_float_bytes, report.float_bytes)
    cfg_f = A.choose_configs(rep_f, lo + report.weight_float_bytes[FRAGILE])
    assert FRAGILE in cfg_f.skip and FRAGILE not in A.assign_configs(net, cfg_f)


# ------------------------------------------------------------------ KV cache

def kv(shape=(2, 3, 11, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 5] *= 6.0          # an outlier channel, as keys often have
    return x


KV_CASES = [(b, gran, gs, sym) for b in (8, 4) for gran, gs in (("token", None), ("group", 32), ("head", None))
            for sym in (False, True)]


@pytest.mark.parametrize("bits,gran,gs,sym", KV_CASES)
def test_kv_round_trip_within_half_scale(bits, gran, gs, sym):
    x = kv()
    q = A.kv_quantize(x, A.KVCacheConfig(bits=bits, granularity=gran, group_size=gs, symmetric=sym))
    err = (q.dequantize() - x).abs()
    assert q.dequantize().shape == x.shape
    assert bool((err <= q.element_scales() * 0.5 * (1 + 1e-5) + 1e-7).all())
    n_scales = {"token": 2 * 3 * 11, "group": 2 * 3 * 11 * 2, "head": 2 * 3}[gran]
    assert q.qt.scales.numel() == n_scales


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_kv_memory_bytes(bits, sym):
    B, Hh, S, D = 2, 3, 20, 64
    store = A.QuantizedKVStore(A.KVCacheConfig(bits=bits, symmetric=sym))
    for layer in range(2):
        store.append(layer, kv((B, Hh, S, D), layer), kv((B, Hh, S, D), layer + 7))
    per_token = D * bits // 8 + 4 + (0 if sym else 1)     # codes + float32 scale (+ uint8 zero)
    assert store.memory_bytes() == 2 * 2 * B * Hh * S * per_token
    assert store.float_bytes() == 2 * 2 * B * Hh * S * D * 4
    ratio = store.float_bytes() / store.memory_bytes()
    ideal = 32 / bits
    assert ideal * 0.8 < ratio < ideal                     # ~4x / ~8x minus the scale overhead
    # a float residual window costs its tokens in float
    res = A.QuantizedKVStore(A.KVCacheConfig(bits=bits, symmetric=sym, residual_length=5))
    res.append(0, kv((B, Hh, S, D)), kv((B, Hh, S, D), 1))
    assert res.memory_bytes() == 2 * B * Hh * ((S - 5) * per_token + 5 * D * 4)


@pytest.mark.parametrize("gran,gs,residual", [("token", None, 0), ("token", None, 3), ("group", 32, 0),
                                               ("group", 32, 3), ("channel", None, 3), ("channel", None, 4)])
def test_kv_append_steps_equals_whole_sequence(gran, gs, residual):
    cfg = A.KVCacheConfig(bits=4, granularity=gran, group_size=gs, residual_length=residual)
    k, v = kv((1, 2, 14, 64), 1), kv((1, 2, 14, 64), 2)
    layer = A.KVLayerCache(cfg)
    pos = 0
    for step in (6, 1, 1, 3, 1, 2):
        k_all, v_all = layer.append(k[:, :, pos:pos + step], v[:, :, pos:pos + step])
        pos += step
        assert k_all.shape == (1, 2, pos, 64) and layer.seq_length() == pos
    nq = 14 // residual * residual if gran == "channel" else 14 - residual   # channel: whole blocks
    for full, got, stream in ((k, k_all, layer.keys), (v, v_all, layer.values)):
        whole = A.kv_quantize(full[:, :, :nq], cfg)
        assert len(stream.blocks) == 1
        assert torch.equal(stream.blocks[0].qt.codes, whole.qt.codes)
        assert torch.equal(stream.blocks[0].qt.scales, whole.qt.scales)
        assert torch.equal(got[:, :, :nq], whole.dequantize())
        assert torch.equal(got[:, :, nq:], full[:, :, nq:])          # the float window is exact


def test_kv_channel_granularity_for_outlier_keys():
    # keys with an outlier channel: per-channel scales over 8-token blocks (KIVI) keep the other
    # channels' error small, where per-token scales are stretched by the outlier
    x = kv((2, 3, 16, 64), 3)
    cfg = A.KVCacheConfig(bits=4, granularity="channel", residual_length=8)
    q = A.kv_quantize(x, cfg)
    assert q.qt.scales.numel() == 2 * 3 * 2 * 64 and q.seq_units == 2
    err = (q.dequantize() - x).abs()
    assert bool((err <= q.element_scales() * 0.5 * (1 + 1e-5) + 1e-7).all())
    tok = A.kv_quantize(x, A.KVCacheConfig(bits=4, granularity="token"))
    assert err.mean() < 0.6 * (tok.dequantize() - x).abs().mean()
    # keys per channel, values per token, in one cache; batch selection keeps both
    both = A.KVCacheConfig(bits=4, granularity="token", key_granularity="channel", residual_length=8)
    layer = A.KVLayerCache(both)
    k_all, v_all = layer.append(x[:, :, :13], x[:, :, :13] + 1)
    assert torch.equal(k_all[:, :, :8], A.kv_quantize(x[:, :, :8], both, "channel").dequantize())
    assert torch.equal(k_all[:, :, 8:], x[:, :, 8:13])                      # 5 float tokens
    assert torch.equal(v_all[:, :, :5], A.kv_quantize(x[:, :, :5] + 1, both).dequantize())
    assert layer.keys.blocks[0].granularity == "channel" and layer.values.blocks[0].granularity == "token"
    layer.select_batch(torch.tensor([1, 1]))
    k2, _ = layer.append(x[[1, 1], :, 13:16], x[[1, 1], :, 13:16] + 1)
    assert torch.equal(k2[:, :, :8], k_all[[1, 1], :, :8])
    assert torch.equal(k2[:, :, 8:], A.kv_quantize(x[[1, 1], :, 8:16], both, "channel").dequantize())


def test_kv_head_granularity_blocks_and_batch_select():
    cfg = A.KVCacheConfig(bits=8, granularity="head")
    layer = A.KVLayerCache(cfg)
    k, v = kv((3, 2, 9, 32), 4), kv((3, 2, 9, 32), 5)
    layer.append(k[:, :, :8], v[:, :, :8])
    k_all, _ = layer.append(k[:, :, 8:], v[:, :, 8:])
    assert torch.equal(k_all[:, :, :8], A.kv_quantize(k[:, :, :8], cfg).dequantize())   # prefill block
    assert len(layer.keys.blocks) == 2
    idx = torch.tensor([2, 0, 0])
    layer.select_batch(idx)
    k_sel, _ = layer.append(k[idx, :, :1], v[idx, :, :1])
    assert torch.equal(k_sel[:, :, :9], k_all[idx])
    assert layer.batch == 3 and layer.seq_length() == 10


def test_kv_bad_input():
    with pytest.raises(ValueError, match="granularity must be one of"):
        A.KVCacheConfig(granularity="row")
    with pytest.raises(ValueError, match="key_granularity must be one of"):
        A.KVCacheConfig(key_granularity="row")
    with pytest.raises(ValueError, match="set residual_length"):
        A.KVCacheConfig(key_granularity="channel")
    with pytest.raises(ValueError, match="whole blocks of residual_length"):
        A.kv_quantize(kv((1, 1, 6, 64)), A.KVCacheConfig(granularity="channel", residual_length=4))
    with pytest.raises(ValueError, match="needs group_size"):
        A.KVCacheConfig(granularity="group")
    with pytest.raises(ValueError, match="only used with granularity='group'"):
        A.KVCacheConfig(group_size=32)
    with pytest.raises(ValueError, match="residual_length"):
        A.KVCacheConfig(residual_length=-1)
    with pytest.raises(ValueError, match="bits must be one of"):
        A.KVCacheConfig(bits=6)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        A.kv_quantize(kv((1, 1, 2, 48)), A.KVCacheConfig(granularity="group", group_size=32))
    with pytest.raises(ValueError, match="4-D tensor"):
        A.QuantizedKVStore().append(0, torch.zeros(2, 64), torch.zeros(2, 64))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bits=5), ValueError, "bits must be one of"),
    (dict(bits=1), ValueError, "bits must be one of"),
    (dict(granularity="group", group_size=24), ValueError, "multiple of 16"),
    (dict(granularity="group", group_size=0), ValueError, "multiple of 16"),
    (dict(residual_length=-1), ValueError, "residual_length must be an int >= 0"),
    (dict(granularity="channel"), ValueError, "set residual_length"),
])
def test_kv_config_rejects_out_of_range(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        A.KVCacheConfig(**kwargs)


def test_kv_config_accepts_3_bits():
    x = kv((1, 2, 5, 64))
    q = A.kv_quantize(x, A.KVCacheConfig(bits=3))
    assert bool(((q.dequantize() - x).abs() <= q.element_scales() * 0.5 * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("args,exc,match", [
    ((None,), TypeError, "config must be a KVCacheConfig, got NoneType"),
    ((A.KVCacheConfig(), "bogus"), ValueError, "granularity must be one of"),
    ((A.KVCacheConfig(), "channel"), ValueError, "needs a KVCacheConfig with residual_length >= 1"),
    ((A.KVCacheConfig(), "group"), ValueError, "needs a KVCacheConfig with group_size"),
    ((A.KVCacheConfig(granularity="group", group_size=128),), ValueError, "does not divide head_dim=64"),
])
def test_kv_quantize_rejects_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        A.kv_quantize(kv((1, 2, 8, 64)), *args)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        A.kv_quantize(kv((1, 2, 8, 64)).double(), A.KVCacheConfig())


def kv_state(layer):
    """What a KVLayerCache holds (copied), for before/after comparisons."""
    meta = [layer.spec, layer.seq_length(), layer.memory_bytes(), layer.float_bytes()]
    tensors = []
    for s in (layer.keys, layer.values):
        meta.append([b.shape for b in s.blocks])
        tensors += [t.clone() for b in s.blocks for t in (b.qt.codes, b.qt.scales, b.qt.zeros) if t is not None]
        tensors.append(torch.empty(0) if s.residual is None else s.residual.clone())
    return meta, tensors


def assert_same_state(a, b):
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def nan_values():
    v = kv((1, 2, 8, 64), 9)
    v[0, 1, 0, 3] = float("nan")   # 8 tokens: some leave the float window and hit quantize
    return kv((1, 2, 8, 64), 8), v


KV_LAYER_CONFIGS = {
    "token": dict(granularity="token"),
    "token-residual": dict(granularity="token", residual_length=3),
    "group": dict(granularity="group", group_size=32),
    "head": dict(granularity="head"),
    "head-residual": dict(granularity="head", residual_length=3),
    "channel-keys": dict(granularity="token", key_granularity="channel", residual_length=4),
}
BAD_APPENDS = {   # (key_states, value_states) after a [1, 2, 5, 64] float32 prefill
    "batch": (lambda: (kv((2, 2, 1, 64)),) * 2, ValueError, r"\(2, 2, 1, 64\).*\(1, 2, 5, 64\)"),
    "batch-heads-swapped": (lambda: (kv((2, 1, 1, 64)),) * 2, ValueError, r"\(2, 1, 1, 64\).*\(1, 2, 5, 64\)"),
    "heads": (lambda: (kv((1, 3, 1, 64)),) * 2, ValueError, "only seq may differ"),
    "head_dim": (lambda: (kv((1, 2, 1, 32)),) * 2, ValueError, "only seq may differ"),
    "value-head_dim": (lambda: (kv((1, 2, 1, 64)), kv((1, 2, 1, 32))), ValueError,
                       r"value_states \(1, 2, 1, 32\).*values \(1, 2, 5, 64\)"),
    "kv-seq": (lambda: (kv((1, 2, 2, 64)), kv((1, 2, 1, 64))), ValueError, "must agree on"),
    "kv-dtype": (lambda: (kv((1, 2, 1, 64)), kv((1, 2, 1, 64)).half()), ValueError, "must agree on"),
    "dtype-change": (lambda: (kv((1, 2, 1, 64)).half(),) * 2, ValueError, "float16.*float32"),
    "float64": (lambda: (kv((1, 2, 1, 64)).double(),) * 2, TypeError, "float32, float16 or bfloat16"),
    "not-tensor": (lambda: ([[0.0]], [[0.0]]), TypeError, "must be a torch tensor"),
    "3-D": (lambda: (torch.zeros(2, 1, 64),) * 2, ValueError, "4-D tensor"),
    "empty-head_dim": (lambda: (torch.zeros(1, 2, 1, 0),) * 2, ValueError, "empty batch, heads or head_dim"),
    "nan-values": (nan_values, ValueError, "NaN"),
}


@pytest.mark.parametrize("bad", list(BAD_APPENDS))
@pytest.mark.parametrize("cfg", list(KV_LAYER_CONFIGS))
def test_kv_failed_append_leaves_cache_unchanged(cfg, bad):
    config = A.KVCacheConfig(bits=4, **KV_LAYER_CONFIGS[cfg])
    make, exc, match = BAD_APPENDS[bad]
    k, v = kv((1, 2, 6, 64), 1), kv((1, 2, 6, 64), 2)
    store, ref = A.QuantizedKVStore(config), A.KVLayerCache(config)
    for layer in (store, ref):
        layer.append(*((0,) if layer is store else ()), k[:, :, :5], v[:, :, :5])
    before = kv_state(store.layers[0])
    with pytest.raises(exc, match=match):
        store.append(0, *make())
    assert_same_state(kv_state(store.layers[0]), before)
    # still usable: the next valid step gives exactly what an undisturbed cache gives
    got, want = store.append(0, k[:, :, 5:], v[:, :, 5:]), ref.append(k[:, :, 5:], v[:, :, 5:])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert store.seq_length() == 6 and store.layers[0].batch == 1 and store.layers[0].heads == 2


def test_kv_failed_append_adds_no_layers():
    store = A.QuantizedKVStore(A.KVCacheConfig())
    with pytest.raises(ValueError, match="must agree on"):
        store.append(2, kv((1, 2, 3, 64)), kv((1, 2, 4, 64)))
    assert store.layers == [] and store.memory_bytes() == 0
    with pytest.raises(TypeError, match="config must be a KVCacheConfig"):
        A.QuantizedKVStore("int8")


@pytest.mark.parametrize("residual", [0, 3])
def test_kv_zero_token_append_is_a_no_op(residual):
    layer = A.KVLayerCache(A.KVCacheConfig(residual_length=residual))
    e = torch.zeros(1, 2, 0, 64)
    k_all, v_all = layer.append(e, e)                  # empty layer: returns the (empty) inputs
    assert k_all.shape == v_all.shape == (1, 2, 0, 64)
    assert layer.seq_length() == 0 and layer.spec is None and layer.float_bytes() == 0
    k, v = kv((3, 4, 5, 64)), kv((3, 4, 5, 64), 1)    # the empty append fixed no shape
    k_all, _ = layer.append(k, v)
    before = kv_state(layer)
    k0, _ = layer.append(torch.zeros(3, 4, 0, 64), torch.zeros(3, 4, 0, 64))
    assert torch.equal(k0, k_all)
    assert_same_state(kv_state(layer), before)
    with pytest.raises(ValueError, match="only seq may differ"):   # still checked against the layer
        layer.append(e, e)


@pytest.mark.parametrize("idx", [[1, 0, 1], (1, 0, 1), torch.tensor([1, 0, 1]), torch.tensor([1, 0, 1], dtype=torch.int32)])
def test_kv_select_batch_accepts_index_sequences(idx):
    k, v = kv((2, 2, 5, 64)), kv((2, 2, 5, 64), 1)
    config = A.KVCacheConfig(residual_length=2)
    layer, ref = A.KVLayerCache(config), A.KVLayerCache(config)
    layer.append(k, v)
    layer.select_batch(idx)
    assert layer.batch == 3
    ref.append(k[[1, 0, 1]], v[[1, 0, 1]])     # per-token codes: selecting first changes nothing
    step = kv((3, 2, 1, 64), 2), kv((3, 2, 1, 64), 3)
    assert all(torch.equal(a, b) for a, b in zip(layer.append(*step), ref.append(*step)))


@pytest.mark.parametrize("idx,exc,match", [
    ([2], ValueError, r"in \[0, 2\) \(this layer's batch size\), got \[2\]"),
    (torch.tensor([0, -1]), ValueError, r"in \[0, 2\)"),
    ([], ValueError, "non-empty 1-D"),
    ([[0, 1]], ValueError, "non-empty 1-D"),
    (torch.tensor([1.0]), TypeError, "must be integers"),
    (torch.tensor([True, False]), TypeError, "must be integers"),
    ("01", TypeError, "1-D integer tensor, list or tuple"),
])
def test_kv_select_batch_bad_indices(idx, exc, match):
    layer = A.KVLayerCache(A.KVCacheConfig(granularity="head", residual_length=2))
    layer.append(kv((2, 2, 5, 64)), kv((2, 2, 5, 64), 1))
    before = kv_state(layer)
    with pytest.raises(exc, match=match):
        layer.select_batch(idx)
    assert_same_state(kv_state(layer), before)


# ------------------------------------------------------------------ transformers integration

@pytest.fixture(scope="module")
def tiny_llama():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                         initializer_range=0.1)
    return tr, tr.LlamaForCausalLM(cfg).eval()


def teacher_forced_logits(model, ids, cache, prefill=12):
    """Last-token logits after the prefill and after each following token, fed one at a time."""
    outs = []
    with torch.no_grad():
        outs.append(model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits[:, -1])
        for t in range(prefill, ids.shape[1]):
            outs.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(outs, 1)


# Tolerances, relative to the float cache's logits over the whole sequence (‖Δ‖/‖ref‖); measured
# on this model: int8 ≈ 5e-3, int4 ≈ 8e-2 (token granularity, no residual window).
KV_TOL = {8: 2e-2, 4: 0.25}


@pytest.mark.parametrize("bits", [8, 4])
def test_hf_cache_logits_close_to_float(tiny_llama, bits):
    tr, model = tiny_llama
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(5))
    ref = teacher_forced_logits(model, ids, tr.DynamicCache(config=model.config))
    cache = A.QuantizedKVCache(A.KVCacheConfig(bits=bits))
    assert isinstance(cache, tr.cache_utils.Cache)
    got = teacher_forced_logits(model, ids, cache)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < KV_TOL[bits]
    assert cache.get_seq_length() == 32
    assert cache.float_bytes() / cache.memory_bytes() > {8: 3.0, 4: 5.0}[bits]   # head_dim 32


def test_hf_generate_with_quantized_cache(tiny_llama):
    tr, model = tiny_llama
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=tr.DynamicCache(config=model.config), **kw)
        cache = A.QuantizedKVCache(A.KVCacheConfig(bits=8, residual_length=4))
        out = model.generate(ids, past_key_values=cache, **kw)
    assert out.sequences.shape == (2, 16)
    assert cache.get_seq_length() == 15
    # first generated step: same context in both, so its logits must agree within the int8 tolerance
    rel = float((out.logits[0] - ref.logits[0]).norm() / ref.logits[0].norm())
    assert rel < KV_TOL[8]
    assert cache.memory_bytes() < cache.float_bytes()
