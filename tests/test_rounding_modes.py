"""Every deterministic rounding mode and overflow policy against the independent value-list oracle
(``_exact_refs.oracle_round``: searchsorted over the sorted values, exact comparisons, ties by the
parity of the code taken from the reference table), for the ml_dtypes formats, exotic minifloats,
integers and codebooks, float32 and float64 inputs, on every backend; plus hand-made cases."""
import numpy as np
import pytest
import torch

import lowbit
from _exact_refs import one_torch_thread  # noqa: F401  (autouse fixture)
from _exact_refs import (DETERMINISTIC_MODES, ML_FORMATS, assert_bits_equal, backend_params, codebook_refs,
                         exotic_refs, int_refs, make_points, ml_ref, Oracle, oracle_round, run_lowbit)

BACKENDS = backend_params()

_CODEBOOKS = codebook_refs()
REFS = {name: (ml_ref(name), name) for name in ML_FORMATS}
REFS.update({name: (ref, name) for name, ref in exotic_refs().items()})
REFS.update({name: (ref, name) for name, ref in int_refs().items()})
REFS.update(_CODEBOOKS)


def _policies(ref):
    if ref.kind in ("int", "codebook"):
        return ["saturate"]
    out = ["saturate"]
    if ref.has_inf or ref.has_nan:
        out.append("inf")
    if ref.has_nan:
        out.append("nan")
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(REFS))
def test_every_mode_and_policy_vs_oracle(name, backend, dtype):
    ref, fmt = REFS[name]
    x = make_points(ref, dtype, n_random=5000)
    failures = []
    for overflow in _policies(ref):
        oracle = Oracle(x, ref, overflow)
        for mode in DETERMINISTIC_MODES:
            want, defined = oracle.round(mode)
            got = run_lowbit(x, fmt, mode, overflow, dtype, backend)
            try:
                assert_bits_equal(got, want, x, f"{name} {mode} overflow={overflow}", mask=defined)
            except AssertionError as e:
                failures.append(str(e)[:400])
    assert not failures, "\n".join(failures)


def test_oracle_declines_only_round_to_odd_between_zero_and_min_normal_when_flushed():
    ref = exotic_refs()["e5m2_ftz"]
    x = make_points(ref, np.float64, n_random=2000)
    for mode in DETERMINISTIC_MODES:
        _, defined = oracle_round(x, ref, mode, "inf")
        undefined = x[~defined]
        if mode != "odd":
            assert defined.all(), mode
        else:
            assert len(undefined) and (np.abs(undefined) < 2.0**-14).all() and (undefined != 0).all()


# --- hand-made cases -------------------------------------------------------------------------------

def q(values, fmt, mode="nearest_even", overflow="saturate", dtype=torch.float64):
    return lowbit.quantize(torch.tensor(values, dtype=dtype), fmt, mode, overflow).tolist()


def test_e2m1fn_by_hand():
    # values 0 0.5 1 1.5 2 3 4 6, codes 0..7 (code parity = parity of the mantissa bit, 0 even)
    x = [2.5, 1.25, 1.75, 5.0, 0.25, 0.75, -2.5, 2.2, -2.9]
    assert q(x, "e2m1fn", "nearest_even") == [2.0, 1.0, 2.0, 4.0, 0.0, 1.0, -2.0, 2.0, -3.0]
    assert q(x, "e2m1fn", "nearest_away") == [3.0, 1.5, 2.0, 6.0, 0.5, 1.0, -3.0, 2.0, -3.0]
    assert q(x, "e2m1fn", "nearest_zero") == [2.0, 1.0, 1.5, 4.0, 0.0, 0.5, -2.0, 2.0, -3.0]
    assert q(x, "e2m1fn", "toward_zero") == [2.0, 1.0, 1.5, 4.0, 0.0, 0.5, -2.0, 2.0, -2.0]
    assert q(x, "e2m1fn", "up") == [3.0, 1.5, 2.0, 6.0, 0.5, 1.0, -2.0, 3.0, -2.0]
    assert q(x, "e2m1fn", "down") == [2.0, 1.0, 1.5, 4.0, 0.0, 0.5, -3.0, 2.0, -3.0]
    # odd: the neighbour with the odd code: 3 (5), 1.5 (3), 1.5 (3), 6 (7), 0.5 (1), 0.5, -3, 3, -3
    assert q(x, "e2m1fn", "odd") == [3.0, 1.5, 1.5, 6.0, 0.5, 0.5, -3.0, 3.0, -3.0]
    # saturating beyond max in every mode, -0 kept
    assert q([7.0, -100.0, -0.0, -0.1], "e2m1fn", "up") == [6.0, -6.0, -0.0, -0.0]


def test_directed_modes_at_overflow_follow_ieee():
    # e5m2: max 57344, has inf. IEEE 754 7.4: toward zero -> +-max; up: +inf / -max; down: +max / -inf
    x = [1e6, -1e6, 61440.0, -61440.0, 60000.0]  # 61440 is the overflow tie (57344 + 8192/2)
    assert q(x, "e5m2", "toward_zero", "inf") == [57344.0, -57344.0, 57344.0, -57344.0, 57344.0]
    assert q(x, "e5m2", "up", "inf") == [np.inf, -57344.0, np.inf, -57344.0, np.inf]
    assert q(x, "e5m2", "down", "inf") == [57344.0, -np.inf, 57344.0, -np.inf, 57344.0]
    assert q(x, "e5m2", "nearest_even", "inf") == [np.inf, -np.inf, np.inf, -np.inf, 57344.0]
    assert q(x, "e5m2", "nearest_zero", "inf") == [np.inf, -np.inf, 57344.0, -57344.0, 57344.0]
    assert q(x, "e5m2", "nearest_even", "saturate") == [57344.0, -57344.0, 57344.0, -57344.0, 57344.0]
    # infinite inputs are exact: they stay infinite under "inf" whatever the mode
    assert q([np.inf, -np.inf], "e5m2", "toward_zero", "inf") == [np.inf, -np.inf]
    # e4m3fn (no inf): overflow is nan, toward-zero directions give max; 464 is the tie (448 even)
    assert q([464.0, 465.0, 1e6], "e4m3fn", "nearest_even", "inf")[0] == 448.0
    assert np.isnan(q([465.0, 1e6], "e4m3fn", "nearest_even", "inf")).all()
    assert q([1e6, -1e6], "e4m3fn", "toward_zero", "inf") == [448.0, -448.0]
    assert np.isnan(q([1e6], "e4m3fn", "toward_zero", "nan")).all()


def test_integers_by_hand():
    x = [2.5, 3.5, -2.5, -3.5, 2.2, -2.2, 100.0, -100.0, -0.4]
    assert q(x, "int4") == [2.0, 4.0, -2.0, -4.0, 2.0, -2.0, 7.0, -8.0, 0.0]
    assert q(x, "int4", "nearest_away") == [3.0, 4.0, -3.0, -4.0, 2.0, -2.0, 7.0, -8.0, 0.0]
    assert q(x, "int4", "odd") == [3.0, 3.0, -3.0, -3.0, 3.0, -3.0, 7.0, -8.0, -1.0]
    assert q(x, "int4n", "down") == [2.0, 3.0, -3.0, -4.0, 2.0, -3.0, 7.0, -7.0, -1.0]
    assert q(x, "uint4", "up") == [3.0, 4.0, 0.0, 0.0, 3.0, 0.0, 15.0, 0.0, 0.0]
    # zero is unsigned: no -0 from an integer format
    assert np.signbit(q([-0.4, -0.0], "int4")).tolist() == [False, False]
    # fixed8.4: step 1/16, range -8 .. 127/16; 1/32 is the tie between 0 and 1/16 -> 0 (even)
    assert q([1 / 32, 3 / 32, 0.1, 9.0, -9.0], "fixed8.4") == [0.0, 0.125, 0.125, 127 / 16, -8.0]


def test_codebook_by_hand():
    # user table -2, -0.75, 0.5, 1, 3.25, 10 (codes 0..5): ties at -1.375, -0.125, 0.75, 2.125, 6.625
    t = lowbit.codebook([-2, -0.75, 0.5, 1, 3.25, 10])
    x = [-1.375, -0.125, 0.75, 2.125, 6.625, 0.6, 20.0, -5.0]
    assert q(x, t, "nearest_even") == [-2.0, 0.5, 0.5, 3.25, 3.25, 0.5, 10.0, -2.0]
    assert q(x, t, "nearest_away") == [-2.0, -0.75, 1.0, 3.25, 10.0, 0.5, 10.0, -2.0]
    assert q(x, t, "nearest_zero") == [-0.75, 0.5, 0.5, 1.0, 3.25, 0.5, 10.0, -2.0]
    assert q(x, t, "up") == [-0.75, 0.5, 1.0, 3.25, 10.0, 1.0, 10.0, -2.0]
    assert q(x, t, "odd") == [-0.75, -0.75, 1.0, 1.0, 10.0, 1.0, 10.0, -2.0]
    # a near-tie between table values whose distances round equal in float64 is not a tie
    assert q([np.nextafter(-0.125, -1.0), np.nextafter(-0.125, 1.0)], t, "nearest_even") == [-0.75, 0.5]
