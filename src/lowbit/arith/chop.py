"""The front door for MATLAB ``chop`` (Higham & Pranesh) and Pychop users: their options, lowbit's formats.

    y = lowbit.chop(x, prec="h", rmode=1)                # fp16, round to nearest even
    opts = lowbit.arith.ChopOptions(prec=(5, 15), rmode=5, subnormal=False)   # t = 5 bits, emax = 15
    y = opts(x)

prec: 'q43' / 'fp8-e4m3' (t=4, emax=7), 'q52' / 'fp8-e5m2' (3, 15), 'h' / 'half' / 'fp16' (11, 15),
    'b' / 'bfloat16' / 'bf16' (8, 127), 's' / 'single' / 'fp32' (24, 127), 'd' / 'double' / 'fp64'
    (53, 1023: float64 itself, returned unchanged), or a custom (t, emax) pair (t <= 24, emax <= 127:
    MATLAB's prec='c' with options.params, Pychop's customs). t counts the hidden bit; emin = 1 - emax.
rmode: 1 nearest even, 2 toward +inf, 3 toward -inf, 4 toward zero, 5 stochastic with probability
    proportional to the distance, 6 stochastic with probability 1/2 (MATLAB chop's six; Pychop's
    LightChop adds 7 nearest ties to zero, 8 nearest ties away, 9 round to odd, accepted too).
subnormal: keep subnormals (default True, except for 'b' as in chop). Without them, values below
    the smallest normal go to 0 or xmin by the mode; for rmode 1 a tie (|x| = xmin/2) goes to xmin as
    chop's documentation says.
explim: False ignores the exponent range (no overflow, underflow or subnormals at t bits: the rounding
    of the significand only, over float64's range).
flip, p: soft errors as in MATLAB chop: each element of the rounded result has, with probability p,
    one uniformly chosen bit of its t - 1 trailing significand bits flipped.
Overflow, as chop: rmode 1 gives +-inf past the rounding threshold; 2 and 3 give inf on their side and
    -+xmax on the other; 4, 5 and 6 give +-xmax. inf and nan inputs pass through.

Differences from Pychop 0.6.2 (pychop.np.float_point.Chop_), which chop matches: Pychop draws its flip
mask with randint(0, 1) (always 0), so every element is flipped whatever p is, and never picks the top
trailing bit; without subnormals it rounds to the subnormal grid before rounding to 0 or xmin (a double
rounding: values just below xmin/2 go to xmin). Random streams differ (torch vs NumPy), so the
stochastic modes agree in distribution, not element by element.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..emulate import quantize
from ..formats import FloatFormat
from ..rounding import make_generator, round_up, uniform
from .basic import operands

PRECISIONS = {
    "q43": (4, 7), "fp8-e4m3": (4, 7), "q52": (3, 15), "fp8-e5m2": (3, 15),
    "h": (11, 15), "half": (11, 15), "fp16": (11, 15),
    "b": (8, 127), "bfloat16": (8, 127), "bf16": (8, 127),
    "s": (24, 127), "single": (24, 127), "fp32": (24, 127),
    "d": (53, 1023), "double": (53, 1023), "fp64": (53, 1023),
}
RMODES = {1: "nearest_even", 2: "up", 3: "down", 4: "toward_zero", 5: "stochastic", 6: "stochastic_half",
          7: "nearest_zero", 8: "nearest_away", 9: "odd"}


@dataclass(frozen=True)
class ChopOptions:
    """MATLAB chop's options structure (see the module doc); calling it chops an array."""

    prec: Union[str, Tuple[int, int]] = "h"
    rmode: int = 1
    subnormal: Optional[bool] = None
    explim: bool = True
    flip: bool = False
    p: float = 0.5

    def __post_init__(self):
        t, emax = self.params
        if isinstance(self.rmode, bool) or self.rmode not in RMODES:
            raise ValueError(f"rmode must be one of {sorted(RMODES)}, got {self.rmode!r}")
        if not (isinstance(self.p, (int, float)) and 0 <= self.p <= 1):
            raise ValueError(f"p must be a probability in [0, 1], got {self.p!r}")
        if (t, emax) != (53, 1023) and not (2 <= t <= 24 and 1 <= emax <= 127):
            raise ValueError(f"custom precision (t, emax) = {(t, emax)}: lowbit emulates t in 2..24 "
                             "(significand bits with the hidden one) and emax in 1..127")

    @property
    def params(self) -> Tuple[int, int]:
        """(t, emax)."""
        if isinstance(self.prec, str):
            if self.prec.lower() not in PRECISIONS:
                raise ValueError(f"unknown prec {self.prec!r}; accepted: {', '.join(PRECISIONS)} or a "
                                 "(t, emax) pair")
            return PRECISIONS[self.prec.lower()]
        if (isinstance(self.prec, tuple) and len(self.prec) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in self.prec)):
            return self.prec
        raise ValueError(f"prec must be a name ({', '.join(PRECISIONS)}) or a (t, emax) pair of ints, "
                         f"got {self.prec!r}")

    @property
    def keeps_subnormals(self) -> bool:
        if self.subnormal is not None:
            return bool(self.subnormal)
        return not (isinstance(self.prec, str) and self.prec.lower() in ("b", "bfloat16", "bf16"))

    @property
    def rounding(self) -> str:
        return RMODES[self.rmode]

    def format(self) -> FloatFormat:
        """The lowbit format with chop's precision, emin and subnormals; its exponent field may be
        wider than needed for emax (chop's overflow rule is then applied on top)."""
        t, emax = self.params
        e = max(2, math.ceil(math.log2(2 * emax + 2)))
        return FloatFormat(e, t - 1, "ieee", None if 2**e == 2 * emax + 2 else emax,
                           subnormals=self.keeps_subnormals)

    def __call__(self, x, generator=None):
        return chop(x, options=self, generator=generator)


def _overflow(q: torch.Tensor, x: torch.Tensor, xmax: float, rmode: int) -> torch.Tensor:
    over = (q.abs() > xmax) & torch.isfinite(x)
    pos = q > 0
    big = torch.full_like(q, xmax)
    inf = torch.full_like(q, math.inf)
    if rmode in (1, 7, 8):
        v = torch.where(pos, inf, -inf)
    elif rmode == 2:
        v = torch.where(pos, inf, -big)
    elif rmode == 3:
        v = torch.where(pos, big, -inf)
    else:
        v = torch.where(pos, big, -big)
    return torch.where(over, v, q)


def _significand(x: torch.Tensor, t: int, mode: str, gen) -> torch.Tensor:
    """x rounded to t significant bits, exponent unbounded (explim=False)."""
    m, e = torch.frexp(x)
    s = m.abs() * 2.0**t  # t-bit integer part, exact
    lo = torch.floor(s)
    frac = s - lo
    rand = uniform(x.shape, gen, x.device) if mode.startswith("stochastic") else None
    up = round_up(mode, frac, torch.remainder(lo, 2) == 1, x < 0, rand)
    r = torch.where(up, lo + 1, lo)
    out = torch.copysign(torch.ldexp(r, (e - t).double()), x)
    return torch.where(torch.isfinite(x), out, x)


def _flip(y: torch.Tensor, t: int, emin: Optional[int], p: float, gen) -> torch.Tensor:
    """With probability p per element, flip one of the t - 1 trailing significand bits."""
    hit = uniform(y.shape, gen, y.device) < p
    bit = torch.randint(0, t - 1, y.shape, generator=gen, device=y.device)
    finite = torch.isfinite(y)
    a = torch.where(finite, y.abs(), torch.ones_like(y))
    _, e = torch.frexp(torch.where(a > 0, a, torch.ones_like(a)))
    e = e - 1
    if emin is not None:
        e = torch.clamp(e, min=emin)
    e = torch.where(a > 0, e, torch.full_like(e, emin if emin is not None else 0))
    quantum = torch.exp2((e - (t - 1)).double())
    u = torch.round(a / quantum).to(torch.int64) ^ (torch.ones_like(e, dtype=torch.int64) << bit)
    sign = torch.where(torch.signbit(y) & (y != 0), -1.0, 1.0).double()
    flipped = sign * u.double() * quantum
    return torch.where(hit & finite, flipped, y)


def chop(x, prec: Union[str, Tuple[int, int]] = "h", rmode: int = 1, subnormal: Optional[bool] = None,
         explim: bool = True, flip: bool = False, p: float = 0.5, *, options: Optional[ChopOptions] = None,
         generator=None):
    """Round ``x`` as MATLAB chop / Pychop do (see the module doc); same type, shape and dtype out.

    options: a :class:`ChopOptions` instead of the keywords. generator: torch.Generator or seed for
    the stochastic modes and flips (None: torch's global generator).
    """
    opts = options if options is not None else ChopOptions(prec, rmode, subnormal, explim, flip, p)
    (t_in,), kind, _ = operands(("x", x))
    if isinstance(x, (np.ndarray, torch.Tensor)):
        out_dtype = x.dtype
    else:
        out_dtype = None
    t, emax = opts.params
    mode = opts.rounding
    gen = make_generator(generator, t_in.device) if (mode.startswith("stochastic") or opts.flip) else None
    with torch.no_grad():
        if (t, emax) == (53, 1023):
            y = t_in.clone()
        elif not opts.explim:
            y = _significand(t_in, t, mode, gen)
        else:
            fmt = opts.format()
            y = quantize(t_in, fmt, mode, "inf", generator=gen)
            y = _overflow(y, t_in, 2.0**emax * (2 - 2.0**(1 - t)), opts.rmode)
            if not opts.keeps_subnormals and opts.rmode == 1:
                xmin = 2.0 ** (1 - emax)
                y = torch.where(t_in.abs() == xmin / 2, torch.copysign(torch.full_like(y, xmin), t_in), y)
        if opts.flip and (t, emax) != (53, 1023):
            y = _flip(y, t, (1 - emax) if opts.explim else None, opts.p, gen)
    if kind == "numpy":
        return y.numpy().astype(out_dtype if out_dtype is not None else np.float64, copy=False)
    return y.to(out_dtype) if out_dtype is not None else y


__all__ = ["chop", "ChopOptions", "PRECISIONS", "RMODES"]
