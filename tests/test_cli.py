"""transformers end to end (tiny random Llama): quantize with lowbit (RTN, GPTQ), save, load in a
fresh process, generate; and the `lowbit` CLI (quantize / eval / bench) via subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lowbit  # noqa: E402

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lowbit.__file__)))
ENV = {**os.environ, "PYTHONPATH": PKG_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief. ") * 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(d / "model"))
    (d / "calib.txt").write_text(TEXT)
    (d / "eval.txt").write_text(TEXT[::-1])
    return d


def _run(args, **kw):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=120, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


GEN = """
import sys, torch, lowbit
from lowbit.nn import QuantLinear
m = lowbit.load_quantized_model(sys.argv[1])
n = sum(isinstance(x, QuantLinear) for x in m.modules())
ids = m.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
print(n, ' '.join(map(str, ids[0].tolist())))
"""


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_save_load_in_fresh_process_and_generate(tiny, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from lowbit.algorithms import GPTQConfig, RTNConfig, quantize_model
    from lowbit.nn import QuantLinear, save_quantized_model

    model = AutoModelForCausalLM.from_pretrained(str(tiny / "model"), dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = (RTNConfig(bits=4, group_size=32) if method == "rtn"
           else GPTQConfig(bits=4, group_size=32, act_order=True))
    data = None if method == "rtn" else [torch.randint(0, 128, (1, 32)) for _ in range(4)]
    with torch.no_grad():
        results = quantize_model(model, cfg, data, apply="quantized")
    assert len(results) == 14 and sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert isinstance(model.lm_head, torch.nn.Linear)            # skipped by default
    with torch.no_grad():
        q_logits = model(ids).logits
    rel = float((q_logits - ref).norm() / ref.norm())
    assert 0 < rel < 0.3
    out = save_quantized_model(model, str(tmp_path / "q"))
    assert os.path.exists(out) and os.path.exists(tmp_path / "q" / "config.json")
    with torch.no_grad():
        want = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    r = _run(["-c", GEN, str(tmp_path / "q")])
    n, toks = r.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(n) == 14
    assert toks == " ".join(map(str, want[0].tolist()))          # same tokens as the in-process model
    assert len(toks.split()) == 10


def test_tied_model_saves_embedding_once_and_loads_without_float_skeleton(tmp_path, capsys):
    """A tied embedding/lm_head is stored once; load_quantized_model builds the skeleton with its
    parameters on the meta device, so every loaded parameter comes from the file (none is left
    on meta, none is the skeleton's random init) and the tie holds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.algorithms import RTNConfig, quantize_model
    from lowbit.nn import MODEL_FILE, load_quantized_model, save_quantized_model

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        quantize_model(model, RTNConfig(bits=4, group_size=32), apply="quantized")
    save_quantized_model(model, str(tmp_path / "q"))
    file = str(tmp_path / "q" / MODEL_FILE)
    entries = lowbit.load(file)
    assert entries["lm_head.weight"] is entries["model.embed_tokens.weight"]
    from lowbit import cli

    assert cli.main(["inspect", file]) == 0
    assert "alias of model.embed_tokens.weight" in capsys.readouterr().out
    ids = torch.randint(0, 512, (2, 20))
    back = load_quantized_model(str(tmp_path / "q"))
    assert not any(p.is_meta for p in back.parameters())
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.model.norm.weight, model.model.norm.weight)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    # a file written before alias entries (the embedding twice) loads the same way
    sd = {k: (v.clone() if k == "lm_head.weight" else v) for k, v in lowbit.nn.quantized_state_dict(model).items()}
    lowbit.save(sd, str(tmp_path / "two_copies.safetensors"))
    old = load_quantized_model(str(tmp_path / "two_copies.safetensors"), str(tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(old(ids).logits, model(ids).logits)
    # a file that lacks a weight the model needs is refused, not left on meta
    del sd["model.norm.weight"]
    lowbit.save(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        load_quantized_model(str(tmp_path / "partial.safetensors"), str(tmp_path / "q"))


def test_cli_quantize_eval_inspect_bench(tiny, tmp_path, capsys):
    out = tmp_path / "q_gptq"
    r = _run(["-m", "lowbit.cli", "quantize", str(tiny / "model"), str(out), "--method", "gptq", "--bits", "4",
              "--group-size", "32", "--calib", str(tiny / "calib.txt"), "--seq-len", "64", "--n-samples", "4"])
    assert "wrote" in r.stdout and "5/5" in r.stderr                        # progress reached the end
    assert (out / "model.lowbit.safetensors").exists()
    from lowbit import cli

    assert cli.main(["inspect", str(out / "model.lowbit.safetensors")]) == 0   # in process: cheaper
    assert "lowbit int4-asym-g32" in capsys.readouterr().out
    assert cli.main(["eval", str(tiny / "model"), "--text", str(tiny / "eval.txt"), "--seq-len", "64", "--json"]) == 0
    f = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = _run(["-m", "lowbit.cli", "eval", str(out), "--text", str(tiny / "eval.txt"), "--seq-len", "64", "--json"])
    q = json.loads(r.stdout.strip().splitlines()[-1])
    n_bytes = len(TEXT.encode())
    assert f["tokens"] == q["tokens"] == n_bytes - (n_bytes + 63) // 64    # byte tokens, 63 scored per window
    # a random model's perplexity is near the vocabulary size; quantization moves it only a little
    assert 50 < f["perplexity"] < 300 and abs(q["perplexity"] / f["perplexity"] - 1) < 0.1
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])                                       # arguments reach lowbit.bench
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
    assert cli.main(["quantize", str(tiny / "model"), str(tmp_path / "x"), "--method", "awq"]) == 2
    assert "--calib" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["quantize", "{m}", "{o}", "--seq-len", "0"], ["quantize", "{m}", "{o}", "--seq-len", "-4"],
    ["quantize", "{m}", "{o}", "--n-samples", "0"], ["quantize", "{m}", "{o}", "--n-samples", "-1"],
    ["quantize", "{m}", "{o}", "--group-size", "-16"], ["quantize", "{m}", "{o}", "--group-size", "x"],
    ["eval", "{m}", "--text", "{t}", "--seq-len", "0"], ["eval", "{m}", "--text", "{t}", "--seq-len", "1"],
    ["eval", "{m}", "--text", "{t}", "--max-windows", "0"], ["eval", "{m}", "--text", "{t}", "--max-windows", "-1"],
])
def test_cli_rejects_bad_counts_naming_the_option(tiny, tmp_path, capsys, args):
    """Counts below their minimum are usage errors, not a range() error, a misleading "too short" or
    a silently dropped window (x[:-1])."""
    from lowbit import cli

    args = [a.format(m=tiny / "model", o=tmp_path / "q", t=tiny / "eval.txt") for a in args]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert f"argument {args[-2]}:" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_cli_group_size_zero_is_one_group_per_row(tiny, tmp_path, capsys):
    from lowbit import cli

    assert cli.main(["quantize", str(tiny / "model"), str(tmp_path / "q"), "--group-size", "0"]) == 0
    assert cli.main(["inspect", str(tmp_path / "q" / "model.lowbit.safetensors")]) == 0
    assert "lowbit int4-asym-per_row" in capsys.readouterr().out


def test_cli_refuses_out_equal_to_model_dir(tiny, capsys):
    """Writing into MODEL_DIR would put model.lowbit.safetensors beside the float weights, and a
    later `lowbit eval MODEL_DIR` would silently score the quantized model."""
    from lowbit import cli

    model = str(tiny / "model")
    for out in (model, model + os.sep, os.path.join(model, os.pardir, "model")):
        with pytest.raises(SystemExit) as e:
            cli.main(["quantize", model, out])
        assert e.value.code == 2 and "OUT must not be MODEL_DIR" in capsys.readouterr().err
    assert not (tiny / "model" / "model.lowbit.safetensors").exists()


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_cli_missing_model_folder_fails_at_once(tmp_path, capsys, command):
    """Not a hub lookup: the offline retries took ~20 s and ended in an internet-connection error."""
    import time

    from lowbit import cli

    missing = str(tmp_path / "nope")
    args = ["quantize", missing, str(tmp_path / "q")] if command == "quantize" else ["eval", missing, "--text", missing]
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2 and f"no such model folder: {missing}" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5


def test_perplexity_matches_manual_computation(tiny):
    from transformers import AutoModelForCausalLM

    from lowbit.cli import perplexity

    model = AutoModelForCausalLM.from_pretrained(str(tiny / "model"), dtype=torch.float32).eval()
    ids = list(range(100))
    ppl, n = perplexity(model, ids, 40)
    assert n == 39 + 39 + 19
    with torch.no_grad():
        nll = 0.0
        for s in (0, 40, 80):
            t = torch.tensor([ids[s:s + 40]])
            nll += float(model(t, labels=t).loss) * (t.shape[1] - 1)
    assert abs(ppl - float(torch.exp(torch.tensor(nll / n)))) < 1e-3 * ppl
    for bad in (dict(seq_len=1), dict(seq_len=40, max_windows=0), dict(seq_len=40, max_windows=-1)):
        with pytest.raises(ValueError, match="seq_len >= 2 and max_windows >= 1"):
            perplexity(model, ids, **bad)


def test_gptq_time_floor_counts_the_calibration_work(tiny):
    """bench/gptq_time_floor.py: multiply-adds of one calibration sequence through a 2-layer Llama
    (hidden 64, 4 heads of 16, 2 KV heads, MLP 128), counted by hand."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        import gptq_time_floor
    finally:
        sys.path.pop(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny / "model")).eval()
    S = 16
    got = gptq_time_floor.count_macs(model, S)
    per_token_linear = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 128 + 128 * 64   # q, k+v, o, gate+up, down
    # distinct Linear inputs per layer: q/k/v's, o's, gate/up's (K=64) and down's (K=128)
    per_token_hessian = 3 * (64 * 65 // 2) + 128 * 129 // 2
    assert got["blocks"] == 2 and got["distinct_inputs"] == 8
    assert got["linear"] == 2 * S * per_token_linear
    assert got["hessian"] == 2 * S * per_token_hessian
    assert got["attention"] == 2 * 2 * 4 * 16 * (S * (S + 1) // 2)     # layers x (QKᵀ, AV) x heads x dim
