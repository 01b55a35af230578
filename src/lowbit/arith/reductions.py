"""Reductions in a target format: cumsum, cumprod, prod, mean, var, std.

The order of operations is part of the result, so it is a parameter:

order="sequential" (default, as MATLAB chop users write their loops): first element first; the
    running value is rounded to ``fmt`` after every ``accum_every`` terms (1: after every operation;
    k: the k terms of a block are combined in float64 first, a blocked accumulator; None: float64
    throughout and one rounding at the end, which is what Pychop's reductions do). Vectorised across
    the other axes: one step per element of the reduced axis.
order="pairwise" (prod, mean, var, std): a balanced tree, pairs (0,1), (2,3), ... combined and
    rounded at every level (an odd element out is carried up); log2(n) vectorised steps.

Every single operation is correctly rounded (lowbit.arith.basic: exact float64-to-odd results, one
rounding). mean = sum / n; var = sum((x - mean)**2) / (n - ddof) with every subtraction, square,
addition and the division rounded (two-pass); std = sqrt(var) rounded.
"""
from __future__ import annotations

from typing import Optional

import torch

from .basic import finish, odd_add, odd_div, odd_mul, odd_sqrt, operands, round_to, setup

ORDERS = ("sequential", "pairwise")


def _check_args(t: torch.Tensor, axis: int, accum_every, order: str):
    if not -max(t.dim(), 1) <= axis < max(t.dim(), 1):
        raise ValueError(f"axis {axis} is out of range for shape {tuple(t.shape)}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if accum_every is not None and (isinstance(accum_every, bool) or not isinstance(accum_every, int)
                                    or accum_every < 1):
        raise ValueError(f"accum_every must be a positive integer or None, got {accum_every!r}")


class _Ctx:
    """A format, mode and policy: ``r(x)`` rounds float64-to-odd values to the format."""

    def __init__(self, fmt, rounding, overflow, generator, sr_bits, device):
        self.f, self.mode, self.ov, self.gen = setup(fmt, rounding, overflow, generator, device)
        self.sr_bits = sr_bits

    def r(self, x):
        return round_to(x, self.f, self.mode, self.ov, self.gen, self.sr_bits)


def _scan(t, ctx: _Ctx, op, float64_scan, accum_every):
    """Running op along dim 0, every output rounded; the carry rounded every accum_every terms."""
    n = t.shape[0]
    if n == 0:
        return t.clone()
    if accum_every is None:
        return ctx.r(float64_scan(t, 0))
    out = torch.empty_like(t)
    carry = None
    for c in range(0, n, accum_every):
        block = t[c:c + accum_every]
        part = block if accum_every == 1 else float64_scan(block, 0)
        vals = ctx.r(part if carry is None else op(carry.unsqueeze(0), part))
        out[c:c + accum_every] = vals
        carry = vals[-1]
    return out


def _fold(t, ctx: _Ctx, op, float64_reduce, accum_every, order):
    """op-reduction along dim 0, rounded as ``order`` and ``accum_every`` say."""
    n = t.shape[0]
    if order == "pairwise":
        v = ctx.r(t) if n else t
        while v.shape[0] > 1:
            m = v.shape[0] // 2 * 2
            paired = ctx.r(op(v[0:m:2], v[1:m:2]))
            v = torch.cat([paired, v[m:]]) if m < v.shape[0] else paired
        return v[0]
    if accum_every is None:
        return ctx.r(float64_reduce(t, 0))
    acc = None
    for c in range(0, n, accum_every):
        part = float64_reduce(t[c:c + accum_every], 0)
        acc = ctx.r(part if acc is None else op(acc, part))
    return acc


def _prepare(x, axis):
    (t,), kind, dtype = operands(("x", x))
    if t.dim() == 0:
        t = t.reshape(1)
    return t, kind, dtype


def _empty_identity(t, value):
    return torch.full(t.shape[1:], value, dtype=torch.float64, device=t.device)


def _running(x, fmt, axis, accum_every, rounding, overflow, generator, sr_bits, odd_op, exact_scan):
    t, kind, dtype = _prepare(x, axis)
    _check_args(t, axis, accum_every, "sequential")
    ctx = _Ctx(fmt, rounding, overflow, generator, sr_bits, t.device)
    with torch.no_grad():
        y = _scan(t.movedim(axis, 0), ctx, odd_op, exact_scan, accum_every).movedim(0, axis)
    return finish(y, kind, dtype, ctx.f)


def cumsum(x, fmt, axis: int = -1, accum_every: Optional[int] = 1, rounding: str = "nearest_even",
           overflow: Optional[str] = None, *, generator=None, sr_bits: Optional[int] = None):
    """Running sums along ``axis``, each rounded to ``fmt`` (sequential; see the module doc)."""
    return _running(x, fmt, axis, accum_every, rounding, overflow, generator, sr_bits, odd_add, torch.cumsum)


def cumprod(x, fmt, axis: int = -1, accum_every: Optional[int] = 1, rounding: str = "nearest_even",
            overflow: Optional[str] = None, *, generator=None, sr_bits: Optional[int] = None):
    """Running products along ``axis``, each rounded to ``fmt`` (sequential; see the module doc)."""
    return _running(x, fmt, axis, accum_every, rounding, overflow, generator, sr_bits, odd_mul, torch.cumprod)


def _sum0(t, ctx, accum_every, order):
    if t.shape[0] == 0:
        return _empty_identity(t, 0.0)
    return _fold(t, ctx, odd_add, torch.sum, accum_every, order)


def prod(x, fmt, axis: int = -1, accum_every: Optional[int] = 1, rounding: str = "nearest_even",
         overflow: Optional[str] = None, *, order: str = "sequential", generator=None,
         sr_bits: Optional[int] = None):
    """Product along ``axis`` in ``fmt`` (order and rounding points: see the module doc)."""
    t, kind, dtype = _prepare(x, axis)
    _check_args(t, axis, accum_every, order)
    ctx = _Ctx(fmt, rounding, overflow, generator, sr_bits, t.device)
    with torch.no_grad():
        t0 = t.movedim(axis, 0)
        y = _empty_identity(t0, 1.0) if t0.shape[0] == 0 else _fold(t0, ctx, odd_mul, torch.prod,
                                                                    accum_every, order)
    return finish(y, kind, dtype, ctx.f)


def _mean0(t, ctx, accum_every, order):
    n = t.shape[0]
    if n == 0:
        raise ValueError("mean of an empty axis")
    if accum_every is None and order == "sequential":
        return ctx.r(torch.mean(t, 0))
    s = _sum0(t, ctx, accum_every, order)
    return ctx.r(odd_div(s, torch.full_like(s, float(n))))


def mean(x, fmt, axis: int = -1, accum_every: Optional[int] = 1, rounding: str = "nearest_even",
         overflow: Optional[str] = None, *, order: str = "sequential", generator=None,
         sr_bits: Optional[int] = None):
    """Mean along ``axis``: the rounded sum divided by n, rounded (accum_every=None: float64 mean,
    one rounding)."""
    t, kind, dtype = _prepare(x, axis)
    _check_args(t, axis, accum_every, order)
    ctx = _Ctx(fmt, rounding, overflow, generator, sr_bits, t.device)
    with torch.no_grad():
        y = _mean0(t.movedim(axis, 0), ctx, accum_every, order)
    return finish(y, kind, dtype, ctx.f)


def _var0(t, ctx, ddof, accum_every, order):
    n = t.shape[0]
    if n - ddof <= 0:
        raise ValueError(f"var needs more than ddof={ddof} elements along the axis, got {n}")
    if accum_every is None and order == "sequential":
        return ctx.r(torch.var(t, 0, correction=ddof))
    m = _mean0(t, ctx, accum_every, order)
    d = ctx.r(odd_add(t, -m.unsqueeze(0)))
    sq = ctx.r(odd_mul(d, d))
    s = _sum0(sq, ctx, accum_every, order)
    return ctx.r(odd_div(s, torch.full_like(s, float(n - ddof))))


def _check_ddof(ddof):
    if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative integer, got {ddof!r}")


def var(x, fmt, axis: int = -1, ddof: int = 0, accum_every: Optional[int] = 1,
        rounding: str = "nearest_even", overflow: Optional[str] = None, *, order: str = "sequential",
        generator=None, sr_bits: Optional[int] = None):
    """Variance along ``axis`` (two-pass, every operation rounded; accum_every=None: float64, one
    rounding). ddof as in NumPy."""
    t, kind, dtype = _prepare(x, axis)
    _check_args(t, axis, accum_every, order)
    _check_ddof(ddof)
    ctx = _Ctx(fmt, rounding, overflow, generator, sr_bits, t.device)
    with torch.no_grad():
        y = _var0(t.movedim(axis, 0), ctx, ddof, accum_every, order)
    return finish(y, kind, dtype, ctx.f)


def std(x, fmt, axis: int = -1, ddof: int = 0, accum_every: Optional[int] = 1,
        rounding: str = "nearest_even", overflow: Optional[str] = None, *, order: str = "sequential",
        generator=None, sr_bits: Optional[int] = None):
    """Standard deviation: the square root of :func:`var`, rounded (accum_every=None: float64 std,
    one rounding)."""
    t, kind, dtype = _prepare(x, axis)
    _check_args(t, axis, accum_every, order)
    _check_ddof(ddof)
    ctx = _Ctx(fmt, rounding, overflow, generator, sr_bits, t.device)
    with torch.no_grad():
        t0 = t.movedim(axis, 0)
        if accum_every is None and order == "sequential":
            y = ctx.r(torch.std(t0, 0, correction=ddof))
        else:
            y = ctx.r(odd_sqrt(_var0(t0, ctx, ddof, accum_every, order)))
    return finish(y, kind, dtype, ctx.f)


__all__ = ["cumsum", "cumprod", "prod", "mean", "var", "std"]
