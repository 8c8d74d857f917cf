"""Smoke test of the matmul benchmark harness (python -m lowbit.bench) on a tiny shape, and of its
handling of missing optional peers. Runs in seconds; the numbers themselves are not checked."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from lowbit import bench
from lowbit.bench import measure, ours, peers_llama_cpp, peers_onnxruntime, peers_torch, report

TINY = ["--shapes", "256x128", "--M", "1,32", "--threads", "1", "--budget", "0.002",
        "--l3-mib", "0.25", "--idle-wait", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = bench.runner._ext.core().get_num_threads()
    try:
        bench.main(TINY + ["--json", str(path)])
    finally:
        bench.runner._set_threads(threads)
    return json.loads(path.read_text())


def test_every_method_is_measured_or_explained(tiny_run):
    assert [r["M"] for r in tiny_run["rows"]] == [1, 32]
    assert [r["regime"] for r in tiny_run["rows"]] == ["decode", "prefill"]
    for row in tiny_run["rows"]:
        # w4a8 g128 / g32 / g128 with x per block, w4a32, w8a8, w8a32; + w4a16 (bf16 x) with torch
        assert len(row["ours"]) == 6 + (importlib.util.find_spec("torch") is not None)
        for name, r in row["results"].items():
            assert 0 < r["time_ms_min"] <= r["time_ms"] <= r["time_ms_max"]
            assert r["pct_limit"] > 0 and r["GBps"] > 0
            assert r["compute"] in ("int8", "bf16", "fp32"), (name, r["compute"])
            if r["ours"]:
                assert set(r["ratio_vs_peers"]) == {n for n, v in row["results"].items() if not v["ours"]}
    decode = tiny_run["rows"][0]["results"]
    assert all(r["weight_copies"] * r["weight_bytes"] >= 4 * tiny_run["machine"]["l3_bytes"] for r in decode.values())
    for r in decode.values():  # one DRAM read probe per repeat, each a positive rate
        assert len(r["probe_GBps"]) == r["repeats"] and min(r["probe_GBps"]) > 0
        assert r["pct_start_limit"] > 0
    lim = tiny_run["limits"]["1"]
    for r in tiny_run["rows"][1]["results"].values():  # prefill: one compute-peak probe per repeat
        assert len(r["probe_GOPs"]) == r["repeats"] and min(r["probe_GOPs"]) > 0
        assert r["pct_start_limit"] == pytest.approx(100 * r["GOPs"] / (
            lim["int8_dot_GOPs"] if r["compute"] == "int8" else lim.get("bf16_dot_GFLOPs") or lim["fp32_fma_GFLOPs"]
            if r["compute"] == "bf16" else lim["fp32_fma_GFLOPs"]))
    for why in tiny_run["unavailable"].values():
        assert why  # a missing peer says why
    for lim in tiny_run["limits"].values():
        assert lim["dram_read_GBps"] > 0 and lim["fp32_fma_GFLOPs"] > 0 and lim["int8_dot_GOPs"] > 0
        assert lim["fp32_fma_instr"] and lim["int8_dot_instr"]
        # a bf16-dot peak where the CPU has avx512_bf16, else the reason it is missing
        assert (lim["bf16_dot_GFLOPs"] or 0) > 0 or lim["bf16_dot_instr"].startswith("unavailable")
        # on AVX2 the exact s8×s8 rate too (the W8A8 kernels' ceiling there)
        if lim["int8_dot_kind"] == "int8":
            assert 0 < lim["int8_exact_dot_GOPs"]


def test_peers_multiply_by_our_weights(tiny_run):
    """Float-compute methods given our codes reproduce x @ dequantize(W).T: the harness converted
    the layouts right (int8-activation methods differ by their activation rounding)."""
    errors = {name: e for section in tiny_run["accuracy"]["errors"].values() for name, e in section.items()}
    float_compute = [n for n in errors if "w4a32" in n or "w8a32" in n or "acc0" in n]
    assert float_compute
    for name in float_compute:
        assert errors[name] < 1e-4, name
    for name in [n for n in errors if "bf16 x" in n]:
        assert errors[name] < 2e-2, name  # x rounded to bf16
    for name in ("torch int4pack_mm bf16", "torch int8pack_mm bf16"):
        if name in errors:
            assert errors[name] < 2e-2, name  # bf16 activations and scales
    for name in [n for n in errors if n.startswith("llama.cpp")]:
        assert errors[name] < 5e-2, name  # x rounded to int8 per block of 32; a misread layout gives ~1


def test_int8_activation_errors_are_their_rounding(tiny_run):
    """Each A8 method's error is what its activation rounding explains: per token for w4a8/w8a8,
    per K-block for w4a8_xblk (the same rounding, exact products); per block is never worse."""
    for section in tiny_run["accuracy"]["errors"].values():
        token = section["(x rounded per token to int8, exact product)"]
        block = next(e for n, e in section.items() if n.startswith("(x rounded per block of"))
        for name, e in section.items():
            if name.startswith("lowbit") and ("w4a8" in name or "w8a8" in name):
                expected = block if "x per block" in name else token
                assert abs(e - expected) <= 0.02 * expected, (name, e, expected)
        assert block <= token * (1 + 1e-9)  # equal when the block is the whole row (per-channel)


def test_missing_peers_are_reported_not_raised(monkeypatch):
    for module in ("torch", "onnxruntime", "llama_cpp"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    monkeypatch.delenv("LOWBIT_BENCH_GGML_DIR", raising=False)
    monkeypatch.setattr(peers_llama_cpp, "_lib", None)
    case = ours.Case(64, 32)
    for entries in (peers_torch.methods(case), peers_onnxruntime.methods(case, 1), peers_llama_cpp.methods(case, 1)):
        assert len(entries) == 1 and isinstance(entries[0], measure.Unavailable)
        assert "not installed" in entries[0].reason


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "not installed" in report.plot([], str(tmp_path / "p.png"))


def test_timer_reports_median_min_max():
    stats = measure.time_calls([lambda: None] * 3, budget_s=0.001)
    assert stats.repeats >= 3 and stats.copies == 3
    assert stats.min_s <= stats.median_s <= stats.max_s
    assert stats.probe_rates == [] and stats.per_call_s == []


def test_timer_probes_after_every_repeat():
    seen = []
    stats = measure.time_calls([lambda: seen.append("call")] * 2, budget_s=0.001,
                               probe=lambda: seen.append("probe") or 7.0)
    assert stats.probe_rates == [7.0] * stats.repeats and len(stats.per_call_s) == stats.repeats
    # warm-up pass, then each repeat's calls followed by one probe
    repeat = ["call"] * (stats.calls_per_repeat) + ["probe"]
    assert seen == ["call"] * 2 + repeat * stats.repeats


def test_microbench_read_reps_is_validated():
    import numpy as np
    with pytest.raises(ValueError, match="reps"):
        bench.runner._ext.core().microbench("read", np.ones(1 << 16, np.uint8), 0)


@pytest.mark.parametrize("kind", ["fma", "int8", "int8_exact", "vnni256", "fma512", "vnni512", "bf16dot512",
                                  "amx_int8", "amx_bf16"])
def test_microbench_peaks_run_or_say_why(kind):
    """Each peak microbenchmark gives a positive rate where its variant runs, else a clear error."""
    core = bench.runner._ext.core()
    try:
        rate = core.microbench(kind, 1000)
    except (RuntimeError, ValueError) as e:
        assert "needs the" in str(e) or "must be" in str(e)
    else:
        assert rate > 0
    with pytest.raises(ValueError, match="iterations"):
        core.microbench(kind, 0)


def test_microbench_peaks_run_on_a_cpu_that_has_them():
    """On this CPU, the peaks its features promise are measured (an AMX CPU runs the tile ones)."""
    core = bench.runner._ext.core()
    feats = set(core.build_info()["cpu_features"])
    expect = {"avx_vnni": "vnni256", "avx512vnni": "vnni512", "avx512bf16": "bf16dot512", "amx_int8": "amx_int8",
              "amx_bf16": "amx_bf16"}
    for feat, kind in expect.items():
        if feat in feats and (not kind.startswith("amx") or "os:amx" in feats):
            assert core.microbench(kind, 1000) > 0, kind
