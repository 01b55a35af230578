"""The fast packed path (kernels/codes.py) and NVFP4's given tensor amax, against the reference.

encode: the fast CPU path gives the reference encode's codes, scale codes and tensor scale bit for
bit over the kernel tests' vectors (every code point, midpoint, float32 ulp neighbours, overflow,
specials, random values; tests/test_kernels_common.py), every deterministic mode and overflow policy;
decode (a table look-up) gives the reference decode's bits. Stochastic modes: decode(encode(x)) is
quantize(x) with the same seed, and the frequencies are right. ``tensor_amax``: every backend agrees,
and bad values are refused with a clear error.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit.kernels import codes, cpu_fast
from test_kernels_common import (BLOCK_FORMATS, DETERMINISTIC, ELEMENT_FORMATS, assert_same_bits, block_vectors,
                                 element_vectors, overflow_policies)


@pytest.fixture(autouse=True)
def _one_thread_eager(monkeypatch):
    """One torch thread and eager execution (the compiled path has its own test below)."""
    monkeypatch.setenv("LOWBIT_CPU_COMPILE", "0")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_same_encoding(got, want, x, what):
    assert got.codes.dtype == want.codes.dtype, (what, got.codes.dtype, want.codes.dtype)
    bad = got.codes != want.codes
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} codes differ; first x="
                                 f"{x.reshape(-1)[bad.reshape(-1)][:6].tolist()} got="
                                 f"{got.codes[bad][:6].tolist()} want={want.codes[bad][:6].tolist()}")
    if want.scales is not None:
        assert got.scales.dtype == want.scales.dtype and torch.equal(got.scales, want.scales), what
    if want.tensor_scale is not None:
        assert torch.equal(got.tensor_scale.cpu(), want.tensor_scale.cpu()), what


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_element_codes_bit_exact(name):
    fmt = lowbit.format(name)
    assert codes.code_spec(fmt) is not None, f"{name} is not claimed by the fast encode"
    x = element_vectors(fmt, n_random=5000)
    if not fmt.has_nan:
        x = x[~torch.isnan(x)]       # refused by encode (tested below)
    for overflow in overflow_policies(fmt):
        for mode in DETERMINISTIC:
            want = lowbit.encode(x, fmt, mode, overflow, backend="reference")
            got = lowbit.encode(x, fmt, mode, overflow, backend="cpu_fast")
            _assert_same_encoding(got, want, x, f"{name} {mode} {overflow}")
            assert_same_bits(lowbit.decode(got), lowbit.decode(want, backend="reference"), x, f"{name} decode")


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_block_codes_bit_exact(name):
    fmt = lowbit.format(name)
    assert codes.block_code_claims(fmt, "nearest_even") is not None, f"{name} is not claimed"
    x = block_vectors(fmt, n_blocks=256)
    for mode in DETERMINISTIC:
        want = lowbit.encode(x, fmt, mode, backend="reference")
        got = lowbit.encode(x, fmt, mode, backend="cpu_fast")
        _assert_same_encoding(got, want, x, f"{name} {mode}")
        assert_same_bits(lowbit.decode(got), lowbit.decode(want, backend="reference"), x, f"{name} decode")


def test_fast_path_is_used(monkeypatch):
    calls = []
    for fn in ("encode_element", "encode_block", "decode_element", "decode_block"):
        real = getattr(codes, fn)
        monkeypatch.setattr(codes, fn, lambda *a, _r=real, _n=fn: calls.append(_n) or _r(*a))
    x = torch.randn(4, 32)
    lowbit.decode(lowbit.encode(x, "e4m3fn"))
    lowbit.decode(lowbit.encode(x, "mxfp4"))
    assert calls == ["encode_element", "decode_element", "encode_block", "decode_block"]
    # unclaimed work (a codebook of float64 values, float64 tensors) still encodes, on the reference
    for fmt, xx in (("codebook(0.1,0.2,0.7)", x.double()), ("e4m3fn", x.double())):
        assert torch.equal(lowbit.decode(lowbit.encode(xx, fmt)), lowbit.quantize(xx, fmt))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_other_axis(dtype):
    for name in ("e4m3fn", "e2m1fn", "int4", "mxfp4", "nvfp4"):
        fmt = lowbit.format(name)
        if isinstance(fmt, lowbit.BlockFormat):
            x = block_vectors(fmt, n_blocks=64)
            x = x[: (x.shape[0] // 4) * 4].reshape(-1, 4, fmt.size).permute(2, 0, 1).to(dtype)  # axis 0
            kw = {"axis": 0}
        else:
            x = element_vectors(fmt, n_random=1000).to(dtype)
            x = x if fmt.has_nan else x[~torch.isnan(x)]
            kw = {}
        for mode in ("nearest_even", "up"):
            want = lowbit.encode(x, fmt, mode, backend="reference", **kw)
            got = lowbit.encode(x, fmt, mode, **kw)
            _assert_same_encoding(got, want, x, f"{name} {mode} {dtype}")
            d = lowbit.decode(got)
            assert d.dtype == dtype
            assert_same_bits(d, lowbit.quantize(x, fmt, mode, **kw), x, f"{name} {dtype} round trip")


def test_user_scale_and_nan_refused():
    x = torch.randn(8, 64) * 3
    s = torch.rand(8, 1) + 0.1
    for name in ("e4m3fn", "int4", "e2m1fn"):
        enc = lowbit.encode(x, name, scale=s)
        assert_same_bits(lowbit.decode(enc), lowbit.quantize(x, name, scale=s), x, name)
    xn = torch.tensor([1.0, float("nan"), 2.0])
    for name in ("e2m1fn", "int4", "int8", "e3m2fn"):
        with pytest.raises(ValueError, match="has no nan code"):
            lowbit.encode(xn, name, backend="cpu_fast")
    assert lowbit.encode(xn, "e4m3fn").codes[1] == 0x7F


def test_stochastic_round_trip_and_statistics():
    x = torch.full((200_000,), 1.0 + 2**-5)          # e4m3fn: p(up to 1.125) = 0.25
    for name, xx in (("e4m3fn", x), ("mxfp8_e4m3", x.view(-1, 32)), ("nvfp4", x.view(-1, 16) * 0.7)):
        for mode, kw in (("stochastic", {}), ("stochastic", {"sr_bits": 3}), ("stochastic_half", {})):
            enc = lowbit.encode(xx, name, mode, generator=11, **kw)
            q = lowbit.quantize(xx, name, mode, generator=11, **kw)
            assert_same_bits(lowbit.decode(enc), q, xx, f"{name} {mode}")
    enc = lowbit.encode(x, "e4m3fn", "stochastic", generator=3)
    up = (enc.codes == 0x39).double()                # 1.125 = 0 0111 001
    assert bool(((enc.codes == 0x38) | (enc.codes == 0x39)).all())
    assert abs(up.mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / len(up))


def test_compiled_encode_matches_eager(monkeypatch):
    fmt = lowbit.format("e4m3fn")
    x = element_vectors(fmt, n_random=20_000)
    xb = block_vectors(lowbit.format("nvfp4"), n_blocks=128)
    eager = lowbit.encode(x, fmt, "nearest_even")
    eager_b = lowbit.encode(xb, "nvfp4", "up")
    monkeypatch.setenv("LOWBIT_CPU_COMPILE", "1")
    cpu_fast._compile_ok[0] = None
    comp = lowbit.encode(x, fmt, "nearest_even")
    if cpu_fast._compile_ok[0] is False:
        pytest.skip("torch.compile does not work on this machine (no C++ toolchain?)")
    _assert_same_encoding(comp, eager, x, "compiled e4m3fn")
    comp_b = lowbit.encode(xb, "nvfp4", "up")
    _assert_same_encoding(comp_b, eager_b, xb, "compiled nvfp4")
    # the compiled table decoder
    assert_same_bits(lowbit.decode(comp), lowbit.decode(eager, backend="reference"), x, "compiled decode")



CODEBOOKS = ("nf4", "fp4_bnb", "codebook(-3,-1,-0.25,0,0.5,0.75,2,6)", "codebook(0.25,0.5,3)")


@pytest.mark.parametrize("name", CODEBOOKS)
def test_codebooks_bit_exact(name):
    """Codebooks on the fast path (kernels/codebook_fast.py): quantize and encode give the
    reference's bits in every deterministic mode; stochastic modes stay on the reference."""
    from lowbit.kernels import codebook_fast
    fmt = lowbit.format(name)
    x = element_vectors(fmt, n_random=5000)
    xn = x[~torch.isnan(x)]
    for mode in DETERMINISTIC:
        got = cpu_fast.quantize_element(x, fmt, mode, "saturate")
        assert got is not None, f"{name} is not claimed"
        assert_same_bits(got, lowbit.quantize(x, fmt, mode, backend="reference"), x, f"{name} {mode}")
        _assert_same_encoding(lowbit.encode(xn, fmt, mode), lowbit.encode(xn, fmt, mode, backend="reference"),
                              xn, f"{name} {mode} encode")
    assert codebook_fast.encode_element(x, fmt, "nearest_even")[1]      # x holds nan: encode refuses it
    assert not codebook_fast.claims(fmt, "stochastic")


# --- NVFP4's given tensor amax (delayed scaling) ------------------------------------------------------

def test_tensor_amax_all_backends_agree():
    fmt = lowbit.format("nvfp4")
    x = block_vectors(fmt, n_blocks=128)
    true_amax = float(torch.where(torch.isfinite(x), x.abs(), 0).amax())
    for amax in (true_amax, true_amax / 3, true_amax / 1e20, 0.0, 1e-30):
        for mode in ("nearest_even", "toward_zero"):
            want = lowbit.quantize(x, fmt, mode, tensor_amax=amax, backend="reference")
            assert_same_bits(lowbit.quantize(x, fmt, mode, tensor_amax=amax, backend="cpu_fast"), want, x,
                             f"amax {amax} {mode}")
            enc = lowbit.encode(x, fmt, mode, tensor_amax=amax)
            _assert_same_encoding(enc, lowbit.encode(x, fmt, mode, tensor_amax=amax, backend="reference"), x,
                                  f"encode amax {amax}")
            assert_same_bits(lowbit.decode(enc), want, x, f"decode amax {amax}")
    # the tensor's own amax given = measured; a stale (smaller) amax saturates, it is not an error
    assert_same_bits(lowbit.quantize(x, fmt, tensor_amax=torch.tensor(true_amax)), lowbit.quantize(x, fmt), x,
                     "given = measured")
    small = lowbit.quantize(x, fmt, tensor_amax=true_amax / 1e6)
    assert float(torch.where(torch.isfinite(small), small.abs(), 0).amax()) <= true_amax / 1e6 * 1.0001
    # float64 amax is used as float32, numpy scalars and one-element arrays are accepted
    a64 = 1.0 + 2**-40
    assert_same_bits(lowbit.quantize(x, fmt, tensor_amax=a64), lowbit.quantize(x, fmt, tensor_amax=1.0), x,
                     "float64 amax")
    assert_same_bits(lowbit.quantize(x, fmt, tensor_amax=np.float32(2.5)),
                     lowbit.quantize(x, fmt, tensor_amax=np.array([[2.5]])), x, "numpy amax")


def test_tensor_amax_block_with_tensor_flag():
    fmt = lowbit.format("block(e3m2fn,e4m3fn,8,tensor)")
    x = torch.randn(64, 16) * 40
    for b in ("reference", "cpu_fast"):
        assert_same_bits(lowbit.quantize(x, fmt, tensor_amax=30.0, backend=b),
                         lowbit.quantize(x, fmt, tensor_amax=30.0, backend="reference"), x, b)


@pytest.mark.parametrize("bad, err, match", [
    (-1.0, ValueError, "finite number >= 0"),
    (float("nan"), ValueError, "finite number >= 0"),
    (float("inf"), ValueError, "finite number >= 0"),
    (1e39, ValueError, "past float32's range"),
    (torch.tensor([1.0, 2.0]), ValueError, "one number"),
    (np.ones((2, 2)), ValueError, "one number"),
    ("3", TypeError, "number or a one-element tensor"),
    (True, TypeError, "number or a one-element tensor"),
    (torch.tensor([True]), TypeError, "real number"),
])
def test_tensor_amax_bad_values(bad, err, match):
    with pytest.raises(err, match=match):
        lowbit.quantize(torch.randn(32), "nvfp4", tensor_amax=bad)
    with pytest.raises(err, match=match):
        lowbit.encode(torch.randn(32), "nvfp4", tensor_amax=bad)


def test_tensor_amax_refused_without_a_tensor_scale():
    for name in ("mxfp4", "e4m3", "int4", "block(e2m1fn,e4m3fn,16)"):
        with pytest.raises(ValueError, match="per-tensor scale"):
            lowbit.quantize(torch.randn(32), name, tensor_amax=1.0)
