"""The faster formulas of lowbit.arith.elementary (asinh, acosh, cosh, sinh and tanh from one exp or log,
log2's powers of two tested in float arithmetic, mod without fmod) in their hard regions: tiny and
subnormal arguments, huge ones, acosh near 1, cosh's and sinh's overflow boundary, the branch points, mod's
huge quotients and zero signs. Results are compared bit for bit (with the sign of zero) with the
mpmath reference of test_arith_elementary (true value at 300 bits, rounded by exact rational
arithmetic), in every rounding mode: eager for three formats, compiled (the fused loop) for fp16."""
from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest

from lowbit import arith
from test_arith_elementary import MODES, Rounder, _true

BIG = 1 << 16  # run_fused compiles from this size on
TINY = [5e-324, 2.0**-1074 * 3, 2.0**-1022, 2.0**-1000, 2.0**-149, 2.0**-133, 2.0**-126, 2.0**-24, 2.0**-14,
        6e-8, 2.0**-30, 1e-5, 3.0517578125e-05]
HUGE = [2.0**52, 2.0**53 + 2, 2.0**60 - 2.0**8, 2.0**60, 2.0**60 + 2.0**8, 1e20, 1e154, 1.4e154, 1e300,
        1.7976931348623157e308]
HARD = {
    "arcsinh": TINY + [0.0625, 0.5, 1.0, 3.0, 100.0, 65504.0] + HUGE,
    "arccosh": [1.0, 1.0 + 2.0**-52, 1.0 + 2.0**-40, 1.0 + 2.0**-23, 1.0 + 2.0**-10, 1.0009765625, 1.5,
                2.0, 3.0, 65504.0, 0.5, 0.0, -1.0, -3.0] + HUGE,
    "cosh": TINY + [0.0625, 1.0, 11.0898, 21.99, 22.0, 22.01, 88.72, 89.42, 709.78, 709.79, 710.47,
                    710.4758600739439, 710.4758600739440, 710.48, 1419.0, 1420.0, 1e300],
    "sinh": TINY + [0.0624, 0.0625, 0.0626, 0.25, 1.0, 11.0898, 21.99, 22.0, 22.01, 88.72, 89.42, 709.78,
                    709.79, 710.4758600739439, 710.4758600739440, 710.48, 1419.0, 1420.0, 1e300],
    "tanh": TINY + [0.0624, 0.0625, 0.0626, 0.25, 1.0, 4.5, 9.0, 10.0, 19.0, 20.0, 400.0, 1e300],
    "log2": [5e-324, 2.0**-1074 * 3, 2.0**-1073, 2.0**-1040, 2.0**-1023, 2.0**-1022, 2.0**-1001, 2.0**-1000,
             2.0**-999, 2.0**-149, 2.0**-24, 0.5, 1.0, 1.0 + 2.0**-52, 1.0 - 2.0**-53, 2.0, 3.0, 1024.0,
             1023.9999999999999, 2.0**1023, 1.7976931348623157e308, 0.0],
}
FORMATS = ("fp16", "bf16", "e4m3")


_MP = {"arcsinh": mpmath.asinh, "tanh": mpmath.tanh, "cosh": mpmath.cosh, "sinh": mpmath.sinh}


def _reference(name, x):
    """_true, except for |x| < 2**-100 where f(x) is within 2**-200 of x or 1 and _true's 300 bits
    would call it exact: there mpmath at 2500 bits (f(x) - x or f(x) - 1 is >= 2**-2200 relative)."""
    if name not in _MP or x == 0 or abs(x) >= 2.0**-100:
        return _true(name, x)
    with mpmath.workprec(2500):
        sign, man, exp, _ = _MP[name](mpmath.mpf(x))._mpf_
        return (-1) ** sign * Fraction(int(man)) * Fraction(2) ** int(exp)


def _arguments(name):
    xs = np.array(HARD[name])
    xs = np.concatenate([xs, np.nextafter(xs, np.inf), np.nextafter(xs, -np.inf)])
    if name != "arccosh" and name != "log2":
        xs = np.concatenate([xs, -xs])
    return np.unique(xs[np.isfinite(xs)])


def _compare(got, want, args):
    same = ((got == want) & (np.signbit(got) == np.signbit(want))) | (np.isnan(got) & np.isnan(want))
    bad = np.flatnonzero(~same)
    assert not bad.size, [(tuple(a[i] for a in args), got[i], want[i]) for i in bad[:5]]


@pytest.mark.parametrize("name", sorted(HARD))
def test_identities_hard_regions(monkeypatch, name):
    xs = _arguments(name)
    exact = [_reference(name, x) for x in xs]
    for fmt in FORMATS:
        rnd = Rounder(fmt)
        for mode in MODES:
            want = np.array([rnd(q, mode) for q in exact])
            if name in ("arcsinh", "sinh", "tanh"):  # odd: f(-0) = -0 (the reference has no signed zero)
                want = np.where(xs == 0, xs, want)
            monkeypatch.setenv("LOWBIT_CPU_COMPILE", "0")
            with np.errstate(all="ignore"):
                _compare(getattr(arith, name)(xs, fmt, mode), want, (xs,))
            if fmt == "fp16" and mode == "nearest_even":  # the compiled loop (one compile per mode)
                monkeypatch.setenv("LOWBIT_CPU_COMPILE", "auto")
                reps = -(-BIG // len(xs))
                with np.errstate(all="ignore"):
                    got = getattr(arith, name)(np.tile(xs, reps), fmt, mode)
                _compare(got, np.tile(want, reps), (np.tile(xs, reps),))


def _true_mod(a: float, b: float):
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    q = Fraction(a) / Fraction(b)
    return Fraction(a) - math.floor(q) * Fraction(b)


def _mod_arguments():
    rng = np.random.default_rng(5)
    a = [1e10, 3.835459876475195e+307, -1e300, 5.0, -5.0, 5.0, -5.0, 0.0, -0.0, 6.0, -6.0, -1e-300, 1e-300,
         2.0**52 * 3, 2.0**53, 1e20, -7.5, 2.0**-1074, -2.0**-1074]
    b = [3e-300, 4.271451847358432e-201, 7.0, 3.0, 3.0, -3.0, -3.0, 3.0, -3.0, -3.0, 3.0, 1.0, -1.0,
         3.0, 3.0 + 2.0**-51, 0.1, 2.0**-900, 2.0**900, 2.0**-1074]
    k = rng.integers(-2**40, 2**40, 30).astype(float)
    bb = rng.uniform(0.5, 2, 30)
    near = np.concatenate([np.nextafter(k * bb, np.inf), np.nextafter(k * bb, -np.inf), k * bb])
    a = np.concatenate([a, near, rng.uniform(-100, 100, 40)])
    b = np.concatenate([b, np.tile(bb, 3), rng.uniform(-3, 3, 40)])
    return a, b


def test_mod_without_fmod(monkeypatch):
    """mod's fused loop (trunc quotient, Dekker remainder, value and tail) and its exact path for
    what it leaves (huge quotients, tiny divisors: NumPy's fmod there, torch's gives nan); eager in
    every format and mode, compiled for fp16 nearest_even (one compile per mode)."""
    a, b = _mod_arguments()
    exact = [_true_mod(x, y) for x, y in zip(a, b)]
    reps = -(-BIG // len(a))
    for fmt in FORMATS:
        rnd = Rounder(fmt)
        for mode in MODES:
            compiled = fmt == "fp16" and mode == "nearest_even"
            monkeypatch.setenv("LOWBIT_CPU_COMPILE", "auto" if compiled else "0")
            n = reps if compiled else 1
            want = np.array([rnd(q, mode) for q in exact])
            want = np.where(want == 0, np.copysign(0.0, b), want)  # NumPy's zeros take b's sign
            got = arith.mod(np.tile(a, n), np.tile(b, n), fmt, mode)
            _compare(got, np.tile(want, n), (np.tile(a, n), np.tile(b, n)))
