"""Elementary functions correctly rounded to a format: exp, log, sin, ..., power, floor, mod.

Each result is the true function value rounded once to ``fmt`` with the chosen mode (what an exact
low-precision unit would return), for every element format and rounding mode lowbit has. How:

1. The function is evaluated in float64 by torch (SLEEF / libm, error at most a few float64 ulps;
   NEAR_REL = 512 ulps is assumed), or, where SLEEF's routine is slow, by a composition of
   vectorised primitives whose error is bounded in its docstring far inside NEAR_REL: asinh and
   acosh from one log (:func:`_asinh`, :func:`_acosh`, :func:`_log1p_nonneg`), cosh, sinh and tanh
   from one exp (:func:`_cosh`, :func:`_sinh`, :func:`_tanh`), expm1 and atanh as below. Overflow past float64 from a
   finite argument is kept as +-DBL_MAX (the true value is finite and past every format's range),
   not inf.
2. Where the format is reachable through float32 rounded to odd (:mod:`lowbit.arith.odd32`), an
   element is *safe* when no float32 lies within the error bound of its float64 value: its true value
   then has the same float32-to-odd image, which rounds to the format exactly as the true value does
   (no double-rounding error). Elsewhere (codebooks, >21-bit formats) an element is safe when the
   format's rounding of the two ends of the error interval agrees (rounding is monotone); for the
   stochastic modes the rounding down and up of both ends must agree (the two neighbours are known;
   probabilities then come from the float64 value, off by at most 2**-44 relative).
3. The elements that are not safe (about 2**-15 of random float32-precision data; none are lost by
   underflow to 0) are re-evaluated exactly by :func:`lowbit.arith.mpref.true_odd64` (mpmath with
   Ziv's loop; exact rational arithmetic for powers), and known exact cases (exp(0) = 1, log2(2**k),
   found in float arithmetic by :func:`_is_power_of_two`, log10(10**k), arccos(1) = 0, f(+-0),
   poles, domain errors) are set directly.

floor, ceil, round (half to even), sign, mod and floor_divide are exact in float64 (mod and
floor_divide through an exact remainder; fmod through NumPy on the CPU, torch's vector fmod gives nan
where a / b overflows), then rounded once. Special values follow NumPy.

On the CPU, for deterministic modes and odd32 formats, steps 1-2 and the rounding run as one loop
(:func:`_fast`, compiled by torch.compile for large tensors) whose outputs are the float64 result and
its number of nans; elements it cannot decide (not safe, power's exponents 2, -1, 0.5, mod's and
floor_divide's NumPy special cases, mod's huge quotients) come out as a marker nan and go through the
generic path (:func:`_exact_path`) alone; the scan for markers runs only where the count is not 0.
mod there skips fmod (:func:`_mod_pair`: a Dekker remainder, then the value and its rounding error,
whose RO32 :func:`lowbit.arith.odd32.odd32_pair` takes directly).
For power (``_FLOAT32_FIRST``; the rule holds for every function of ``FLOAT32_DECIDABLE``, but
ended slower for the others when measured) a float32 loop (:func:`_fast32`) runs first: where the operands are float32 values it
evaluates the function in float32 (SLEEF's u10 routines, at most 1 float32 ulp, twice as wide a
vector) and decides an element when y * (1 -+ 2**-20), an interval that holds the true value, rounds
to one value of the format; the rest (~0.3% of in-format fp16 data, every element of data that is not
float32) goes through the float64 loop. Inductor rewrites expm1 as exp(x) - 1 and atanh as
0.5 log((1+x)/(1-x)), which lose the relative bound near 0; :func:`_expm1` and :func:`_atanh` keep it.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import numpy as np
import torch

from ..emulate import quantize
from ..kernels import cpu_fast
from ..rounding import STOCHASTIC_MODES
from .basic import finish, finite, odd_add, odd_div, odd_mul, odd_sqrt, operands, round_to, setup, to_odd, two_prod
from .odd32 import NEAR_ABS, NEAR_REL, odd32_exact, odd32_pair, run_fused, to_odd32, to_odd32_near

UNARY = ("exp", "expm1", "log", "log1p", "log2", "log10", "sin", "cos", "tan", "arcsin", "arccos",
         "arctan", "sinh", "cosh", "tanh", "arcsinh", "arccosh", "arctanh")
EXACT_UNARY = ("floor", "ceil", "round", "sign")
BINARY = ("power", "mod", "floor_divide")

_TORCH = {
    "exp": torch.exp, "expm1": torch.expm1, "log": torch.log, "log1p": torch.log1p, "log2": torch.log2,
    "log10": torch.log10, "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "arcsin": torch.asin,
    "arccos": torch.acos, "arctan": torch.atan, "sinh": torch.sinh, "cosh": torch.cosh, "tanh": torch.tanh,
    "arcsinh": torch.asinh, "arccosh": torch.acosh, "arctanh": torch.atanh,
    "floor": torch.floor, "ceil": torch.ceil, "round": torch.round, "sign": torch.sign,
}
_CAN_OVERFLOW = ("exp", "expm1", "sinh", "cosh")
_ODD_AT_ZERO = ("expm1", "log1p", "sin", "tan", "arcsin", "arctan", "sinh", "tanh", "arcsinh", "arctanh")
_ONE_AT_ZERO = ("exp", "cos", "cosh")
_MAX_EXACT_POWER_OF_TEN = 22  # 10**k is a float64 for k = 0..22


DBL_MAX = sys.float_info.max
_FIX_BITS = 0x7FF8_0000_0F1C_5EED  # a nan marking "needs the exact fallback"
_FIX = torch.tensor(_FIX_BITS, dtype=torch.int64).view(torch.float64)  # low 29 bits set: no float32 gives it


def true_odd64(name: str, *args: float) -> float:
    """The exact fallback (lowbit.arith.mpref; mpmath is imported on first use)."""
    from .mpref import true_odd64 as exact
    return exact(name, *args)


def _known_exact(name: str, x: torch.Tensor, y: torch.Tensor):
    """(y, conditions): y with the elements whose true value is known exactly set to it, and the
    conditions (see :func:`_value`) marking them."""
    zero = x == 0
    conds = [(finite(x), "known_unless"), (finite(y), "known_unless")]
    if name in _ODD_AT_ZERO:
        y = torch.where(zero, x, y)
        conds.append((zero, "known"))
    elif name in _ONE_AT_ZERO:
        y = torch.where(zero, 1.0, y)
        conds.append((zero, "known"))
    if name in ("log", "arccos", "arccosh"):
        one = x == 1
        y = torch.where(one, 0.0, y)
        conds.append((one, "known"))
    elif name == "log2":  # powers of two: y is within ulps of the integer log2(x) there
        pow2 = _is_power_of_two(x)
        y = torch.where(pow2, y.round(), y)
        conds.append((pow2, "known"))
    elif name == "log10":  # 10**k for k = 0..22 (the exact ones): y is within ulps of k there
        k = torch.where(finite(y), y, 0.0).round().clamp(0, _MAX_EXACT_POWER_OF_TEN)
        hit = x == _power_of_ten(k)
        y = torch.where(hit, k, y)
        conds.append((hit, "known"))
    return y, conds


def _power_of_ten(k: torch.Tensor) -> torch.Tensor:
    """10**k for integer-valued float64 k in [0, 22], exactly: a product of 10**16, 10**8, 10**4,
    10**2 and 10 chosen by k's binary digits, every partial product a power of ten up to 10**22 and
    so exact. Blends rather than a table gather, which inductor's CPU code does not vectorise."""
    p = torch.ones_like(k)
    for step in (16.0, 8.0, 4.0, 2.0, 1.0):
        take = k >= step
        p = torch.where(take, p * 10.0**step, p)
        k = torch.where(take, k - step, k)
    return p


def _is_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """Whether |x| is a power of two (also true for 0; false for inf and nan), in float arithmetic,
    which inductor vectorises (int64 bit casts and shifts it does not). For m * 2**k with m in
    [1, 2), k >= -1021 (smaller |x| are scaled by 2**64 first): x (1 - 2**-53) is exact for m = 1
    (the binade below has spacing 2**(k-53)), and rounds to x - 2**(k-52) for m > 1 (the removed
    m 2**(k-53) is more than half a spacing); so x - x (1 - 2**-53), exact by Sterbenz, times 2**53
    equals x only for m = 1 (for m > 1 it is 2**(k+1) > x, or inf)."""
    xs = torch.where(x.abs() < 2.0**-1000, x * 2.0**64, x)
    return (xs - xs * (1.0 - 2.0**-53)) * 2.0**53 == xs


def _value(name: str, *args):
    """(y, conditions): float64 value of the function (overflow past float64 from finite arguments
    kept as +-DBL_MAX) and (condition, role) pairs: "known" (y is exact where the condition holds),
    "known_unless" (exact where it does not hold), "mark" / "mark_unless" (left by the fused path to
    :func:`_exact_path`: power's exponents 2, -1, 0.5; floor_divide's NumPy special cases; mod is
    :func:`_mod_pair`'s);
    marks win over known. Single comparisons rather than bool algebra, and no isinf / isnan: the
    fused loop then applies each as one blend, which inductor vectorises."""
    if name in EXACT_UNARY:
        return _TORCH[name](args[0]), [(None, "known")]
    if name == "floor_divide":
        a, b = args
        y = _floor_divide_float64(a, b)
        return y, [(None, "known"), (finite(a), "mark_unless"), (finite(b), "mark_unless"), (b == 0, "mark")]
    if name == "power":
        a, b = args
        y = torch.pow(a, b)
        y = _overflow_kept_finite(y, (finite(a), finite(b), a != 0))
        special = ((b == 2) | (b == -1) | (b == 0.5)) & (a > 0) & (a < float("inf"))
        return y, [(finite(a), "known_unless"), (finite(b), "known_unless"), (finite(y), "known_unless"),
                   (a == 0, "known"), (b == 0, "known"), (a == 1, "known"), (b == 1, "known"), (special, "mark")]
    (t,) = args
    y = _ACCURATE.get(name, _TORCH[name])(t)
    if name in _CAN_OVERFLOW:
        y = _overflow_kept_finite(y, (finite(t),))
    return _known_exact(name, t, y)


def _expm1(t: torch.Tensor) -> torch.Tensor:
    """expm1 with a relative error of a few float64 ulps under torch.compile too: inductor's CPU
    vector code computes expm1 as exp(x) - 1, whose error near 0 is ~2**-53 absolute (relative
    2**-23 at x = 2**-30). For |x| < 1/8 a Taylor polynomial (terms to x**12/12!: truncation below
    2**-68 relative; the x**2 part is at most 0.07 of the result, so its rounding errors add under
    0.3 ulp); elsewhere exp(x) - 1 is accurate to 2**-52 * e**x / |e**x - 1| <= 2**-49 relative."""
    p = torch.full_like(t, 1.0 / 479001600.0)  # 1/12!
    for k in range(11, 1, -1):
        p = p * t + 1.0 / math.factorial(k)
    small = t + (t * t) * p
    return torch.where(t.abs() < 0.125, small, torch.exp(t) - 1.0)


def _atanh(t: torch.Tensor) -> torch.Tensor:
    """atanh accurate to a few float64 ulps under torch.compile too: inductor's CPU vector code uses
    0.5 * log((1 + x) / (1 - x)), whose error near 0 is ~2**-52 absolute. Here
    sign(x) * 0.5 * log1p(2|x| / (1 - |x|)): the log1p argument u >= 0 carries ~2 roundings, and
    log1p damps a relative error of u by u / ((1 + u) log1p(u)) <= 1."""
    a = t.abs()
    return torch.copysign(0.5 * torch.log1p((a + a) / (1.0 - a)), t)


# Below: faster compositions of vectorised primitives (SLEEF exp / log / log1p, IEEE sqrt and
# division) for functions whose SLEEF routine is slow (double-double inside). Each comment bounds the
# relative error in units of u = 2**-53 (one IEEE rounding) and e (the libm error of exp / log /
# log1p: SLEEF u10, 1 ulp = at most 2u); NEAR_REL = 2**-44 = 512u leaves every bound far inside.
_LN2 = math.log(2.0)  # ln 2 (1 + 2**-55.6): 2**-60 relative after adding to a value >= 42
_HUGE = 2.0**60  # past it asinh(a) = log(a) + ln 2 + 1/(4a^2) and log1p(a) = log(a) + 1/a - ...


def _log1p_nonneg(v: torch.Tensor) -> torch.Tensor:
    """log1p(v) for v >= 0 (nan for nan) from one log, <= 2e + 6u relative (SLEEF's log1p costs ~1.3
    logs). w = fl(1 + v) and c = v - (w - 1) is its rounding error, exactly (w - 1 is exact for
    w <= 2, then v - (w - 1) by Sterbenz), |c| <= u w; log1p(v) = log(w) + log1p(c / w).
    log(w) errs by e relative to log(w) <= 2 log1p(v) (the worst case is w = 1 + 2u against
    1 + v >= 1 + u; w = 1 gives 0). For w < 2 the correction c / w is taken as c (2 - w) =
    (c / w)(1 - (w - 1)**2): off by u (w - 1)**2, at most 3u (w - 1) of log1p(v) >= (w - 1) ln 2 / 2.
    For w >= 2 (also v = inf) it is dropped: < u, against log1p(v) >= ln 2."""
    w = 1.0 + v
    lw = torch.log(w)
    return torch.where(w < 2.0, lw + (v - (w - 1.0)) * (2.0 - w), lw)


def _asinh(t: torch.Tensor) -> torch.Tensor:
    """asinh, <= 2e + 12u relative (SLEEF's asinh, ~3 logs' time, replaced by one log). For
    a = |t| < 2**60: asinh(a) = log1p(v), v = a + a^2 / (1 + sqrt(1 + a^2)) (= a + sqrt(1 + a^2) - 1
    without the cancellation): every operation adds or divides positive terms, so v carries at most
    6u, and log1p passes a relative error of v on damped by v / ((1 + v) log1p(v)) <= 1. For a >= 2**60:
    log(a) + ln 2, off by 1/a < 2**-60 absolute on a value >= 42. Subnormal a: a^2 underflows to 0,
    v = a (asinh(a) = a (1 - a^2/6))."""
    a = t.abs()
    big = a >= _HUGE
    v = torch.where(big, a, a + (a * a) / (1.0 + torch.sqrt(1.0 + a * a)))
    r = _log1p_nonneg(v)
    return torch.copysign(torch.where(big, r + _LN2, r), t)


def _acosh(t: torch.Tensor) -> torch.Tensor:
    """acosh, <= 2e + 11u relative (SLEEF's acosh, ~2 logs' time, replaced by one log). For
    1 <= t < 2**60: s = t - 1 is exact (Sterbenz below 2, a multiple of ulp(t) above) and
    acosh(t) = log1p(s + sqrt(s (s + 2))): positive terms only (<= 4u on the log1p argument), damped
    by log1p as in :func:`_asinh`; near 1, acosh(1 + s) ~ sqrt(2s) is computed from the exact s. For
    t >= 2**60: log(t) + ln 2, off by 1/t absolute on a value >= 42. nan below 1."""
    big = t >= _HUGE
    s = t - 1.0
    r = _log1p_nonneg(torch.where(big, t, s + torch.sqrt(s * (s + 2.0))))
    return torch.where(t >= 1.0, torch.where(big, r + _LN2, r), float("nan"))


_COSH_TAIL = 22.0  # for |x| >= 22, e**-|x| / 2 is below 2**-63 of cosh(x)


def _cosh(t: torch.Tensor) -> torch.Tensor:
    """cosh from one exp, <= 2e + 3u relative (SLEEF's cosh costs two exps' time). h = exp(|x| / 2)
    (the halving is exact but for subnormals, where h = 1 anyway), e = h * h (<= 2e + u):
    (e + 1/e) / 2 for |x| < 22 (positive terms, <= 2e + 3u); (h / 2) * h = e**|x| / 2 beyond
    (drops e**-|x| / 2 < 2**-63 relative), which overflows only when cosh does, up to 1419
    (|x| / 2 past exp's range: h = inf, cosh overflows too)."""
    a = t.abs()
    h = torch.exp(0.5 * a)
    e = h * h
    return torch.where(a < _COSH_TAIL, 0.5 * e + 0.5 / e, (0.5 * h) * h)


def _odd_taylor(s: torch.Tensor, coeffs) -> torch.Tensor:
    """coeffs[0] + s (coeffs[1] + s (...)) by Horner's rule: the series after a of an odd function."""
    p = torch.full_like(s, coeffs[-1])
    for c in coeffs[-2::-1]:
        p = p * s + c
    return p


# sinh's Taylor coefficients from x**3 to x**11 (the x**13 term is below 2**-70 of sinh(x) for
# |x| < 1/16)
_SINH_TAYLOR = (1 / 6, 1 / 120, 1 / 5040, 1 / 362880, 1 / 39916800)


def _sinh(t: torch.Tensor) -> torch.Tensor:
    """sinh from one exp, <= 33e + 34u relative (SLEEF's sinh costs about two exps' time). a = |x|.
    For a < 1/16 the Taylor polynomial a + a s (1/6 + s (1/120 + ...)), s = a**2 (the part after a
    is below 2**-8.5 of the result, so its roundings add < 0.01u to the final addition's 0.5u). For
    1/16 <= a < 22: h = exp(a / 2), e = h * h (<= 2e + u), (e - 1/e) / 2: 0.5 e and 0.5 / e carry
    <= 2e + 2u, and the subtraction amplifies them by (e + 1/e) / (e - 1/e) = coth(a) <= coth(1/16)
    < 16.1, plus its own u. From 22 on: (h / 2) * h = e**a / 2 (drops e**-a / 2 < 2**-63 relative),
    which overflows only where sinh does, as in :func:`_cosh`. Subnormal a: s = 0 and the result a."""
    a = t.abs()
    s = a * a
    small = a + (a * s) * _odd_taylor(s, _SINH_TAYLOR)
    h = torch.exp(0.5 * a)
    e = h * h
    mid = 0.5 * e - 0.5 / e
    return torch.copysign(torch.where(a < 0.0625, small, torch.where(a < _COSH_TAIL, mid, (0.5 * h) * h)), t)


# tanh's Taylor coefficients from x**5 to x**13 (the x**15 term is below 2**-65 of tanh(x) for
# |x| < 1/16)
_TANH_TAYLOR = (2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075)


def _tanh(t: torch.Tensor) -> torch.Tensor:
    """tanh from one exp, <= 9e + 3u relative (SLEEF's tanh costs ~2 exps' time). a = |x|. For
    a < 1/16 the Taylor polynomial a + a s (-1/3 + s (2/15 + ...)), s = a**2 (the part after a is
    below 2**-9.6 of the result, so its roundings add < 0.01u to the final addition's 0.5u). Else
    E = exp(-2a) and (1 - E) / (1 + E): E <= e**(-1/8), so 1 - E amplifies E's error by
    E / (1 - E) <= 7.6 (the subtraction is exact for E >= 1/2, one rounding below); 1 + E and the
    division add e + 2u. Large a: E = 0 and the result 1 (true value within 2e**-2a of it);
    subnormal a: s = 0 and the result a (true value a (1 - a**2 / 3))."""
    a = t.abs()
    s = a * a
    small = a + (a * s) * (_odd_taylor(s, _TANH_TAYLOR) * s - 1.0 / 3.0)
    e = torch.exp(-2.0 * a)
    return torch.copysign(torch.where(a < 0.0625, small, (1.0 - e) / (1.0 + e)), t)


_ACCURATE = {"expm1": _expm1, "arctanh": _atanh, "arcsinh": _asinh, "arccosh": _acosh, "cosh": _cosh,
             "sinh": _sinh, "tanh": _tanh}


def _overflow_kept_finite(y: torch.Tensor, conditions) -> torch.Tensor:
    """y with +-inf replaced by +-DBL_MAX where every condition holds (a finite true value past
    float64's range); nested blends rather than bool algebra (see :func:`_value`)."""
    out = torch.where(y.abs() == float("inf"), torch.copysign(torch.full_like(y, DBL_MAX), y), y)
    for c in conditions:
        out = torch.where(c, out, y)
    return out


def _masks(y: torch.Tensor, conds):
    """(known, marked) bool masks from :func:`_value`'s conditions."""
    known = torch.zeros_like(y, dtype=torch.bool)
    marked = torch.zeros_like(known)
    for c, role in conds:
        c = torch.ones_like(known) if c is None else (~c if role.endswith("_unless") else c)
        if role.startswith("known"):
            known = known | c
        else:
            marked = marked | c
    return known, marked


def _fast(*args, static):
    """(values, nans): the value rounded to the format through RO32 and cpu_fast's bit arithmetic,
    as float64, with the elements needing :func:`_exact_path` set to FIX (args: operands, FIX, P),
    and the number of nan outputs, an upper bound on the FIX ones (inductor sums it in the same
    loop, where a scan for FIX afterwards costs a fifth of the loop's time). One loop under
    torch.compile on large CPU tensors; a single float64 output because inductor stores bool masks
    element by element."""
    name, st = static
    *xs, fix, P = args
    if name == "mod":
        (y, tail), conds = _mod_pair(*xs)
    else:
        (y, conds), tail = _value(name, *xs), None
    ro, near = odd32_pair(y, tail)
    out = cpu_fast.round_bits(ro, st, P).double()
    res = torch.where(near, fix, out)
    for c, role in sorted(conds, key=lambda cr: cr[1].startswith("mark")):  # marks last: they win
        hit, miss = (out, res) if role.startswith("known") else (fix, res)
        if c is None:
            res = hit
        else:
            res = torch.where(c, miss, hit) if role.endswith("_unless") else torch.where(c, hit, miss)
    return res, (res != res).sum()


# Functions whose float32 evaluation (torch / inductor: SLEEF's u10 routines, at most 1 float32 ulp,
# vectorised 8-wide on AVX2) can decide the result first: not expm1, arctanh, arcsinh (inductor
# rewrites them into formulas without that bound) nor arccosh (scalar libm in inductor's vector code).
FLOAT32_DECIDABLE = ("exp", "log", "log1p", "log2", "log10", "sin", "cos", "tan", "arcsin", "arccos", "arctan",
                     "sinh", "cosh", "tanh", "power")
# Those that take the float32 pass: measured faster end to end only for power (1.3x); exp and sin
# were 10-25% slower, the marker scan and the left-over pass costing more than float32 saves.
_FLOAT32_FIRST = ("power",)
_TRIG = ("sin", "cos", "tan")
# relative half-width of the interval around the float32 value y that must hold the true value f:
# y * 2**-20 is 8 to 16 ulps of y (y's significand is in [1, 2)), so y * (1 -+ 2**-20), rounded to
# float32, lies at least 7.5 ulps of y away from y; ulp(f) <= 2 ulp(y), so the interval holds f
# wherever the float32 routine errs by at most 3.75 ulps of f (SLEEF's u10 routines: 1 ulp)
_BRACKET32 = 2.0**-20
_NORMAL_LO, _NORMAL_HI = 2.0**-125, 2.0**126  # |y| here: SLEEF's bound applies, nothing overflows


def _fast32(*args, static):
    """First pass: the function in float32, rounded to the format where that is provably right, FIX
    elsewhere (args: float64 operands, FIX, P). An element is decided when its operands are float32
    values, its float32 value y has 2**-125 <= |y| <= 2**126, and y * (1 - 2**-20) and
    y * (1 + 2**-20) round to the same value of the format: the true value lies between them (the
    float32 routine errs by at most 1 ulp), and rounding is monotone, so it rounds to that value too.
    Float comparisons only (no bit casts, which inductor does through memory): nan never passes."""
    name, st = static
    *xs, fix, P = args
    x32 = [a.float() for a in xs]
    y = (torch.pow(*x32) if name == "power" else _TORCH[name](x32[0]))
    r_lo = cpu_fast.round_bits(y * (1.0 - _BRACKET32), st, P)
    r_hi = cpu_fast.round_bits(y * (1.0 + _BRACKET32), st, P)
    res = torch.where(r_lo == r_hi, r_lo.double(), fix)  # the same sign: equal zeros are the same
    a = y.abs()
    res = torch.where(a >= _NORMAL_LO, res, fix)
    res = torch.where(a <= _NORMAL_HI, res, fix)
    for x, x_32 in zip(xs, x32):
        res = torch.where(x_32.double() == x, res, fix)  # also false for nan
    if name in _TRIG:  # SLEEF's float32 trig bound is stated for moderate arguments
        res = torch.where(x32[0].abs() <= 65536.0, res, fix)
    return res


def _fused64(name, flat, f, mode, ov, gen, sr_bits, spec, P, compile_min=None):
    """The float64 loop (:func:`_fast`), then the generic exact path for what it leaves."""
    out, nans = run_fused(_fast, (name, spec.static_key()), *flat, _FIX, P, compile_min=compile_min)
    if not nans:
        return out
    idx = _marked(out)
    if idx.numel():
        out[idx] = _exact_path(name, [a[idx] for a in flat], f, mode, ov, gen, sr_bits)
    return out


def _marked(out: torch.Tensor) -> torch.Tensor:
    """Indices of the elements set to _FIX (few). NumPy on the CPU: one thread scans this faster
    than torch's parallel eq + nonzero on a busy 2-core machine (~3 ms against ~35 ms for 4M)."""
    if out.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(out.numpy().view(np.int64) == _FIX_BITS))
    return (out.view(torch.int64) == _FIX_BITS).nonzero().squeeze(1)


def _uncertain_generic(y, fmt, mode, ov, known):
    """Elements whose rounding is not decided by the float64 value (formats outside odd32)."""

    err = y.abs() * NEAR_REL + NEAR_ABS
    lo, hi = y - err, y + err
    checks = ("down", "up") if mode in STOCHASTIC_MODES else (mode,)
    unsure = torch.zeros_like(known)
    for m in checks:
        a, b = quantize(lo, fmt, m, ov), quantize(hi, fmt, m, ov)
        unsure = unsure | ~((a == b) | (torch.isnan(a) & torch.isnan(b)))
    return unsure & ~known & torch.isfinite(y)


def _exact_values(name: str, idx: torch.Tensor, args) -> torch.Tensor:
    cols = [a.reshape(-1)[idx].cpu().tolist() for a in args]
    vals = [true_odd64(name, *v) for v in zip(*cols)]
    return torch.tensor(vals, dtype=torch.float64, device=args[0].device)


def _round_function(name, y, known, args, f, mode, ov, gen, sr_bits):
    """Round float64 approximations ``y`` of function ``name`` at ``args`` to ``f`` exactly."""
    shape = y.shape
    y = y.reshape(-1)
    known = known.reshape(-1)
    flat_args = [a.reshape(-1) for a in args]
    if odd32_exact(f):
        ro, near = to_odd32_near(y)
        fix = (near & ~known).nonzero().squeeze(1)
        if fix.numel():
            y = y.clone()
            y[fix] = _exact_values(name, fix, flat_args)
            ro = ro.clone()
            ro[fix] = to_odd32(y[fix])
        if mode not in STOCHASTIC_MODES:
            return quantize(ro, f, mode, ov).double().reshape(shape)
    else:
        fix = _uncertain_generic(y, f, mode, ov, known).nonzero().squeeze(1)
        if fix.numel():
            y = y.clone()
            y[fix] = _exact_values(name, fix, flat_args)
    return round_to(y, f, mode, ov, gen, sr_bits).reshape(shape)


def _power_float64(a: torch.Tensor, b: torch.Tensor):
    """(y, known): float64 powers, exact (rounded to odd) for the exponents 1, 2, -1, 0.5."""
    y, conds = _value("power", a, b)
    known, special = _masks(y, conds)
    exact = {2.0: lambda v: odd_mul(v, v), -1.0: lambda v: odd_div(torch.ones_like(v), v), 0.5: odd_sqrt}
    for exponent, fn in exact.items():
        idx = (special & (b == exponent)).nonzero(as_tuple=True)
        if idx[0].numel():
            y = y.clone()
            y[idx] = fn(a[idx])
    return y, known | special


def _floor_divide_float64(a, b):
    q = a / b
    ph, pl = two_prod(q, b)
    r = (a - ph) - pl
    below = (r * torch.sign(b)) < 0  # the exact quotient lies below q
    fq = torch.floor(q)
    integral = fq == q
    big = q.abs() >= 2.0**53
    step_down = torch.where(big, to_odd(q, -torch.ones_like(q)), q - 1)
    return torch.where(integral, torch.where(below, step_down, q), fq)


def _fmod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fmod(a, b), exact; on the CPU through NumPy (C's fmod): torch's vectorised CPU fmod (SLEEF)
    returns nan where a / b overflows float64 (torch 2.13: fmod(1e10, 3e-300))."""
    if a.device.type == "cpu":
        with np.errstate(all="ignore"):
            return torch.from_numpy(np.fmod(a.numpy(), b.numpy()))
    return torch.fmod(a, b)


def _mod_float64(a, b):
    r = _fmod(a, b)
    wrap = (r != 0) & ((r < 0) != (b < 0))
    r = torch.where(wrap, odd_add(r, b), r)
    return torch.where(r == 0, torch.copysign(torch.zeros_like(r), b), r)


_MOD_RANGE = 2.0**900  # |b| within 2**-+900: Dekker's product q * b is exact, its split does not overflow


def _mod_pair(a: torch.Tensor, b: torch.Tensor):
    """((s, tail), conditions): NumPy's mod(a, b) = s + tail exactly (s = RN(s + tail)), for the
    fused loop, where SLEEF's fmod and :func:`_mod_float64`'s bool algebra and round-to-odd cost
    three times the rest. Holds where |a / b| < 2**52 and 2**-900 <= |b| <= 2**900; the other
    elements (also inf, nan, b = 0) are marked for :func:`_exact_path`.

    q = trunc(fl(a / b)) is trunc(a / b) or one more in magnitude (fl is monotone and an integer
    below 2**52 is a float; fl(a / b) errs by < 1/4 there). a - q b = (a - p) - e with
    p + e = q b (Dekker, exact): a - p is exact (Sterbenz: p is within a factor 2 of a when q != 0)
    and so is the second subtraction, whose result is representable (fmod's, or when q is one too
    big, a multiple of 2**(min exponent - 52) below |a| 2**-52). Where that remainder t has the
    sign opposite to a, q was one too big: fmod = t + sign(a) |b|, exact again. Where fmod and b
    differ in sign, mod = t + b, rounded: s = fl(t + b), tail = t - (s - b) (Fast2Sum, |t| < |b|);
    a zero result takes b's sign, as NumPy's."""
    quotient = a / b
    q = torch.trunc(quotient)
    p, e = two_prod(q, b)
    t = (a - p) - e
    t = torch.where(torch.copysign(t, a) != t, t + torch.copysign(b, a), t)  # != : t != 0, other sign
    wrap = torch.copysign(t, b) != t
    s = torch.where(wrap, t + b, t)
    tail = torch.where(wrap, t - (s - b), 0.0)
    s = torch.where(s == 0, torch.copysign(torch.zeros_like(s), b), s)
    return (s, tail), [(None, "known"), (quotient.abs() < 2.0**52, "mark_unless"),
                       (b.abs() >= 1 / _MOD_RANGE, "mark_unless"), (b.abs() <= _MOD_RANGE, "mark_unless")]


def _numpy_specials(name, a, b, y):
    """NumPy's results where an operand is not finite or the divisor is 0."""
    special = ~(torch.isfinite(a) & torch.isfinite(b) & (b != 0))
    if bool(special.any()):
        idx = special.nonzero(as_tuple=True)
        with np.errstate(all="ignore"):
            ref = getattr(np, name)(a[idx].cpu().numpy(), b[idx].cpu().numpy())
        y = y.clone()
        y[idx] = torch.from_numpy(np.asarray(ref, dtype=np.float64)).to(y.device)
    return y


def _exact_path(name: str, args, f, mode, ov, gen, sr_bits) -> torch.Tensor:
    """The generic exact path (any format, mode and device) on flat float64 operands."""
    if name == "power":
        y, known = _power_float64(*args)
        return _round_function("power", y, known, args, f, mode, ov, gen, sr_bits)
    if name in ("mod", "floor_divide"):
        exact = _floor_divide_float64 if name == "floor_divide" else _mod_float64
        return round_to(_numpy_specials(name, *args, exact(*args)), f, mode, ov, gen, sr_bits)
    if name in EXACT_UNARY:
        return round_to(_TORCH[name](args[0]), f, mode, ov, gen, sr_bits)
    y, conds = _value(name, *args)
    known, _ = _masks(y, conds)
    return _round_function(name, y, known, args, f, mode, ov, gen, sr_bits)


def _compute(name: str, named, fmt, rounding, overflow, generator, sr_bits):
    ts, kind, dtype = operands(*named)
    f, mode, ov, gen = setup(fmt, rounding, overflow, generator, ts[0].device)
    ts = torch.broadcast_tensors(*ts)
    shape = ts[0].shape
    flat = [t.reshape(-1) for t in ts]
    spec = cpu_fast.element_spec(f, mode, ov) if flat[0].device.type == "cpu" else None
    with torch.no_grad():
        if spec is not None and odd32_exact(f) and mode not in STOCHASTIC_MODES and flat[0].numel() < 2**31:
            P = torch.tensor(spec.numbers(), dtype=torch.int32)
            rest = (f, mode, ov, gen, sr_bits, spec, P)
            if name in _FLOAT32_FIRST:
                out = run_fused(_fast32, (name, spec.static_key()), *flat, _FIX, P)
                idx = _marked(out)
                if 4 * idx.numel() > out.numel():  # mostly not float32 operands: float64 for all
                    out = _fused64(name, flat, *rest)
                elif idx.numel():
                    # compiled from 4096 on (eager costs ~0.6 us per element, a compile ~10 s
                    # once): the left-over of a 4M call (~0.3%) is worth it, a test's is not
                    out[idx] = _fused64(name, [a[idx] for a in flat], *rest, compile_min=4096)
            else:
                out = _fused64(name, flat, *rest)
        else:
            out = _exact_path(name, flat, f, mode, ov, gen, sr_bits)
    return finish(out.reshape(shape), kind, dtype, f)


def _make_unary(name: str):
    def fn(x, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
           sr_bits: Optional[int] = None):
        return _compute(name, (("x", x),), fmt, rounding, overflow, generator, sr_bits)
    what = "rounded half to even" if name == "round" else "correctly rounded"
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"numpy.{name}(x), {what} to ``fmt`` (see lowbit.arith.elementary)."
    return fn


def _make_binary(name: str):
    def fn(x, y, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
           sr_bits: Optional[int] = None):
        return _compute(name, (("x", x), ("y", y)), fmt, rounding, overflow, generator, sr_bits)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"numpy.{name}(x, y), correctly rounded to ``fmt`` (see lowbit.arith.elementary)."
    return fn


exp, expm1, log, log1p, log2, log10, sin, cos, tan, arcsin, arccos, arctan, sinh, cosh, tanh, \
    arcsinh, arccosh, arctanh = (_make_unary(n) for n in UNARY)
floor, ceil, round, sign = (_make_unary(n) for n in EXACT_UNARY)  # noqa: A001
power, mod, floor_divide = (_make_binary(n) for n in BINARY)

FUNCTIONS = {n: globals()[n] for n in UNARY + EXACT_UNARY + BINARY}
__all__ = list(FUNCTIONS)
