"""Parity with Pychop (pychop.np.float_point.Chop_, the MATLAB chop port): every function and
reduction, every Pychop rounding mode (1-6), every format both support (q43 = e4m3, q52 = e5m2,
h = fp16, b = bf16 with subnormals, s = fp32). Inputs are in the format, so Pychop's chopping of its
inputs changes nothing.

Deterministic modes must agree element by element, except where Pychop does not round correctly:
every disagreement is decided by the exact value (mpmath at 300 bits / exact rationals, rounded by
exact comparison) and lowbit must be the one that is right. Pychop's reductions compute in float64
and round once; lowbit's accum_every=None does the same through torch, so a disagreement there must
come from the two float64 values differing (summation order) and each side must be its own float64
value rounded. Stochastic modes: both must return one of the two neighbours of the true value.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import lowbit
from lowbit import arith

pychop_fp = pytest.importorskip("pychop.np.float_point", reason="the parity test runs Pychop itself (test extra)")
from test_arith_elementary import Rounder, _same, _true  # noqa: E402

FORMATS = {"q43": "e4m3", "q52": "e5m2", "h": "fp16", "b": "bf16", "s": "e8m23"}
DET = {1: "nearest_even", 2: "up", 3: "down", 4: "toward_zero"}
DOMAINS = {"arcsin": (-1, 1), "arccos": (-1, 1), "arctanh": (-0.99, 0.99), "arccosh": (1, 30),
           "log": (0.01, 100), "log2": (0.01, 100), "log10": (0.01, 100), "log1p": (-0.99, 30),
           "exp": (-20, 20), "expm1": (-20, 20), "sinh": (-20, 20), "cosh": (-20, 20)}
UNARY = arith.elementary.UNARY + arith.elementary.EXACT_UNARY
REDUCTIONS = ("cumsum", "cumprod", "prod", "mean", "var", "std")


@pytest.fixture(autouse=True)
def _no_gc_in_pychop(monkeypatch):
    """Pychop calls gc.collect() in every rounding, which costs ~0.1 s with torch loaded; the results
    do not depend on it."""
    monkeypatch.setattr(pychop_fp.gc, "collect", lambda *a: 0)


def _inputs(name, prec, n=120, seed=0):
    fmt = FORMATS[prec]
    rng = np.random.default_rng(seed)
    lo, hi = DOMAINS.get(name, (-10, 10))
    x = rng.uniform(lo, hi, n)
    if prec in ("q43", "q52"):  # every finite value of the format inside the domain
        vals = lowbit.format(fmt).values().numpy()
        x = np.concatenate([x, vals[(vals >= lo) & (vals <= hi)]])
    x = lowbit.quantize(x, fmt)
    if name in ("log", "log2", "log10", "arccosh"):
        x = x[x > 0] if name != "arccosh" else x[x >= 1]
    if name in ("arctanh",):
        x = x[np.abs(x) < 1]
    return x


def _pychop(prec, rmode):
    return pychop_fp.Chop_(prec, rmode=rmode, subnormal=True, random_state=0)


def _call_pychop(pc, name, *args):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return np.asarray(getattr(pc, name)(*[a.copy() for a in args]), dtype=np.float64)


def _exact(name, args):
    if name in ("floor", "ceil", "round", "sign", "mod", "floor_divide"):
        from fractions import Fraction
        with np.errstate(all="ignore"):
            ref = getattr(np, name)(*args)  # exact in float64 except mod's wrap-around
        if name == "mod":
            import math
            return [Fraction(a) - math.floor(Fraction(a) / Fraction(b)) * Fraction(b)
                    for a, b in zip(*args)]
        return [Fraction(v) for v in ref]
    return [_true(name, *v) for v in zip(*args)]


def _explain(name, args, fmt, mode, ours, theirs):
    """Indices where the two differ; asserts lowbit is the correctly rounded one there."""
    bad = np.flatnonzero(~_same(ours, theirs))
    if bad.size:
        rnd = Rounder(fmt)
        exact = _exact(name, [a[bad] for a in args])
        want = np.array([rnd(q, mode) for q in exact])
        assert _same(ours[bad], want).all(), (name, fmt, mode, [(tuple(a[i] for a in args), ours[i], theirs[i])
                                                             for i in bad[:4]])
        assert not _same(theirs[bad], want).any()
    return bad.size


@pytest.mark.parametrize("prec", list(FORMATS))
def test_elementary_functions_match_pychop(prec, record_property):
    fmt = FORMATS[prec]
    disagreements = {}
    for rmode, mode in DET.items():
        pc = _pychop(prec, rmode)
        for name in UNARY:
            x = _inputs(name, prec)
            ours = np.asarray(getattr(arith, name)(x, fmt, mode), dtype=np.float64)
            n = _explain(name, (x,), fmt, mode, ours, _call_pychop(pc, name, x))
            disagreements[(name, rmode)] = n
        for name in ("power", "mod", "floor_divide"):
            x = _inputs(name, prec, seed=1)
            y = _inputs(name, prec, seed=2)[:len(x)]
            x = x[:len(y)]
            if name == "power":
                x, y = np.abs(x) + 0.5, y / 4
                x, y = lowbit.quantize(x, fmt), lowbit.quantize(y, fmt)
            else:
                y = np.where(y == 0, 1.0, y)
            ours = np.asarray(getattr(arith, name)(x, y, fmt, mode), dtype=np.float64)
            disagreements[(name, rmode)] = _explain(name, (x, y), fmt, mode, ours,
                                                    _call_pychop(pc, name, x, y))
    record_property("disagreements", {k: v for k, v in disagreements.items() if v})


@pytest.mark.parametrize("prec", list(FORMATS))
def test_reductions_match_pychop(prec):
    import torch
    fmt = FORMATS[prec]
    x = lowbit.quantize(np.random.default_rng(3).uniform(0.5, 1.5, 64), fmt)
    for rmode, mode in DET.items():
        pc = _pychop(prec, rmode)
        for name in REDUCTIONS:
            ours = np.asarray(getattr(arith, name)(x, fmt, accum_every=None, rounding=mode), dtype=np.float64)
            theirs = _call_pychop(pc, name, x)
            bad = ~_same(ours, theirs)
            if bad.any():  # only from different float64 values, each rounded correctly
                f64_np = np.atleast_1d(getattr(np, name)(x))
                f64_t = np.atleast_1d(getattr(torch, name)(torch.from_numpy(x), 0).numpy()
                                      if name not in ("var", "std") else
                                      getattr(torch, name)(torch.from_numpy(x), 0, correction=0).numpy())
                assert not _same(f64_np, f64_t)[bad].any(), (name, prec, mode)
                assert np.array_equal(ours[bad], lowbit.quantize(f64_t[bad], fmt, mode, "inf"))


@pytest.mark.parametrize("prec", ["q43", "h", "b"])
@pytest.mark.parametrize("rmode", [5, 6])
def test_stochastic_modes_pick_neighbours(prec, rmode):
    fmt = FORMATS[prec]
    pc = _pychop(prec, rmode)
    mode = {5: "stochastic", 6: "stochastic_half"}[rmode]
    for name in ("exp", "sin", "log1p", "tanh"):
        x = _inputs(name, prec, n=60)
        down = np.asarray(getattr(arith, name)(x, fmt, "down"), dtype=np.float64)
        up = np.asarray(getattr(arith, name)(x, fmt, "up"), dtype=np.float64)
        ours = np.asarray(getattr(arith, name)(x, fmt, mode, generator=0), dtype=np.float64)
        theirs = _call_pychop(pc, name, x)
        for r in (ours, theirs):
            assert (_same(r, down) | _same(r, up)).all(), (name, prec, rmode)


def test_chop_front_door_matches_pychop():
    """chop(x, prec, rmode) against Chop_(prec, rmode)(x) on data spanning every range, subnormals and
    overflow included; disagreements only at Pychop's double rounding below the subnormal grid
    (rmode 1) and must be decided for lowbit by exact arithmetic (test_arith_faults_chop)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(3000) * 10.0 ** rng.integers(-45, 40, 3000)
    for prec in ("q43", "q52", "h", "b", "s"):
        for rmode in (1, 2, 3, 4):
            for sub in (True, False):
                pc = pychop_fp.Chop_(prec, rmode=rmode, subnormal=sub)
                theirs = pc(x.copy())
                ours = arith.chop(x, prec, rmode, subnormal=sub)
                bad = ~_same(ours, theirs)
                if bad.any():
                    t, emax = arith.ChopOptions(prec).params
                    xmin = 2.0 ** (1 - emax)
                    assert rmode == 1 and (np.abs(x[bad]) < xmin).all(), (prec, rmode, sub, x[bad][:3])
