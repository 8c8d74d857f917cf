"""Runtime ISA dispatch and the thread pool: build_info says what was compiled, detected and
chosen; LOWBIT_ISA / set_isa force a variant; forcing one the CPU lacks is a clear error (not
SIGILL); results do not depend on the thread count."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import lowbit
from conftest import CPU_VARIANTS, NOT_RUNNABLE, rng_for

ALL_NAMES = {"amx", "avx512", "avx2_vnni", "avx2", "avx512_emulated", "amx_emulated", "avx2_vnni_emulated", "ref"}
EMULATED = {"avx512_emulated", "amx_emulated", "avx2_vnni_emulated"}  # test-only builds, never picked by "auto"


def run_python(code, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LOWBIT_ISA", "LOWBIT_NUM_THREADS")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_build_info_content():
    info = lowbit.build_info()
    assert {"cpu_variants", "cpu_features", "cpu_isa", "num_threads", "version", "cuda"} <= set(info)
    assert info["version"] == lowbit.__version__
    names = [v["name"] for v in info["cpu_variants"]]
    assert len(names) == len(set(names)) and set(names) <= ALL_NAMES
    assert {"avx512", "avx2", "amx_emulated", "avx2_vnni_emulated", "ref"} <= set(names)  # always compiled on x86-64
    assert names[-1] == "ref"
    for v in info["cpu_variants"]:
        assert isinstance(v["runnable"], bool)
        if v["runnable"]:
            assert "reason" not in v
        else:
            assert v["reason"].startswith("CPU lacks ") and len(v["reason"]) > len("CPU lacks ")
    by_name = {v["name"]: v for v in info["cpu_variants"]}
    assert by_name["ref"]["runnable"]
    feats = set(info["cpu_features"])
    # runnable flags agree with the detected features
    assert by_name["avx2"]["runnable"] == ({"avx2", "fma", "f16c", "os:ymm"} <= feats)
    assert by_name["avx512"]["runnable"] == ({"avx512f", "avx512bw", "avx512vl", "avx512dq",
                                              "avx512vnni", "os:zmm"} <= feats
                                             and by_name["avx2"]["runnable"])
    assert by_name["amx_emulated"]["runnable"] == by_name["avx512"]["runnable"]  # AVX-512 code, tiles modelled
    assert by_name["avx2_vnni_emulated"]["runnable"] == by_name["avx512"]["runnable"]  # vpdpbusd ymm, EVEX
    if "avx2_vnni" in by_name:
        assert by_name["avx2_vnni"]["runnable"] == ("avx_vnni" in feats and by_name["avx2"]["runnable"])
    # "auto" picks the first runnable, non-emulated variant (the list runs best first)
    expect = next(v["name"] for v in info["cpu_variants"] if v["runnable"] and v["name"] not in EMULATED)
    assert info["cpu_isa"] == expect == lowbit._ext.core().get_isa()
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    assert info["cuda"]["built"] in (True, False) and "loaded" in info["cuda"]


def test_build_info_on_this_machine():
    """What this test machine is expected to report (AVX2 without AVX-512)."""
    feats = set(lowbit.build_info()["cpu_features"])
    if "avx512f" in feats or "avx2" not in feats:
        pytest.skip("this check describes an AVX2-only CPU")
    vnni = "avx_vnni" in feats and "avx2_vnni" in CPU_VARIANTS
    assert lowbit.build_info()["cpu_isa"] == ("avx2_vnni" if vnni else "avx2")
    assert "avx512" in NOT_RUNNABLE and "avx512f" in NOT_RUNNABLE["avx512"]


@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_env_var_selects_variant(name):
    r = run_python("""
        import lowbit, numpy as np
        info = lowbit.build_info()
        w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
        q = lowbit.quantize(w, bits=4, group_size=16)
        print(info['cpu_isa'], lowbit._ext.core().get_isa(), q.codes.sum())
    """, LOWBIT_ISA=name)
    assert r.returncode == 0, r.stderr
    isa, isa2, _ = r.stdout.split()
    assert isa == name and isa2 == name


def test_env_var_auto_and_empty_mean_best():
    best = lowbit.build_info()["cpu_isa"]
    for value in ("auto", ""):
        r = run_python("import lowbit; print(lowbit.build_info()['cpu_isa'])", LOWBIT_ISA=value)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == best


@pytest.mark.parametrize("name", sorted(NOT_RUNNABLE) or ["(none)"])
def test_env_var_forcing_a_missing_isa_fails_at_import(name):
    if name == "(none)":
        pytest.skip("every compiled variant runs on this CPU")
    r = run_python("import lowbit", LOWBIT_ISA=name)
    assert r.returncode == 1, (r.returncode, r.stderr)  # a Python error, not a signal (SIGILL: -4)
    assert "ImportError" in r.stderr
    assert f"lowbit ISA '{name}' cannot run here: CPU lacks" in r.stderr
    assert "LOWBIT_ISA" in r.stderr


@pytest.mark.parametrize("name", ["foo", "AVX2", "avx", "sse"])
def test_env_var_unknown_isa_fails_clearly(name):
    r = run_python("import lowbit", LOWBIT_ISA=name)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "ImportError" in r.stderr
    assert f"unknown lowbit ISA '{name}'; compiled variants: auto, " in r.stderr
    assert "ref" in r.stderr and "LOWBIT_ISA" in r.stderr


def test_set_isa():
    core = lowbit._ext.core()
    best = core.get_isa()
    try:
        for name in CPU_VARIANTS:
            core.set_isa(name)
            assert core.get_isa() == name == lowbit.build_info()["cpu_isa"]
        with pytest.raises(ValueError, match=r"^unknown lowbit ISA 'nope'"):
            core.set_isa("nope")
        for name, why in NOT_RUNNABLE.items():
            with pytest.raises(ValueError, match=rf"^lowbit ISA '{name}' cannot run here: CPU lacks"):
                core.set_isa(name)
        assert core.get_isa() == CPU_VARIANTS[-1]  # a failed set_isa leaves the choice alone
    finally:
        core.set_isa("auto")
    assert core.get_isa() == best


def test_emulated_variants_are_never_auto():
    if not EMULATED & set(CPU_VARIANTS):
        pytest.skip("no emulated variant runs here")
    assert lowbit.build_info()["cpu_isa"] not in EMULATED


# ------------------------------------------------------------------------------------------------
# threads

def test_set_num_threads(restore_threads):
    for n in (1, 2, 3):
        lowbit.set_num_threads(n)
        assert lowbit.get_num_threads() == n == lowbit.build_info()["num_threads"]
    for bad in (0, -1, 1025):
        with pytest.raises(ValueError, match=r"num_threads must be in \[1, 1024\]"):
            lowbit.set_num_threads(bad)
    assert lowbit.get_num_threads() == 3


def test_num_threads_env_var():
    r = run_python("import lowbit; print(lowbit.get_num_threads())", LOWBIT_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"
    r = run_python("import lowbit, os; print(lowbit.get_num_threads(), len(os.sched_getaffinity(0)))")
    n, cpus = r.stdout.split()
    assert n == cpus  # default: the CPUs this process may run on
    for bad in ("0", "abc", "4x", "99999999999", "2000"):
        r = run_python("import lowbit; lowbit.get_num_threads()", LOWBIT_NUM_THREADS=bad)
        assert r.returncode == 1 and "ValueError: LOWBIT_NUM_THREADS must be an integer in [1, 1024], got" in r.stderr


def test_thread_start_failure_is_an_error_not_a_hang():
    # under a 1 GiB address-space limit only a few of 1024 threads' stacks fit: the pool must stop
    # the ones it started and raise (it used to deadlock destroying their condition variable)
    r = run_python("""
        import resource, numpy as np, lowbit
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        lowbit.set_num_threads(1024)
        try:
            lowbit.quantize(np.ones((4096, 64), np.float32), bits=4, group_size=32)
        except RuntimeError as e:
            print("error:", e)
        lowbit.set_num_threads(1)
        print(lowbit.quantize(np.ones((4096, 64), np.float32), bits=4, group_size=32).shape)
    """)
    assert r.returncode == 0, r.stderr
    assert "error: lowbit could start only" in r.stdout and "of 1024 threads" in r.stdout
    assert r.stdout.strip().endswith("(4096, 64)")


@pytest.mark.parametrize("fmt", [dict(bits=4, group_size=128), dict(bits=8, symmetric=True, group_size=None),
                                 dict(bits=4, codebook="nf4", group_size=64),
                                 dict(bits=3, group_size="tensor")], ids=["asym4", "sym8", "nf4", "asym3t"])
def test_results_identical_across_thread_counts(isa, fmt, restore_threads):
    rows, K = (96, 2048) if isa == "avx512_emulated" else (512, 4096)  # big enough to split
    w = rng_for("threads", str(fmt)).standard_normal((rows, K)).astype(np.float32)
    w[7, 100] = 40.0  # an outlier in one row
    results = []
    for n in (1, 2, 4):
        lowbit.set_num_threads(n)
        qt = lowbit.quantize(w, **fmt)
        results.append((qt, lowbit.dequantize(qt), lowbit.dequantize(qt, dtype="float16"),
                        lowbit.pack_int4(qt.codes & 0xF if qt.codes.dtype == np.uint8 else qt.codes % 8)))
    q1 = results[0]
    for qn in results[1:]:
        np.testing.assert_array_equal(qn[0].codes, q1[0].codes)
        np.testing.assert_array_equal(qn[0].scales.view(np.uint32), q1[0].scales.view(np.uint32))
        if q1[0].zeros is not None:
            np.testing.assert_array_equal(qn[0].zeros, q1[0].zeros)
        for a, b in zip(qn[1:], q1[1:]):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_nan_row_reported_the_same_with_threads(restore_threads):
    w = rng_for("nanthreads").standard_normal((256, 4096)).astype(np.float32)
    w[200, 5] = np.nan
    w[131, 4095] = np.inf
    for n in (1, 2):
        lowbit.set_num_threads(n)
        with pytest.raises(ValueError, match=r"first in row 131\)"):
            lowbit.quantize(w, bits=4, group_size=128)


def _check_in_threads(check, threads=4, rounds=10, timeout=120):
    """Runs check(i) `rounds` times in each of `threads` Python threads at once; check returns an
    error message or None. Asserts that no thread hung, raised or reported an error."""
    errors = []

    def work(i):
        try:
            for _ in range(rounds):
                err = check(i)
                if err:
                    errors.append(f"thread {i}: {err}")
                    return
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"thread {i}: {e!r}")

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    assert not errors, errors


def test_concurrent_python_threads_get_correct_results(restore_threads):
    """Calls from several Python threads at once (the GIL is released in the kernels) must not
    corrupt each other: a busy pool runs the extra calls inline."""
    lowbit.set_num_threads(2)
    ws = [rng_for("conc", i).standard_normal((64, 2048)).astype(np.float32) for i in range(4)]
    expected = [lowbit.quantize(w, bits=4, group_size=64).codes for w in ws]

    def check(i):
        if not np.array_equal(lowbit.quantize(ws[i], bits=4, group_size=64).codes, expected[i]):
            return "wrong codes"

    _check_in_threads(check, rounds=15)


def test_concurrent_python_threads_matmul_prefill(restore_threads):
    """Prefill matmuls from several Python threads at once, each with its own weight: the kernels'
    per-thread scratch kept across a call's work items (unpacked weight sets) must never serve
    another call, so every result equals the one computed alone."""
    lowbit.set_num_threads(2)
    rng = rng_for("conc_mm")
    cases = []
    for bits, gs in ((4, 128), (8, None), (4, 32), (4, 64)):
        w = rng.standard_normal((200, 320)).astype(np.float32)
        x = rng.standard_normal((150, 320)).astype(np.float32)
        qt = lowbit.quantize(w, bits=bits, group_size=gs)
        for act_bits in (8, None):
            cases.append((x, qt, act_bits, lowbit.matmul(x, qt, act_bits=act_bits)))

    def check(i):  # thread i starts at case i, so different threads run different weights at once
        for j in range(i, i + len(cases)):
            x, qt, act_bits, expected = cases[j % len(cases)]
            if not np.array_equal(lowbit.matmul(x, qt, act_bits=act_bits), expected):
                return f"case {j % len(cases)} differs"

    _check_in_threads(check, rounds=6)


def test_many_quick_parallel_calls(restore_threads):
    """Back-to-back small parallel calls: pieces are claimed by whichever threads run, and a
    worker still finishing one call's piece, or waking up late, must never take a piece of the
    next call (each piece exactly once: the outputs equal the 1-thread ones)."""
    rng = rng_for("quick")
    ws = [rng.standard_normal((rows, 256)).astype(np.float32) for rows in (130, 700, 1500, 3000)]
    lowbit.set_num_threads(1)
    want = [lowbit.quantize(w, bits=4, group_size=32).codes for w in ws]
    for n in (2, 3):
        lowbit.set_num_threads(n)
        for i in range(1500):
            j = i % len(ws)
            got = lowbit.quantize(ws[j], bits=4, group_size=32).codes
            assert np.array_equal(got, want[j]), (n, i)


def test_pieces_run_on_torchs_openmp_team_once_it_is_loaded():
    """Without torch, lowbit's pool runs a call's pieces. Once torch has loaded GNU OpenMP, its
    team does (its threads spin after each torch op; lowbit's own would compete with them), with
    the same results and errors, for up to as many threads as OpenMP is set to or there are CPUs."""
    r = run_python("""
        import os, numpy as np, lowbit
        lowbit.set_num_threads(2)
        w = np.random.default_rng(0).standard_normal((512, 4096)).astype(np.float32)
        before = lowbit.build_info()["thread_runtime"]
        a = lowbit.quantize(w, bits=4, group_size=128).codes
        import torch
        torch.set_num_threads(2)
        gomp = "libgomp" in open("/proc/self/maps").read()
        after = lowbit.build_info()["thread_runtime"]
        b = lowbit.quantize(w, bits=4, group_size=128).codes
        w[300, 7] = np.nan
        try:
            lowbit.quantize(w, bits=4, group_size=128)
            err = "no error"
        except ValueError as e:
            err = str(e)
        torch.set_num_threads(1)
        lowbit.set_num_threads(len(os.sched_getaffinity(0)) + 1)
        capped = lowbit.build_info()["thread_runtime"]
        print(before, after, capped, gomp, np.array_equal(a, b), "first in row 300)" in err)
    """)
    assert r.returncode == 0, r.stderr
    before, after, capped, gomp, same, err = r.stdout.split()
    assert before == "lowbit" and capped == "lowbit" and same == "True" and err == "True", r.stdout
    assert after == ("openmp" if gomp == "True" else "lowbit"), r.stdout


def test_fork_after_using_the_pool(restore_threads):
    """A forked child has none of the parent's pool threads; lowbit must still work there."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    lowbit.set_num_threads(2)
    w = rng_for("fork").standard_normal((256, 1024)).astype(np.float32)
    expected = lowbit.quantize(w, bits=4, group_size=64).codes
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            signal.alarm(60)  # a deadlocked child dies instead of hanging the suite
            ok = np.array_equal(lowbit.quantize(w, bits=4, group_size=64).codes, expected)
            os.write(wfd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(wfd)
    _, status = os.waitpid(pid, 0)
    out = os.read(r, 1)
    os.close(r)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert out == b"1"
