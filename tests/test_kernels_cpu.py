"""The fast CPU path (kernels/cpu_fast.py) against the reference oracle, bit for bit.

Deterministic modes: every code point, midpoint, float32 ulp neighbours, overflow, specials and
random values (tests/test_kernels_common.py) for every format the path claims, under every overflow
policy the format allows. Stochastic modes: statistics (unbiased, frequencies proportional to the
distance, reproducible, independent across elements, sr_bits as hardware does it). Dispatch: auto
picks the fast path, falls back to the reference for what it does not claim.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.formats import BlockFormat, FloatFormat, IntFormat
from lowbit.kernels import cpu_fast
from test_kernels_common import (overflow_policies, BLOCK_FORMATS, DETERMINISTIC, ELEMENT_FORMATS, assert_same_bits,
                                 block_vectors, element_vectors, reference_block, reference_element)


@pytest.fixture(autouse=True)
def _one_thread_eager(monkeypatch):
    """One torch thread (pytest -n 2 on two cores) and eager execution (compiling each of the many
    variants would take minutes; the compiled path has its own test below)."""
    monkeypatch.setenv("LOWBIT_CPU_COMPILE", "0")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- deterministic modes: bit-exact ----------------------------------------------------------------

@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_element_formats_bit_exact(name):
    fmt = lowbit.format(name)
    x = element_vectors(fmt)
    for overflow in overflow_policies(fmt):
        for mode in DETERMINISTIC:
            assert cpu_fast.element_spec(fmt, mode, overflow) is not None, f"{name} is no longer claimed"
            got = cpu_fast.quantize_element(x, fmt, mode, overflow)
            assert got is not None
            assert_same_bits(got, reference_element(x, fmt, mode, overflow), x, f"{name} {mode} {overflow}")


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_block_formats_bit_exact(name):
    fmt = lowbit.format(name)
    x = block_vectors(fmt)
    for mode in DETERMINISTIC:
        got = cpu_fast.quantize_block(x, fmt, mode, -1)
        assert got is not None, f"{name} {mode} is no longer claimed"
        assert_same_bits(got, reference_block(x, fmt, mode), x, f"{name} {mode}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["e4m3fn", "e5m2", "e2m1fn", "int4", "e3m4"])
def test_half_precision_inputs(name, dtype):
    fmt = lowbit.format(name)
    x = element_vectors(fmt, n_random=4000).to(dtype)
    for mode in DETERMINISTIC:
        got = cpu_fast.quantize_element(x, fmt, mode, "saturate")
        assert got.dtype == dtype
        assert_same_bits(got, reference_element(x, fmt, mode, "saturate"), x, f"{name} {mode} {dtype}")


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp8_e5m2"])
def test_blocks_other_axis_and_dtype(name):
    fmt = lowbit.format(name)
    x = block_vectors(fmt, n_blocks=64)                       # (rows, size)
    xt = x[: (x.shape[0] // 4) * 4].reshape(-1, 4, fmt.size).permute(2, 0, 1)   # block axis 0
    for mode in ("nearest_even", "up"):
        got = cpu_fast.quantize_block(xt, fmt, mode, 0)
        assert_same_bits(got, reference_block(xt, fmt, mode, 0), xt, f"{name} {mode} axis 0")
        xb = xt.to(torch.bfloat16)
        got = cpu_fast.quantize_block(xb, fmt, mode, 0)
        assert_same_bits(got, reference_block(xb, fmt, mode, 0), xb, f"{name} {mode} bf16")


def test_through_public_api_all_backends_agree():
    x = torch.randn(4096) * 30
    for name in ("e4m3", "e5m2", "int8", "mxfp4", "nvfp4", "fixed8.4"):
        ref = lowbit.quantize(x, name, "nearest_away", backend="reference")
        for b in ("auto", "cpu_fast"):
            assert_same_bits(lowbit.quantize(x, name, "nearest_away", backend=b), ref, x, f"{name} {b}")


# --- what is not claimed falls back, and dispatch ----------------------------------------------------

def test_unclaimed_work_falls_back_to_reference():
    x = torch.randn(1000)
    assert cpu_fast.quantize_element(x.double(), lowbit.format("e4m3"), "nearest_even", "saturate") is None
    # codebooks: stochastic modes, and tables float32 cannot hold, stay on the reference
    assert cpu_fast.quantize_element(x, lowbit.format("nf4"), "stochastic", "saturate") is None
    assert cpu_fast.quantize_element(x, lowbit.format("codebook(0.1,0.2,0.7)"), "nearest_even", "saturate") is None
    for name in ("e8m0", "e8m23_b-1"):
        f = lowbit.format(name)
        assert cpu_fast.quantize_element(x, f, "nearest_even", "saturate") is None, name
        want = kernels.quantize_element(x, f, "nearest_even", "saturate", backend="reference")
        assert_same_bits(lowbit.quantize(x, f, backend="cpu_fast") if name != "e8m23_b-1" else
                         kernels.quantize_element(x, f, "nearest_even", "saturate", backend="cpu_fast"),
                         want, x, name)
    assert cpu_fast.quantize_block(x.reshape(-1, 10), lowbit.format("block(nf4,e8m0,10)"),
                                   "nearest_even", -1) is None


def test_auto_dispatch_uses_fast_path_on_cpu(monkeypatch):
    calls = []
    real = cpu_fast.quantize_element

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_fast, "quantize_element", spy)
    lowbit.quantize(torch.randn(100), "e4m3")
    assert calls == [True]
    lowbit.quantize(torch.randn(100), "e4m3", backend="reference")
    assert calls == [True]


def test_triton_backend_refuses_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="triton"):
        lowbit.quantize(torch.randn(10), "e4m3", backend="triton")


def test_unknown_backend_names_the_accepted_ones():
    with pytest.raises(ValueError, match="cpu_fast"):
        lowbit.quantize(torch.randn(10), "e4m3", backend="fast")


# --- stochastic rounding ----------------------------------------------------------------------------

def _neighbours(x, fmt):
    lo = reference_element(x, fmt, "down")
    hi = reference_element(x, fmt, "up")
    return lo, hi


@pytest.mark.parametrize("name", ["e4m3fn", "e2m1fn", "int4", "e5m2"])
def test_stochastic_unbiased_and_proportional(name):
    fmt = lowbit.format(name)
    g = torch.Generator().manual_seed(7)
    # a handful of values at known fractions between neighbours, including subnormals and values
    # below the smallest positive number, each repeated 200k times
    vals = fmt.values()
    pos = vals[vals > 0]
    a, b = float(pos[len(pos) // 2]), float(pos[len(pos) // 2 + 1])
    tiny = float(pos[0])
    pts = torch.tensor([a + 0.3 * (b - a), -(a + 0.9 * (b - a)), 0.25 * tiny, -0.7 * tiny,
                        a + 0.5 * (b - a)], dtype=torch.float32)
    n = 200_000
    x = pts.repeat_interleave(n)
    q = cpu_fast.quantize_element(x, fmt, "stochastic", "saturate", g)
    lo, hi = _neighbours(x, fmt)
    assert bool(((q == lo) | (q == hi)).all()), "a result is not one of the two neighbours"
    q = q.double().view(len(pts), n)
    lo, hi = lo.double().view(len(pts), n)[:, 0], hi.double().view(len(pts), n)[:, 0]
    xd = pts.double()
    p_hi = (xd - lo) / (hi - lo)
    freq = (q == hi[:, None]).double().mean(1)
    sd = torch.sqrt(p_hi * (1 - p_hi) / n)
    assert bool(((freq - p_hi).abs() <= 5 * sd + 1e-7).all()), (freq, p_hi)
    err = (q.mean(1) - xd).abs()
    assert bool((err <= 5 * sd * (hi - lo) + 1e-12).all()), "biased"


def test_stochastic_reproducible_with_seed_and_independent():
    fmt = lowbit.format("e4m3fn")
    x = torch.full((100_000,), 1.0 + 2**-5)   # halfway-ish: 1 + 1/32 between 1 and 1.125 -> p = 0.25
    q1 = lowbit.quantize(x, fmt, "stochastic", generator=123)
    q2 = lowbit.quantize(x, fmt, "stochastic", generator=123)
    q3 = lowbit.quantize(x, fmt, "stochastic", generator=124)
    assert torch.equal(q1, q2)
    assert not torch.equal(q1, q3)
    up = (q1 > 1).double()
    assert abs(up.mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / len(x))
    # neighbouring elements are independent: lag-1 and lag-4096 correlations are ~0
    for lag in (1, 2, 4096):
        c = torch.corrcoef(torch.stack([up[:-lag], up[lag:]]))[0, 1].item()
        assert abs(c) < 5 / math.sqrt(len(x)), (lag, c)
    # a generator advances: two draws from one generator differ
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(lowbit.quantize(x, fmt, "stochastic", generator=g),
                           lowbit.quantize(x, fmt, "stochastic", generator=g))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sr_bits_truncates_the_fraction(k):
    # 1 + 0.3 * 0.125 between 1 and 1.125 (e4m3fn): frac 0.3 -> floor(0.3 * 2^k) / 2^k
    fmt = lowbit.format("e4m3fn")
    n = 200_000
    x = torch.full((n,), 1 + 0.3 * 0.125)
    q = cpu_fast.quantize_element(x, fmt, "stochastic", "saturate", torch.Generator().manual_seed(k), sr_bits=k)
    p = math.floor(0.3 * 2**k) / 2**k
    freq = (q > 1).double().mean().item()
    assert abs(freq - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-3) / n)


def test_stochastic_half_and_exact_values():
    fmt = lowbit.format("e2m1fn")
    n = 100_000
    x = torch.cat([torch.full((n,), 1.1), fmt.values().float().repeat(100)])
    q = cpu_fast.quantize_element(x, fmt, "stochastic_half", "saturate", torch.Generator().manual_seed(1))
    freq = (q[:n] == 1.5).double().mean().item()
    assert abs(freq - 0.5) < 5 * math.sqrt(0.25 / n)
    assert torch.equal(q[n:], x[n:])                      # representable values never move
    q = cpu_fast.quantize_element(x[n:], fmt, "stochastic", "saturate", torch.Generator().manual_seed(1))
    assert torch.equal(q, x[n:])


def test_stochastic_blocks_land_on_neighbours():
    fmt = lowbit.format("mxfp4")
    x = torch.randn(4096, 32)
    q = cpu_fast.quantize_block(x, fmt, "stochastic", -1, torch.Generator().manual_seed(3))
    lo = reference_block(x, fmt, "down")
    hi = reference_block(x, fmt, "up")
    assert bool(((q == lo) | (q == hi)).all())
    frac = ((x - lo) / (hi - lo)).where(hi > lo, torch.zeros_like(x))
    assert abs(((q == hi) & (hi > lo)).double().mean().item() - frac[hi > lo].double().mean().item() *
               (hi > lo).double().mean().item()) < 0.01


def test_random_bits_hash_matches_a_uint32_model():
    """The int32 torch hash wraps like unsigned 32-bit arithmetic (checked against numpy uint32)."""
    idx = torch.arange(0, 100_000, 7, dtype=torch.int32)
    got = cpu_fast.random_bits(idx, -123456789, 987654321).numpy().view(np.uint32)

    def mix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x7FEB352D)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x846CA68B)
        return h ^ (h >> np.uint32(16))

    with np.errstate(over="ignore"):
        u = idx.numpy().view(np.uint32) + np.uint32(-123456789 & 0xFFFFFFFF)
        want = mix(mix(u) ^ np.uint32(987654321))
    assert np.array_equal(got, want)
    # and its bits look uniform: each of the 32 bit positions is set about half the time
    bits = (got[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    assert np.all(np.abs(bits.mean(0) - 0.5) < 0.02)


# --- the compiled path ----------------------------------------------------------------------------------

def test_compiled_path_matches_eager(monkeypatch):
    """torch.compile'd execution (used for large tensors) gives the same bits as eager, for a
    deterministic and a stochastic mode (same seed -> same random bits) and a block format."""
    fmt = lowbit.format("e4m3fn")
    x = element_vectors(fmt, n_random=50_000)
    eager = cpu_fast.quantize_element(x, fmt, "nearest_even", "saturate")
    eager_sr = cpu_fast.quantize_element(x, fmt, "stochastic", "saturate", torch.Generator().manual_seed(9))
    xb = block_vectors(lowbit.format("mxfp4"), n_blocks=256)
    eager_mx = cpu_fast.quantize_block(xb, lowbit.format("mxfp4"), "nearest_even", -1)
    monkeypatch.setenv("LOWBIT_CPU_COMPILE", "1")
    cpu_fast._compile_ok[0] = None
    comp = cpu_fast.quantize_element(x, fmt, "nearest_even", "saturate")
    if cpu_fast._compile_ok[0] is False:
        pytest.skip("torch.compile does not work on this machine (no C++ toolchain?)")
    assert_same_bits(comp, eager, x, "compiled nearest_even")
    comp_sr = cpu_fast.quantize_element(x, fmt, "stochastic", "saturate", torch.Generator().manual_seed(9))
    assert_same_bits(comp_sr, eager_sr, x, "compiled stochastic")
    assert_same_bits(cpu_fast.quantize_block(xb, lowbit.format("mxfp4"), "nearest_even", -1), eager_mx,
                     xb, "compiled mxfp4")
    assert_same_bits(comp, reference_element(x, fmt, "nearest_even"), x, "compiled vs reference")
    # the other compiled functions: the amax-rule blocks (NVFP4), integer blocks, a directed mode
    for name, mode in (("nvfp4", "nearest_even"), ("bfp8_b16", "up")):
        f = lowbit.format(name)
        xv = block_vectors(f, n_blocks=128)
        assert_same_bits(cpu_fast.quantize_block(xv, f, mode, -1), reference_block(xv, f, mode), xv,
                         f"compiled {name} {mode}")
    f = lowbit.format("int8")
    xi = element_vectors(f, n_random=5000)
    assert_same_bits(cpu_fast.quantize_element(xi, f, "odd", "saturate"), reference_element(xi, f, "odd"),
                     xi, "compiled int8 odd")


def test_triton_is_never_imported_without_cuda():
    """The Triton module is imported lazily, on CUDA tensors only: CPU work never loads it."""
    import subprocess
    import sys
    code = ("import sys, torch, lowbit; lowbit.quantize(torch.randn(64), 'e4m3'); "
            "lowbit.quantize(torch.randn(64), 'mxfp4'); "
            "print('lowbit.kernels.triton_quant' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LOWBIT_CPU_COMPILE": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout
