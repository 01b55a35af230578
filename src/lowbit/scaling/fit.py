"""``lowbit scaling fit``: the law fitted to a sweep's runs, with bootstrap intervals, held-out
checks (largest N, then largest D, left out of the fit and predicted), and the weight/activation
decomposition of W4A4's penalty (w4a16 runs give the weight part, w16a4 runs the activation part).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from .law import (BASE_NAMES, HUBER_DELTA, PENALTY_NAMES, BaseFit, PenaltyFit, base_log_loss, base_params, fit_base,
                  fit_penalty, log_log2, penalty, penalty_params)

UNQUANTIZED = "bf16"
WEIGHT_PART, ACT_PART = "w4a16", "w16a4"
INTERVAL = 0.95


def param_count(rec: dict, n_count: str) -> float:
    """N of a run as the law counts it: without the embedding (``no_emb``) or all parameters (``total``)."""
    if n_count not in ("no_emb", "total"):
        raise ValueError(f"n_count must be no_emb or total; got {n_count!r}")
    return float(rec["N_no_emb"] if n_count == "no_emb" else rec["N"])


def _arrays(runs: Sequence[dict], n_count: str):
    n = np.array([param_count(r, n_count) for r in runs])
    d = np.array([float(r["D"]) for r in runs])
    g = [r.get("G") for r in runs]
    loss = np.array([float(r["loss"]) for r in runs])
    return n, d, g, loss


def by_precision(runs: Sequence[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in runs:
        out.setdefault(r["precision"], []).append(r)
    return out


def observed_penalty(run: dict, runs: Sequence[dict]) -> Optional[float]:
    """L_q - L_bf16 of the unquantized run with the same width, tokens and seed (None if absent)."""
    for r in runs:
        if (r["precision"] == UNQUANTIZED and r["width"] == run["width"] and r["D"] == run["D"]
                and r["seed"] == run["seed"]):
            return float(run["loss"]) - float(r["loss"])
    return None


def fit_all(runs: Sequence[dict], n_count: str = "no_emb", base_starts=None,
            penalty_starts: Optional[Dict[str, list]] = None):
    """(BaseFit, {precision: PenaltyFit}) of ``runs``; precisions with fewer than 3 runs are left out."""
    groups = by_precision(runs)
    if UNQUANTIZED not in groups:
        raise ValueError(f"the base law L(N, D) is fitted on the {UNQUANTIZED} runs, and there are none; "
                         f"run the sweep with --precisions {UNQUANTIZED},...")
    n, d, _, loss = _arrays(groups[UNQUANTIZED], n_count)
    base = fit_base(n, d, loss, base_starts)
    pens = {}
    for p, rs in sorted(groups.items()):
        if p == UNQUANTIZED or len(rs) < 3:
            continue
        n, d, g, loss = _arrays(rs, n_count)
        pens[p] = fit_penalty(base, n, d, g, loss, (penalty_starts or {}).get(p))
    return base, pens


def _interval(samples: np.ndarray) -> List[float]:
    lo, hi = (1 - INTERVAL) / 2, 1 - (1 - INTERVAL) / 2
    return [float(np.quantile(samples, lo)), float(np.quantile(samples, hi))]


def bootstrap(runs: Sequence[dict], base: BaseFit, pens: Dict[str, PenaltyFit], n_count: str, samples: int,
              seed: int) -> Dict[str, np.ndarray]:
    """Parameter vectors refitted on ``samples`` resamples (runs drawn with replacement within each
    precision), started from the full fit's best optima: {"base": (S, 5), precision: (S, 4)}."""
    rng = np.random.default_rng(seed)
    groups = by_precision(runs)
    out: Dict[str, list] = {"base": [], **{p: [] for p in pens}}
    for _ in range(samples):
        pick = {p: [rs[i] for i in rng.integers(0, len(rs), len(rs))] for p, rs in groups.items()}
        n, d, _, loss = _arrays(pick[UNQUANTIZED], n_count)
        b = fit_base(n, d, loss, base.starts)
        out["base"].append(b.theta)
        for p, fit in pens.items():
            n, d, g, loss = _arrays(pick[p], n_count)
            out[p].append(fit_penalty(b, n, d, g, loss, fit.starts).theta)
    return {k: np.array(v) for k, v in out.items()}


def named_intervals(samples: np.ndarray, names, natural) -> dict:
    """Interval of each parameter in natural units (A rather than log A)."""
    nat = np.array([list(natural(s).values()) for s in samples])
    keys = list(natural(samples[0]).keys())
    return {k: _interval(nat[:, i]) for i, k in enumerate(keys)}


def _rel(pred: float, obs: float) -> float:
    return abs(pred - obs) / abs(obs) if obs else float("inf")


def holdout(runs: Sequence[dict], axis: str, n_count: str) -> dict:
    """Fit without the runs at the largest N (``axis="N"``) or D, predict those: per run, the
    relative error of the loss and (where the bf16 partner was run) of delta_p."""
    value = (lambda r: param_count(r, n_count)) if axis == "N" else (lambda r: float(r["D"]))
    top = max(value(r) for r in runs)
    train = [r for r in runs if value(r) < top]
    test = [r for r in runs if value(r) == top]
    try:
        base, pens = fit_all(train, n_count)
    except ValueError as e:
        return {"held_out": f"largest {axis} = {top:g}", "error": str(e)}
    rows = []
    for r in test:
        n, d = param_count(r, n_count), float(r["D"])
        lb = float(np.exp(base.log_loss([n], [d])[0]))
        row = {"key": r["key"], "precision": r["precision"], "loss": r["loss"]}
        if r["precision"] == UNQUANTIZED:
            row["predicted"] = lb
        elif r["precision"] in pens:
            dp = float(pens[r["precision"]].delta([n], [d], [r.get("G")])[0])
            row["predicted"] = lb + dp
            obs = observed_penalty(r, runs)
            if obs is not None:
                row.update(delta_p=obs, delta_p_predicted=dp, delta_p_rel_error=_rel(dp, obs))
        else:
            continue
        row["loss_rel_error"] = _rel(row["predicted"], r["loss"])
        rows.append(row)
    loss_err = [r["loss_rel_error"] for r in rows]
    dp_err = [r["delta_p_rel_error"] for r in rows if "delta_p_rel_error" in r]
    return {"held_out": f"largest {axis} = {top:g}", "n_train": len(train), "n_test": len(rows), "runs": rows,
            "loss_rel_error_mean": float(np.mean(loss_err)) if loss_err else None,
            "loss_rel_error_max": float(np.max(loss_err)) if loss_err else None,
            "delta_p_rel_error_median": float(np.median(dp_err)) if dp_err else None,
            "delta_p_rel_error_max": float(np.max(dp_err)) if dp_err else None}


def crossing(weight: np.ndarray, act: np.ndarray, n: float, g: Optional[float]) -> Optional[float]:
    """Tokens D at which the weight and activation penalties are equal for this N and G (None when
    their D exponents are equal)."""
    x, z = math.log(n), float(log_log2([g])[0])
    dg = weight[1] - act[1]
    if abs(dg) < 1e-9:
        return None
    rest = (weight[0] - act[0]) + (weight[2] - act[2]) * z - (weight[3] - act[3]) * x
    return float(math.exp(-rest / dg))


def fit_sweep(runs: Sequence[dict], n_count: str = "no_emb", bootstrap_samples: int = 200, seed: int = 0) -> dict:
    """Everything ``lowbit scaling fit`` reports, as one JSON-able dict."""
    if isinstance(bootstrap_samples, bool) or not isinstance(bootstrap_samples, int) or bootstrap_samples < 0:
        raise ValueError(f"bootstrap must be an int >= 0; got {bootstrap_samples!r}")
    base, pens = fit_all(runs, n_count)
    boot = bootstrap(runs, base, pens, n_count, bootstrap_samples, seed) if bootstrap_samples else {}
    groups = by_precision(runs)
    n, d, _, loss = _arrays(groups[UNQUANTIZED], n_count)
    out = {"n_count": n_count, "huber_delta": HUBER_DELTA, "bootstrap": bootstrap_samples, "interval": INTERVAL,
           "n_runs": len(runs),
           "base": {"params": base_params(base.theta), "theta": base.theta.tolist(), "names": list(BASE_NAMES),
                    "n_runs": len(loss),
                    "rms_log_residual": float(np.sqrt(np.mean((np.log(loss) - base.log_loss(n, d)) ** 2)))},
           "penalty": {}}
    if bootstrap_samples:
        out["base"]["intervals"] = named_intervals(boot["base"], BASE_NAMES, base_params)
        out["base"]["samples"] = boot["base"].tolist()
    lb_all = {}
    for p, fit in pens.items():
        n, d, g, loss = _arrays(groups[p], n_count)
        lb = base.loss(n, d)
        lb_all[p] = lb
        pred = np.log(lb + fit.delta(n, d, g))
        entry = {"params": penalty_params(fit.theta), "theta": fit.theta.tolist(), "names": list(PENALTY_NAMES),
                 "n_runs": len(loss), "gamma_G_fixed": fit.fix_g,
                 "groups": sorted({x for x in g if x is not None}),
                 "rms_log_residual": float(np.sqrt(np.mean((np.log(loss) - pred) ** 2)))}
        if bootstrap_samples:
            entry["intervals"] = named_intervals(boot[p], PENALTY_NAMES, penalty_params)
            entry["samples"] = boot[p].tolist()
        out["penalty"][p] = entry
    out["holdout"] = {"largest_N": holdout(runs, "N", n_count), "largest_D": holdout(runs, "D", n_count)}
    if WEIGHT_PART in pens and ACT_PART in pens:
        w, a = pens[WEIGHT_PART].theta, pens[ACT_PART].theta
        sizes = sorted({param_count(r, n_count) for r in runs})
        gs = sorted({r["G"] for r in groups[WEIGHT_PART] if r.get("G")}) or [None]
        out["decomposition"] = {
            "weight": WEIGHT_PART, "activation": ACT_PART,
            "gamma_D_weight": float(w[1]), "gamma_D_activation": float(a[1]),
            "weight_grows_faster_with_D": bool(w[1] > a[1]),
            # share of bootstrap resamples (both parts refitted on the same resample) where it does
            "weight_faster_share": (float(np.mean(boot[WEIGHT_PART][:, 1] > boot[ACT_PART][:, 1]))
                                    if bootstrap_samples else None),
            "crossing_D": [{"N": s, "G": gg, "D": crossing(w, a, s, gg)} for s in sizes for gg in gs]}
    return out


def summary_lines(fit: dict) -> List[str]:
    """The fit in a few lines: parameters with intervals, held-out errors, the crossing."""
    def fmt(name, v, iv):
        return f"{name}={v:.4g}" + (f" [{iv[0]:.3g}, {iv[1]:.3g}]" if iv else "")

    b = fit["base"]
    ivs = b.get("intervals", {})
    lines = [f"L(N, D) = A/N^alpha + B/D^beta + E on {b['n_runs']} {UNQUANTIZED} runs (N = {fit['n_count']}; "
             f"{int(fit['interval'] * 100)}% bootstrap intervals of {fit['bootstrap']} resamples):",
             "  " + "  ".join(fmt(k, v, ivs.get(k)) for k, v in b["params"].items())
             + f"  rms log residual {b['rms_log_residual']:.4f}"]
    for p, e in fit["penalty"].items():
        ivs = e.get("intervals", {})
        fixed = " (gamma_G held at 0: one group size)" if e["gamma_G_fixed"] else ""
        lines.append(f"delta_p {p} on {e['n_runs']} runs{fixed}:")
        lines.append("  " + "  ".join(fmt(k, v, ivs.get(k)) for k, v in e["params"].items())
                     + f"  rms log residual {e['rms_log_residual']:.4f}")
    for name, h in fit["holdout"].items():
        if "error" in h:
            lines.append(f"held out {h['held_out']}: not fitted ({h['error']})")
            continue
        dp = (f"; delta_p relative error median {h['delta_p_rel_error_median']:.1%}, max "
              f"{h['delta_p_rel_error_max']:.1%}") if h["delta_p_rel_error_median"] is not None else ""
        lines.append(f"held out {h['held_out']} ({h['n_test']} runs, fitted on {h['n_train']}): loss relative error "
                     f"mean {h['loss_rel_error_mean']:.2%}, max {h['loss_rel_error_max']:.2%}{dp}")
    dec = fit.get("decomposition")
    if dec:
        lines.append(f"weight part ({dec['weight']}) gamma_D {dec['gamma_D_weight']:.3g} vs activation part "
                     f"({dec['activation']}) {dec['gamma_D_activation']:.3g}: the weight part grows "
                     f"{'faster' if dec['weight_grows_faster_with_D'] else 'slower'} with D"
                     + (f" (in {dec['weight_faster_share']:.0%} of the bootstrap resamples)"
                        if dec.get("weight_faster_share") is not None else ""))
        for c in dec["crossing_D"]:
            where = "never (equal D exponents)" if c["D"] is None else f"D = {c['D']:.3g}"
            lines.append(f"  parts cross at N={c['N']:.3g}, G={c['G']}: {where}")
    return lines


def predict(fit: dict, n: float, d: float, g: Optional[int], precision: str) -> dict:
    """Predicted loss and delta_p (with the bootstrap's interval when the fit has samples)."""
    if precision != UNQUANTIZED and precision not in fit["penalty"]:
        raise ValueError(f"precision {precision!r} was not fitted; fitted: {', '.join([UNQUANTIZED, *fit['penalty']])}")
    for name, v in (("params", n), ("tokens", d)):
        if not v > 0:
            raise ValueError(f"--{name} must be positive; got {v}")
    if g is not None and g < 2:
        raise ValueError(f"--group must be >= 2; got {g}")
    x, y, z = np.log([n]), np.log([d]), log_log2([g])

    def one(base_theta, pen_theta):
        lb = float(np.exp(base_log_loss(np.asarray(base_theta), x, y)[0][0]))
        dp = 0.0 if pen_theta is None else float(penalty(np.asarray(pen_theta), x, y, z)[0])
        return lb + dp, dp

    pen = fit["penalty"].get(precision)
    loss, dp = one(fit["base"]["theta"], pen["theta"] if pen else None)
    out = {"loss": loss, "delta_p": dp}
    bs, ps = fit["base"].get("samples"), (pen or {}).get("samples")
    if bs and (pen is None or ps):
        vals = np.array([one(b, p) for b, p in zip(bs, ps if pen else [None] * len(bs))])
        out["loss_interval"] = _interval(vals[:, 0])
        out["delta_p_interval"] = _interval(vals[:, 1])
    return out


def _upper_penalty(p: dict) -> float:
    return p["delta_p_interval"][1] if "delta_p_interval" in p else p["delta_p"]


def predict_lines(fit: dict, n: float, d: float, g: Optional[int], precision: str,
                  max_penalty: Optional[float] = None) -> List[str]:
    pen = fit["penalty"].get(precision)
    groups = [g] if g is not None else ((pen or {}).get("groups") or [None])
    lines = []
    for gg in groups:
        p = predict(fit, n, d, gg, precision)
        iv = lambda k: f" [{p[k][0]:.4g}, {p[k][1]:.4g}]" if k in p else ""
        lines.append(f"{precision} N={n:.4g} D={d:.4g} G={gg}: loss {p['loss']:.4f}{iv('loss_interval')}, "
                     f"delta_p {p['delta_p']:.4g}{iv('delta_p_interval')}")
    if max_penalty is not None:
        if pen is None or pen["gamma_G_fixed"]:
            lines.append(f"--max-penalty: {precision}'s fit has no group-size dependence to choose from")
        else:
            ok = [G for G in (2 ** i for i in range(3, 12))
                  if _upper_penalty(predict(fit, n, d, G, precision)) <= max_penalty]
            best = max(ok) if ok else None
            lines.append(f"largest power-of-two group size with delta_p <= {max_penalty:g} (upper end of "
                         f"the interval where there is one): {best if best else 'none from 8 to 2048'}")
    return lines
