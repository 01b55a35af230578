"""lowbit.arith reductions against plain Python loops in exact rational arithmetic, each operation
rounded by the exact Fraction rounder of test_arith_elementary."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import lowbit
from lowbit import arith
from test_arith_elementary import Rounder, _same

FMT = "bf16"


def _data(shape, seed=0, lo=-3.0, hi=3.0):
    x = np.random.default_rng(seed).uniform(lo, hi, shape)
    return lowbit.quantize(x, FMT)


def _seq(values, rnd, mode, op, start=None):
    out, acc = [], start
    for v in values:
        acc = Fraction(v) if acc is None else Fraction(rnd(op(Fraction(acc), Fraction(v)), mode))
        acc = Fraction(rnd(acc, mode))
        out.append(float(acc))
    return out


def _pairwise(values, rnd, mode, op):
    v = [Fraction(rnd(Fraction(a), mode)) for a in values]
    while len(v) > 1:
        nxt = [Fraction(rnd(op(v[i], v[i + 1]), mode)) for i in range(0, len(v) - 1, 2)]
        if len(v) % 2:
            nxt.append(v[-1])
        v = nxt
    return float(v[0])


def _mul(a, b):
    return a * b


def _add(a, b):
    return a + b


@pytest.mark.parametrize("mode", ["nearest_even", "down"])
def test_sequential_scans_and_folds(mode):
    rnd = Rounder(FMT)
    x = _data((37, 3))
    for col in range(3):
        xs = x[:, col]
        want = _seq(xs, rnd, mode, _add)
        assert _same(arith.cumsum(x, FMT, axis=0, rounding=mode)[:, col], want).all()
        xp = xs / 2 + 1.0
        xp = lowbit.quantize(xp, FMT)
        want_p = _seq(xp, rnd, mode, _mul)
        xpp = np.stack([xp] * 2, axis=1)
        assert _same(arith.cumprod(xpp, FMT, axis=0, rounding=mode)[:, 0], want_p).all()
        assert arith.prod(xp, FMT, rounding=mode) == want_p[-1]
        n = len(xs)
        m = rnd(Fraction(want[-1]) / n, mode)
        assert arith.mean(xs, FMT, rounding=mode) == m
        d = [rnd(Fraction(v) - Fraction(m), mode) for v in xs]
        sq = [rnd(Fraction(v) ** 2, mode) for v in d]
        s = _seq(sq, rnd, mode, _add)[-1]
        var1 = rnd(Fraction(s) / (n - 1), mode)
        assert arith.var(xs, FMT, ddof=1, rounding=mode) == var1
        std_ref = arith.sqrt(np.array([var1]), FMT, mode)[0]
        assert arith.std(xs, FMT, ddof=1, rounding=mode) == std_ref


def test_pairwise_and_blocked():
    rnd = Rounder(FMT)
    xs = _data(45, seed=1)
    mode = "nearest_even"
    assert arith.prod(lowbit.quantize(xs / 4 + 1, FMT), FMT, order="pairwise") == \
        _pairwise(lowbit.quantize(xs / 4 + 1, FMT), rnd, mode, _mul)
    s = _pairwise(xs, rnd, mode, _add)
    assert arith.mean(xs, FMT, order="pairwise") == rnd(Fraction(s) / len(xs), mode)
    # blocks of 4 summed in float64 (exact here: few bf16 terms), the running value rounded per block
    acc, out = None, []
    for c in range(0, len(xs), 4):
        part = Fraction(float(np.sum(xs[c:c + 4])))
        acc = Fraction(rnd(part if acc is None else acc + part, mode))
        out.append(float(acc))
    got = arith.cumsum(xs, FMT, accum_every=4)
    assert _same(got[3::4], out[:len(got[3::4])]).all()


def test_one_rounding_matches_float64_then_round():
    x = _data((50, 4), seed=2)
    for name, ref in (("cumsum", np.cumsum), ("cumprod", np.cumprod), ("prod", np.prod), ("mean", np.mean),
                      ("var", np.var), ("std", np.std)):
        xx = x / 8 + 1 if name in ("cumprod", "prod") else x
        got = getattr(arith, name)(xx, FMT, axis=0, accum_every=None)
        want = lowbit.quantize(ref(xx, axis=0), FMT)
        assert np.array_equal(got, want), name


def test_torch_axis_shapes_and_errors():
    t = torch.tensor(_data((4, 5), seed=3))
    assert arith.cumsum(t, FMT, axis=1).shape == (4, 5)
    assert arith.mean(t, FMT, axis=0).shape == (5,)
    assert arith.var(t, FMT, axis=-1, order="pairwise").shape == (4,)
    assert float(arith.prod(torch.zeros(0, dtype=torch.float64), FMT)) == 1.0
    with pytest.raises(ValueError, match="order"):
        arith.mean(t, FMT, order="random")
    with pytest.raises(ValueError, match="axis"):
        arith.cumsum(t, FMT, axis=3)
    with pytest.raises(ValueError, match="ddof"):
        arith.var(t, FMT, ddof=5, axis=0)
    with pytest.raises(ValueError, match="accum_every"):
        arith.cumsum(t, FMT, accum_every=0)
    assert math.isinf(float(arith.cumsum(np.array([6e4, 6e4]), "fp16")[-1]))


def test_blocks_of_a_memmap_equal_the_in_memory_results(tmp_path):
    from lowbit.arith import chunked
    x = _data((53, 3), seed=6)
    path = tmp_path / "x.npy"
    np.save(path, x)
    xm = np.load(path, mmap_mode="r")
    out = np.lib.format.open_memmap(tmp_path / "y.npy", "w+", np.float64, x.shape)
    chunked.map_blocks(arith.exp, xm, out=out, rows=7, fmt=FMT)
    assert np.array_equal(out, arith.exp(x, FMT))
    for mode in ("nearest_even", "down"):
        assert np.array_equal(chunked.scan_blocks("cumsum", xm, FMT, mode, rows=7), arith.cumsum(x, FMT, 0, rounding=mode))
        xp = lowbit.quantize(x / 4 + 1, FMT)
        assert np.array_equal(chunked.scan_blocks("cumprod", xp, FMT, mode, rows=5),
                              arith.cumprod(xp, FMT, 0, rounding=mode))
        assert np.array_equal(chunked.fold_blocks("sum", xm, FMT, mode, rows=7), arith.sum(x, FMT, 0, rounding=mode))
        assert np.array_equal(chunked.fold_blocks("prod", xp, FMT, mode, rows=4), arith.prod(xp, FMT, 0, rounding=mode))
    with pytest.raises(ValueError, match="rows"):
        chunked.fold_blocks("sum", xm, FMT, rows=0)
    with pytest.raises(ValueError, match="scan_blocks"):
        chunked.scan_blocks("cummax", xm, FMT)
