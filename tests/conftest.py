"""Shared fixtures: run the CPU tests once per runnable kernel variant of this build.

`isa` forces a variant with lowbit._ext.core().set_isa(name) and restores "auto" afterwards, so
the reference, AVX2, AVX-512 (when the CPU has it) and the test-only builds are all exercised on
one machine: the SIMDe-emulated AVX-512 build, the AMX kernels on a scalar model of the tiles
(amx_emulated) and the AVX-VNNI kernels on vpdpbusd's AVX-512VL encoding (avx2_vnni_emulated),
the last two on AVX-512 VNNI CPUs. The SIMDe build is slow (scalar emulation of every
intrinsic): tests use `size_budget(isa)` to pick smaller shapes for it.
"""
from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import reference`

import lowbit  # noqa: E402

_INFO = lowbit._ext.core().build_info()
CPU_VARIANTS = [v["name"] for v in _INFO["cpu_variants"] if v["runnable"]]
NOT_RUNNABLE = {v["name"]: v.get("reason", "") for v in _INFO["cpu_variants"] if not v["runnable"]}
SLOW_VARIANTS = {"avx512_emulated"}


def pytest_report_header(config):
    return [f"lowbit CPU variants runnable here: {', '.join(CPU_VARIANTS)}",
            f"lowbit CPU variants compiled but not runnable: {NOT_RUNNABLE or 'none'}"]


@pytest.fixture(params=CPU_VARIANTS)
def isa(request):
    """The name of a runnable CPU variant, forced for the duration of the test."""
    core = lowbit._ext.core()
    core.set_isa(request.param)
    assert core.get_isa() == request.param
    try:
        yield request.param
    finally:
        core.set_isa("auto")


@pytest.fixture
def restore_threads():
    """Put lowbit's thread count back after a test that changes it."""
    n = lowbit.get_num_threads()
    yield
    lowbit.set_num_threads(n)


def is_slow(isa_name: str) -> bool:
    return isa_name in SLOW_VARIANTS


def seed_for(*parts) -> int:
    """A stable seed that differs per test case (the parts name the case)."""
    return zlib.crc32(repr(parts).encode())


def rng_for(*parts) -> np.random.Generator:
    return np.random.default_rng(seed_for(*parts))


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except Exception:
        return False
