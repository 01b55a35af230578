"""The scaling-law fitter on synthetic sweeps drawn from a known law (lowbit.scaling.law/fit)."""
import math

import numpy as np
import pytest

from lowbit.scaling.fit import (bootstrap, crossing, fit_all, fit_sweep, holdout, observed_penalty, predict,
                                named_intervals)
from lowbit.scaling.law import (BASE_NAMES, PENALTY_NAMES, base_log_loss, base_params, fit_base, huber,
                                penalty_params, quantized_log_loss)

TRUE_BASE = {"A": 400.0, "B": 300.0, "E": 1.8, "alpha": 0.34, "beta": 0.28}
TRUE_PEN = {"k": 0.02, "gamma_D": 0.3, "gamma_G": 1.0, "gamma_N": 0.4}


def law(n, d, g=None, base=TRUE_BASE, pen=TRUE_PEN):
    loss = base["A"] / n ** base["alpha"] + base["B"] / d ** base["beta"] + base["E"]
    if g is not None:
        loss += pen["k"] * d ** pen["gamma_D"] * math.log2(g) ** pen["gamma_G"] / n ** pen["gamma_N"]
    return loss


def synthetic_runs(seed=0, noise=0.003, sizes=(3e5, 1e6, 3e6, 1e7), tokens=(1e7, 3e7, 1e8, 3e8), groups=(32, 128),
                   extra=None):
    """bf16 and w4a4 runs on a grid, each loss times exp(noise * standard normal)."""
    rng = np.random.default_rng(seed)
    runs = []
    for w, n in enumerate(sizes):
        for d in tokens:
            for precision, gs in (("bf16", (None,)), ("w4a4", groups), *(extra or {}).items()):
                for g in gs:
                    pen = TRUE_PEN if precision != "w16a4" else {**TRUE_PEN, "gamma_D": 0.1, "k": 0.3}
                    loss = law(n, d, g if precision != "w16a4" else 2, pen=pen) * math.exp(noise * rng.standard_normal())
                    runs.append({"key": f"{w}-{d:g}-{g}-{precision}", "width": w, "seed": 0, "N": n * 1.2, "N_no_emb": n,
                                 "D": d, "G": g, "precision": precision, "loss": loss})
    return runs


def test_huber_gradient_and_jacobians_match_finite_differences():
    rng = np.random.default_rng(0)
    x, y, z = rng.uniform(12, 17, 7), rng.uniform(15, 20, 7), rng.uniform(1, 2, 7)
    for fn, theta in ((lambda t: base_log_loss(t, x, y), np.array([6.0, 5.5, 0.6, 0.35, 0.3])),
                      (lambda t: quantized_log_loss(t, np.full(7, 2.5), x, y, z), np.array([-4.0, 0.3, 1.0, 0.4]))):
        _, jac = fn(theta)
        for i in range(len(theta)):
            e = np.zeros_like(theta)
            e[i] = 1e-6
            num = (fn(theta + e)[0] - fn(theta - e)[0]) / 2e-6
            np.testing.assert_allclose(jac[:, i], num, rtol=1e-5, atol=1e-8)
    r = np.array([-3e-3, -5e-4, 0.0, 5e-4, 3e-3])
    v, g = huber(r, 1e-3)
    np.testing.assert_allclose(v, [2.5e-6, 1.25e-7, 0, 1.25e-7, 2.5e-6])
    np.testing.assert_allclose(g, [-1e-3, -5e-4, 0, 5e-4, 1e-3])


def test_noiseless_sweep_is_recovered_exactly():
    base, pens = fit_all(synthetic_runs(noise=0.0))
    got = {**base_params(base.theta), **penalty_params(pens["w4a4"].theta)}
    for name, true in {**TRUE_BASE, **TRUE_PEN}.items():
        assert got[name] == pytest.approx(true, rel=2e-3), name


@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_sweep_true_parameters_lie_in_bootstrap_intervals(seed):
    runs = synthetic_runs(seed)
    base, pens = fit_all(runs)
    boot = bootstrap(runs, base, pens, "no_emb", 40, seed)
    intervals = {**named_intervals(boot["base"], BASE_NAMES, base_params),
                 **named_intervals(boot["w4a4"], PENALTY_NAMES, penalty_params)}
    for name, true in {**TRUE_BASE, **TRUE_PEN}.items():
        lo, hi = intervals[name]
        assert lo <= true <= hi, (name, true, lo, hi)
    # the intervals say something: the base exponents are pinned to well under their own size
    for name in ("alpha", "beta"):
        lo, hi = intervals[name]
        assert hi - lo < 0.5 * TRUE_BASE[name], name


def test_holdout_predicts_a_noiseless_law_and_flags_a_broken_one():
    runs = synthetic_runs(noise=0.0)
    for axis in ("N", "D"):
        h = holdout(runs, axis, "no_emb")
        assert h["n_test"] == (12 if axis == "N" else 12) and h["loss_rel_error_max"] < 1e-3
        assert h["delta_p_rel_error_max"] < 1e-2
    # the largest model's quantized losses follow another law: the held-out check must show it
    bent = [dict(r, loss=r["loss"] + 0.3) if r["N_no_emb"] == 1e7 and r["precision"] == "w4a4" else r for r in runs]
    h = holdout(bent, "N", "no_emb")
    assert h["delta_p_rel_error_median"] > 0.5


def test_weight_activation_decomposition_and_crossing():
    runs = synthetic_runs(noise=0.0, extra={"w4a16": (32, 128), "w16a4": (None,)})
    out = fit_sweep(runs, bootstrap_samples=4)
    dec = out["decomposition"]
    assert dec["weight_faster_share"] == 1.0
    assert dec["gamma_D_weight"] == pytest.approx(0.3, rel=1e-2)
    assert dec["gamma_D_activation"] == pytest.approx(0.1, rel=2e-2) and dec["weight_grows_faster_with_D"]
    assert out["penalty"]["w16a4"]["gamma_G_fixed"]
    # at the crossing both parts are equal, by the definition of the law
    w, a = np.array(out["penalty"]["w4a16"]["theta"]), np.array(out["penalty"]["w16a4"]["theta"])
    d = crossing(w, a, 1e6, 32)
    dw = w[0] + w[1] * math.log(d) + w[2] * math.log(math.log2(32)) - w[3] * math.log(1e6)
    da = a[0] + a[1] * math.log(d) - a[3] * math.log(1e6)
    assert dw == pytest.approx(da, abs=1e-9)


def test_predict_interval_contains_the_point_and_observed_penalty():
    runs = synthetic_runs(seed=3)
    out = fit_sweep(runs, bootstrap_samples=20)
    p = predict(out, 2e6, 5e7, 64, "w4a4")
    assert p["loss_interval"][0] <= p["loss"] <= p["loss_interval"][1]
    assert p["loss"] == pytest.approx(law(2e6, 5e7, 64), rel=0.01)
    q = next(r for r in runs if r["precision"] == "w4a4")
    b = next(r for r in runs if r["precision"] == "bf16" and r["D"] == q["D"] and r["width"] == q["width"])
    assert observed_penalty(q, runs) == pytest.approx(q["loss"] - b["loss"])
    with pytest.raises(ValueError, match="was not fitted"):
        predict(out, 1e6, 1e7, 64, "w2a2")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 5"):
        fit_base([1e6, 2e6], [1e7, 1e7], [3.0, 2.9])
    with pytest.raises(ValueError, match="positive finite"):
        fit_base([1e6] * 5, [1e7] * 5, [3.0, 2.9, float("nan"), 1, 1])
    with pytest.raises(ValueError, match="bf16 runs, and there are none"):
        fit_sweep([r for r in synthetic_runs() if r["precision"] != "bf16"], bootstrap_samples=0)
    with pytest.raises(ValueError, match="n_count"):
        fit_sweep(synthetic_runs(), n_count="some", bootstrap_samples=0)
