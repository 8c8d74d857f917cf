"""Quantization algorithms on a tiny synthetic transformer (CPU, float32).

The model has 2 pre-norm decoder blocks (RMSNorm -> q/k/v/o, LayerNorm -> up/down), hidden 96
(ragged with group 64), MLP 192, embeddings of low rank (correlated inputs) and a few outlier
channels in the norm gains (so AWQ/SmoothQuant have something to do)."""
import copy
import math

import numpy as np

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lowbit  # noqa: E402
from lowbit import algorithms as A  # noqa: E402

H, FF, VOCAB, T = 96, 192, 128, 32
torch.set_num_threads(1)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = RMSNorm(H)
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.norm2 = nn.LayerNorm(H)
        self.up = nn.Linear(H, FF)
        self.down = nn.Linear(FF, H)

    def forward(self, x):
        h = self.norm1(x)
        B, L, _ = h.shape
        q, k, v = (m(h).view(B, L, 4, H // 4).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H // 4), -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(B, L, H))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class Tiny(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, H)
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.lm_head = nn.Linear(H, VOCAB)
        with torch.no_grad():
            basis = torch.randn(8, H, generator=g)
            self.embed.weight.copy_(torch.randn(VOCAB, 8, generator=g) @ basis
                                    + 0.1 * torch.randn(VOCAB, H, generator=g))
            for blk in self.layers:
                for m in blk.modules():
                    if isinstance(m, nn.Linear):
                        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                        m.bias.zero_()
                gain = torch.ones(H)
                gain[torch.randperm(H, generator=g)[:4]] = 12.0   # outlier channels
                blk.norm1.weight.copy_(gain)
                blk.norm2.weight.copy_(gain[torch.randperm(H, generator=g)])

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.layers:
            x = blk(x)
        return self.lm_head(x)


def batches(seed, n=8, bs=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bs, T), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return Tiny().eval()


@pytest.fixture(scope="module")
def calib():
    return batches(1)


@pytest.fixture(scope="module")
def fp_inputs(model):
    """Float-model inputs of every decoder Linear on held-out data: name -> [rows, K]."""
    lins = A.find_linears(model, ["lm_head"])
    xs = {n: [] for n in lins}
    hs = [m.register_forward_hook(lambda m, a, o, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
          for n, m in lins.items()]
    with torch.no_grad():
        for b in batches(2, n=4):
            model(b)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def layer_error(model, results, fp_inputs):
    """Mean over Linears of the relative output error ‖x W_effᵀ − x Wᵀ‖² / ‖x Wᵀ‖²."""
    mods = dict(model.named_modules())
    errs = []
    for n, r in results.items():
        x, w = fp_inputs[n], mods[n].weight.detach()
        ref = x @ w.t()
        errs.append(float((x @ r.effective_weight().t() - ref).square().sum() / ref.square().sum()))
    return sum(errs) / len(errs)


_ERRS = {}


def run_algo(model, config, calib):
    m = copy.deepcopy(model)
    res = A.quantize_model(m, config, None if isinstance(config, A.RTNConfig) else calib)
    return m, res


@pytest.fixture(scope="module")
def rtn(model, fp_inputs):
    m, res = run_algo(model, A.RTNConfig(bits=4, group_size=64), None)
    _ERRS["rtn"] = layer_error(model, res, fp_inputs)
    return m, res


# ------------------------------------------------------------------ configs

def test_config_validation():
    with pytest.raises(ValueError, match="bits must be one of"):
        A.GPTQConfig(bits=5)
    with pytest.raises(ValueError, match="multiple of 16"):
        A.RTNConfig(group_size=100)
    with pytest.raises(ValueError, match="percdamp"):
        A.GPTQConfig(percdamp=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        A.SmoothQuantConfig(alpha=1.5)
    with pytest.raises(TypeError, match="list of name patterns"):
        A.AWQConfig(skip="lm_head")
    with pytest.raises(ValueError, match="min_clip"):
        A.AWQConfig(min_clip=0.0)
    for bad in ("duo", 1, None):
        with pytest.raises(ValueError, match="duo_scaling"):
            A.AWQConfig(duo_scaling=bad)
    for cls in (A.GPTQConfig, A.AWQConfig, A.SmoothQuantConfig):
        for bad in (0, -1.0, True, "2"):
            with pytest.raises((ValueError, TypeError), match="lockstep_max_gib"):
                cls(lockstep_max_gib=bad)
    with pytest.raises(ValueError, match="act_bits must be 8 or None"):
        A.QATConfig(act_bits=4)
    with pytest.raises(ValueError, match="needs calibration_data"):
        A.quantize_model(Tiny(), A.GPTQConfig())
    with pytest.raises(TypeError, match="config must be"):
        A.quantize_model(Tiny(), "gptq")
    # field types: a string for a bool would count as True; 8.0 act_bits or a float grid size
    # would fail later, inside the kernels or torch
    for make, msg in [(lambda: A.GPTQConfig(act_order="no"), "GPTQConfig.act_order must be True or False"),
                      (lambda: A.AWQConfig(fold="no"), "AWQConfig.fold must be True or False"),
                      (lambda: A.SmoothQuantConfig(act_bits=8.0), "act_bits must be an int or None"),
                      (lambda: A.QATConfig(act_bits=8.0), "act_bits must be an int or None"),
                      (lambda: A.AWQConfig(n_grid=2.5), "AWQConfig.n_grid must be an int"),
                      (lambda: A.GPTQConfig(percdamp=float("nan")), "percdamp must be a finite number"),
                      (lambda: A.KVCacheConfig(residual_length=1.5), "residual_length must be an int")]:
        with pytest.raises(TypeError, match=msg):
            make()
    for make in (lambda: A.AWQConfig(max_tokens=0), lambda: A.GPTQConfig(awq_scales=True, awq_max_tokens=0)):
        with pytest.raises(ValueError, match="max_tokens must be >= 1"):
            make()
    mixed = A.MixedPrecisionConfig(default=A.RTNConfig(group_size=32))
    with pytest.raises(ValueError, match="apply must be"):
        A.quantize_model(Tiny(), mixed, apply="bogus")


def test_calibration_rejects_nan_inputs(model):
    bad = [torch.full((1, T), 3)]
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.layers[0].norm2.weight[5] = float("nan")      # the MLP's input goes NaN
    for cfg in (A.GPTQConfig(group_size=32), A.AWQConfig(group_size=32), A.SmoothQuantConfig()):
        with pytest.raises(ValueError, match=r"calibration input of layers\.0\.up contains NaN or Inf"):
            A.quantize_model(copy.deepcopy(m), cfg, bad)


class SharedBlock(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.n = nn.LayerNorm(H)
        self.a = lin

    def forward(self, x):
        return x + self.a(self.n(x))


class SharedModel(nn.Module):
    """ALBERT-style: one Linear runs in both blocks, after a different norm in each."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        lin = nn.Linear(H, H)
        self.layers = nn.ModuleList([SharedBlock(lin), SharedBlock(lin)])
        with torch.no_grad():
            for blk in self.layers:
                blk.n.weight.copy_(1 + torch.rand(H, generator=g) * 4)

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return x


@pytest.mark.parametrize("cfg", [A.SmoothQuantConfig(), A.AWQConfig(group_size=32)], ids=["smoothquant", "awq"])
def test_no_fold_into_a_norm_when_the_linear_is_shared(cfg):
    # folding 1/s into block 0's norm would leave block 1's input to the same Linear undivided
    torch.manual_seed(0)
    m = SharedModel().eval()
    x = [torch.randn(4, 8, H) * 3 for _ in range(2)]
    with torch.no_grad():
        ref = m(x[0])
        res = A.quantize_model(m, cfg, x)
        err = float((m(x[0]) - ref).norm() / ref.norm())
    assert not any(r.scale_folded for r in res.values())
    assert err < 0.05, err


# ------------------------------------------------------------------ observers

def test_observers_ranges_and_params():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 96, generator=g)
    w[3, 5] = 40.0                                       # an outlier
    mm = A.MinMaxObserver(4, False, "group", 64).update(w)
    pc = A.PercentileObserver(4, False, "group", 64, percentile=99.0).update(w)
    lo, hi = mm.range()
    plo, phi = pc.range()
    assert lo.shape == (32, 2) and torch.all(plo >= lo) and torch.all(phi <= hi)
    # min-max parameters are exactly lowbit's own for the same groups
    s, z = mm.qparams()
    ref = lowbit.quantize(w, 4, 64, False)
    assert torch.equal(s, ref.scales) and torch.equal(z, ref.zeros)
    assert torch.equal(mm.quantize(w).codes, ref.codes)
    # MSE clip search: ratios <= 1, error <= min-max error per group, range inside min-max
    mse = A.MSEObserver(4, False, "group", 64, n_grid=10).update(w)
    e_mse = (lowbit.dequantize(mse.quantize(w)) - w).square().sum()
    e_mm = (lowbit.dequantize(ref) - w).square().sum()
    assert torch.all(mse.best_ratio <= 1.0) and (mse.best_ratio < 1.0).any()
    assert float(e_mse) < float(e_mm)
    mlo, mhi = mse.range()
    assert torch.all(mhi <= hi + 1e-6) and torch.all(mlo >= lo - 1e-6)
    # per-tensor / per-token streaming and moving average
    t = A.MinMaxObserver(8, True, "tensor")
    ma = A.MovingAverageMinMaxObserver(8, True, "tensor", momentum=0.5)
    for k in range(3):
        x = torch.randn(16, 96, generator=g) * (k + 1)
        t.update(x)
        ma.update(x)
    assert float(ma.range()[1]) <= float(t.range()[1]) and float(ma.range()[0]) >= float(t.range()[0])
    tok = A.MinMaxObserver(8, True, "token").update(x)
    assert torch.equal(tok.quantize(x).codes, lowbit.quantize(x, 8, None, True).codes)
    with pytest.raises(ValueError, match="granularity"):
        A.MinMaxObserver(8, True, "row")


def test_calibration_hooks_hessian(model, calib):
    lin = model.layers[0].q
    xs = []
    h = lin.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, H)))
    stats = A.collect_stats(model, {"q": lin}, calib[:3], hessian=True)["q"]
    h.remove()
    X = torch.cat(xs)
    assert stats.n == X.shape[0]
    torch.testing.assert_close(stats.hessian, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.abs_mean, X.abs().mean(0))
    torch.testing.assert_close(stats.abs_max, X.abs().amax(0))


@pytest.mark.parametrize("K", [7, 1023, 1024, 1537])
@pytest.mark.parametrize("panels", [False, True], ids=["cpu_kernel", "torch_panels"])
def test_add_gram_matches_full_product(K, panels):
    # the upper-triangle update (lowbit's kernel on the CPU, torch's row panels on other devices)
    # then the mirror must equal xᵀx up to float summation, and be exactly symmetric
    g = torch.Generator().manual_seed(K)
    x = torch.randn(65, K, generator=g)
    h0 = torch.randn(K, K, generator=g)
    h0 = h0 + h0.t()
    h = h0.clone()
    if panels:
        A.observers.symmetrize_(A.observers.add_gram_panels_(h, x))
    else:
        A.observers.add_gram_(h, x)
    torch.testing.assert_close(h, h0 + x.t() @ x, rtol=1e-5, atol=1e-4)
    assert torch.equal(h, h.t())


@pytest.mark.parametrize("K", [1, 5, 16, 17, 33, 100, 1030])
def test_gram_update_matches_float64_product(isa, K):
    # every tile shape and edge: K not a multiple of any tile, m across the 256-row chunks
    from conftest import is_slow, seed_for
    rng = np.random.default_rng(seed_for("gram", isa, K))
    for m in ([1, 3, 257] if is_slow(isa) and K > 100 else [1, 3, 255, 257, 600]):
        x = rng.standard_normal((m, K)).astype(np.float32)
        x[:, K // 2] *= 50.0                                    # an outlier channel
        h0 = rng.standard_normal((K, K)).astype(np.float32)
        h = h0.copy()
        lowbit.ops.gram_update(h, x)
        want = h0.astype(np.float64) + x.astype(np.float64).T @ x.astype(np.float64)
        # float32 sums of m products: error bound by m · eps · Σ|x_i x_j| (plus h0's rounding)
        bound = (m * 2.0**-23) * (np.abs(x).astype(np.float64).T @ np.abs(x)) + 2.0**-23 * np.abs(want) + 1e-6
        up = np.triu_indices(K)
        assert np.all(np.abs(h.astype(np.float64) - want)[up] <= bound[up]), (isa, K, m)


def test_gram_update_same_bits_for_any_thread_count(restore_threads):
    x = torch.randn(700, 300)
    out = []
    for n in (1, 2, 3):
        lowbit.set_num_threads(n)
        h = torch.zeros(300, 300)
        lowbit.ops.gram_update(h, x)
        out.append(torch.triu(h))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_gram_update_bad_input():
    op = lowbit.ops.gram_update
    x, h = torch.randn(8, 6), torch.zeros(6, 6)
    with pytest.raises(TypeError, match="x must be float32"):
        op(h, x.double())
    with pytest.raises(TypeError, match="h must be float32"):
        op(h.double(), x)
    with pytest.raises(ValueError, match=r"h must have shape \(6,6,\)"):
        op(torch.zeros(5, 5), x)
    with pytest.raises(ValueError, match="contiguous rows"):
        op(torch.zeros(8, 8), x.t())
    with pytest.raises(ValueError, match="contiguous rows"):
        op(h, x.reshape(-1))
    with pytest.raises(ValueError, match="no columns"):
        op(torch.zeros(0, 0), torch.zeros(3, 0))
    hb = h.clone()
    op(hb, x[:0])                                           # no rows: nothing to add
    assert torch.equal(hb, h)
    with pytest.raises(ValueError, match="read-only|writable"):
        ro = np.zeros((6, 6), np.float32)
        ro.flags.writeable = False
        op(ro, x.numpy())


def test_calibration_hooks_share_stats_of_a_shared_input(model, calib):
    """q/k/v read one tensor: one LinearStats (computed once per batch) serves all three."""
    blk = model.layers[1]
    lins = {"q": blk.q, "k": blk.k, "v": blk.v, "o": blk.o}
    stats = A.collect_stats(model, lins, calib[:3], hessian=True)
    assert stats["q"] is stats["k"] is stats["v"] and stats["o"] is not stats["q"]
    alone = A.collect_stats(model, {"v": blk.v}, calib[:3], hessian=True)["v"]
    assert stats["v"].n == alone.n
    torch.testing.assert_close(stats["v"].hessian, alone.hessian)


# ------------------------------------------------------------------ algorithms

def test_rtn_is_lowbit_quantize(model, rtn):
    m, res = rtn
    assert "lm_head" not in res and len(res) == 12
    w = model.layers[1].down.weight.detach()
    assert torch.equal(res["layers.1.down"].qt.codes, lowbit.quantize(w, 4, 64, False).codes)
    torch.testing.assert_close(m.layers[1].down.weight.detach(), lowbit.dequantize(res["layers.1.down"].qt))


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_beats_rtn(model, calib, fp_inputs, rtn, act_order, static):
    cfg = A.GPTQConfig(bits=4, group_size=64, act_order=act_order, static_groups=static)
    m, res = run_algo(model, cfg, calib)
    err = layer_error(model, res, fp_inputs)
    _ERRS[f"gptq act_order={act_order} static={static}"] = err
    assert err < 0.8 * _ERRS["rtn"], (err, _ERRS["rtn"])
    r = res["layers.0.up"]
    if act_order and not static:
        assert r.perm is not None and r.g_idx.shape == (H,)
        assert sorted(r.perm.tolist()) == list(range(H))
        assert int(r.g_idx.max()) == 1       # K=96, group 64: two groups, the second ragged
    else:
        assert r.perm is None
    # the simulated model carries exactly the dequantized weights
    torch.testing.assert_close(m.layers[0].up.weight.detach(), r.weight())


@pytest.mark.parametrize("sequential,true_sequential", [(True, False), (False, True)])
def test_gptq_one_calibration_pass_per_block_or_model(model, calib, fp_inputs, rtn, sequential,
                                                      true_sequential):
    cfg = A.GPTQConfig(bits=4, group_size=64, sequential=sequential, true_sequential=true_sequential)
    calls, head_calls = [], []
    hooks = [blk.register_forward_pre_hook(lambda *a: calls.append(1)) for blk in model.layers]
    hooks.append(model.lm_head.register_forward_pre_hook(lambda *a: head_calls.append(1)))
    try:
        m, res = run_algo(model, cfg, calib)
    finally:
        for h in hooks:
            h.remove()
    assert len(res) == 12 and layer_error(model, res, fp_inputs) < 0.8 * _ERRS["rtn"]
    assert not head_calls        # forwards stop after the last calibrated Linear: no lm_head
    # block calls per batch. sequential: input capture + one calibration pass + the output pass
    # per block (+ one probe per block, on the first batch only); else one float-model forward
    per_batch = len(calls) / len(calib)
    L = len(model.layers)
    assert per_batch == (3 * L + L / len(calib) if sequential else L), per_batch


def _count_block_calls(model, config, calib):
    calls = []
    hooks = [blk.register_forward_pre_hook(lambda *a: calls.append(1)) for blk in model.layers]
    try:
        m, res = run_algo(model, config, calib)
    finally:
        for h in hooks:
            h.remove()
    return m, res, len(calls)


@pytest.mark.parametrize("config", [
    A.GPTQConfig(bits=4, group_size=64, act_order=True),
    A.AWQConfig(bits=4, group_size=64),                        # folds scales into the norms
    A.SmoothQuantConfig(alpha=0.5, search_alpha=True),          # folds + simulated act rounding
], ids=["gptq", "awq", "smoothquant"])
def test_lockstep_equals_streaming_with_one_forward_per_batch(model, config):
    """lockstep: each block runs once per batch, the batches paused at every stage until it is
    quantized. Same stages on the same inputs as streaming true-sequential (batches of different
    shapes included; a fold recomputes the stage input with the folded norm): the same result."""
    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, VOCAB, shape, generator=g) for shape in ((2, T), (3, T // 2), (1, T))]
    L, n, stages = len(model.layers), len(calib), 4
    m1, locked, calls = _count_block_calls(model, config, calib)
    # per block: input capture (n stub calls), the probe, one forward per batch
    assert calls == L * n + L + L * n, calls
    cfg = copy.deepcopy(config)
    cfg.lockstep = False
    m2, streamed, calls = _count_block_calls(model, cfg, calib)
    # streaming: capture, probe, one forward per stage (each cut after its stage) and the output pass
    assert calls == L * n + L + L * n * (stages + 1), calls
    assert locked.keys() == streamed.keys()
    for name in locked:
        a, b = locked[name], streamed[name]
        assert a.scale_folded == b.scale_folded
        assert torch.equal(a.qt.codes, b.qt.codes) and torch.equal(a.qt.scales, b.qt.scales), name
    ids = batches(5, n=1)[0]
    with torch.no_grad():
        assert torch.equal(m1(ids), m2(ids))


def test_lockstep_error_reaches_the_caller(model, calib):
    m = copy.deepcopy(model)

    def failing(stage):
        raise ValueError("stage failed on purpose")

    with pytest.raises(ValueError, match="on purpose"):
        A.sequential.quantize_sequential(m, calib, A.find_linears(m, ["lm_head"]), failing)
    assert all(not lin._forward_pre_hooks for lin in A.find_linears(m).values())


@pytest.mark.parametrize("lockstep", [True, False])
def test_calibration_collects_only_what_is_asked(model, calib, lockstep):
    """GPTQ without AWQ scales needs the Hessian only: no |x| statistics are gathered for it."""
    seen = []

    def record(stage):
        st = stage.stats[stage.names[0]]
        seen.append((st.hessian is not None, st.abs_sum is None and st.abs_max is None))
        return {}

    m = copy.deepcopy(model)
    A.sequential.quantize_sequential(m, calib, A.find_linears(m, ["lm_head"]), record, hessian=True,
                                     abs_stats=False, lockstep=lockstep)
    assert seen and all(h and no_abs for h, no_abs in seen)


def test_lockstep_without_greenlet_streams(model, calib, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_greenlet(name, *args, **kwargs):
        if name == "greenlet":
            raise ImportError("no greenlet here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_greenlet)
    cfg = A.GPTQConfig(bits=4, group_size=64)
    with pytest.warns(RuntimeWarning, match="greenlet"):
        m, res, calls = _count_block_calls(model, cfg, calib)
    monkeypatch.undo()
    L, n = len(model.layers), len(calib)
    assert calls == L * n + L + L * n * 5, calls      # the streaming count: 4 stages + output pass
    assert all(torch.equal(res[k].qt.codes, v.qt.codes) for k, v in run_algo(model, cfg, calib)[1].items())


def test_gptq_hessian_weighted_clip_beats_rtn_and_stays_on_grid(model, calib, fp_inputs, rtn):
    cfg = A.GPTQConfig(bits=3, group_size=64, act_order=True, clip_search=True, n_clip_grid=8,
                       clip_hessian_weighted=True)
    m, res = run_algo(model, cfg, calib)
    rtn3 = run_algo(model, A.RTNConfig(bits=3, group_size=64), None)[1]
    assert layer_error(model, res, fp_inputs) < 0.8 * layer_error(model, rtn3, fp_inputs)
    plain = run_algo(model, A.GPTQConfig(bits=3, group_size=64, act_order=True, clip_search=True,
                                         n_clip_grid=8), calib)[1]
    assert any(not torch.equal(res[k].qt.scales, plain[k].qt.scales) for k in res)  # the weights act
    for r in res.values():  # in the stored (act-order) column order, the values sit on the grid
        w = lowbit.dequantize(r.qt)
        assert torch.equal(lowbit.quantize(w.contiguous(), 3, 64, scales=r.qt.scales, zeros=r.qt.zeros).codes,
                           r.qt.codes)
    for bad in (dict(clip_search=False), dict(clip_search=True, static_groups=True),
                dict(clip_search=True, group_size=None)):
        with pytest.raises(ValueError, match="clip_hessian_weighted"):
            A.GPTQConfig(clip_hessian_weighted=True, **bad)


def test_lockstep_over_its_memory_limit_streams(model, calib):
    """A block whose parked activations would not fit in lockstep_max_gib streams instead (with a
    warning), with the same codes; a generous limit keeps lockstep."""
    L, n = len(model.layers), len(calib)
    cfg = A.GPTQConfig(bits=4, group_size=64, lockstep_max_gib=1e-6)
    with pytest.warns(RuntimeWarning, match="lockstep calibration of layers.0 would hold"):
        _, small, calls = _count_block_calls(model, cfg, calib)
    assert calls == L * n + L + L * n * 5, calls      # streaming: 4 stages + output pass
    cfg.lockstep_max_gib = 1.0
    _, big, calls = _count_block_calls(model, cfg, calib)
    assert calls == L * n + L + L * n, calls          # lockstep: one forward per batch
    assert all(torch.equal(big[k].qt.codes, v.qt.codes) for k, v in small.items())


def test_lockstep_memory_bound_covers_the_block_outputs(model, calib):
    """The probe's bound counts every tensor the block's leaves make: at least the Linears'
    outputs, scaled to each batch's tokens."""
    blocks = A.sequential.find_blocks(model)
    firsts, _ = A.sequential._capture_inputs(model, blocks, calib)
    prefix, block = blocks[0]
    lins = {n: m for n, m in A.find_linears(model, ["lm_head"]).items() if n.startswith(prefix + ".")}
    _, per_batch = A.sequential._probe(block, prefix, lins, firsts[0])
    tokens = firsts[0][0][0].shape[:-1].numel() if firsts[0][0] else None
    assert per_batch >= 4 * tokens * sum(m.out_features for m in lins.values())
    fits, need, limit = A.sequential._lockstep_fits(per_batch, firsts, 1e-6)
    assert not fits and need == per_batch * len(firsts) and limit == int(1e-6 * 2**30)


def test_gptq_clip_search_beats_rtn_and_stays_on_grid(model, calib, fp_inputs, rtn):
    cfg = A.GPTQConfig(bits=3, group_size=64, clip_search=True, n_clip_grid=8)
    m, res = run_algo(model, cfg, calib)
    rtn3 = run_algo(model, A.RTNConfig(bits=3, group_size=64), None)[1]
    assert layer_error(model, res, fp_inputs) < 0.8 * layer_error(model, rtn3, fp_inputs)
    r = res["layers.1.down"]
    # the stored codes reproduce the weights the simulated model runs with
    torch.testing.assert_close(m.layers[1].down.weight.detach(), r.weight())
    assert torch.equal(lowbit.quantize(r.weight().contiguous(), 3, 64, scales=r.qt.scales,
                                       zeros=r.qt.zeros).codes, r.qt.codes)


def test_gptq_with_awq_scales(model, calib, fp_inputs, rtn):
    cfg = A.GPTQConfig(bits=4, group_size=64, act_order=True, awq_scales=True, awq_max_tokens=512)
    m, res = run_algo(model, cfg, calib)
    err = layer_error(model, res, fp_inputs)
    _ERRS["gptq + awq scales"] = err
    assert err < 0.8 * _ERRS["rtn"], (err, _ERRS["rtn"])
    r = res["layers.1.k"]
    assert r.input_scale is not None and r.scale_folded and r.perm is not None
    # folded into norm1: the simulated model sees x/s and multiplies by the stored weight
    torch.testing.assert_close(m.layers[1].k.weight.detach(), r.weight())


def _reference_gptq_columns(w, u, begin, end, s, z, bits, sym):
    """The column loop in plain torch, rounding each column with lowbit.fake_quantize."""
    w, q, e = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
    for i in range(begin, end):
        si = s if s.dim() == 1 else s[i - begin]
        zi = None if z is None else (z if z.dim() == 1 else z[i - begin])
        q[i] = lowbit.fake_quantize(w[i].view(-1, 1), bits, None, sym, scales=si.view(-1, 1),
                                    zeros=None if zi is None else zi.view(-1, 1))[:, 0]
        e[i] = (w[i] - q[i]) / u[i, i]
        w[i + 1:] -= u[i, i + 1:, None] * e[i][None, :]
    return w, q, e


@pytest.mark.parametrize("bits,sym,per_column,N", [(4, False, False, 37), (3, True, False, 300),
                                                   (8, True, True, 5), (2, False, True, 513)])
def test_gptq_columns_matches_reference(bits, sym, per_column, N):
    g = torch.Generator().manual_seed(bits * 1000 + N)
    B, begin, end = 24, 3, 19
    w = torch.randn(B, N, generator=g)
    a = torch.randn(B, B, generator=g)
    u = torch.linalg.cholesky(a @ a.t() + B * torch.eye(B), upper=True).contiguous()
    shape = (end - begin, N) if per_column else (N,)
    s = torch.rand(shape, generator=g) * 0.5 + 0.01
    z = None if sym else torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    want = _reference_gptq_columns(w, u, begin, end, s, z, bits, sym)
    got_w, q, e = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
    lowbit.ops.gptq_columns(got_w, q, e, u, begin, end, s, z, bits, sym)
    assert torch.equal(got_w, want[0])
    assert torch.equal(q[begin:end], want[1][begin:end]) and torch.equal(e[begin:end], want[2][begin:end])


def _reference_clip_search(w, bits, gs, sym, ratios, col_weight=None):
    """The search spelled out with lowbit.quantize / dequantize per ratio (numpy float64 errors)."""
    K = w.shape[1]
    g = K if gs is None else (w.numel() if gs == "tensor" else gs)
    flat = w.reshape(1, -1) if gs == "tensor" else w
    best = None
    for c in ratios:
        qt = lowbit.quantize(w, bits, gs, sym, clip_ratio=c)
        d = (w - lowbit.dequantize(qt)).double().square()
        if col_weight is not None:
            d = d * col_weight.double()
        d = d.reshape(flat.shape)
        err = torch.stack([d[:, j:j + g].sum(1) for j in range(0, flat.shape[1], g)], 1)
        s, z = qt.scales, qt.zeros
        if best is None:
            best = [err, s, z, torch.full_like(err, c)]
            continue
        b = err < best[0]
        best = [torch.where(b, err, best[0]), torch.where(b, s, best[1]),
                None if z is None else torch.where(b, z, best[2]), torch.where(b, torch.full_like(err, c), best[3])]
    return best


@pytest.mark.parametrize("bits,gs,sym,weighted", [(4, 128, False, False), (3, 64, True, True),
                                                  (4, None, False, True), (8, 32, True, False),
                                                  (2, "tensor", False, False)])
def test_clip_search_matches_quantize_round_trips(bits, gs, sym, weighted):
    # the C++ search picks the ratio the spelled-out search picks (its float32 error sums may break
    # an exact tie differently: the chosen error must then equal the best to rounding)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 300, generator=g)
    w[2, 7] = 25.0  # an outlier: clipping pays
    cw = torch.rand(300, generator=g) if weighted else None
    ratios = torch.linspace(1.0, 0.5, 12).tolist()
    s, z, r = lowbit.ops.clip_search(w, bits, gs, sym, ratios, cw)
    err, s_ref, z_ref, r_ref = _reference_clip_search(w, bits, gs, sym, ratios, cw)
    same = r == r_ref
    assert same.float().mean() > 0.98 and (bits == 8 or (r < 1).any())  # clipping pays at low bits
    assert torch.equal(s[same], s_ref[same]) and (z is None or torch.equal(z[same], z_ref[same]))
    # the chosen parameters quantize like lowbit.quantize with them, and their error is the least
    qt = lowbit.quantize(w, bits, gs, sym, scales=s, zeros=z)
    d = (w - lowbit.dequantize(qt)).double().square() * (1 if cw is None else cw.double())
    flat_d = d.reshape(1, -1) if gs == "tensor" else d
    step = flat_d.shape[1] if gs in (None, "tensor") else gs
    got = torch.stack([flat_d[:, j:j + step].sum(1) for j in range(0, flat_d.shape[1], step)], 1)
    assert torch.all(got <= err * (1 + 1e-5) + 1e-12)
    # numpy in, numpy out
    sn, zn, rn = lowbit.ops.clip_search(w.numpy(), bits, gs, sym, ratios, None if cw is None else cw.numpy())
    assert isinstance(sn, np.ndarray) and np.array_equal(rn, r.numpy())


def test_clip_search_bad_input():
    w = torch.randn(8, 64)
    op = lowbit.ops.clip_search
    with pytest.raises(ValueError, match="clip ratios must be in"):
        op(w, 4, 32, False, [1.0, 0.0])
    with pytest.raises(ValueError, match="no clip ratios"):
        op(w, 4, 32, False, [])
    with pytest.raises(ValueError, match="shape"):
        op(w, 4, 32, False, [1.0], torch.ones(63))
    with pytest.raises(ValueError, match="column weights"):
        op(w, 4, 32, False, [1.0], -torch.ones(64))
    bad = w.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        op(bad, 4, 32, False, [1.0])
    with pytest.raises(ValueError, match="empty"):
        op(w[:0], 4, 32, False, [1.0])


def test_gptq_columns_bad_input():
    B, N = 8, 16
    w, q, e = torch.randn(B, N), torch.zeros(B, N), torch.zeros(B, N)
    u, s, z = torch.eye(B), torch.ones(N), torch.zeros(N, dtype=torch.uint8)
    op = lowbit.ops.gptq_columns
    with pytest.raises(TypeError, match="float32"):
        op(w.double(), q, e, u, 0, B, s, z, 4, False)
    with pytest.raises(ValueError, match="shape"):
        op(w, q[:, :3], e, u, 0, B, s, z, 4, False)
    with pytest.raises(ValueError, match="inside the block"):
        op(w, q, e, u, 5, 5, s, z, 4, False)
    with pytest.raises(ValueError, match="only used by asymmetric"):
        op(w, q, e, u, 0, B, s, z, 4, True)
    with pytest.raises(ValueError, match="scales must be finite"):
        op(w, q, e, u, 0, B, -s, z, 4, False)
    with pytest.raises(ValueError, match="diagonal must be positive"):
        op(w, q, e, torch.zeros(B, B), 0, B, s, z, 4, False)
    with pytest.raises(ValueError, match="bits must be one of"):
        op(w, q, e, u, 0, B, s, z, 5, False)
    bad = w.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        op(bad, q, e, u, 0, B, s, z, 4, False)


def test_gptq_dead_columns_and_per_channel():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(256, 80, generator=g)
    X[:, 7] = 0.0                                        # a dead input
    W = torch.randn(24, 80, generator=g)
    Hs = 2 * X.t() @ X / 256
    for gs in (None, 32):
        r = A.gptq_quantize_weight(W, Hs, A.GPTQConfig(bits=4, group_size=gs, symmetric=True))
        wq = r.effective_weight()
        assert torch.all(wq[:, 7] == 0)
        rtn = lowbit.dequantize(lowbit.quantize(W, 4, gs, True))
        assert (X @ (wq - W).t()).square().sum() < (X @ (rtn - W).t()).square().sum()


def test_progress_reports_each_block(model, calib, capsys, monkeypatch):
    """progress=True: one step per decoder block and one for the Linears outside them (lm_head
    here), on stderr; progress=False (and None off a terminal) prints nothing."""
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *a, **k):         # the plain fallback, whatever is installed
        if name == "tqdm":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    A.quantize_model(copy.deepcopy(model), A.GPTQConfig(bits=4, group_size=64, skip=()), calib[:2],
                     progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    n = len(model.layers)
    assert lines == [f"lowbit GPTQ [{i + 1}/{n + 1}] layers.{i}" for i in range(n)] + \
        [f"lowbit GPTQ [{n + 1}/{n + 1}] 1 Linears outside the blocks"], lines
    for progress in (False, None):
        A.quantize_model(copy.deepcopy(model), A.AWQConfig(bits=4, group_size=64), calib[:2],
                         progress=progress)
        assert capsys.readouterr().err == ""


def test_awq_duo_scaling_search():
    """'both' searches the activation-only and the duo family and keeps the least output error;
    the weight term is each weight's |w| relative to its group max, averaged over output rows
    (a ragged last group included)."""
    from lowbit.algorithms.awq import search_scales, weight_magnitude
    g = torch.Generator().manual_seed(3)
    K = 80                                    # groups of 32: the last one is 16 wide
    x = torch.randn(300, K, generator=g) * torch.linspace(0.1, 4.0, K)
    ws = {"a": torch.randn(24, K, generator=g), "b": torch.randn(8, K, generator=g)}
    wcat = torch.cat(list(ws.values())).abs()
    ref = torch.cat([wcat[:, i:i + 32] / wcat[:, i:i + 32].amax(1, keepdim=True)
                     for i in range(0, K, 32)], 1).mean(0)
    torch.testing.assert_close(weight_magnitude(ws, 32), ref)
    found = {}
    for duo in (False, True, "both"):
        cfg = A.AWQConfig(bits=4, group_size=32, n_grid=8, duo_scaling=duo)
        s, (alpha, used), errors = search_scales(x, x.abs().mean(0), ws, cfg)
        assert len(errors) == (16 if duo == "both" else 8)
        assert {d for _, d in errors} == ({False, True} if duo == "both" else {duo})
        assert errors[(alpha, used)] == min(errors.values())
        assert torch.all(s > 0) and s.shape == (K,)
        found[duo] = errors[(alpha, used)]
    assert found["both"] == min(found[False], found[True])


def test_awq_beats_rtn_and_folds(model, calib, fp_inputs, rtn):
    m, res = run_algo(model, A.AWQConfig(bits=4, group_size=64), calib)
    err = layer_error(model, res, fp_inputs)
    _ERRS["awq"] = err
    assert err < 0.9 * _ERRS["rtn"], (err, _ERRS["rtn"])
    # q/k/v read RMSNorm output: folded into the norm; o/down read functional outputs: input scale
    assert res["layers.0.q"].scale_folded and res["layers.0.up"].scale_folded
    assert not res["layers.0.o"].scale_folded and not res["layers.0.down"].scale_folded
    # the applied model equals the float model with effective weights (folding is exact)
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for n, r in res.items():
            mods[n].weight.copy_(r.effective_weight())
        b = batches(5, n=1)[0]
        torch.testing.assert_close(m(b), ref(b), rtol=1e-3, atol=1e-3)


def test_smoothquant_reduces_w8a8_error(model, calib, fp_inputs):
    b = batches(4, n=2)
    with torch.no_grad():
        y_fp = torch.cat([model(x) for x in b])

    def model_err(m):
        with torch.no_grad():
            return float((torch.cat([m(x) for x in b]) - y_fp).square().mean())

    plain = copy.deepcopy(model)
    lins = A.find_linears(plain, ["lm_head"])
    A.apply_simulated(plain, {n: A.LayerResult(lowbit.quantize(l.weight.detach(), 8, None, True), act_bits=8)
                              for n, l in lins.items()})
    smooth, res = run_algo(model, A.SmoothQuantConfig(alpha=0.5), calib)
    e_plain, e_smooth = model_err(plain), model_err(smooth)
    _ERRS["w8a8 no smoothing (model out mse)"] = e_plain
    _ERRS["w8a8 smoothquant (model out mse)"] = e_smooth
    assert e_smooth < 0.7 * e_plain, (e_smooth, e_plain)
    assert res["layers.1.k"].scale_folded and res["layers.1.k"].qt.bits == 8
    searched, res_s = run_algo(model, A.SmoothQuantConfig(alpha=0.5, search_alpha=True, n_grid=5), calib)
    e_search = model_err(searched)
    _ERRS["w8a8 smoothquant alpha search (model out mse)"] = e_search
    assert e_search < 0.7 * e_plain, (e_search, e_plain)
    # the searched α minimizes the calibration-row error among its candidates, α = 0.5 included
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(5)) * 3
    ws = [l.weight.detach() for l in (model.layers[0].q, model.layers[0].k)]
    cfg = A.SmoothQuantConfig(alpha=0.5, search_alpha=True, n_grid=5)
    from lowbit.algorithms.sequential import Stage
    from lowbit.algorithms.smoothquant import choose_alpha, smooth_scales, w8a8_error
    st = Stage(["q", "k"], {}, x=x)
    amax = x.abs().amax(0)
    best = choose_alpha(st, amax, ws, cfg)
    errs = [w8a8_error(x, ws, smooth_scales(amax, ws, a), cfg) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert w8a8_error(x, ws, smooth_scales(amax, ws, best), cfg) == min(errs)


@pytest.mark.parametrize("learnable", [False, True])
def test_qat_convert_matches_fake_quant(model, calib, learnable):
    m = copy.deepcopy(model)
    cfg = A.QATConfig(bits=4, group_size=64, act_bits=8, learnable_scales=learnable)
    A.prepare_qat(m, cfg)
    assert isinstance(m.layers[0].q, A.QATLinear) and not isinstance(m.lm_head, A.QATLinear)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    with torch.no_grad():
        targets = [model(x) for x in calib[:4]]
    losses = []
    for step in range(6):
        x, y = calib[step % 4], targets[step % 4]
        loss = (m(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        if learnable and step == 0:
            assert m.layers[0].q.scales.grad.abs().sum() > 0
        assert m.layers[0].q.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        x = batches(6, n=1)[0]
        y_fake = m(x)
        res = A.convert(m)
        y_conv = m(x)
    assert not any(isinstance(mod, A.QATLinear) for mod in m.modules())
    assert len(res) == 12 and res["layers.0.v"].act_bits == 8
    torch.testing.assert_close(y_conv, y_fake, rtol=1e-5, atol=1e-5)


def test_quantize_model_and_size_report(model, calib):
    m = copy.deepcopy(model)
    res = A.quantize_model(m, A.GPTQConfig(bits=4, group_size=64, skip=["lm_head", "*.down"]), calib)
    assert len(res) == 10 and not any(n.endswith("down") for n in res)
    rep = A.model_size_report(m, res)
    assert rep["quantized_bytes"] < rep["float_bytes"] and rep["compression"] > 1.5
    assert rep["layers"]["layers.0.q"]["format"] == "int4-asym-g64"


def test_zz_report_numbers():
    """Prints the layer-output errors gathered above (run with -s to see them)."""
    print("\nrelative layer-output error (int4 g64 asym, held-out data):")
    for k, v in _ERRS.items():
        print(f"  {k:40s} {v:.5f}")
    assert "rtn" in _ERRS


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_awq_on_model_without_blocks(sequential):
    """A plain nn.Sequential (no ModuleList of blocks): every Linear is calibrated from full-model
    forwards; the first Linear's input is the model input, so AWQ keeps an input scale."""
    g = torch.Generator().manual_seed(7)
    net = nn.Sequential(nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 48)).eval()
    data = [torch.randn(64, 8, generator=g) @ torch.randn(8, 80, generator=g) for _ in range(4)]
    ref_out = net(data[0]).detach()
    errs = {}
    for cfg in (A.RTNConfig(4, 32), A.GPTQConfig(4, 32, sequential=sequential), A.AWQConfig(4, 32)):
        m = copy.deepcopy(net)
        res = A.quantize_model(m, cfg, data)
        assert set(res) == {"0", "2"}
        with torch.no_grad():
            errs[type(cfg).__name__] = float((m(data[0]) - ref_out).square().mean())
    assert errs["GPTQConfig"] < errs["RTNConfig"] and errs["AWQConfig"] < errs["RTNConfig"], errs


def test_import_lowbit_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, lowbit; assert 'torch' not in sys.modules; import lowbit.algorithms"
    subprocess.run([sys.executable, "-c", code], check=True)


class KwBlock(nn.Module):
    """A block taking its hidden state and per-block keyword arguments (like transformers
    decoder layers): a positional table that differs between blocks, and a KV cache list."""

    def __init__(self, idx):
        super().__init__()
        self.idx = idx
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))

    def forward(self, hidden_states, pos=None, past_key_values=None):
        h = hidden_states + pos
        k = self.k(h)
        if past_key_values is not None:            # a growing cache, as a real one would
            past_key_values.setdefault(self.idx, []).append(k)
            k = torch.cat(past_key_values[self.idx], dim=1)
        v = self.v(h) if past_key_values is None else k
        a = torch.softmax(self.q(h) @ k.transpose(-1, -2) / math.sqrt(H), -1) @ v
        return hidden_states + self.o(a)


class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.layers = nn.ModuleList([KwBlock(i) for i in range(2)])
        self.pos = [torch.randn(T, H, generator=g), 3 * torch.randn(T, H, generator=g)]

    def forward(self, x, use_cache=True):
        cache = {} if use_cache else None
        for i, blk in enumerate(self.layers):
            x = blk(hidden_states=x, pos=self.pos[i], past_key_values=cache)
        return x


def test_sequential_uses_each_blocks_own_arguments_and_no_cache():
    """Block 1 must be calibrated with its own `pos` (not block 0's) and without a KV cache that
    grows each time the block is re-run: its stats equal those of a plain float forward."""
    from lowbit.algorithms.sequential import quantize_sequential
    net = KwModel().eval()
    data = [torch.randn(2, T, H) for _ in range(3)]
    ref = A.collect_stats(net, {"layers.1.q": net.layers[1].q}, [{"x": d, "use_cache": False} for d in data])
    seen = {}

    def stage_fn(stage):
        for n in stage.names:
            seen[n] = stage.stats[n]
        return {}                                  # quantize nothing: inputs stay float
    quantize_sequential(net, data, A.find_linears(net), stage_fn)
    assert set(seen) == {f"layers.{i}.{p}" for i in range(2) for p in "qkvo"}
    assert torch.allclose(seen["layers.1.q"].abs_max, ref["layers.1.q"].abs_max, rtol=1e-5, atol=1e-6)
    assert seen["layers.1.o"].n == ref["layers.1.q"].n


def test_calibration_hooks_share_stats_only_for_the_same_rows():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x, enc=None, edit=False):
            y = self.q(x)
            if edit:
                x.mul_(100)          # in place: k reads other rows from the same tensor object
            return y + self.k(input=enc if enc is not None else x)   # k called by keyword

    m = TwoInputs()
    x = torch.randn(3, 16)
    with A.CalibrationHooks({"q": m.q, "k": m.k}) as cal:
        for _ in range(3):           # the same tensor object as three batches: three batches
            m(x)
    assert cal.stats["q"] is cal.stats["k"] and cal.stats["q"].n == 9
    with A.CalibrationHooks({"q": m.q, "k": m.k}) as cal:
        m(x.clone(), edit=True)
    assert cal.stats["k"] is not cal.stats["q"] and float(cal.stats["k"].abs_max.max()) > 50
    with pytest.raises(ValueError, match=r"k reads the same input as q in this batch but not in earlier ones"):
        with A.CalibrationHooks({"q": m.q, "k": m.k}):
            m(x, torch.full((3, 16), 100.0))
            m(x)
    with pytest.raises(TypeError, match=r"inputs of Linear layers; c is a Conv2d"):
        A.CalibrationHooks({"c": nn.Conv2d(3, 3, 1)})


@pytest.mark.parametrize("obs", [A.MinMaxObserver, A.MovingAverageMinMaxObserver, A.PercentileObserver,
                                 A.MSEObserver])
def test_observers_check_their_input(obs):
    o = obs()
    for bad, err, msg in [(torch.tensor(1.0), ValueError, "non-empty tensor"), (torch.zeros(0, 4), ValueError, "non-empty"),
                          (np.ones((2, 4), np.float32), TypeError, "takes a torch tensor"),
                          (torch.ones(2, 4, dtype=torch.int32), TypeError, "float tensor"),
                          (torch.tensor([[float("nan")] + [1.0] * 99]), ValueError, "NaN or Inf")]:
        with pytest.raises(err, match=msg):
            o.update(bad)
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8"):
        obs(bits=5)


def test_mse_observer_keeps_at_most_max_rows():
    o = A.MSEObserver(max_rows=5)
    o.update(torch.randn(100, 16))
    assert o.data.shape == (5, 16)
    o.update(torch.randn(2, 16))
    assert o.data.shape == (5, 16)
    with pytest.raises(ValueError, match=r"every update needs shape \[rows, 16\]"):
        o.update(torch.randn(2, 32))
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_rows must be an int >= 1"):
            A.MSEObserver(max_rows=bad)
