"""lowbit.arith: correctly rounded elementwise operations and the accumulation model of matmul/sum.

Oracles are independent of the implementation under test: elementwise results are checked against the
exact rational (or exact square-root comparison) value rounded by a search over the format's sorted
value list; matmul/sum against a plain Python loop over scalars that applies lowbit.quantize at every
rounding step of the model."""
from __future__ import annotations

import bisect
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import lowbit
from lowbit import arith

DET_MODES = ["nearest_even", "nearest_away", "nearest_zero", "toward_zero", "up", "down", "odd"]
_VALUES = {}


def _values(fmt):
    if fmt not in _VALUES:
        f = lowbit.format(fmt)
        vals = f.values().tolist()
        codes = f.encode_values(torch.tensor(vals, dtype=torch.float64)).tolist()
        _VALUES[fmt] = (vals, {v: c % 2 for v, c in zip(vals, codes)})
    return _VALUES[fmt]


def oracle(fmt, mode, cmp):
    """Round the exact value x to fmt; ``cmp(y)`` (y a Fraction) returns the sign of x - y.
    x must lie within [min, max] of the format (no overflow here)."""
    vals, parity = _values(fmt)
    lo_i, hi_i = 0, len(vals) - 1  # largest i with vals[i] <= x
    assert cmp(Fraction(vals[0])) >= 0 and cmp(Fraction(vals[-1])) <= 0, "out of range"
    while lo_i < hi_i:
        mid = (lo_i + hi_i + 1) // 2
        if cmp(Fraction(vals[mid])) >= 0:
            lo_i = mid
        else:
            hi_i = mid - 1
    lo = vals[lo_i]
    if cmp(Fraction(lo)) == 0:
        return lo
    hi = vals[lo_i + 1]
    if mode.startswith("nearest"):
        c = cmp((Fraction(lo) + Fraction(hi)) / 2)
        if c:
            return hi if c > 0 else lo
        if mode == "nearest_away":
            return hi if abs(hi) > abs(lo) else lo
        if mode == "nearest_zero":
            return lo if abs(hi) > abs(lo) else hi
        return lo if parity[lo] == 0 else hi
    if mode == "up":
        return hi
    if mode == "down":
        return lo
    if mode == "toward_zero":
        return lo if lo >= 0 else hi
    if mode == "odd":
        return lo if parity[lo] == 1 else hi
    raise ValueError(mode)


def rational_cmp(q: Fraction):
    return lambda y: (q > y) - (q < y)


def sqrt_cmp(x: Fraction):
    def cmp(y):
        if y < 0:
            return 1
        y2 = y * y
        return (x > y2) - (x < y2)
    return cmp


def _operands(rng, n, lo_exp=-3, hi_exp=3):
    """float64 numbers with full 53-bit significands over a few binades, both signs."""
    sig = rng.uniform(1, 2, n)
    return np.ldexp(sig, rng.integers(lo_exp, hi_exp + 1, n)) * rng.choice([-1.0, 1.0], n)


def _midpoints(fmt, rng, n):
    """Exact midpoints between neighbouring values of fmt (float64), within [-8, 8]."""
    vals = [v for v in _values(fmt)[0] if abs(v) <= 8]
    i = rng.integers(0, len(vals) - 1, n)
    return np.array([(vals[k] + vals[k + 1]) / 2 for k in i])


OPS = {
    "add": (lambda a, b: Fraction(a) + Fraction(b)),
    "sub": (lambda a, b: Fraction(a) - Fraction(b)),
    "mul": (lambda a, b: Fraction(a) * Fraction(b)),
    "div": (lambda a, b: Fraction(a) / Fraction(b)),
}


def _check(got, expected, what):
    bad = [(i, g, e) for i, (g, e) in enumerate(zip(got.tolist(), expected)) if not g == e]
    assert not bad, f"{what}: {len(bad)} mismatches, first (index, got, expected): {bad[:3]}"


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "e4m3", "fixed8.4"])
@pytest.mark.parametrize("op", list(OPS))
def test_binary_ops_are_correctly_rounded(fmt, op):
    rng = np.random.default_rng(hash((fmt, op)) % 2**32)
    a, b = _operands(rng, 120), _operands(rng, 120)
    if op in ("add", "sub"):
        # a midpoint of fmt plus a perturbation far below float64's resolution of the midpoint:
        # float64 addition loses it (a naive fl64 then round would tie), the exact sum does not
        m = _midpoints(fmt, rng, 40)
        a = np.concatenate([a, m, m])
        b = np.concatenate([b, np.ldexp(rng.uniform(1, 2, 40), -70), -np.ldexp(rng.uniform(1, 2, 40), -70)])
    if op in ("mul", "div"):
        # exact product/quotient a hair off a midpoint m of fmt, which float64 rounds onto m:
        # a = fl(m / b) gives a * b = m + O(2**-53 m); a = fl(m * b) gives a / b likewise
        m = _midpoints(fmt, rng, 80)
        bb = rng.uniform(1, 2, 80)
        b = np.concatenate([b, bb])
        a = np.concatenate([a, m / bb if op == "mul" else m * bb])
    f = lowbit.format(fmt)
    exact = [OPS[op](x, y) for x, y in zip(a.tolist(), b.tolist())]
    keep = [i for i, q in enumerate(exact) if f.min <= q <= f.max and q != 0]
    a, b, exact = a[keep], b[keep], [exact[i] for i in keep]
    assert len(exact) > 100
    for mode in DET_MODES:
        got = getattr(arith, op)(a, b, fmt, mode)
        _check(got, [oracle(fmt, mode, rational_cmp(q)) for q in exact], f"{op} {fmt} {mode}")


@pytest.mark.parametrize("fmt", ["bf16", "e5m2", "fp16"])
def test_sqrt_is_correctly_rounded(fmt):
    rng = np.random.default_rng(7)
    x = np.abs(_operands(rng, 100))
    m = np.abs(_midpoints(fmt, rng, 40))
    m = m[m > 0]
    sq = m * m  # exact: midpoints have at most 25 significant bits
    x = np.concatenate([x, sq, np.nextafter(sq, np.inf), np.nextafter(sq, 0)])
    for mode in DET_MODES:
        got = arith.sqrt(x, fmt, mode)
        _check(got, [oracle(fmt, mode, sqrt_cmp(Fraction(v))) for v in x.tolist()], f"sqrt {fmt} {mode}")


@pytest.mark.parametrize("fmt", ["bf16", "e4m3"])
def test_fma_is_correctly_rounded_with_one_rounding(fmt):
    rng = np.random.default_rng(11)
    a, b = _operands(rng, 150), _operands(rng, 150)
    c = _operands(rng, 150)
    # cancellation: c close to -a*b, and c a midpoint minus a*b's float64 rounding
    c[:50] = -(a[:50] * b[:50]) * (1 + np.ldexp(rng.uniform(-1, 1, 50), -20))
    m = _midpoints(fmt, rng, 50)
    a[50:100] = m / b[50:100]  # a * b = m + tiny; c = m - fl(a * b) is exact (Sterbenz), so the
    c[50:100] = m - a[50:100] * b[50:100]  # exact a * b + c lies a hair off the midpoint m
    exact = [Fraction(x) * Fraction(y) + Fraction(z) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    f = lowbit.format(fmt)
    keep = [i for i, q in enumerate(exact) if f.min <= q <= f.max and q != 0]
    a, b, c, exact = a[keep], b[keep], c[keep], [exact[i] for i in keep]
    for mode in DET_MODES:
        got = arith.fma(a, b, c, fmt, mode)
        _check(got, [oracle(fmt, mode, rational_cmp(q)) for q in exact], f"fma {fmt} {mode}")
    # one rounding, not two: differs from mul-then-add somewhere
    two = arith.add(arith.mul(a, b, fmt), c, fmt)
    assert not np.array_equal(arith.fma(a, b, c, fmt), two)


def test_special_values_and_overflow_policies():
    assert arith.add(240.0, 16.0, "e4m3") == np.inf  # IEEE-like e4m3: overflow to inf
    assert np.isnan(arith.add(448.0, 64.0, "e4m3fn"))  # finite with nan: overflow gives nan
    assert arith.add(448.0, 64.0, "e4m3fn", overflow="saturate") == 448.0
    assert arith.add(448.0, 64.0, "e4m3fn", "toward_zero") == 448.0  # never rounds up: max
    assert arith.add(100.0, 100.0, "int8") == 127.0  # integers saturate
    assert arith.div(1.0, 0.0, "bf16") == np.inf
    assert np.isnan(arith.div(0.0, 0.0, "bf16"))
    assert np.isnan(arith.sqrt(-1.0, "fp16"))
    assert arith.sqrt(0.0, "fp16") == 0.0
    assert arith.resolve_overflow("e2m1fn", None) == "saturate"
    assert arith.resolve_overflow("bf16", None) == "inf"


# --- matmul: vectorised implementation vs a scalar loop -------------------------------------------

def _q(v, fmt, mode):
    return float(lowbit.quantize(np.array([v], dtype=np.float64), fmt, mode,
                                 arith.resolve_overflow(fmt, None))[0])


def loop_matmul(a, b, fin, facc, every, mode, fprod=None, c=None):
    """Oracle: inputs rounded, then for every output a Python loop over k, adding each (exact,
    optionally rounded) product into a chunk sum and rounding the running sum every ``every`` terms.
    Data are chosen so that every float64 sum here is exact."""
    a = a if fin is None else lowbit.quantize(a, fin, mode)
    b = b if fin is None else lowbit.quantize(b, fin, mode)
    m, k = a.shape
    n = b.shape[1]
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            s = 0.0 if c is None else float(np.broadcast_to(c, (m, n))[i, j])
            part, cnt = 0.0, 0
            for t in range(k):
                p = a[i, t] * b[t, j]
                part += p if fprod is None else _q(p, fprod, mode)
                cnt += 1
                if cnt == every or t == k - 1:
                    s = _q(s + part, facc, mode)
                    part, cnt = 0.0, 0
            out[i, j] = s
    return out


def _lowp_data(rng, shape, fmt="bf16"):
    """Values of fmt (few significant bits) over a modest exponent range: float64 sums stay exact."""
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-3, 3, shape)
    return lowbit.quantize(x, fmt)


@pytest.mark.parametrize("every", [1, 3, 8, None])
@pytest.mark.parametrize("acc,mode", [("bf16", "nearest_even"), ("e5m2", "toward_zero"),
                                      ("fp16", "up"), ("e4m3", "nearest_away")])
def test_matmul_matches_scalar_loop(every, acc, mode):
    rng = np.random.default_rng(3)
    a, b = _lowp_data(rng, (3, 37)), _lowp_data(rng, (37, 2))
    got = arith.matmul(a, b, "bf16", acc, every, mode)
    want = loop_matmul(a, b, "bf16", acc, 37 if every is None else every, mode)
    np.testing.assert_array_equal(got, want)


def test_matmul_product_format_and_initial_accumulator():
    rng = np.random.default_rng(4)
    a, b = _lowp_data(rng, (4, 20), "e4m3"), _lowp_data(rng, (20, 3), "e4m3")
    c = _lowp_data(rng, (4, 3))
    got = arith.matmul(a, b, "e4m3", "fp16", 4, "nearest_even", product_format="e5m2", c=c)
    np.testing.assert_array_equal(got, loop_matmul(a, b, "e4m3", "fp16", 4, "nearest_even", "e5m2", c))
    # c broadcast from a row, torch in -> torch out
    got_t = arith.matmul(torch.from_numpy(a), torch.from_numpy(b), "e4m3", "bf16", 2, c=torch.from_numpy(c[0]))
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_array_equal(got_t.numpy(), loop_matmul(a, b, "e4m3", "bf16", 2, "nearest_even", None, c[0]))


def test_matmul_shapes_follow_torch_matmul():
    rng = np.random.default_rng(5)
    A = torch.from_numpy(_lowp_data(rng, (2, 3, 16)))
    B = torch.from_numpy(_lowp_data(rng, (16, 4)))
    v = torch.from_numpy(_lowp_data(rng, (16,)))
    y = arith.matmul(A, B, "bf16", "bf16", 4)
    assert y.shape == (2, 3, 4)
    for i in range(2):  # batch element = 2-D product
        assert torch.equal(y[i], arith.matmul(A[i], B, "bf16", "bf16", 4))
    assert arith.matmul(A[0], v, None, "fp16", 1).shape == (3,)
    assert arith.matmul(v, B, None, "fp16", 1).shape == (4,)
    d = arith.dot(v, v, None, "fp16", 1)
    assert d.shape == () and float(d) == float(arith.matmul(v[None], v[:, None], None, "fp16", 1)[0, 0])
    # no formats: float64 result equal to the float64 product (data exact)
    assert torch.equal(arith.matmul(A, B), (A.double() @ B.double()))


def test_matmul_block_input_format_blocks_along_reduction_axis():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((3, 64)), rng.standard_normal((64, 5))
    got = arith.matmul(a, b, "mxfp8", None, None)
    qa = lowbit.quantize(a, "mxfp8", axis=-1)
    qb = lowbit.quantize(b, "mxfp8", axis=0)
    np.testing.assert_allclose(got, qa @ qb, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="block size"):
        arith.matmul(a[:, :40], b[:40], "mxfp8")


def test_accumulation_facts_stagnation_and_wide_accumulators():
    t = np.full(512, 2.0 ** -8)  # exact sum 2
    # bf16 round-to-nearest: 1 + 2**-8 is a tie between 1 and 1 + 2**-7, ties to even: stuck at 1
    assert arith.sum(t, "bf16", accum_every=1) == 1.0
    assert arith.dot(t, np.ones(512), None, "bf16", 1) == 1.0
    assert arith.sum(t, "bf16", accum_every=16) == 2.0  # chunks of 1/16 are exact up to 16
    assert arith.sum(t, "bf16", accum_every=None) == 2.0  # one rounding at the end
    assert arith.sum(t, "fp32", accum_every=1) == 2.0
    # stochastic rounding does not stagnate: unbiased on average over independent sums
    sr = arith.sum(np.broadcast_to(t, (32, 512)), "bf16", -1, 1, "stochastic", generator=0)
    assert abs(sr.mean() - 2) < 0.1 and sr.min() > 1.5
    # the error of a k=1 sum of many positive terms shrinks as the accumulator widens
    rng = np.random.default_rng(0)
    x = lowbit.quantize(rng.uniform(0, 1, 500), "bf16")
    exact = math.fsum(x.tolist())
    errs = [abs(float(arith.sum(x, f)) - exact) / exact for f in ("e5m2", "bf16", "fp16", "tf32", "fp32")]
    assert errs[0] > errs[1] > errs[2] > errs[4] and errs[3] > errs[4]
    assert errs[1] > 0.02 and errs[4] < 1e-5
    # and with larger chunks (fewer roundings)
    errs_k = [abs(float(arith.sum(x, "bf16", accum_every=k)) - exact) for k in (1, 10, 100, None)]
    assert errs_k[0] > 10 * errs_k[1] and errs_k[1] >= errs_k[2] >= errs_k[3]
    assert errs_k[3] <= 1.0  # k = n: only the final rounding, half an ulp of bf16 at 2**8..2**9


def test_sum_matches_scalar_loop_along_axis():
    rng = np.random.default_rng(8)
    x = _lowp_data(rng, (5, 3, 12))
    got = arith.sum(x, "e4m3", axis=1, accum_every=2, rounding="down")
    want = np.zeros((5, 12))
    for i in range(5):
        for j in range(12):
            s = 0.0
            for c in range(0, 3, 2):
                s = _q(s + float(np.sum(x[i, c:c + 2, j])), "e4m3", "down")
            want[i, j] = s
    np.testing.assert_array_equal(got, want)


def test_stochastic_rounding_is_reproducible_and_unbiased():
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((8, 50)), rng.standard_normal((50, 8))
    kw = dict(input_format="bf16", accum_format="e5m2", accum_every=1, rounding="stochastic")
    y1 = arith.matmul(a, b, generator=123, **kw)
    assert np.array_equal(y1, arith.matmul(a, b, generator=123, **kw))
    assert not np.array_equal(y1, arith.matmul(a, b, generator=124, **kw))
    x = np.full(20000, 1 / 3)
    m = arith.add(x, 0.0, "e4m3", "stochastic", generator=0).mean()
    lo, hi = 0.3125, 0.34375  # e4m3 neighbours of 1/3; P(hi) = (1/3 - lo) / (hi - lo) = 2/3
    assert abs((m - lo) / (hi - lo) - 2 / 3) < 0.02


def test_chop_wrapper():
    ch = arith.Chop("fp16")
    x = np.array([1.0, 2.0 ** -20, 3.0])
    assert np.array_equal(ch(x), lowbit.quantize(x, "fp16"))
    assert np.array_equal(ch.add(x, x[::-1]), arith.add(x, x[::-1], "fp16"))
    assert np.array_equal(ch.div(x, 3.0), arith.div(x, 3.0, "fp16"))
    assert ch.sqrt(2.0) == arith.sqrt(2.0, "fp16") == 1.4140625
    assert np.array_equal(ch.fma(x, x, 1.0), arith.fma(x, x, 1.0, "fp16"))
    A = np.arange(12.0).reshape(3, 4) / 7
    assert np.array_equal(ch.matmul(A, A.T), arith.matmul(A, A.T, "fp16", "fp16", 1))
    assert "fp16" in repr(arith.Chop("fp16")) or "e5m10" in repr(ch)
    # one generator for the whole sequence: reproducible from the seed, fresh numbers per call
    s1 = arith.Chop("e4m3", "stochastic", generator=5)
    s2 = arith.Chop("e4m3", "stochastic", generator=5)
    v = np.full(64, 0.3)
    r1 = [s1.mul(v, 1.0) for _ in range(2)]
    r2 = [s2.mul(v, 1.0) for _ in range(2)]
    assert all(np.array_equal(p, q) for p, q in zip(r1, r2))
    assert not np.array_equal(r1[0], r1[1])


def test_types_dtypes_and_errors():
    h = np.ones(4, np.float16)
    assert arith.add(h, h, "fp16").dtype == np.float16
    assert arith.add(h, h, "bf16").dtype == np.float32  # bf16 values do not fit float16
    t = torch.ones(3, dtype=torch.bfloat16)
    assert arith.mul(t, t, "e4m3").dtype == torch.bfloat16
    assert arith.mul(t, 1.5, "fp32").dtype == torch.float32
    assert arith.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32)).dtype == np.float64
    assert isinstance(arith.add(1.0, 2.0, "bf16"), np.ndarray)
    with pytest.raises(ValueError, match="block format"):
        arith.add(1.0, 2.0, "mxfp4")
    with pytest.raises(ValueError, match="accum_every"):
        arith.matmul(np.ones((2, 2)), np.ones((2, 2)), None, "bf16", 0)
    with pytest.raises(ValueError, match="reduction"):
        arith.matmul(np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(TypeError, match="int64"):
        arith.add(torch.ones(2, dtype=torch.int64), 1.0, "bf16")
    with pytest.raises(ValueError, match="unknown rounding"):
        arith.add(1.0, 1.0, "bf16", "sideways")
    with pytest.raises(lowbit.FormatError):
        arith.Chop("e9m99")
