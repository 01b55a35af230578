"""The exact fallback: a function's true value rounded to odd at float64, from mpmath (Ziv's strategy).

Used for the few elements whose float64 libm result lies too close to a float32 for its rounding to
be trusted (lowbit.arith.elementary). The value is evaluated at 160 bits, and at doubled precision
until an error interval of 2**-(prec-8) relative rounds to one float64-to-odd value (the exact cases
of these functions on
float64 arguments are known and few: f(0), log(1), log2(2**k), log10(10**k), arccos(1), arccosh(1),
which the caller sets, and powers, decided with exact rational arithmetic where possible). Other
functions never accept a value that looks exact: the loop runs on to 5120 bits, enough for every
float64 argument except tanh and expm1 saturating at +-1, whose side is known.
"""
from __future__ import annotations

import math
import struct
from fractions import Fraction
from typing import Optional

import mpmath

DBL_MAX = 1.7976931348623157e308
_MAX_PREC = 5120
_MAX_POW_BITS = 1 << 16


def _log2(x):
    return mpmath.log(x) / mpmath.log(2)


def _log10(x):
    return mpmath.log(x) / mpmath.log(10)


MP_FUNCTIONS = {
    "exp": mpmath.exp, "expm1": mpmath.expm1, "log": mpmath.log, "log1p": mpmath.log1p,
    "log2": _log2, "log10": _log10, "sin": mpmath.sin, "cos": mpmath.cos, "tan": mpmath.tan,
    "arcsin": mpmath.asin, "arccos": mpmath.acos, "arctan": mpmath.atan, "sinh": mpmath.sinh,
    "cosh": mpmath.cosh, "tanh": mpmath.tanh, "arcsinh": mpmath.asinh, "arccosh": mpmath.acosh,
    "arctanh": mpmath.atanh, "power": mpmath.power,
}


def _odd_of(f: float, direction: int) -> float:
    """float64 to odd from its nearest float f and the sign of (true - f)."""
    if direction == 0 or math.isinf(f):
        return f
    if f == 0.0:
        return math.copysign(5e-324, direction)
    if f == math.copysign(DBL_MAX, f) and (f > 0) == (direction > 0):
        return f  # past the range: DBL_MAX is odd
    bits = struct.unpack("<q", struct.pack("<d", f))[0]
    if bits & 1:
        return f
    return math.nextafter(f, math.inf if direction > 0 else -math.inf)


def odd_of_mpf(v) -> float:
    """RO64 of an mpmath number (its exact value)."""
    if not mpmath.isfinite(v):
        return float(v)
    try:
        f = float(v)
    except OverflowError:
        f = math.copysign(math.inf, float(mpmath.sign(v)))
    if math.isinf(f):
        return math.copysign(DBL_MAX, f)
    diff = v - mpmath.mpf(f)
    return _odd_of(f, int(mpmath.sign(diff)))


def odd_of_fraction(q: Fraction) -> float:
    """RO64 of an exact rational."""
    try:
        f = float(q)
    except OverflowError:
        return math.copysign(DBL_MAX, q)
    if math.isinf(f):
        return math.copysign(DBL_MAX, f)
    d = q - Fraction(f)
    return _odd_of(f, (d > 0) - (d < 0))


def _power_exact(x: float, y: float) -> Optional[Fraction]:
    """x**y as an exact rational where it is one (else None); x, y finite, x != 0."""
    if y == int(y):
        n = int(y)
        if abs(n) * 64 <= _MAX_POW_BITS:
            return Fraction(x) ** n
        return None
    if x < 0:
        return None  # nan, decided by float64
    fx = Fraction(x)
    num, den = fx.numerator, fx.denominator  # den is a power of two
    yf = Fraction(y)
    k = yf.denominator  # a power of two > 1
    # x**(n/k) is rational iff x is a perfect k-th power of a rational
    if num.bit_length() > 64 * 4 or k > 64:
        return None
    rn, rd = _int_root(num, k), _int_root(den, k)
    if rn is None or rd is None:
        return None
    n = yf.numerator
    if abs(n) * max(rn.bit_length(), rd.bit_length()) > _MAX_POW_BITS:
        return None
    return Fraction(rn, rd) ** n


def _int_root(a: int, k: int) -> Optional[int]:
    r = round(a ** (1.0 / k)) if a.bit_length() < 1000 else None
    if r is None:
        return None
    for c in (r - 1, r, r + 1):
        if c >= 0 and c**k == a:
            return c
    return None


def true_odd64(name: str, *args: float) -> float:
    """RO64 of the true value of function ``name`` at float64 arguments (finite results only)."""
    if name == "power":
        x, y = args
        if x != 0 and math.isfinite(x) and math.isfinite(y):
            q = _power_exact(x, y)
            if q is not None:
                return odd_of_fraction(q)
    fn = MP_FUNCTIONS[name]
    prec = 160 + max(0, *(abs(math.frexp(a)[1]) for a in args))
    last_exact = None
    while True:
        with mpmath.workprec(prec):
            v = fn(*(mpmath.mpf(a) for a in args))
            if isinstance(v, mpmath.mpc):
                return math.nan
            f = odd_of_mpf(v)
            if name == "power" and mpmath.isfinite(v) and v == mpmath.mpf(f):
                # powers not decided exactly above: accept a float64 seen at two precisions
                if last_exact == f:
                    return f
                last_exact = f
            elif v != mpmath.mpf(f) or not mpmath.isfinite(v):
                err = abs(v) * mpmath.ldexp(1, 8 - prec)
                if odd_of_mpf(v - err) == odd_of_mpf(v + err):
                    return f
        if prec >= _MAX_PREC:
            break
        prec *= 2
    # the other functions take no float64 value at a float64 argument outside the exact cases handled
    # by the caller; a value still looking like one is tanh or expm1 saturating at +-1 or -1 from the
    # inside (|1 - |tanh x|| = 2 exp(-2|x|) < 2**-5000): the true value lies toward zero
    if name in ("tanh", "expm1") and abs(f) == 1.0:
        return _odd_of(f, -1 if f > 0 else 1)
    return f
