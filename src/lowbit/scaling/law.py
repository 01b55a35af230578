"""The QAT scaling law and its robust least-squares fit, as pure numpy functions.

- Base law (unquantized runs): ``L(N, D) = A / N^alpha + B / D^beta + E``, fitted in log space as
  Hoffmann et al. (2022) do: ``log L = LSE(log A - alpha ln N, log B - beta ln D, log E)``.
- Quantization penalty (one precision's runs, the base law held fixed):
  ``delta_p(N, D, G) = k * D^gamma_D * (log2 G)^gamma_G / N^gamma_N``, fitted through
  ``log L_q = log(L(N, D) + delta_p(N, D, G))``.

Both minimise the Huber loss (delta 1e-3) of the log-loss residuals with L-BFGS-B from many starts
(the best kept), with analytic gradients. Starts come from a grid over the exponents with the
linear coefficients solved for each (variable projection), so a few dozen starts cover the space
that Hoffmann's 4,500-point grid covers.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

HUBER_DELTA = 1e-3
BASE_NAMES = ("log_A", "log_B", "log_E", "alpha", "beta")
PENALTY_NAMES = ("log_k", "gamma_D", "gamma_G", "gamma_N")
# Bounds keep L-BFGS out of regions where exp() overflows; exponents beyond them mean no law.
BASE_BOUNDS = [(-30.0, 60.0), (-30.0, 60.0), (-10.0, 5.0), (0.0, 3.0), (0.0, 3.0)]
PENALTY_BOUNDS = [(-60.0, 60.0), (-3.0, 3.0), (-5.0, 8.0), (-3.0, 3.0)]
BASE_EXPONENT_GRID = (0.05, 0.15, 0.3, 0.5, 0.75, 1.0, 1.5)
PENALTY_GRID = {"gamma_D": (0.0, 0.25, 0.5, 1.0), "gamma_G": (0.0, 1.0, 2.5), "gamma_N": (0.0, 0.4, 0.8, 1.5)}


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> Tuple[np.ndarray, np.ndarray]:
    """(Huber loss of each residual, its derivative)."""
    a = np.abs(r)
    small = a <= delta
    value = np.where(small, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def base_log_loss(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(log L(N, D), its Jacobian (n, 5)) for ``x = ln N``, ``y = ln D``."""
    log_a, log_b, log_e, alpha, beta = theta
    terms = np.stack([log_a - alpha * x, log_b - beta * y, np.full_like(x, log_e)], axis=1)
    top = terms.max(axis=1, keepdims=True)
    w = np.exp(terms - top)
    total = w.sum(axis=1, keepdims=True)
    w /= total
    out = (top + np.log(total))[:, 0]
    jac = np.stack([w[:, 0], w[:, 1], w[:, 2], -w[:, 0] * x, -w[:, 1] * y], axis=1)
    return out, jac


def penalty(theta: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """delta_p for ``x = ln N``, ``y = ln D``, ``z = ln log2 G``."""
    log_k, g_d, g_g, g_n = theta
    return np.exp(log_k + g_d * y + g_g * z - g_n * x)


def quantized_log_loss(theta: np.ndarray, base: np.ndarray, x, y, z) -> Tuple[np.ndarray, np.ndarray]:
    """(log(L_base + delta_p), its Jacobian (n, 4) in ``theta``); ``base`` is L(N, D) per run."""
    d = penalty(theta, x, y, z)
    total = base + d
    share = d / total
    jac = np.stack([share, share * y, share * z, -share * x], axis=1)
    return np.log(total), jac


def _objective(model: Callable, target: np.ndarray, delta: float):
    # Divided by delta^2 so a residual of delta counts 0.5: L-BFGS-B's stopping tests are absolute
    # below 1, and the raw Huber sum (~1e-5) would stop it at the start.
    scale = 1.0 / (delta * delta)

    def f(theta):
        pred, jac = model(theta)
        value, grad = huber(target - pred, delta)
        return float(value.sum()) * scale, -(grad[:, None] * jac).sum(axis=0) * scale
    return f


_OPTIONS = {"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-8}


def _minimize(f, starts: Sequence[np.ndarray], bounds, free: Optional[np.ndarray] = None):
    """[(value, theta)] of L-BFGS-B from each start, best first; ``free`` masks the fitted entries
    (the others stay at the start's value)."""
    from scipy.optimize import minimize

    out = []
    for s in starts:
        s = np.asarray(s, dtype=np.float64)
        if free is None or free.all():
            res = minimize(f, s, jac=True, method="L-BFGS-B", bounds=bounds, options=_OPTIONS)
            theta = res.x
        else:
            def g(sub, s=s):
                full = s.copy()
                full[free] = sub
                v, grad = f(full)
                return v, grad[free]
            res = minimize(g, s[free], jac=True, method="L-BFGS-B", bounds=[b for b, m in zip(bounds, free) if m],
                           options=_OPTIONS)
            theta = s.copy()
            theta[free] = res.x
        if np.isfinite(res.fun):
            out.append((float(res.fun), theta))
    if not out:
        raise ValueError("the fit failed from every start (non-finite loss); check the runs' losses")
    out.sort(key=lambda t: t[0])
    return out


def base_starts(x: np.ndarray, y: np.ndarray, loss: np.ndarray) -> List[np.ndarray]:
    """One start per (alpha, beta) of the grid, with A, B, E >= 0 by least squares for them."""
    from scipy.optimize import nnls

    starts = []
    for alpha, beta in itertools.product(BASE_EXPONENT_GRID, BASE_EXPONENT_GRID):
        m = np.stack([np.exp(-alpha * x), np.exp(-beta * y), np.ones_like(x)], axis=1)
        coef, _ = nnls(m, loss)
        coef = np.maximum(coef, 1e-6 * loss.mean())
        starts.append(np.array([np.log(coef[0]), np.log(coef[1]), np.log(coef[2]), alpha, beta]))
    return [np.clip(s, [b[0] for b in BASE_BOUNDS], [b[1] for b in BASE_BOUNDS]) for s in starts]


def penalty_starts(base: np.ndarray, loss: np.ndarray, x, y, z, fix_g: bool) -> List[np.ndarray]:
    """One start per exponent triple of the grid, log k matching the observed penalties' mean."""
    d_obs = np.maximum(loss - base, 1e-4 * loss.mean())
    starts = []
    for g_d, g_g, g_n in itertools.product(PENALTY_GRID["gamma_D"], (0.0,) if fix_g else PENALTY_GRID["gamma_G"],
                                           PENALTY_GRID["gamma_N"]):
        log_k = float(np.mean(np.log(d_obs) - g_d * y - g_g * z + g_n * x))
        starts.append(np.clip(np.array([log_k, g_d, g_g, g_n]), [b[0] for b in PENALTY_BOUNDS],
                              [b[1] for b in PENALTY_BOUNDS]))
    return starts


@dataclass
class BaseFit:
    theta: np.ndarray
    value: float
    starts: List[np.ndarray]     # the best few optima (for the bootstrap's starts)

    def log_loss(self, n, d) -> np.ndarray:
        return base_log_loss(self.theta, np.log(np.asarray(n, float)), np.log(np.asarray(d, float)))[0]

    def loss(self, n, d) -> np.ndarray:
        return np.exp(self.log_loss(n, d))


@dataclass
class PenaltyFit:
    theta: np.ndarray
    value: float
    starts: List[np.ndarray]
    fix_g: bool                  # gamma_G held at 0 (a single group size, or none)

    def delta(self, n, d, g) -> np.ndarray:
        return penalty(self.theta, np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), log_log2(g))


def log_log2(g) -> np.ndarray:
    """``ln log2 G``; 0 (so (log2 G)^gamma = 1) where G is None or NaN (no group)."""
    g = np.array([np.nan if v is None else v for v in np.atleast_1d(np.asarray(g, dtype=object))], dtype=float)
    out = np.zeros_like(g)
    ok = np.isfinite(g)
    out[ok] = np.log(np.log2(g[ok]))
    return out


def fit_base(n, d, loss, starts: Optional[Sequence[np.ndarray]] = None, delta: float = HUBER_DELTA,
             keep: int = 2) -> BaseFit:
    """Fit ``L(N, D)`` to runs (arrays of N, D and loss); ``starts`` default to the full grid."""
    x, y, l = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.asarray(loss, float)
    if len(l) < 5:
        raise ValueError(f"the base law has 5 parameters: it needs at least 5 unquantized runs, got {len(l)}")
    if np.any(~np.isfinite(l)) or np.any(l <= 0):
        raise ValueError("every loss must be a positive finite number")
    f = _objective(lambda t: base_log_loss(t, x, y), np.log(l), delta)
    res = _minimize(f, starts if starts is not None else base_starts(x, y, l), BASE_BOUNDS)
    return BaseFit(res[0][1], res[0][0], [t for _, t in res[:keep]])


def fit_penalty(base: BaseFit, n, d, g, loss, starts: Optional[Sequence[np.ndarray]] = None,
                delta: float = HUBER_DELTA, keep: int = 2) -> PenaltyFit:
    """Fit ``delta_p`` to one precision's runs with ``base`` fixed; gamma_G is held at 0 when the
    runs have fewer than two group sizes."""
    x, y, l = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.asarray(loss, float)
    z = log_log2(g)
    if len(l) < 3:
        raise ValueError(f"delta_p needs at least 3 quantized runs, got {len(l)}")
    groups = {v for v in np.atleast_1d(np.asarray(g, dtype=object)) if v is not None}
    fix_g = len(groups) < 2
    b = np.exp(base_log_loss(base.theta, x, y)[0])
    f = _objective(lambda t: quantized_log_loss(t, b, x, y, z), np.log(l), delta)
    free = np.array([True, True, not fix_g, True])
    if starts is None:
        starts = penalty_starts(b, l, x, y, z, fix_g)
    elif fix_g:
        starts = [np.array([s[0], s[1], 0.0, s[3]]) for s in starts]
    res = _minimize(f, starts, PENALTY_BOUNDS, free)
    return PenaltyFit(res[0][1], res[0][0], [t for _, t in res[:keep]], fix_g)


def base_params(theta: np.ndarray) -> dict:
    """The base law's parameters by name, in natural units (A, B, E rather than their logs)."""
    log_a, log_b, log_e, alpha, beta = (float(v) for v in theta)
    return {"A": float(np.exp(log_a)), "B": float(np.exp(log_b)), "E": float(np.exp(log_e)), "alpha": alpha,
            "beta": beta}


def penalty_params(theta: np.ndarray) -> dict:
    log_k, g_d, g_g, g_n = (float(v) for v in theta)
    return {"k": float(np.exp(log_k)), "gamma_D": g_d, "gamma_G": g_g, "gamma_N": g_n}
