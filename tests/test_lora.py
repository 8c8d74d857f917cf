"""QLoRA-style LoRALinear over a frozen QuantLinear: gradients, training, merge."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lowbit as lb  # noqa: E402
from lowbit.algorithms import LoRALinear, add_lora  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402


def _base(**fmt):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(64, 32), **(fmt or dict(bits=4, group_size=32, codebook="nf4")))


def test_fresh_adapter_is_identity_and_grads_reach_A_B_and_input():
    base = _base()
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(6, 64, requires_grad=True)
    assert torch.equal(lora(x), base(x))                  # B = 0 at start
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    with torch.no_grad():
        lora.lora_B.normal_()
    g = torch.randn(6, 32)
    lora(x).backward(g)
    assert lora.lora_A.grad is not None and lora.lora_A.grad.abs().sum() > 0
    assert lora.lora_B.grad.abs().sum() > 0
    want = g @ (base.dequantized_weight() + lora.delta_weight().detach())  # through the quantized matmul
    assert torch.allclose(x.grad, want, atol=1e-4)


def test_training_decreases_loss_on_toy_regression():
    torch.manual_seed(1)
    teacher = nn.Linear(64, 32)
    base = QuantLinear.from_linear(teacher, bits=4, group_size=32)
    with torch.no_grad():  # the target is the teacher plus a rank-2 change the adapter can learn
        u, v = torch.randn(32, 2) * 0.3, torch.randn(2, 64) * 0.3
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), LoRALinear(base, r=4, alpha=4))
    model[0].requires_grad_(False)
    X = torch.randn(256, 64)
    with torch.no_grad():
        h = model[1](model[0](X))
        Y = teacher(h) + h @ (u @ v).T
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("fmt", [dict(bits=4, group_size=32), dict(bits=4, group_size=32, codebook="nf4"),
                                 dict(bits=8, group_size=None, symmetric=True)], ids=["int4", "nf4", "int8"])
def test_merge_requantizes_in_the_same_format(fmt):
    base = _base(**fmt)
    lora = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.02)
    merged, report = lora.merge()
    assert merged.format == base.format and merged.act_bits == base.act_bits
    target = base.dequantized_weight() + lora.delta_weight().detach()
    err = (merged.dequantized_weight() - target)
    assert abs(report["max_abs"] - float(err.abs().max())) < 1e-6
    assert 0 < report["rel_fro"] < (0.01 if fmt["bits"] == 8 else 0.15)
    x = torch.randn(4, 64)
    assert torch.allclose(merged(x), x @ target.T + base.bias, atol=report["max_abs"] * 64 + 1e-4)


def test_merge_keeps_perm_and_input_scale():
    torch.manual_seed(2)
    perm, s = torch.randperm(64), torch.rand(64) + 0.5
    qt = lb.quantize(torch.randn(32, 64), 8, None, True)
    base = QuantLinear.from_quantized(qt, torch.zeros(32), perm=perm, input_scale=s)
    lora = LoRALinear(base, r=2, alpha=2)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.05)
    merged, report = lora.merge()
    assert torch.equal(merged.perm, perm) and torch.equal(merged.input_scale, s)
    target = base.dequantized_weight() + lora.delta_weight().detach()
    assert torch.allclose(merged.dequantized_weight(), target, atol=3 * report["max_abs"] + 1e-6)
    assert report["rel_fro"] < 0.01


def test_add_lora_wraps_quantlinears_and_freezes_the_rest():
    m = nn.Sequential(_base(), nn.ReLU(), nn.Linear(32, 8))
    add_lora(m, r=2)
    assert isinstance(m[0], LoRALinear)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B"}


def _blocks():
    """Two blocks named like a transformer's: layers.{0,1}.{o,down} QuantLinears beside a float Linear."""
    block = lambda: nn.ModuleDict(dict(o=_base(), down=_base(), gate=nn.Linear(64, 64)))  # noqa: E731
    return nn.ModuleDict(dict(layers=nn.ModuleList([block(), block()])))


def _adapted(m):
    return sorted(n for n, x in m.named_modules() if isinstance(x, LoRALinear))


def test_add_lora_string_target_is_one_pattern():
    m = _blocks()
    add_lora(m, r=2, target="down")           # not the characters 'd', 'o', 'w', 'n'
    assert _adapted(m) == ["layers.0.down", "layers.1.down"]
    with pytest.raises(TypeError, match="target"):
        add_lora(_blocks(), target=["down", 3])


@pytest.mark.parametrize("make, target", [(_blocks, ["nonexistent"]), (_blocks, []),
                                          (lambda: nn.Sequential(nn.Linear(4, 4)), None)],
                         ids=["no-name-match", "empty-target", "no-quantlinear"])
def test_add_lora_matching_nothing_raises_and_freezes_nothing(make, target):
    model = make()
    before = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="no .*QuantLinear"):
        add_lora(model, r=2, target=target)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == before and before
    assert _adapted(model) == []


def test_add_lora_again_keeps_adapters_and_does_not_nest():
    m = _blocks()
    add_lora(m, r=2, target=["o"])
    first = {n: p for n, p in m.named_parameters() if p.requires_grad}
    add_lora(m, r=2)                          # wraps the rest, leaves the o adapters as they are
    assert _adapted(m) == ["layers.0.down", "layers.0.o", "layers.1.down", "layers.1.o"]
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert all(trainable.get(n) is p for n, p in first.items())
    assert len(trainable) == 8 and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    add_lora(m, r=2, target="o")              # already wrapped: a no-op, not an error
    assert _adapted(m) == ["layers.0.down", "layers.0.o", "layers.1.down", "layers.1.o"]
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(trainable)


def test_merge_keeps_act_bits_and_block_granularity():
    torch.manual_seed(3)
    base = QuantLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32, act_bits=8, act_granularity="block")
    lora = LoRALinear(base, r=2, alpha=2)
    merged, report = lora.merge()
    assert (merged.format, merged.act_bits, merged.act_granularity) == (base.format, 8, "block")
    x = torch.randn(5, 64)                    # B = 0: the same layer up to re-quantization rounding
    assert torch.allclose(merged(x), base(x), atol=report["max_abs"] * 64 * 4 + 1e-4)


@pytest.mark.parametrize("alpha, err", [(float("nan"), ValueError), (float("inf"), ValueError),
                                        (-float("inf"), ValueError), ("16", TypeError), (True, TypeError)])
def test_lora_rejects_bad_alpha(alpha, err):
    with pytest.raises(err, match="alpha"):
        LoRALinear(_base(), r=2, alpha=alpha)


@pytest.mark.parametrize("kw", [dict(r=0), dict(r=2.0), dict(dropout=float("nan")), dict(dropout=1.0)])
def test_lora_rejects_bad_r_and_dropout(kw):
    with pytest.raises(ValueError, match="r must|dropout"):
        LoRALinear(_base(), **kw)
