"""Rounding float64 values to a format through a float32 rounded *to odd*.

The fast rounding kernels (cpu_fast, Triton) work on float32. A float64 value ``v`` can be handed to
them exactly: RO32(v), the float32 neighbour of v with an odd last bit whenever v is not a float32,
rounds to a format G exactly as v does, for every deterministic mode, provided every point of G and
every midpoint between two neighbours of G is a float32 with an *even* last bit (Boldo & Melquiond
2008: rounding to odd at p + 2 bits, then rounding at p bits). That holds when G's spacing is at least
four float32 spacings everywhere up to G's overflow threshold, which :func:`odd32_exact` checks:
floats with at most 21 mantissa bits, a smallest positive value >= 2**-147 and an overflow threshold
below float32's max; integers and fixed point of at most 22 bits. Finite values past float32's range
become +-FLT_MAX (odd), which every such format treats as an overflow, as it does the value itself.

RO is also sticky: RO32(RO64(v)) = RO32(v), so the round-to-odd float64 results of lowbit.arith's
error-free transformations may go through this path too.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..emulate import quantize
from ..formats import ElementFormat, FloatFormat, IntFormat
from ..kernels import cpu_fast
from ..rounding import STOCHASTIC_MODES

# |libm(x) - f(x)| <= NEAR_REL * |f(x)| + NEAR_ABS is assumed of torch's float64 functions: 2**-44 is
# 512 float64 ulps, far above the documented bounds (SLEEF u10 and glibc: 1 to 4 ulps)
NEAR_REL = 2.0**-44
NEAR_ABS = 2.0**-1040
_COMPILE_MIN = 1 << 16


def odd32_exact(fmt: ElementFormat) -> bool:
    """Whether rounding RO32(v) to ``fmt`` equals rounding v, for every real v (see module doc)."""
    if isinstance(fmt, FloatFormat):
        return fmt.man <= 21 and fmt.min_subnormal >= 2.0**-147 and fmt.emax <= 127
    if isinstance(fmt, IntFormat):
        magnitude_bits = fmt.width - 1 if fmt.is_signed else fmt.width
        return magnitude_bits <= 21 and fmt.step >= 2.0**-147 and max(abs(fmt.max), abs(fmt.min)) < 2.0**126
    return False


def _odd32(y: torch.Tensor, want_near: bool, tail=None):
    # RO32 = float32 truncation of y with the sticky bit ORed into the last bit. From f = RN32(y):
    # where |f| > |y| the truncation is one pattern below f's magnitude (f != 0 there; past float32's
    # range f is inf and the step gives FLT_MAX). Only comparisons and integer arithmetic: inductor
    # vectorises all of it (isinf / isnan / clamp here made it fall back to scalar code).
    # d = y - f is exact (Sterbenz, or f = 0); the tests on it run in float32 on s = d * 2**1000,
    # which keeps d's sign and whether it is 0 (|d| >= 2**-1074 becomes >= 2**-74; large ones
    # inf): float32 masks convert to int32 for free, float64 ones cost ~2 ns an element.
    # |f| > |y| where d and f have opposite signs (f * s never underflows: |d| >= 2**-53 |f| unless
    # f = 0, where 0 * s is 0 or nan); y = inf: d is nan, both tests false.
    # With a tail (y = RN(y + tail), the value being y + tail): d + tail has the sign of the exact
    # y + tail - f and is 0 only with it (|tail| < |d| unless d = 0: y is the float64 nearest to
    # y + tail, f is another float64).
    f = y.float()
    d = y - f.double()
    if tail is not None:
        d = d + tail
    s = (d * 2.0**1000).float()
    bits = (f.view(torch.int32) - (f * s < 0).int()) | (s.abs() > 0).int()
    out = bits.view(torch.float32)
    if not want_near:
        return out
    # no float32 lies within the error bound of y: the float32 interval of the true value is known
    # (false for |y| past float32's range: every odd32-exact format overflows there)
    near = d.abs() <= y.abs() * NEAR_REL + NEAR_ABS
    return out, near


def odd32_pair(y: torch.Tensor, tail: Optional[torch.Tensor] = None):
    """(RO32(y), near), for use inside fused functions (see :func:`to_odd32_near`); with ``tail``,
    RO32 of the exact y + tail where y = RN(y + tail) (``near`` then means nothing)."""
    return _odd32(y, True, tail)


def _plain(y, *, static=None):
    return _odd32(y, False)


def _with_near(y, *, static=None):
    return _odd32(y, True)


def _rounded(y, P, *, static):
    return cpu_fast.round_bits(_odd32(y, False), static, P).double()


_compiled: dict = {}


def run_fused(fn, static, *args, compile_min=None):
    """``fn(*args, static=static)``, compiled with torch.compile for CPU tensors of at least
    ``compile_min`` elements (default 2**16; one variant per static key; eager where compiling is off
    or fails: LOWBIT_CPU_COMPILE=0 forces eager)."""
    y = args[0]
    flag = os.environ.get("LOWBIT_CPU_COMPILE", "auto").lower()
    key = (fn.__name__, static)
    if y.device.type == "cpu" and y.numel() >= (compile_min or _COMPILE_MIN) and flag not in ("0", "false", "no", "off") \
            and _compiled.get(key, True) is not False:
        cfn = _compiled.get(key)
        if cfn is None:
            def bound(*a):
                return fn(*a, static=static)
            bound.__code__ = bound.__code__.replace(co_name=f"lowbit_{fn.__name__.strip('_')}_{len(_compiled)}")
            cfn = _compiled[key] = torch.compile(bound, dynamic=True)
        try:
            return cfn(*args)
        except Exception:  # no working C++ toolchain or an inductor limitation: this one stays eager
            _compiled[key] = False
    return fn(*args, static=static)


def to_odd32(y: torch.Tensor) -> torch.Tensor:
    """RO32 of float64 ``y`` (finite values past float32's range give +-FLT_MAX; nan, inf kept)."""
    return run_fused(_plain, None, y.contiguous())


def to_odd32_near(y: torch.Tensor):
    """(RO32(y), near): ``near`` marks elements with a float32 within the assumed libm error of y,
    whose float32 interval is therefore uncertain (they need a better evaluation)."""
    return run_fused(_with_near, None, y.contiguous())


def round_float64(x: torch.Tensor, fmt: ElementFormat, mode: str, overflow: str, generator=None,
                  sr_bits=None) -> torch.Tensor:
    """float64 ``x`` rounded to ``fmt`` as float64, via RO32 and the fast float32 kernels where that
    is exact (deterministic modes, :func:`odd32_exact` formats; on the CPU one fused loop);
    otherwise the float64 reference."""
    if mode not in STOCHASTIC_MODES and odd32_exact(fmt):
        spec = cpu_fast.element_spec(fmt, mode, overflow) if x.device.type == "cpu" else None
        if spec is not None and x.numel() < 2**31:
            P = torch.tensor(spec.numbers(), dtype=torch.int32)
            return run_fused(_rounded, spec.static_key(), x.contiguous().view(-1), P).view(x.shape)
        return quantize(to_odd32(x), fmt, mode, overflow).double()
    return quantize(x, fmt, mode, overflow, generator=generator, sr_bits=sr_bits)
