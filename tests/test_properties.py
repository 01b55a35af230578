"""Property tests (hypothesis): idempotence, monotonicity, results always representable, nearest
modes within half a gap (and truly nearest), directed modes really directed, stochastic results one
of the two neighbours, symmetry under negation, and MX block invariances."""
import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lowbit
from _exact_refs import one_torch_thread  # noqa: F401  (autouse fixture)

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

FORMATS = ["e4m3fn", "e5m2", "e4m3fnuz", "e3m4", "e2m1fn", "e3m2fn", "e2m3fn", "bf16", "fp16", "e8m0",
           "int4", "int4n", "uint4", "int8", "fixed8.4", "nf4", "fp4_bnb", "p3109_k8p3", "e5m2_ftz",
           "e1m2fn", "e5m0", "e2m1"]
DET = ["nearest_even", "nearest_away", "nearest_zero", "toward_zero", "up", "down", "odd"]
VALUES = {f: lowbit.format(f).values().numpy() for f in FORMATS}
SIGN_MAGNITUDE = {f for f in FORMATS if isinstance(lowbit.format(f), lowbit.FloatFormat) and f != "e8m0"}


@st.composite
def case(draw, modes=DET):
    """A format, a mode, and a float32 vector spread over the format's range and around it."""
    fmt = draw(st.sampled_from(FORMATS))
    v = VALUES[fmt]
    top = float(max(abs(v[0]), abs(v[-1])))
    f32 = dict(width=32, allow_nan=False, allow_infinity=False)
    bound = min(4 * top, float(np.finfo(np.float32).max))
    elem = st.one_of(st.floats(-bound, bound, **f32), st.floats(**f32),
                     st.sampled_from(v.tolist()).map(float),  # exact values and their float32 neighbours
                     st.sampled_from(v.tolist()).map(lambda a: float(np.nextafter(np.float32(a), np.float32(np.inf)))))
    x = np.array(draw(st.lists(elem, min_size=1, max_size=40)), dtype=np.float32)
    if fmt == "e8m0":  # unsigned, no zero: positive inputs only
        x = np.abs(x)
        x = x[x > 0] if (x > 0).any() else np.array([1.0], np.float32)
    return fmt, draw(st.sampled_from(modes)), torch.from_numpy(x)


def nbrs(fmt, x):
    """Largest value <= x and smallest value >= x (x clipped to the range)."""
    v = VALUES[fmt]
    xd = np.clip(x.double().numpy(), v[0], v[-1])
    i = np.searchsorted(v, xd, side="left")  # v[i] >= x
    hi = v[np.minimum(i, len(v) - 1)]
    j = np.searchsorted(v, xd, side="right") - 1  # v[j] <= x
    lo = v[np.maximum(j, 0)]
    return xd, lo, hi


@SETTINGS
@given(case())
def test_idempotent(c):
    fmt, mode, x = c
    q = lowbit.quantize(x, fmt, mode)
    assert torch.equal(lowbit.quantize(q, fmt, mode), q)


@SETTINGS
@given(case())
def test_monotone(c):
    fmt, mode, x = c
    xs, _ = torch.sort(x)
    q = lowbit.quantize(xs, fmt, mode).double()
    assert (q[1:] >= q[:-1]).all(), (xs, q)


@SETTINGS
@given(case(DET + ["stochastic", "stochastic_half"]))
def test_representable(c):
    fmt, mode, x = c
    q = lowbit.quantize(x, fmt, mode, generator=0).double().numpy()
    assert np.isin(q + 0.0, VALUES[fmt]).all()


@SETTINGS
@given(case(["nearest_even", "nearest_away", "nearest_zero"]))
def test_nearest_is_nearest(c):
    fmt, mode, x = c
    q = lowbit.quantize(x, fmt, mode).double().numpy()
    xd, lo, hi = nbrs(fmt, x)
    err = np.abs(q - xd)
    assert (2 * err <= hi - lo).all()  # within half the gap between the neighbours
    assert (err == np.minimum(xd - lo, hi - xd)).all()  # and no value is nearer
    assert np.isin(q, np.stack([lo, hi])).all()


@SETTINGS
@given(case(["toward_zero", "up", "down"]))
def test_directed(c):
    fmt, mode, x = c
    q = lowbit.quantize(x, fmt, mode).double().numpy()
    xd, lo, hi = nbrs(fmt, x)  # saturation aside, directed rounding picks the neighbour on its side
    if mode == "up":
        assert (q == hi).all() and (q >= xd).all()
    elif mode == "down":
        assert (q == lo).all() and (q <= xd).all()
    else:
        assert (q == np.where(xd >= 0, lo, hi)).all()
        if 0.0 in VALUES[fmt]:
            assert (np.abs(q) <= np.abs(xd)).all() and (q * xd >= 0).all()


@SETTINGS
@given(case(["stochastic", "stochastic_half"]), st.integers(0, 2**31))
def test_stochastic_is_a_neighbour(c, seed):
    fmt, mode, x = c
    q = lowbit.quantize(x, fmt, mode, generator=seed).double().numpy()
    xd, lo, hi = nbrs(fmt, x)
    assert ((q == lo) | (q == hi)).all()


@SETTINGS
@given(case())
def test_negation_symmetry(c):
    fmt, mode, x = c
    if fmt not in SIGN_MAGNITUDE:
        return
    mirror = {"up": "down", "down": "up"}.get(mode, mode)
    assert torch.equal(lowbit.quantize(-x, fmt, mode), -lowbit.quantize(x, fmt, mirror))


@SETTINGS
@given(st.sampled_from(["mxfp4", "mxfp8_e4m3", "mxfp6_e2m3", "mxint8", "nvfp4"]),
       st.lists(st.floats(-1e4, 1e4, width=32, allow_subnormal=False), min_size=32, max_size=32),
       st.integers(-20, 20))
def test_block_invariances(fmt, xs, k):
    x = torch.tensor(xs, dtype=torch.float32).reshape(1, 32)
    amax = float(x.abs().max())
    assume(amax == 0 or amax >= 1e-20)  # keep every block exponent inside E8M0's range after * 2**k
    q = lowbit.quantize(x, fmt)
    # idempotent: the quantized block has the same scale and its elements are on the grid
    if fmt != "nvfp4":  # (NVFP4's tensor scale moves with the amax)
        assert torch.equal(lowbit.quantize(q, fmt), q)
    # a power-of-two factor passes through every scale exactly (the exponents stay in range here)
    assert torch.equal(lowbit.quantize(x * 2.0**k, fmt), q * 2.0**k)
