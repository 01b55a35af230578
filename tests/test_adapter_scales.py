"""The adapters' least-squares scales are optimal: the closed form for the sign grid, the exact
search for grids of up to 16 values (against an independent brute force and perturbations), and a
least-squares fixed point for 8-bit grids."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lowbit
from lowbit.adapters.scale_fit import exact_scale, lloyd_scale, nearest, optimal_scale, row_error, stored_scale

GRIDS = ["codebook(-1,1)", "int2", "int3", "int4", "nf4", "e2m1", "int2n"]


def values(name):
    v = lowbit.format(name).values().double()
    return v[torch.isfinite(v)]


def brute_force(w: torch.Tensor, v: torch.Tensor) -> float:
    """Independent: between consecutive breakpoints |w_i| / m (m a midpoint of the grid) the codes are
    fixed, so the optimum is the least-squares scale of the codes found at each interval's middle
    (or an interval end); evaluate every one of them directly."""
    mids = ((v[1:] + v[:-1]) / 2).abs()
    mids = mids[mids > 0]
    bps = sorted({float(a / m) for a in w.abs() for m in mids if a > 0})
    edges = [0.0] + bps + [2 * (bps[-1] if bps else float(w.abs().max()) + 1) + 1]
    best = float(row_error(w[None], torch.zeros(1, dtype=torch.float64), v))
    for lo, hi in zip(edges[:-1], edges[1:]):
        for s in ((lo + hi) / 2, lo, hi):
            if s <= 0:
                continue
            q = nearest(w / s, v)
            if (q * q).sum() > 0:
                ls = float((w * q).sum() / (q * q).sum())
                for cand in (s, min(max(ls, lo), hi)):
                    if cand > 0:
                        best = min(best, float(row_error(w[None], torch.tensor([cand], dtype=torch.float64), v)))
    return best


rows_st = st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(rows_st)
def test_sign_grid_optimum_is_mean_abs(xs):
    w = torch.tensor(xs, dtype=torch.float64)[None]
    s = exact_scale(w, values("codebook(-1,1)"))
    assert torch.allclose(s, w.abs().mean(1), rtol=1e-12, atol=0)
    e = row_error(w, s, values("codebook(-1,1)"))
    for d in (1e-3, -1e-3, 0.1, -0.1):  # a convex quadratic: any other scale is worse
        assert row_error(w, s * (1 + d), values("codebook(-1,1)")) >= e - 1e-12


@pytest.mark.parametrize("grid", GRIDS)
@settings(max_examples=12, deadline=None)
@given(xs=rows_st)
def test_exact_scale_matches_brute_force(grid, xs):
    v = values(grid)
    w = torch.tensor(xs, dtype=torch.float64)
    s = exact_scale(w[None], v)
    got = float(row_error(w[None], s, v))
    ref = brute_force(w, v)
    assert got <= ref * (1 + 1e-9) + 1e-12, (got, ref)


@pytest.mark.parametrize("grid", GRIDS + ["int4:asym-like"])
def test_exact_scale_beats_dense_scan_and_perturbations(grid):
    v = values("uint4" if grid == "int4:asym-like" else grid)
    torch.manual_seed(1)
    w = torch.randn(8, 48, dtype=torch.float64) * torch.rand(8, 1, dtype=torch.float64) * 3
    w[2] = w[2].abs()  # one-signed rows
    s = exact_scale(w, v)
    e = row_error(w, s, v)
    amax = w.abs().amax(1)
    cands = amax[:, None] / v.abs().max() * torch.linspace(1e-3, 2.0, 4001, dtype=torch.float64)  # (rows, 4001)
    scan = (w[:, None, :] - nearest(w[:, None, :] / cands[:, :, None], v) * cands[:, :, None]).pow(2).sum(2)
    assert torch.all(scan >= e[:, None] - 1e-9)
    for d in (1e-7, 1e-4, 1e-2):
        assert torch.all(row_error(w, s * (1 + d), v) >= e - 1e-12)
        assert torch.all(row_error(w, s * (1 - d), v) >= e - 1e-12)


def test_zero_rows_get_a_zero_scale():
    w = torch.zeros(3, 5, dtype=torch.float64)
    for grid in GRIDS:
        assert torch.equal(optimal_scale(w, values(grid)), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("grid", ["int8", "e4m3"])
def test_eight_bit_scale_is_a_least_squares_fixed_point(grid):
    v = values(grid)
    torch.manual_seed(0)
    w = torch.randn(6, 256, dtype=torch.float64)
    s = lloyd_scale(w, v)
    assert torch.equal(s, optimal_scale(w, v))
    q = nearest(w / s[:, None], v)  # the codes are nearest for the scale ...
    ls = (w * q).sum(1) / (q * q).sum(1)
    assert torch.allclose(ls, s, rtol=1e-9, atol=0)  # ... and the scale is least squares for the codes
    e = row_error(w, s, v)
    absmax = row_error(w, w.abs().amax(1) / v.abs().max(), v)
    assert torch.all(e <= absmax)
    assert torch.all(e >= row_error(w, exact_scale(w, v), v) - 1e-12)  # never below the global optimum


def test_stored_scale_is_the_best_fp16_neighbour():
    v = values("int4")
    torch.manual_seed(3)
    w = torch.randn(16, 32, dtype=torch.float64)
    s = exact_scale(w, v)
    h = stored_scale(w, s, v, torch.float16)
    assert h.dtype == torch.float16
    e = row_error(w, h.double(), v)
    for cand in (s.to(torch.float16), torch.nextafter(s.to(torch.float16), torch.full_like(h, 1e4)),
                 torch.nextafter(s.to(torch.float16), torch.zeros_like(h))):
        assert torch.all(e <= row_error(w, cand.double(), v))
