"""The numerical-analysis examples (examples/summation_error.py, examples/cholesky_bf16.py) against
independent references: exact rational arithmetic with our own round-to-nearest-even, and NumPy's IEEE
float32 / float16 arithmetic (each operation correctly rounded)."""
from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import lowbit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"lowbit_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


se = _load("summation_error")
chol = _load("cholesky_bf16")


def rne(q: Fraction, p: int) -> Fraction:
    """q rounded to p significant bits, ties to even (no exponent range: enough for these data)."""
    if q == 0:
        return q
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    scale = Fraction(2) ** (p - 1 - e)  # q * scale in [2^(p-1), 2^p)
    m = q * scale
    k = m.numerator // m.denominator
    rest = m - k
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and k % 2):
        k += 1
    return sign * k / scale


P = {"fp16": 11, "bf16": 8, "fp8_e4m3": 4, "fp8_e5m2": 3, "fp32": 24}


# --- summation -------------------------------------------------------------------------------------

def test_recursive_sum_of_ones_stagnates_at_2_to_the_p():
    # fp16: 2040 ones already added (to keep the test short), then 60 more: the sum reaches 2048 = 2^11
    # at the 2048th one and stays there (2048 + 1 is a tie, rounded to the even 2048)
    fp16 = se.recursive_sums(np.concatenate([[2040.0], np.ones(60)]), "fp16")
    np.testing.assert_array_equal(fp16[:9], np.arange(2040, 2049))
    assert np.all(fp16[8:] == 2048) and se.stagnation_value("fp16") == 2048
    bf16 = se.recursive_sums(np.ones(300), "bf16")
    assert bf16[-1] == 256 and bf16[255] == 256 and bf16[254] == 255 and se.stagnation_value("bf16") == 256


@pytest.mark.parametrize("fmt,n", [("bf16", 600), ("fp8_e5m2", 200), ("fp8_e4m3", 25)])
def test_recursive_sum_of_integers_matches_exact_simulation(fmt, n):
    got = se.recursive_sums(np.arange(1.0, n + 1), fmt)
    s, want = Fraction(0), []
    for i in range(1, n + 1):
        s = rne(s + i, P[fmt])
        want.append(s)
    assert [Fraction(float(v)) for v in got] == want
    assert got[-1] != n * (n + 1) / 2  # the rounding errors are real ones


def _random_format_data(fmt, shape, seed):
    return lowbit.quantize(np.random.default_rng(seed).random(shape), fmt)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_pairwise_and_blocked_match_exact_simulation(fmt):
    x = _random_format_data(fmt, (2, 96), 1)
    for row, pw, bl in zip(x, se.pairwise_sum(x, fmt), se.blocked_sum(x, fmt, 32)):
        v = [Fraction(float(t)) for t in row]
        while len(v) > 1:  # pairwise, the odd one carried up
            v = [rne(v[i] + v[i + 1], P[fmt]) for i in range(0, len(v) - 1, 2)] + v[len(v) // 2 * 2:]
        assert Fraction(float(pw)) == v[0]
        acc = Fraction(0)
        for b in range(0, len(row), 32):
            part = Fraction(float(row[b]))
            for t in row[b + 1:b + 32]:
                part = rne(part + Fraction(float(t)), P[fmt])
            acc = rne(acc + part, P["fp32"])
        assert Fraction(float(bl)) == rne(acc, P[fmt])


def test_errors_are_nonzero_and_within_the_worst_case_bounds():
    ns = [16, 64, 256]
    x = _random_format_data("bf16", (4, 256), 2)
    errs = se.relative_errors(x, "bf16", ns, 32)
    bnd = se.bounds("bf16", ns, 32)
    for m in se.METHODS:
        assert np.all(errs[m] <= bnd[m][:, None]), m
        assert np.max(errs[m]) > 0, m
    assert bnd["recursive"][-1] == pytest.approx(255.0)  # 255 u = 255/256: gamma_255 = 255
    assert se.bounds("bf16", [512], 32)["recursive"][0] == math.inf  # 511 u > 1: gamma says nothing
    assert se.gamma(3, 0.25) == pytest.approx(3.0) and se.gamma(4, 0.25) == math.inf


def test_data_scale_keeps_fp8_sums_in_range():
    assert se.data_scale("fp16", 4096) == 1.0
    assert se.data_scale("fp8_e4m3", 4096) == 2.0 ** -5  # 4096 * 2^-5 = 128 <= 448 / 2
    assert se.unit_roundoff("bf16") == 2.0 ** -8 and se.unit_roundoff("fp8_e5m2") == 2.0 ** -3


# --- Cholesky --------------------------------------------------------------------------------------

def _numpy_cholesky(a: np.ndarray, dtype) -> np.ndarray:
    """The same right-looking algorithm in NumPy's IEEE arithmetic of dtype."""
    w = a.astype(dtype)
    n = len(w)
    r = np.zeros_like(w)
    for k in range(n):
        r[k, k] = np.sqrt(w[k, k])
        r[k, k + 1:] = w[k, k + 1:] / r[k, k]
        w[k + 1:, k + 1:] = w[k + 1:, k + 1:] - r[k, k + 1:, None] * r[None, k, k + 1:]
    return r.astype(np.float64)


@pytest.mark.parametrize("fmt,dtype", [("fp32", np.float32), ("fp16", np.float16)])
def test_lowp_cholesky_is_bit_identical_to_ieee_arithmetic(fmt, dtype):
    # NumPy's float16 operations compute in float32 and round once more; with 24 >= 2*11 + 2 bits that
    # double rounding is innocuous for +, -, *, /, sqrt (Figueroa 1995), so they are correctly rounded.
    a = lowbit.quantize(chol.randsvd_spd(12, 1e2, np.random.default_rng(3)) * 8, fmt)
    got = chol.cholesky_lowp(a, fmt)
    want = _numpy_cholesky(a, dtype)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("model", ["lowp", "mixed"])
def test_backward_error_positive_and_below_the_bound(model):
    n, fmt = 24, "bf16"
    a = chol.randsvd_spd(n, 1e2, np.random.default_rng(0))
    r, comp = chol.factorize(a, fmt, model, "plain", 0.0)
    u = chol.unit_roundoff(fmt)
    assert 0 < comp <= chol.gamma(n + 1, u)  # |G - R^T R| <= gamma_{n+1} |R^T| |R| (Higham Thm 10.3)
    berr = chol.backward_error(a, r)
    assert u / 8 < berr < n * u
    rf = chol.FACTOR[model](lowbit.quantize(chol.prepare(a, fmt, "plain", 0.0)[0], fmt), fmt)
    assert np.array_equal(np.triu(rf), rf) and np.all(np.diag(rf) > 0)
    np.testing.assert_array_equal(lowbit.quantize(rf, fmt), rf)  # the factor is stored in bf16


def test_breakdown_detected_and_fixed_by_the_shift():
    a = chol.randsvd_spd(20, 1e6, np.random.default_rng(0))
    for model in ("lowp", "mixed"):
        with pytest.raises(chol.CholeskyBreakdown) as e:
            chol.factorize(a, "bf16", model, "plain", 0.0)
        assert e.value.pivot <= 0 and 0 < e.value.step < 20
    r, comp, c, first = chol.factorize_scaled(a, "bf16", "lowp", [2.0 ** k for k in range(-8, 3)])
    assert c > 0 and first is not None and first.pivot <= 0 and np.all(np.isfinite(r))
    assert chol.backward_error(a, r) < 2 * c * 20 * chol.unit_roundoff("bf16") + 0.05
    # the shifted bf16 factor is a good preconditioner: PCG converges, CG alone does not within 2n steps
    assert chol.cg_iterations(a, r) <= 2 * 20 < chol.cg_iterations(a)


def test_diagonal_scaling_prevents_fp8_underflow_breakdown():
    n = 20
    d = 10.0 ** np.linspace(-3, 3, n)
    a = chol.randsvd_spd(n, 10, np.random.default_rng(0)) * np.outer(d, d)
    with pytest.raises(chol.CholeskyBreakdown) as e:  # the smallest diagonal entry underflows to 0
        chol.factorize(a, "fp8_e4m3", "lowp", "plain", 0.0)
    assert e.value.step == 0 and e.value.pivot == 0
    r, _ = chol.factorize(a, "fp8_e4m3", "lowp", "scaled", 0.0)
    assert chol.backward_error(a, r) < 0.2


def test_cg_with_exact_factor_converges_at_once_and_refinement_converges():
    a = chol.randsvd_spd(16, 1e3, np.random.default_rng(4))
    exact = np.linalg.cholesky(a).T
    assert chol.cg_iterations(a, exact) <= 2
    r, _ = chol.factorize(a, "fp16", "mixed", "plain", 0.0)
    errs = chol.refine(a, r, 10)  # contraction about kappa * berr per step, down to about kappa * 2^-53
    assert all(e1 < e0 / 5 for e0, e1 in zip(errs[:8], errs[1:8])) and errs[-1] < 1e-12 < 1e-3 < errs[0]
