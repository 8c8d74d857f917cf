"""lowbit.io: save/load and GPTQ / AWQ / GGUF interop.

Every checkpoint format is checked bit-exactly against a packer/unpacker written here from the
format's description (the module docstrings of lowbit/io/{gptq,awq,gguf}.py restate them), never
against lowbit's own packing code:
  GPTQ  qweight int32 [K/f, N]: bit field i of word [r, n] = q[r*f + i, n] (f = 32/bits);
        qzeros int32 [G, N/f] packed along N the same way, v1 stores zero - 1; scales fp16 [G, N];
        w[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]
  AWQ   qweight int32 [K, N/8]: bit field f of word [k, c] = q[k, 8c + (0,2,4,6,1,3,5,7)[f]]
  GGUF  Q8_0 block: fp16 d + 32 int8 (w = q d); Q4_0 block: fp16 d + 16 bytes, byte j = element j
        (low nibble) and element j+16 (high nibble), w = (q - 8) d
and lowbit's own layout (lowbit/tensor.py): codes [rows, ceil(K/2)] with element 2j in the low
nibble of byte j, symmetric codes as two's complement; w = (q - zero) * scale.
"""
from __future__ import annotations

import io as _io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import lowbit as lb
from lowbit.io import SCHEMA_VERSION
from lowbit import io as lio

F32 = np.float32


# ------------------------------------------------------------------------- reference (format text)
def ref_pack_fields(q, bits, order=None):
    """int32 words from codes q [..., L] along the last axis: field f <- code order[f] of the chunk."""
    per = 32 // bits
    order = list(range(per)) if order is None else list(order)
    q = np.asarray(q, dtype=np.uint64)
    L = q.shape[-1]
    out = np.zeros(q.shape[:-1] + (L // per,), np.uint64)
    for c in range(L // per):
        for f in range(per):
            out[..., c] |= q[..., c * per + order[f]] << np.uint64(bits * f)
    return out.astype(np.uint32).view(np.int32)


def ref_unpack_fields(words, bits, order=None):
    per = 32 // bits
    order = list(range(per)) if order is None else list(order)
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    out = np.zeros(w.shape[:-1] + (w.shape[-1] * per,), np.int64)
    for c in range(w.shape[-1]):
        for f in range(per):
            out[..., c * per + order[f]] = (w[..., c] >> np.uint64(bits * f)) & np.uint64((1 << bits) - 1)
    return out


def ref_gptq(q_kn, z_gn, s_gn, g_idx, bits, v1):
    """GPTQ arrays for codes q [K, N], zeros [G, N], fp16 scales [G, N]."""
    mask = (1 << bits) - 1
    stored = (z_gn - 1) & mask if v1 else z_gn
    return {"qweight": ref_pack_fields(q_kn.T, bits).T.copy(),  # packed along K
            "qzeros": ref_pack_fields(stored, bits), "scales": s_gn.astype(np.float16),
            "g_idx": np.asarray(g_idx, np.int32)}


def ref_lowbit_codes(qt):
    """Unsigned-or-signed integer codes [rows, K] from lowbit's documented layout."""
    c = np.asarray(qt.codes)
    rows, K = qt.shape
    if qt.bits == 8:
        return c.astype(np.int64)
    q = np.zeros((rows, 2 * c.shape[1]), np.int64)
    q[:, 0::2] = c & 0xF
    q[:, 1::2] = c >> 4
    q = q[:, :K]
    return np.where(q >= 8, q - 16, q) if qt.symmetric else q


def ref_dequant(q_nk, z_ng, s_ng, gs):
    """(q - z) * s per group of gs along K, in float32."""
    idx = np.arange(q_nk.shape[1]) // gs
    return (q_nk - z_ng[:, idx]).astype(F32) * s_ng[:, idx].astype(F32)


def random_gptq(rng, N, K, gs, bits, sym):
    G = -(-K // gs)
    q = rng.integers(0, 1 << bits, (K, N))
    z = np.full((G, N), 1 << (bits - 1)) if sym else rng.integers(0, 1 << bits, (G, N))
    s = (rng.random((G, N)) * 0.02 + 1e-3).astype(np.float16)
    return q, z, s


# ----------------------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("v1", [True, False])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_import_is_bit_exact(bits, v1, sym, act_order):
    rng = np.random.default_rng(bits * 8 + v1 * 4 + sym * 2 + act_order)
    N, K, gs = 32, 128, 32
    q, z, s = random_gptq(rng, N, K, gs, bits, sym)
    perm = rng.permutation(K) if act_order else np.arange(K)
    g_idx = np.empty(K, np.int64)
    g_idx[perm] = np.arange(K) // gs  # act-order: channel perm[j] is the j-th quantized
    ck = ref_gptq(q, z, s, g_idx, bits, v1)
    imp = lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"], bits=bits,
                        checkpoint_format="gptq" if v1 else "gptq_v2")
    qt = imp.qt
    assert qt.shape == (N, K) and qt.bits == bits and qt.group_size == gs and qt.symmetric == sym
    if act_order:  # any order within a group is equivalent; the groups must come out contiguous
        assert sorted(imp.perm.tolist()) == list(range(K))
        np.testing.assert_array_equal(g_idx[imp.perm], np.arange(K) // gs)
        perm = imp.perm
    else:
        assert imp.perm is None
    # codes / zeros / scales, in lowbit's documented layout, in permuted K order
    codes = ref_lowbit_codes(qt) + ((1 << (bits - 1)) if sym else 0)
    np.testing.assert_array_equal(codes, q[perm].T)
    np.testing.assert_array_equal(np.asarray(qt.scales), s.astype(F32).T)
    if not sym:
        np.testing.assert_array_equal(np.asarray(qt.zeros), z.T)
    # the meaning: lowbit's dequantize == the GPTQ formula, bit for bit
    w_ref = (q.T - z.T[:, g_idx]).astype(F32) * s.T.astype(F32)[:, g_idx]  # [N, K] original order
    np.testing.assert_array_equal(lb.dequantize(qt), w_ref[:, perm])
    x = rng.standard_normal((3, K)).astype(F32)
    np.testing.assert_allclose(x[:, perm] @ lb.dequantize(qt).T, x @ w_ref.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_export_matches_reference_packer(bits, sym, v1):
    rng = np.random.default_rng(7 + bits)
    N, K, gs = 24, 256, 64
    w = rng.standard_normal((N, K)).astype(F32)
    qt = lb.quantize(w, bits=bits, group_size=gs, symmetric=sym)
    out = lio.to_gptq(qt, checkpoint_format="gptq" if v1 else "gptq_v2")
    mid = 1 << (bits - 1)
    q = ref_lowbit_codes(qt) + (mid if sym else 0)
    z = np.full((N, K // gs), mid) if sym else np.asarray(qt.zeros).astype(np.int64)
    ref = ref_gptq(q.T, z.T, np.asarray(qt.scales).T, np.arange(K) // gs, bits, v1)
    for k in ("qweight", "qzeros", "scales", "g_idx"):
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    # round trip: exact codes/zeros; scales rounded to fp16 (the only loss), bounded error
    back = lio.from_gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], bits=bits,
                         checkpoint_format="auto" if sym else ("gptq" if v1 else "gptq_v2")).qt
    np.testing.assert_array_equal(ref_lowbit_codes(back) + (mid if back.symmetric else 0),
                                  ref_lowbit_codes(qt) + (mid if sym else 0))
    s16 = np.asarray(qt.scales).astype(np.float16).astype(F32)
    np.testing.assert_array_equal(np.asarray(back.scales), s16)
    err = np.abs(lb.dequantize(back) - lb.dequantize(qt)).max()
    bound = (2 ** bits) * np.abs(np.asarray(qt.scales) - s16).max()
    assert err <= bound + 1e-12


def test_gptq_act_order_export_round_trip():
    rng = np.random.default_rng(3)
    N, K, gs = 16, 128, 32
    q, z, s = random_gptq(rng, N, K, gs, 4, False)
    perm = rng.permutation(K)
    g_idx = np.empty(K, np.int64)
    g_idx[perm] = np.arange(K) // gs
    ck = ref_gptq(q, z, s, g_idx, 4, True)
    imp = lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"], checkpoint_format="gptq")
    out = lio.to_gptq(imp.qt, imp.perm, checkpoint_format="gptq")
    for k in ck:  # fp16 scales survive exactly, so the checkpoint comes back byte for byte
        np.testing.assert_array_equal(out[k], ck[k], err_msg=k)


def test_gptq_v1_v2_detection_and_the_silent_garbage_it_prevents():
    rng = np.random.default_rng(11)
    N, K, gs = 16, 64, 32
    q, z, s = random_gptq(rng, N, K, gs, 4, True)
    g = np.arange(K) // gs
    for v1, want in ((True, "gptq"), (False, "gptq_v2")):
        ck = ref_gptq(q, z, s, g, 4, v1)
        assert lio.detect_checkpoint_format(ref_unpack_fields(ck["qzeros"], 4), 4) == want
        qt = lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"]).qt  # auto
        assert qt.symmetric
        np.testing.assert_array_equal(lb.dequantize(qt), ref_dequant(q.T, z.T, s.T, gs))
    # asymmetric zeros cannot be told apart: auto reads v1 and warns; explicit wins
    q, z, s = random_gptq(rng, N, K, gs, 4, False)
    ck = ref_gptq(q, z, s, g, 4, False)
    with pytest.warns(UserWarning, match="checkpoint_format"):
        wrong = lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"]).qt
    right = lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"], checkpoint_format="gptq_v2").qt
    np.testing.assert_array_equal(lb.dequantize(right), ref_dequant(q.T, z.T, s.T, gs))
    assert not np.array_equal(lb.dequantize(wrong), lb.dequantize(right))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"], checkpoint_format="gptq")
    # symmetric=False keeps explicit zeros 8
    ck = ref_gptq(*random_gptq(rng, N, K, gs, 4, True), g, 4, True)
    assert not lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], symmetric=False).qt.symmetric


def test_gptq_bad_input_names_the_tensor():
    rng = np.random.default_rng(0)
    ck = ref_gptq(*random_gptq(rng, 16, 64, 32, 4, False), np.arange(64) // 32, 4, True)
    with pytest.raises(TypeError, match="'layers.0.q'.*qweight"):
        lio.from_gptq(ck["qweight"].astype(np.float32), ck["qzeros"], ck["scales"], name="layers.0.q")
    with pytest.raises(ValueError, match="'layers.0.q'.*g_idx"):
        lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"][:-1], name="layers.0.q",
                      checkpoint_format="gptq")
    with pytest.raises(ValueError, match="'w'.*qzeros"):
        lio.from_gptq(ck["qweight"], ck["qzeros"][:, :1], ck["scales"], checkpoint_format="gptq", name="w")
    with pytest.raises(ValueError, match="bits"):
        lio.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], bits=3)
    with pytest.raises(ValueError, match="multiples of 8"):
        lio.to_gptq(lb.quantize(rng.standard_normal((12, 64)).astype(F32), bits=4, group_size=32))
    with pytest.raises(ValueError, match="codebook"):
        lio.to_gptq(lb.quantize(rng.standard_normal((16, 64)).astype(F32), bits=4, group_size=32, codebook="nf4"))


# ------------------------------------------------------------------------------------------ AWQ
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def test_awq_import_and_export_are_bit_exact():
    rng = np.random.default_rng(5)
    N, K, gs = 32, 128, 64
    q, z, s = random_gptq(rng, N, K, gs, 4, False)
    ck = {"qweight": ref_pack_fields(q, 4, AWQ_ORDER), "qzeros": ref_pack_fields(z, 4, AWQ_ORDER),
          "scales": s}
    qt = lio.from_awq(ck["qweight"], ck["qzeros"], ck["scales"])
    assert qt.shape == (N, K) and qt.group_size == gs and not qt.symmetric
    np.testing.assert_array_equal(ref_lowbit_codes(qt), q.T)
    np.testing.assert_array_equal(np.asarray(qt.zeros), z.T)
    np.testing.assert_array_equal(lb.dequantize(qt), ref_dequant(q.T, z.T, s.T, gs))
    out = lio.to_awq(qt)
    for k in ck:
        np.testing.assert_array_equal(out[k], ck[k], err_msg=k)
    # a symmetric lowbit tensor exports with zero 8
    w = rng.standard_normal((N, K)).astype(F32)
    qs = lb.quantize(w, bits=4, group_size=gs, symmetric=True)
    out = lio.to_awq(qs)
    np.testing.assert_array_equal(ref_unpack_fields(out["qzeros"], 4, AWQ_ORDER), 8)
    np.testing.assert_array_equal(ref_unpack_fields(out["qweight"], 4, AWQ_ORDER), (ref_lowbit_codes(qs) + 8).T)
    back = lio.from_awq(out["qweight"], out["qzeros"], out["scales"], symmetric=None)
    assert back.symmetric
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(qs.codes))


def test_awq_bad_input():
    rng = np.random.default_rng(1)
    q, z, s = random_gptq(rng, 16, 64, 32, 4, False)
    qw, qz = ref_pack_fields(q, 4, AWQ_ORDER), ref_pack_fields(z, 4, AWQ_ORDER)
    with pytest.raises(ValueError, match="'mlp.up'.*scales"):
        lio.from_awq(qw, qz, s[:, :8], name="mlp.up")
    with pytest.raises(TypeError, match="'mlp.up'.*qzeros"):
        lio.from_awq(qw, qz.astype(np.float32), s, name="mlp.up")
    with pytest.raises(ValueError, match="4-bit"):
        lio.to_awq(lb.quantize(rng.standard_normal((16, 64)).astype(F32), bits=8, group_size=32))


@pytest.mark.parametrize("export", [lio.to_awq, lio.to_gptq], ids=["awq", "gptq"])
def test_fp16_export_refuses_scales_below_the_normal_range(export):
    """A scale below float16's smallest normal (6.1e-5) used to become 0 (all-zero weights after
    the round trip) or a subnormal with few bits; zero scales (an all-zero group) still export."""
    w = np.random.default_rng(2).standard_normal((16, 64)).astype(F32)
    with pytest.raises(ValueError, match="below float16's normal range"):
        export(lb.quantize(w * 1e-8, bits=4, group_size=32, symmetric=False))
    with pytest.raises(ValueError, match="below float16's normal range"):
        export(lb.quantize(w * 1e-4, bits=4, group_size=32, symmetric=False))  # subnormal scales
    w[:, :32] = 0
    qt = lb.quantize(w, bits=4, group_size=32, symmetric=False)
    assert (np.asarray(qt.scales)[:, 0] == 0).all()
    assert (np.asarray(export(qt)["scales"])[0] == 0).all()


_I32, _F16 = np.int32, np.float16


@pytest.mark.parametrize("fn, args, kw, msg", [
    (lio.from_gptq, ((0, 8), (1, 1), (1, 8)), {}, "qweight is empty"),               # K = 0
    (lio.from_gptq, ((0, 8), (1, 1), (1, 8)), {"g_idx": np.zeros(0, _I32)}, "qweight is empty"),
    (lio.from_gptq, ((4, 0), (1, 0), (1, 0)), {}, "qweight is empty"),               # N = 0
    (lio.from_gptq, ((4, 8), (0, 1), (0, 8)), {"g_idx": np.zeros(32, _I32)}, "scales is empty"),  # G = 0
    (lio.from_awq, ((0, 1), (1, 1), (1, 8)), {}, "qweight is empty"),
    (lio.from_awq, ((16, 1), (0, 1), (0, 8)), {}, "scales is empty"),
], ids=["gptq_K0", "gptq_K0_g_idx", "gptq_N0", "gptq_G0", "awq_K0", "awq_G0"])
def test_checkpoint_import_rejects_empty_weights(fn, args, kw, msg):
    """An empty weight used to divide by zero in the group arithmetic (or reduce an empty g_idx)."""
    qw, qz, sc = args
    with pytest.raises(ValueError, match=f"'w'.*{msg}"):
        fn(np.zeros(qw, _I32), np.zeros(qz, _I32), np.ones(sc, _F16), name="w", **kw)


def test_load_gptq_rejects_non_integer_bits(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    st.save_file({"x": np.ones(2, F32)}, str(tmp_path / "g.safetensors"))
    with pytest.raises(ValueError, match="bits must be an integer.*4.9"):  # not truncated to 4
        lio.load_gptq(str(tmp_path / "g.safetensors"), quantize_config={"bits": 4.9})


# ----------------------------------------------------------------------------------------- GGUF
def ref_q8_0(q_int8, d16):
    """Q8_0 bytes [rows, nb*34] from int8 codes [rows, K] and fp16 d [rows, K/32]."""
    rows, K = q_int8.shape
    out = bytearray()
    for r in range(rows):
        for b in range(K // 32):
            out += np.float16(d16[r, b]).tobytes() + q_int8[r, b * 32:(b + 1) * 32].astype(np.int8).tobytes()
    return np.frombuffer(bytes(out), np.uint8).reshape(rows, -1)


def ref_q4_0(q_u4, d16):
    """Q4_0 bytes from codes q in [0, 15] [rows, K]: byte j = q[j] | q[j + 16] << 4."""
    rows, K = q_u4.shape
    out = bytearray()
    for r in range(rows):
        for b in range(K // 32):
            blk = q_u4[r, b * 32:(b + 1) * 32]
            out += np.float16(d16[r, b]).tobytes() + bytes(int(blk[j]) | (int(blk[j + 16]) << 4) for j in range(16))
    return np.frombuffer(bytes(out), np.uint8).reshape(rows, -1)


def write_gguf_raw(path, tensors):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for name, data, kind in tensors:
        w.add_tensor(name, data, raw_dtype=None if kind is None else getattr(gguf.GGMLQuantizationType, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_tensors_raw(path):
    gguf = pytest.importorskip("gguf")
    return {t.name: (gguf.GGMLQuantizationType(t.tensor_type).name, np.array(t.data))
            for t in gguf.GGUFReader(str(path)).tensors}


def test_gguf_import_is_bit_exact(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(2)
    rows, K = 8, 96
    q8 = rng.integers(-128, 128, (rows, K))
    q4 = rng.integers(0, 16, (rows, K))
    d = (rng.standard_normal((rows, K // 32)) * 0.01).astype(np.float16)  # negative d too (ggml Q4_0 does that)
    f32 = rng.standard_normal((5, 7)).astype(F32)
    path = tmp_path / "m.gguf"
    write_gguf_raw(path, [("a.q8", ref_q8_0(q8, d), "Q8_0"), ("b.q4", ref_q4_0(q4, d), "Q4_0"), ("norm", f32, None)])
    got = lio.load_gguf(str(path))
    a, b = got["a.q8"], got["b.q4"]
    assert (a.bits, a.group_size, a.symmetric, a.shape) == (8, 32, True, (rows, K))
    assert (b.bits, b.group_size, b.symmetric, b.shape) == (4, 32, True, (rows, K))
    np.testing.assert_array_equal(ref_lowbit_codes(a), q8)
    np.testing.assert_array_equal(ref_lowbit_codes(b), q4 - 8)
    np.testing.assert_array_equal(np.asarray(a.scales), d.astype(F32))
    zero = np.zeros((rows, K // 32))
    np.testing.assert_array_equal(lb.dequantize(a), ref_dequant(q8, zero, d, 32))
    np.testing.assert_array_equal(lb.dequantize(b), ref_dequant(q4, zero + 8, d, 32))
    # and the gguf package's own dequantizer agrees
    raw = gguf_tensors_raw(path)
    for name, qt in (("a.q8", a), ("b.q4", b)):
        kind, data = raw[name]
        np.testing.assert_array_equal(lb.dequantize(qt), gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind)))
    np.testing.assert_array_equal(got["norm"], f32)


@pytest.mark.parametrize("bits", [4, 8])
def test_gguf_export_matches_reference_and_round_trips(tmp_path, bits):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((6, 128)).astype(F32)
    qt = lb.quantize(w, bits=bits, group_size=32, symmetric=True)
    path = tmp_path / "out.gguf"
    lio.save_gguf(str(path), {"blk.0.w": qt, "bias": np.ones(6, F32)}, metadata={"general.name": "t"})
    d16 = np.asarray(qt.scales).astype(np.float16)
    c = ref_lowbit_codes(qt)
    want = ref_q8_0(c, d16) if bits == 8 else ref_q4_0(c + 8, d16)
    kind, data = gguf_tensors_raw(path)["blk.0.w"]
    assert kind == ("Q8_0" if bits == 8 else "Q4_0")
    np.testing.assert_array_equal(data, want)
    back = lio.load_gguf(str(path))
    np.testing.assert_array_equal(np.asarray(back["blk.0.w"].codes), np.asarray(qt.codes))
    np.testing.assert_array_equal(np.asarray(back["blk.0.w"].scales), d16.astype(F32))
    # the only loss is the fp16 rounding of the scales
    err = np.abs(lb.dequantize(back["blk.0.w"]) - lb.dequantize(qt)).max()
    assert err <= 2 ** (bits - 1) * np.abs(np.asarray(qt.scales) - d16.astype(F32)).max() + 1e-12
    assert not list(tmp_path.glob(".*.tmp"))


def test_gguf_asymmetric_zero8_exports_and_others_are_refused(tmp_path):
    pytest.importorskip("gguf")
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 64)).astype(F32)
    s = np.abs(rng.standard_normal((4, 2))).astype(F32) * 0.1
    qt = lb.quantize(w, bits=4, group_size=32, symmetric=False, scales=s, zeros=np.full((4, 2), 8))
    lio.save_gguf(str(tmp_path / "a.gguf"), {"w": qt})
    np.testing.assert_array_equal(lb.dequantize(lio.load_gguf(str(tmp_path / "a.gguf"))["w"]),
                                  ref_dequant(ref_lowbit_codes(qt), np.full((4, 2), 8), s.astype(np.float16), 32))
    for bad in (lb.quantize(w, bits=4, group_size=64, symmetric=True), lb.quantize(w, bits=4, group_size=32)):
        with pytest.raises(ValueError, match="'w'.*Q4_0"):
            lio.save_gguf(str(tmp_path / "b.gguf"), {"w": bad})
    assert not (tmp_path / "b.gguf").exists()


def test_gguf_unsupported_type_and_truncation(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(9)
    path = tmp_path / "k.gguf"
    q4k = rng.integers(0, 256, (2, 144)).astype(np.uint8)  # two rows of one 256-element Q4_K block
    q4k[:, 0:4] = np.frombuffer(np.array([0.01, 0.0], np.float16).tobytes(), np.uint8)  # d, dmin
    q8 = ref_q8_0(rng.integers(-128, 128, (2, 32)), np.full((2, 1), 0.5, np.float16))
    write_gguf_raw(path, [("ok", q8, "Q8_0"), ("blk.3.ffn", q4k, "Q4_K")])
    with pytest.raises(ValueError, match="'blk.3.ffn'.*Q4_K"):
        lio.load_gguf(str(path))
    assert set(lio.load_gguf(str(path), unsupported="skip")) == {"ok"}
    deq = lio.load_gguf(str(path), unsupported="dequantize")["blk.3.ffn"]
    np.testing.assert_array_equal(deq, gguf.quants.dequantize(q4k, gguf.GGMLQuantizationType.Q4_K))
    data = path.read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated.*'blk.3.ffn'"):
        lio.load_gguf(str(tmp_path / "t.gguf"))
    (tmp_path / "h.gguf").write_bytes(data[:40])
    with pytest.raises(ValueError, match="GGUF"):
        lio.load_gguf(str(tmp_path / "h.gguf"))


# ---------------------------------------------------------------------------------- save / load
def _formats(rng):
    w = rng.standard_normal((20, 200)).astype(F32)  # K=200: ragged last group for g64
    return {"int4_asym_g64": lb.quantize(w, 4, 64, False), "int8_sym_row": lb.quantize(w, 8, None, True),
            "int8_asym_g32": lb.quantize(w, 8, 32, False), "int3_sym_g32": lb.quantize(w, 3, 32, True),
            "nf4_g64": lb.quantize(w, 4, 64, codebook="nf4"), "int4_tensor": lb.quantize(w, 4, "tensor", False)}


def _same_qt(a, b):
    assert a.shape == b.shape and a.format == b.format
    for p in ("codes", "scales", "zeros"):
        x, y = getattr(a, p), getattr(b, p)
        assert (x is None) == (y is None), p
        if x is not None:
            assert str(x.dtype) == str(y.dtype), p
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


def test_save_load_round_trip_and_schema(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    obj = dict(_formats(rng))
    obj["bias"] = rng.standard_normal(20).astype(np.float16)
    obj["steps"] = np.arange(3, dtype=np.int64)
    path = tmp_path / "m.safetensors"
    lb.save(obj, str(path))
    got = lb.load(str(path))
    assert list(got) == list(obj)
    for k, v in obj.items():
        if isinstance(v, lb.QuantizedTensor):
            _same_qt(v, got[k])
        else:
            assert got[k].dtype == v.dtype
            np.testing.assert_array_equal(got[k], v)
    # an independent reader (the safetensors package) sees the same tensors and the schema
    raw = st.load_file(str(path))
    np.testing.assert_array_equal(raw["int4_asym_g64.lowbit.codes"], obj["int4_asym_g64"].codes)
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "lowbit" and meta["lowbit.schema_version"] == "1"
    ent = json.loads(meta["lowbit.entries"])["int4_asym_g64"]
    assert ent == {"kind": "quantized", "layout": "lowbit-rows-v1", "bits": 4, "scheme": "asymmetric",
                   "group_size": 64, "shape": [20, 200], "framework": "numpy",
                   "tensors": {"codes": "int4_asym_g64.lowbit.codes", "scales": "int4_asym_g64.lowbit.scales",
                               "zeros": "int4_asym_g64.lowbit.zeros"}}
    # a plain safetensors file loads as arrays
    st.save_file({"x": np.ones((2, 2), F32)}, str(tmp_path / "plain.safetensors"))
    np.testing.assert_array_equal(lb.load(str(tmp_path / "plain.safetensors"))["x"], np.ones((2, 2), F32))


def test_torch_state_dict_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(64, 16).to(torch.bfloat16)
    sd = lin.state_dict()
    sd["weight"] = lb.quantize(lin.weight.detach().float(), bits=4, group_size=32)
    lb.save(sd, str(tmp_path / "sd.safetensors"))
    got = lb.load(str(tmp_path / "sd.safetensors"))
    assert got["bias"].dtype == torch.bfloat16 and torch.equal(got["bias"], sd["bias"])
    assert isinstance(got["weight"].codes, torch.Tensor)
    _same_qt(sd["weight"], got["weight"])
    as_np = lb.load(str(tmp_path / "sd.safetensors"), framework="numpy")
    np.testing.assert_array_equal(as_np["bias"], sd["bias"].float().numpy())


def test_zero_dim_arrays_round_trip(tmp_path):
    """np.ascontiguousarray used to turn a 0-d array into shape (1,)."""
    pytest.importorskip("safetensors")
    obj = {"np": np.array(2.5, F32), "i": np.array(7, np.int64)}
    try:
        import torch
        obj["t"], obj["bf16"] = torch.tensor(2.5), torch.tensor(2.5, dtype=torch.bfloat16)
    except ImportError:
        pass
    lb.save(obj, str(tmp_path / "s.safetensors"))
    got = lb.load(str(tmp_path / "s.safetensors"))
    for k, v in obj.items():
        assert tuple(got[k].shape) == () and type(got[k]) is type(v), k
        assert got[k].dtype == v.dtype and got[k].item() == v.item(), k


@pytest.mark.parametrize("obj, err, msg", [
    ({"__metadata__": np.ones(2, F32)}, ValueError, "reserved by safetensors"),
    ({"c": np.ones(2, np.complex64)}, TypeError, "complex64 cannot be stored"),
    ({"c": np.ones(2, np.complex128)}, TypeError, "complex128 cannot be stored"),
], ids=["metadata_name", "complex64", "complex128"])
def test_save_refuses_what_load_cannot_read(tmp_path, obj, err, msg):
    """These used to be written, leaving a file that lb.load rejects (or misreads)."""
    pytest.importorskip("safetensors")
    path = tmp_path / "x.safetensors"
    with pytest.raises(err, match=msg):
        lb.save(obj, str(path))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_shared_memory_is_stored_once(tmp_path):
    """Two entries viewing the same memory (a tied embedding and lm_head) are written once, as an
    alias entry (schema 2), and load as one object; equal values in separate memory stay separate."""
    st = pytest.importorskip("safetensors.numpy")
    torch = pytest.importorskip("torch")
    emb = torch.randn(50, 16)
    sd = {"embed.weight": emb, "head.weight": emb.detach(), "copy": emb.clone(),
          "q": lb.quantize(np.ones((4, 32), F32), 4, 32), "a": np.arange(6, dtype=F32)}
    sd["a_view"] = sd["a"][:]
    path = str(tmp_path / "tied.safetensors")
    lb.save(sd, path)
    assert sorted(st.load_file(path)) == ["a", "copy", "embed.weight", "q.lowbit.codes", "q.lowbit.scales",
                                          "q.lowbit.zeros"]
    from safetensors import safe_open
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    entries = json.loads(meta["lowbit.entries"])
    assert meta["lowbit.schema_version"] == "2" and SCHEMA_VERSION == 2
    assert entries["head.weight"] == {"kind": "alias", "of": "embed.weight"}
    assert entries["a_view"] == {"kind": "alias", "of": "a"} and entries["copy"]["kind"] == "dense"
    got = lb.load(path)
    assert list(got) == list(sd)
    assert got["head.weight"] is got["embed.weight"] and torch.equal(got["head.weight"], emb)
    assert got["copy"] is not got["embed.weight"] and got["a_view"] is got["a"]
    for bad, msg in (({"x": {"kind": "alias", "of": "nowhere"}}, "'x'.*alias of 'nowhere'"),
                     ({"x": {"kind": "alias", "of": "q"}}, "'x'.*alias of 'q'.*not an earlier dense")):
        dst = tmp_path / "bad_alias.safetensors"
        _rewrite_meta(path, dst, lambda m, e, t: e.update(bad))
        with pytest.raises(ValueError, match=msg):
            lb.load(str(dst))


def _rewrite_meta(src, dst, fn):
    """Copy a lowbit file with its metadata changed by fn(meta, entries) (written by safetensors)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    with safe_open(str(src), framework="np") as f:
        meta = dict(f.metadata())
    entries = json.loads(meta["lowbit.entries"])
    tensors = load_file(str(src))
    fn(meta, entries, tensors)
    meta["lowbit.entries"] = json.dumps(entries)
    save_file(tensors, str(dst), metadata=meta)


def test_load_rejects_newer_unknown_inconsistent_truncated(tmp_path):
    pytest.importorskip("safetensors")
    rng = np.random.default_rng(1)
    src = tmp_path / "ok.safetensors"
    lb.save({"layers.0.w": lb.quantize(rng.standard_normal((8, 64)).astype(F32), 4, 32), "b": np.ones(8, F32)}, str(src))
    cases = {
        "newer": (lambda m, e, t: m.update({"lowbit.schema_version": str(SCHEMA_VERSION + 1)}),
                  f"schema version {SCHEMA_VERSION + 1}.*[Uu]pgrade"),
        "scheme": (lambda m, e, t: e["layers.0.w"].update(scheme="int5"), "'layers.0.w'.*unknown format scheme"),
        "layout": (lambda m, e, t: e["layers.0.w"].update(layout="marlin-v9"), "'layers.0.w'.*unknown layout"),
        "kind": (lambda m, e, t: e["b"].update(kind="sparse"), "'b'.*unknown entry kind"),
        "shape": (lambda m, e, t: e["layers.0.w"].update(shape=[8, 96]), "'layers.0.w'.*inconsistent.*codes"),
        "missing": (lambda m, e, t: t.pop("layers.0.w.lowbit.zeros"), "'layers.0.w'.*zeros.*missing"),
    }
    for case, (fn, msg) in cases.items():
        dst = tmp_path / f"{case}.safetensors"
        _rewrite_meta(src, dst, fn)
        with pytest.raises(ValueError, match=msg):
            lb.load(str(dst))
    data = src.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated.*tensor '"):
        lb.load(str(tmp_path / "trunc.safetensors"))
    (tmp_path / "hdr.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="corrupted safetensors header"):
        lb.load(str(tmp_path / "hdr.safetensors"))
    with pytest.raises(TypeError, match="'x'.*list"):
        lb.save({"x": [1, 2]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="collides"):
        lb.save({"a": lb.quantize(np.ones((2, 32), F32), 4, 32), "a.lowbit.codes": np.ones(1, F32)},
                str(tmp_path / "bad.safetensors"))


def _write_lowbit(path, entries, tensors):
    """A lowbit file whose lowbit.entries is `entries` (a dict, or JSON text written as is)."""
    from safetensors.numpy import save_file
    text = entries if isinstance(entries, str) else json.dumps(entries)
    save_file(tensors, str(path), metadata={"format": "lowbit", "lowbit.schema_version": "1",
                                            "lowbit.entries": text})
    return str(path)


def _write_raw_safetensors(path, header, data=b""):
    """A safetensors file with exactly this JSON header (the safetensors package refuses odd ones)."""
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)
    return str(path)


# one 4x32 int4-asym per-row quantized entry; "@V@" in a test's JSON text is replaced by raw JSON
_Q_TENSORS = {"c": np.zeros((4, 16), np.uint8), "s": np.ones((4, 1), F32), "z": np.zeros((4, 1), np.uint8)}


def _q_entry(**kw):
    e = {"kind": "quantized", "layout": "lowbit-rows-v1", "bits": 4, "scheme": "asymmetric", "group_size": None,
         "shape": [4, 32], "tensors": {"codes": "c", "scales": "s", "zeros": "z"}, "framework": "numpy"}
    e.update(kw)
    return e


@pytest.mark.parametrize("meta_dtype, stored, framework", [
    ("bfloat16", np.array([1.5, 2.5, 3.0], F32), "numpy"),   # used to read as 9.18e-41, ...
    ("bfloat16", np.array([1.5, 2.5, 3.0], F32), "torch"),   # used to read as 6 bfloat16 values
    ("uint16", np.array([1, 2], np.uint32), "torch"),
    ("float32", np.array([1, 2], np.int32), "numpy"),
    ("float16", np.array([1, 2], np.uint16), "numpy"),
], ids=["bf16_on_f32", "bf16_on_f32_torch", "u16_on_u32_torch", "f32_on_i32", "f16_on_u16"])
def test_load_rejects_dense_dtype_that_disagrees_with_the_file(tmp_path, meta_dtype, stored, framework):
    pytest.importorskip("safetensors")
    if framework == "torch":
        pytest.importorskip("torch")
    ent = {"x": {"kind": "dense", "tensors": {"data": "f"}, "dtype": meta_dtype, "framework": framework}}
    path = _write_lowbit(tmp_path / "d.safetensors", ent, {"f": stored})
    st_name = {"float32": "F32", "uint32": "U32", "int32": "I32", "uint16": "U16"}[stored.dtype.name]
    with pytest.raises(ValueError, match=f"'x'.*dtype '{meta_dtype}'.*{st_name}"):
        lb.load(path)


def test_load_accepts_bfloat16_stored_as_u16_or_bf16(tmp_path):
    pytest.importorskip("safetensors")
    bits = (np.array([1.5, -2.0], F32).view(np.uint32) >> 16).astype(np.uint16)
    ent = {"x": {"kind": "dense", "tensors": {"data": "f"}, "dtype": "bfloat16", "framework": "numpy"}}
    got = lb.load(_write_lowbit(tmp_path / "u16.safetensors", ent, {"f": bits}))["x"]
    np.testing.assert_array_equal(got, [1.5, -2.0])
    meta = {"format": "lowbit", "lowbit.schema_version": "1", "lowbit.entries": json.dumps(ent)}
    path = _write_raw_safetensors(tmp_path / "bf16.safetensors", {
        "__metadata__": meta, "f": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, bits.tobytes())
    np.testing.assert_array_equal(lb.load(path)["x"], [1.5, -2.0])


@pytest.mark.parametrize("field, raw, msg", [
    ("bits", "4.9", "bits must be an integer.*4.9"),               # used to load as bits=4
    ("bits", "4.0", "bits must be an integer"),
    ("bits", "1e400", "bits must be an integer.*inf"),             # used to raise OverflowError
    ("bits", '"4"', "bits must be an integer"),
    ("group_size", "16.7", "group_size must be an integer.*16.7"),  # used to load as group_size=16
    ("group_size", "1e400", "group_size must be an integer.*inf"),
    ("group_size", "0", "group_size must be an integer >= 1"),      # used to raise ZeroDivisionError
    ("group_size", "true", "group_size must be an integer"),
    ("shape", "[4, 32.5]", "shape must be an integer.*32.5"),
    ("shape", "[4, 1e400]", "shape must be an integer.*inf"),
    ("shape", "[4, -32]", "shape must be an integer >= 0"),
], ids=["bits_4.9", "bits_4.0", "bits_1e400", "bits_str", "group_16.7", "group_1e400", "group_0", "group_true",
        "shape_float", "shape_1e400", "shape_negative"])
def test_load_rejects_non_integer_metadata_numbers(tmp_path, field, raw, msg):
    pytest.importorskip("safetensors")
    text = json.dumps({"q": _q_entry(**{field: "@V@"})}).replace('"@V@"', raw)
    path = _write_lowbit(tmp_path / "n.safetensors", text, _Q_TENSORS)
    with pytest.raises(ValueError, match=f"'q'.*{msg}"):
        lb.load(path)


@pytest.mark.parametrize("entries, msg", [
    ("[]", "lowbit.entries.*JSON list, not an object"),
    ('"abc"', "lowbit.entries.*JSON str, not an object"),
    ({"q": _q_entry(tensors=["c", "s", "z"])}, "'q'.*malformed entry: its tensors"),
    ({"q": _q_entry(tensors={"codes": ["c"], "scales": "s", "zeros": "z"})}, "'q'.*malformed entry: its tensors"),
    ({"q": _q_entry(scheme=["asymmetric"])}, "'q'.*unknown format scheme"),
    ({"q": _q_entry(shape=4)}, "'q'.*inconsistent quantized entry"),
    ({"q": _q_entry(), "a": {"kind": "alias", "of": ["q"]}}, r"'a'.*alias of \['q'\]"),
], ids=["entries_list", "entries_str", "tensors_list", "tensor_name_list", "scheme_list", "shape_int",
        "alias_of_list"])
def test_load_rejects_malformed_lowbit_metadata(tmp_path, entries, msg):
    """Each of these used to escape as AttributeError or TypeError('unhashable type')."""
    pytest.importorskip("safetensors")
    path = _write_lowbit(tmp_path / "m.safetensors", entries, _Q_TENSORS)
    with pytest.raises(ValueError, match=msg):
        lb.load(path)


_T = {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}


@pytest.mark.parametrize("header, msg", [
    ({"__metadata__": [1], "t": _T}, "__metadata__ is a JSON list"),
    ({"__metadata__": {"format": "lowbit", "lowbit.schema_version": "1", "lowbit.entries": {"t": 1}}, "t": _T},
     "__metadata__ 'lowbit.entries' is a JSON dict, not a string"),
    ({"t": dict(_T, shape=[4.0])}, "'t'.*malformed entry"),
    ({"t": dict(_T, shape="4")}, "'t'.*malformed entry"),
    ({"t": dict(_T, data_offsets=[0.5, 4])}, "'t'.*malformed entry"),
    ({"t": dict(_T, shape=[2 ** 32, 2 ** 32], data_offsets=[0, 0])}, "'t'.*needs 18446744073709551616 bytes"),
], ids=["meta_list", "meta_value_dict", "shape_float", "shape_str", "offset_float", "shape_wraps_int64"])
def test_load_rejects_malformed_safetensors_header(tmp_path, header, msg):
    path = _write_raw_safetensors(tmp_path / "h.safetensors", header, b"abcd")
    with pytest.raises(ValueError, match=msg):
        lb.load(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    stn = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "m.safetensors"
    lb.save({"x": np.zeros(4, F32)}, str(path))
    before = path.read_bytes()
    real = stn.save_file

    def crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(20)  # half-written
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(stn, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        lb.save({"x": np.ones(1000, F32)}, str(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ------------------------------------------------------------------------ checkpoints + inspect
def test_checkpoint_files_and_inspect(tmp_path, capsys):
    st = pytest.importorskip("safetensors.numpy")
    pytest.importorskip("gguf")
    from lowbit import cli
    rng = np.random.default_rng(6)
    q, z, s = random_gptq(rng, 32, 128, 32, 4, False)
    perm = rng.permutation(128)
    g_idx = np.empty(128, np.int64)
    g_idx[perm] = np.arange(128) // 32
    gp = {f"model.layers.0.self_attn.q_proj.{k}": v for k, v in ref_gptq(q, z, s, g_idx, 4, True).items()}
    gp["model.norm.weight"] = np.ones(32, np.float16)
    st.save_file(gp, str(tmp_path / "gptq.safetensors"))
    got = lio.load_gptq(str(tmp_path / "gptq.safetensors"), quantize_config={"bits": 4, "checkpoint_format": "gptq"})
    imp = got["model.layers.0.self_attn.q_proj"]
    np.testing.assert_array_equal(lb.dequantize(imp.qt), ref_dequant(q[imp.perm].T, z.T, s.T, 32))
    np.testing.assert_array_equal(g_idx[imp.perm], np.arange(128) // 32)
    np.testing.assert_array_equal(got["model.norm.weight"], np.ones(32, np.float16))
    aw = {"l.qweight": ref_pack_fields(q, 4, AWQ_ORDER), "l.qzeros": ref_pack_fields(z, 4, AWQ_ORDER), "l.scales": s}
    st.save_file(aw, str(tmp_path / "awq.safetensors"))
    np.testing.assert_array_equal(lb.dequantize(lio.load_awq(str(tmp_path / "awq.safetensors"))["l"]),
                                  ref_dequant(q.T, z.T, s.T, 32))
    lb.save({"w": lb.quantize(rng.standard_normal((16, 64)).astype(F32), 4, 32)}, str(tmp_path / "lb.safetensors"))
    lio.save_gguf(str(tmp_path / "m.gguf"), {"w8": lb.quantize(rng.standard_normal((4, 64)).astype(F32), 8, 32, True)})
    expect = {"gptq.safetensors": ["model.layers.0.self_attn.q_proj", "gptq int4 g32 act-order", "32x128",
                                   "model.norm.weight", "dense F16"],
              "awq.safetensors": ["awq int4 g32", "32x128"],
              "lb.safetensors": ["lowbit int4-asym-g32", "16x64"],
              "m.gguf": ["gguf Q8_0", "4x64", str(4 * 2 * 34)]}
    for name, words in expect.items():
        assert cli.main(["inspect", str(tmp_path / name)]) == 0
        text = capsys.readouterr().out
        for w in words:
            assert w in text, (name, w, text)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    assert cli.main(["inspect", str(tmp_path / "bad.safetensors")]) == 1
    assert "not a safetensors file" in capsys.readouterr().err


def test_import_lowbit_stays_light():
    code = ("import sys, lowbit, lowbit.io, lowbit.cli; lowbit.save; "
            "print(sorted(m for m in ('torch', 'safetensors', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.stdout.strip() == "[]"


def test_pyproject_declares_script_and_test_extra():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "pyproject.toml")).read()
    assert 'lowbit = "lowbit.cli:main"' in text
    test_extra = [line for line in text.splitlines() if line.startswith("test = [")][0]
    assert "safetensors" in test_extra and "gguf" in test_extra
