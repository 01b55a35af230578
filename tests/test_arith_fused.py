"""The fused CPU fast path of lowbit.arith's functions (odd32 RO32 + bit rounding in one compiled loop)
against its definitions: RO32 against a scalar NumPy construction, and every function's fused result
against the generic exact path (itself checked against mpmath in test_arith_elementary.py) on inputs
built to sit on and next to rounding boundaries, exact cases and special values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
from lowbit import arith
from lowbit.arith import elementary
from lowbit.arith.basic import setup
from lowbit.arith.odd32 import to_odd32

BIG = 1 << 16  # run_fused compiles from this size on


def _ro32_reference(vals: np.ndarray) -> np.ndarray:
    """RO32 by definition: truncate to float32, then step to the odd neighbour if inexact."""
    out = np.empty(len(vals), dtype=np.float32)
    for i, v in enumerate(vals):
        if np.isnan(v) or np.isinf(v):
            out[i] = v
            continue
        with np.errstate(over="ignore"):
            f = np.float32(v)
        if abs(float(f)) > abs(v):
            f = np.nextafter(f, np.float32(0))
        if float(f) != v and f.view(np.int32) & 1 == 0:
            f = np.nextafter(f, np.float32(np.inf if v > 0 else -np.inf))
        out[i] = f
    return out


def _adversarial_float64(rng) -> np.ndarray:
    f32 = rng.integers(0, 2**32, 3000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f32 = f32[np.isfinite(f32)].astype(np.float64)
    ulp = np.abs(np.spacing(f32.astype(np.float32)).astype(np.float64))
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -5e-324, 2.0**-149, 2.0**-150, 3 * 2.0**-151,
                2.0**-151, -2.0**-150, 3.4028234663852886e38, 3.4028235e38 * 1.0000001, -3.5e38, 1e300,
                -1.7976931348623157e308]
    return np.concatenate([f32, f32 + ulp / 2, f32 - ulp / 2, f32 + ulp / 4, np.nextafter(f32, np.inf),
                           np.nextafter(f32, -np.inf), specials])


@pytest.mark.parametrize("compiled", [True, False])
def test_ro32_matches_its_definition(monkeypatch, compiled):
    if not compiled:
        monkeypatch.setenv("LOWBIT_CPU_COMPILE", "0")
    vals = _adversarial_float64(np.random.default_rng(0))
    want = _ro32_reference(vals)
    reps = -(-BIG // len(vals))
    got = to_odd32(torch.from_numpy(np.tile(vals, reps))).numpy()[: len(vals)]
    same = (got.view(np.int32) == want.view(np.int32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), (vals[~same][:5], got[~same][:5], want[~same][:5])


def _boundary_arguments(name, fmt, rng):
    """Arguments whose function value lies on or within a float64 ulp of a value or midpoint of fmt."""
    vals = lowbit.format(fmt).values().numpy()
    vals = vals[(vals > 0.05) & (vals < 60)]
    targets = rng.choice(np.concatenate([vals[:-1], (vals[:-1] + vals[1:]) / 2]), 150)
    inverse = {"exp": np.log, "log10": lambda v: 10.0**v, "cosh": np.arccosh}
    xs = inverse[name](targets[targets >= 1] if name == "cosh" else targets) if name in inverse else targets
    xs = xs[np.isfinite(xs)]
    return np.concatenate([np.nextafter(xs, -np.inf), xs, np.nextafter(xs, np.inf)])


SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 8.0, 1000.0, 1e22, 1e23, np.inf, -np.inf, np.nan,
                     2.0**-30, 5e-324, -800.0, 800.0, 1e300, -1e300])


@pytest.mark.parametrize("name", ["exp", "log10", "cosh", "power", "mod", "floor_divide", "floor", "sign"])
@pytest.mark.parametrize("compiled", [True, False])
def test_fused_equals_exact_path(monkeypatch, name, compiled):
    if not compiled:
        monkeypatch.setenv("LOWBIT_CPU_COMPILE", "0")
    elif name not in ("exp", "power", "floor_divide"):
        pytest.skip("compiled: the other functions cover the same code (test time)")
    rng = np.random.default_rng(1)
    fmt, mode = ("e4m3", "down") if name == "cosh" else ("fp16", "nearest_even")
    x = np.concatenate([_boundary_arguments(name, fmt, rng), SPECIALS, -SPECIALS])
    args = [x]
    if name in elementary.BINARY:
        y = np.concatenate([rng.choice(SPECIALS, 200), lowbit.quantize(rng.uniform(-4, 4, len(x) - 200), fmt)])
        rng.shuffle(y)
        args = [x, y]
    pad = BIG - len(x)  # ordinary values up to the compiled size (the hard ones once: mpmath is slow)
    args = [np.concatenate([a, lowbit.quantize(rng.uniform(-3, 3, pad), fmt)]) for a in args]
    with np.errstate(all="ignore"):
        got = getattr(arith, name)(*args, fmt, mode)
    f, m, ov, gen = setup(fmt, mode, None, None, torch.device("cpu"))
    want = elementary._exact_path(name, [torch.from_numpy(a) for a in args], f, m, ov, gen, None).numpy()
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    bad = np.flatnonzero(~same)
    assert not bad.size, [(tuple(a[i] for a in args), got[i], want[i]) for i in bad[:5]]


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_float32_first_pass_exhaustive(monkeypatch, fmt):
    """The float32 first pass (decided where the float32 value, widened by 2**-20 on each side,
    rounds to one value) against the float64 exact path on every value of the format up to 1024
    (bf16: from 2**-12; power: 20000 sampled pairs); eager, which runs the same SLEEF float32
    routines as the compiled loop."""
    monkeypatch.setenv("LOWBIT_CPU_COMPILE", "0")
    monkeypatch.setattr(elementary, "_FLOAT32_FIRST", elementary.FLOAT32_DECIDABLE)
    vals = lowbit.format(fmt).values().numpy()
    # above 1024 exp/sinh/cosh overflow and trig needs mpmath's slow reduction; bf16 below 2**-12: f(x)
    # is within float32 ulps of 0, 1 or x, left by the float32 pass to mpmath (slow, tested elsewhere)
    vals = vals[(vals <= 1024) & ((vals >= 2.0**-12) | (fmt == "fp16"))]
    vals = np.concatenate([vals, -vals, [np.inf, -np.inf, np.nan]])
    rng = np.random.default_rng(3)
    modes = ("nearest_even", "down") if fmt == "fp16" else ("up",)
    for name in elementary.FLOAT32_DECIDABLE:
        if name == "power":
            args = [np.abs(rng.choice(vals, 20000)), rng.choice(vals[np.abs(vals) < 8], 20000)]
        else:  # past these the float32 value is inf or 1 and the float64 path (tested above) takes
            # over, mostly through mpmath (slow)
            big = {"tanh": 12, "exp": 128, "sinh": 128, "cosh": 128}.get(name, np.inf)
            args = [vals[~(np.abs(vals) > big)]]
        for mode in modes:
            with np.errstate(all="ignore"):
                got = getattr(arith, name)(*args, fmt, mode)
            f, m, ov, gen = setup(fmt, mode, None, None, torch.device("cpu"))
            want = elementary._exact_path(name, [torch.from_numpy(a) for a in args], f, m, ov, gen, None).numpy()
            same = ((got == want) & (np.signbit(got) == np.signbit(want))) | (np.isnan(got) & np.isnan(want))
            bad = np.flatnonzero(~same)
            assert not bad.size, (name, mode, [(tuple(a[i] for a in args), got[i], want[i]) for i in bad[:5]])


@pytest.mark.parametrize("name", ["expm1", "arctanh"])
def test_compiled_small_arguments(name):
    """Inductor's vector code computes expm1 as exp(x) - 1 and atanh as 0.5 log((1 + x) / (1 - x)),
    ~2**-53 absolute near 0; lowbit's own formulas keep the relative bound there. Directed rounding
    of f(x) for small bf16 x: f(x) = x + x**2/2 or x + x**3/3 lies above x, so "down" gives x."""
    x = np.array([2.0**-20, 2.0**-9, 3 * 2.0**-12, 2.0**-30, 2.0**-126, 1e-3 + 2.0**-40])
    xs = np.tile(x, -(-BIG // len(x)))
    got = getattr(arith, name)(xs, "bf16", "down")[: len(x)]
    f, m, ov, gen = setup("bf16", "down", None, None, torch.device("cpu"))
    want = elementary._exact_path(name, [torch.from_numpy(x)], f, m, ov, gen, None).numpy()
    assert np.array_equal(got, want), (got, want)
    assert got[0] == 2.0**-20


@pytest.mark.parametrize("mode", ["down", "up"])
def test_log10_of_every_exact_power_of_ten_is_its_exponent(mode):
    # the fused loop recognises 10**k arithmetically; its neighbours must not be taken for powers
    # (log10 of them is just below / above k, which directed rounding tells apart from k)
    k = np.arange(23.0)
    p = np.array([10.0**int(i) for i in k])
    below, above = np.nextafter(p, 0), np.nextafter(p, np.inf)
    x = np.tile(np.concatenate([p, below, above]), -(-BIG // 69))[:BIG]
    got = arith.log10(x, "e8m23", mode)[:69]
    assert (got[:23] == k).all()
    lo, hi = got[23:46], got[46:]
    if mode == "down":
        assert (lo[1:] < k[1:]).all() and (hi >= k).all()
    else:
        assert (lo <= k).all() and (hi[1:] > k[1:]).all()
