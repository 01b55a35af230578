"""Stochastic rounding: unbiased, each outcome as often as its distance says, reproducible with a
seed or a torch.Generator, independent across elements, the k-random-bits variant, 50/50 rounding.
Fixed seeds make every test deterministic; the bounds are 6 standard deviations (a false alarm
would need a one-in-a-billion draw, and the seeds are fixed, so the outcome never changes)."""
import math

import numpy as np
import pytest
import torch

import lowbit
from _exact_refs import one_torch_thread  # noqa: F401  (autouse fixture)
from _exact_refs import backend_params

BACKENDS = backend_params()
N = 1_000_000  # draws (kept below cpu_fast's torch.compile threshold of 2**20 elements, whose
# one-off compile per format would dominate this file's run time)


def sr(x, fmt, backend, rounding="stochastic", **kw):
    b, dev = backend
    return lowbit.quantize(x.to(dev), fmt, rounding, backend=b, **kw).cpu()


def neighbours(fmt, x: float):
    """The two values of ``fmt`` around x, by search over the value list."""
    v = lowbit.format(fmt).values().numpy()
    i = np.searchsorted(v, x, side="right")
    return float(v[i - 1]), float(v[i])


# e4m3fn: between 1 and 1.125 (ulp 1/8); -3.3 between -3.5 and -3.25; 2.0**-8 + ... a subnormal gap;
# int4: between 2 and 3; nf4: between two table values; bf16 near 1
CASES = [("e4m3fn", 1.0 + 0.125 * f) for f in (0.01, 0.25, 0.5, 0.7, 0.99)] + [
    ("e4m3fn", -3.3), ("e4m3fn", 2.0**-9 * 0.3), ("e5m2", 1000.0), ("int4", 2.3), ("int4", -0.6),
    ("nf4", 0.3), ("bf16", 1.0 + 2**-7 * 0.375), ("e2m1fn", -5.5), ("e8m0", 3.0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbiased_and_proportional(backend):
    """Each case: 2**18 draws of one value. P(hi) must be the fraction of the way from lo to hi
    (binomial bound), the mean must equal x (|mean error| <= 6 sigma), and only lo and hi occur."""
    n = 2**18
    for fmt, x0 in CASES:
        x = torch.full((n,), x0, dtype=torch.float64 if fmt == "bf16" else torch.float32)
        x0 = float(x[0])
        lo, hi = neighbours(fmt, x0)
        q = sr(x, fmt, backend, generator=1234).double()
        is_hi = q == hi
        assert (is_hi | (q == lo)).all(), (fmt, x0, q.unique())
        p = (x0 - lo) / (hi - lo)  # P(hi); for negatives the magnitude goes up with P(lo) = 1 - p
        n_hi = int(is_hi.sum())
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(n_hi - n * p) <= 6 * sigma + 1, (fmt, x0, n_hi / n, p)
        mean_err = float(q.mean()) - x0
        assert abs(mean_err) <= 6 * (hi - lo) * math.sqrt(p * (1 - p) / n) + 1e-12 * abs(x0), (fmt, x0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chi_square_and_mean_over_many_values(backend):
    """1e6 values spread over many gaps: the total rounding error is zero within 6 sigma, and the
    count of round-ups against the expected count, pooled in 10 bins of the fraction, passes a
    chi-square test with 10 degrees of freedom (bound: 45, far beyond the 1e-6 quantile of 35.6)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(N, generator=g, dtype=torch.float64) * 400 - 200).float()
    v = lowbit.format("e4m3fn").values()
    xd = x.double()
    i = torch.searchsorted(v, xd, right=True)
    lo, hi = v[i - 1], v[i]
    gap = (hi - lo).numpy()
    p = ((xd - lo) / (hi - lo)).numpy()
    q = sr(x, "e4m3fn", backend, generator=99).double()
    assert ((q == lo) | (q == hi)).all()
    up = (q == hi).numpy()
    total_err = float((q - xd).sum())
    assert abs(total_err) <= 6 * math.sqrt((gap**2 * p * (1 - p)).sum()), total_err
    bins = np.minimum((p * 10).astype(int), 9)
    chi2 = 0.0
    for b in range(10):
        sel = bins == b
        expected = p[sel].sum()
        var = (p[sel] * (1 - p[sel])).sum()
        chi2 += (up[sel].sum() - expected) ** 2 / var
    assert chi2 < 45, chi2


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_values_never_move(backend):
    v = lowbit.format("e4m3fn").values().float()
    x = v.repeat(64)
    for mode in ("stochastic", "stochastic_half"):
        assert torch.equal(sr(x, "e4m3fn", backend, mode, generator=0), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_and_advancing(backend):
    b, dev = backend
    x = torch.randn(10000) * 3
    a = sr(x, "e2m1fn", backend, generator=5)
    assert torch.equal(a, sr(x, "e2m1fn", backend, generator=5))
    assert not torch.equal(a, sr(x, "e2m1fn", backend, generator=6))
    g1 = torch.Generator(device=dev).manual_seed(5)
    g2 = torch.Generator(device=dev).manual_seed(5)
    first = sr(x, "e2m1fn", backend, generator=g1)
    assert torch.equal(first, sr(x, "e2m1fn", backend, generator=g2))
    # the generator advances: a second call draws new numbers
    assert not torch.equal(first, sr(x, "e2m1fn", backend, generator=g1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_independent_across_elements(backend):
    """Round-up indicators of neighbouring elements (and along the other axis of a 2-D tensor) are
    uncorrelated: |r| <= 6 / sqrt(n)."""
    x = torch.full((1000, 1000), 1.0625)  # halfway between 1 and 1.125 in e4m3fn: P(up) = 1/2
    up = (sr(x, "e4m3fn", backend, generator=11) == 1.125).double()
    n = up.numel()
    for a, b in [(up[:, :-1], up[:, 1:]), (up[:-1, :], up[1:, :]), (up[:, :-7], up[:, 7:]),
                 (up.flatten()[:-3001], up.flatten()[3001:])]:
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) <= 6 / math.sqrt(n), r
    # and calls with different seeds are independent of each other
    up2 = (sr(x, "e4m3fn", backend, generator=12) == 1.125).double()
    assert abs(np.corrcoef(up.flatten().numpy(), up2.flatten().numpy())[0, 1]) <= 6 / math.sqrt(n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_bits(backend):
    """With k random bits, P(up) = floor(frac * 2**k) / 2**k: the fraction is truncated to k bits."""
    n = 2**18
    for k, f in [(1, 0.3), (1, 0.7), (2, 0.3), (2, 0.2), (2, 0.75), (2, 0.99), (3, 0.4), (4, 0.97), (8, 0.5)]:
        p = math.floor(f * 2**k) / 2**k
        for sign in (1.0, -1.0):
            x = torch.full((n,), sign * (1.0 + 0.125 * f))
            q = sr(x, "e4m3fn", backend, generator=21, sr_bits=k)
            frac_up = float((q.abs() == 1.125).double().mean())
            assert ((q.abs() == 1.0) | (q.abs() == 1.125)).all()
            if p in (0.0, 1.0):
                assert frac_up == p, (k, f)
            else:
                assert abs(frac_up - p) <= 6 * math.sqrt(p * (1 - p) / n), (k, f, frac_up, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_bits_integers_and_codebooks(backend):
    """Integers are sign-magnitude like floats: the magnitude's fraction is truncated to k bits.
    Codebooks are not (their modes act in value order): the fraction from the lower neighbour is."""
    n = 2**16
    v = lowbit.format("nf4").values().tolist()
    for fmt, lo, hi in [("int4", 2.0, 3.0), ("int4", -3.0, -2.0), ("nf4", v[8], v[9]), ("nf4", v[2], v[3])]:
        for k, f in [(2, 0.2), (2, 0.6), (3, 0.99)]:
            x = torch.full((n,), lo + f * (hi - lo), dtype=torch.float64)
            f = float((x[0] - lo) / (hi - lo))
            if fmt == "int4" and hi <= 0:  # sign-magnitude: P(lo, the larger magnitude) from 1 - f
                p_hi = 1 - math.floor((1 - f) * 2**k) / 2**k
            else:
                p_hi = math.floor(f * 2**k) / 2**k
            q = sr(x, fmt, backend, generator=4, sr_bits=k).double()
            assert ((q == lo) | (q == hi)).all()
            frac_hi = float((q == hi).double().mean())
            assert abs(frac_hi - p_hi) <= 6 * math.sqrt(p_hi * (1 - p_hi) / n), (fmt, lo, k, f, frac_hi, p_hi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_half(backend):
    """50/50 between the neighbours whatever the distance; exact values stay."""
    n = 2**18
    for f in (0.05, 0.5, 0.95):
        x = torch.full((n,), 1.0 + 0.125 * f)
        q = sr(x, "e4m3fn", backend, "stochastic_half", generator=3)
        assert ((q == 1.0) | (q == 1.125)).all()
        frac_up = float((q == 1.125).double().mean())
        assert abs(frac_up - 0.5) <= 6 * math.sqrt(0.25 / n), (f, frac_up)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_block_formats(backend):
    """MX elements round stochastically on the element grid; the block scale is deterministic."""
    # block: amax 6 -> shared 0 (scale 1); 2.5 lies between e2m1's 2 and 3 (P(up) = 1/2); 6 is exact
    x = torch.tensor([6.0, 2.5] + [0.0] * 30).repeat(2**14)
    q = sr(x, "mxfp4", backend, generator=8).view(-1, 32)
    assert (q[:, 0] == 6).all() and (q[:, 2:] == 0).all()
    second = q[:, 1]
    assert set(second.unique().tolist()) <= {2.0, 3.0}
    assert abs(float((second == 3).double().mean()) - 0.5) <= 6 * math.sqrt(0.25 / 2**14)
