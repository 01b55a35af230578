"""Cholesky factorization A = R^T R of symmetric positive definite matrices in emulated bf16 / fp16 /
fp8 e4m3, every rounding done by lowbit.arith: backward error against the rounding-error bound,
breakdown on ill-conditioned matrices, and the diagonal scaling and shift that prevent it.

    python3 examples/cholesky_bf16.py                          # the tables in docs/emulation.md
    python3 examples/cholesky_bf16.py --n 16 128 --kappa 1e2 1e6 --formats bf16 fp16

Matrices: A = Q diag(sigma) Q^T, Q a random orthogonal matrix, sigma geometrically spaced from 1 to
1/kappa (randsvd, mode 3), symmetrized exactly; and a badly scaled one, B = D A D with
D = diag(10^linspace(-s, s)) (--badly-scaled s), whose condition number is that of A times up to 10^4s.

Two models of the factorization (right-looking, only the upper triangle is read), factor format u_f:
  lowp   every elementary operation (sqrt of the pivot, division by it, each product r_ki r_kj, each
         subtraction) rounded to u_f: a scalar unit computing in u_f.
  mixed  a tensor-core-like unit: the row r_k enters each rank-1 update rounded to u_f, products are
         exact and sums are rounded to fp32 (arith.matmul(-r^T, r, input_format=u_f,
         accum_format="fp32", c=A22)); sqrt and division in fp32; R stored in u_f.
Two ways to prepare the matrix (after Higham & Pranesh, SIAM J. Sci. Comput. 2021):
  plain    A multiplied by the power of two mu with max|mu A| in (M/2, M], M = min(max(u_f)/8, 1024)
           (exact; keeps fp8 entries normal and products finite), as examples/iterative_refinement.py.
  scaled   H = D^-1 A D^-1 with D = diag(sqrt(a_ii)) (unit diagonal), then mu H with mu = 2^floor(log2 M);
           if that breaks down, H + c n u_f I instead (the shift moves the smallest eigenvalue of fl(H)
           away from zero), c = 2^-8 first and doubled after each breakdown up to 2^2 (--shifts); the
           c used is printed (0: no shift was needed) with the step where the unshifted one broke.
The factor of A is R_A = R D / sqrt(mu), formed in float64 (exact up to float64 rounding), so every
variant is measured on the same footing. Reported:
  berr     ||A - R_A^T R_A||_2 / ||A||_2 (float64), the normwise backward error; n u_f is printed beside
           it (Higham, Accuracy and Stability of Numerical Algorithms, ch. 10: ||dA||_2 <= c n u ||A||_2);
  comp     max_ij |G - R^T R|_ij / (|R^T||R|)_ij for the matrix G = fl(prepared A) that was factorized,
           to compare with gamma_{n+1} = (n+1) u_f / (1 - (n+1) u_f) (ibid.: |dA| <= gamma_{n+1}
           |R^T||R| for the lowp model; the mixed model has no such bound and is shown for comparison);
  breakdown: the step k and the value of a pivot that is not positive (the factorization stops).
Then two solvers of A x = b, b = A 1, built on the factor (everything but the factorization in float64; x* the
float64 solve):
  IR       Cholesky-based iterative refinement (--ir-steps): x_0 = R_A^-1 R_A^-T b; r = b - A x_i,
           d = R_A^-1 R_A^-T r, x_{i+1} = x_i + d; forward error ||x - x*||_inf / ||x*||_inf at the end.
           It converges when kappa(A) * berr is safely below 1.
  PCG      conjugate gradients preconditioned with M = R_A^T R_A, the number of iterations until
           ||b - A x||_2 <= 1e-10 ||b||_2 (at most 2n); beside it unpreconditioned CG's. A factor too
           inaccurate for IR (a shifted one, say) can still be a good preconditioner, the idea behind
           GMRES-IR (Carson & Higham 2017; Higham & Pranesh 2021).
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np

import lowbit
from lowbit import arith

PREPARATIONS = ("plain", "scaled")


class CholeskyBreakdown(ArithmeticError):
    """A pivot that is not positive: the computed Schur complement is not positive definite."""

    def __init__(self, step: int, pivot: float):
        super().__init__(f"Cholesky breakdown at step {step}: pivot {pivot:.3g} is not positive")
        self.step, self.pivot = step, pivot


def randsvd_spd(n: int, kappa: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric positive definite n x n, eigenvalues geometrically spaced from 1 to 1/kappa."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = kappa ** (-np.arange(n) / (n - 1))
    a = (q * lam) @ q.T
    return (a + a.T) / 2


def unit_roundoff(fmt: str) -> float:
    return 2.0 ** -(lowbit.format(fmt).man + 1)


def gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u) if k * u < 1 else math.inf


def _check_pivot(w: np.ndarray, k: int) -> None:
    if not w[k, k] > 0:  # also catches NaN
        raise CholeskyBreakdown(k, float(w[k, k]))


def cholesky_lowp(a: np.ndarray, fmt: str) -> np.ndarray:
    """Upper triangular R with R^T R = a, every operation rounded to fmt (a is used as given: round
    it to fmt first)."""
    ch = arith.Chop(fmt)
    w = np.array(a, dtype=np.float64)
    n = w.shape[0]
    r = np.zeros_like(w)
    for k in range(n):
        _check_pivot(w, k)
        r[k, k] = ch.sqrt(w[k, k])
        r[k, k + 1:] = ch.div(w[k, k + 1:], r[k, k])
        # Schur complement, both triangles (the products are symmetric, so w stays symmetric)
        w[k + 1:, k + 1:] = ch.sub(w[k + 1:, k + 1:], ch.mul(r[k, k + 1:, None], r[None, k, k + 1:]))
    return r


def cholesky_mixed(a: np.ndarray, fmt: str) -> np.ndarray:
    """R^T R = a on a unit that multiplies fmt operands exactly and adds in fp32; R stored in fmt."""
    w = lowbit.quantize(np.array(a, dtype=np.float64), "fp32")
    n = w.shape[0]
    r = np.zeros_like(w)
    for k in range(n):
        _check_pivot(w, k)
        r[k, k] = arith.sqrt(w[k, k], "fp32")
        r[k, k + 1:] = arith.div(w[k, k + 1:], r[k, k], "fp32")
        row = r[k:k + 1, k + 1:]
        w[k + 1:, k + 1:] = arith.matmul(-row.T, row, input_format=fmt, accum_format="fp32",
                                         c=w[k + 1:, k + 1:])
    return lowbit.quantize(r, fmt)


FACTOR = {"lowp": cholesky_lowp, "mixed": cholesky_mixed}


def prepare(a: np.ndarray, fmt: str, how: str, shift: float = 0.0):
    """(G, d, mu): the float64 matrix to round and factorize, G = mu (D^-1 A D^-1 + shift n u_f I) for
    scaled, G = mu A for plain (d = ones), with the diagonal d of D and the power of two mu."""
    f = lowbit.format(fmt)
    m = min(f.max / 8, 1024.0)
    n = a.shape[0]
    if how == "plain":
        d = np.ones(n)
        h = a
    else:
        d = np.sqrt(np.diag(a))
        h = a / np.outer(d, d)
        np.fill_diagonal(h, 1.0)
        if shift:
            h = h + shift * n * unit_roundoff(fmt) * np.eye(n)
    mu = 2.0 ** math.floor(math.log2(m / np.max(np.abs(h))))
    return h * mu, d, mu


def factorize(a: np.ndarray, fmt: str, model: str, how: str, shift: float = 0.0):
    """(R_A in float64, componentwise ratio on the factorized matrix); raises CholeskyBreakdown."""
    g, d, mu = prepare(a, fmt, how, shift)
    g = lowbit.quantize(g, fmt)
    r = FACTOR[model](g, fmt)
    ar = np.abs(r)
    denom = ar.T @ ar
    resid = np.abs(g - r.T @ r)
    comp = float(np.max(np.where(denom > 0, resid / np.where(denom > 0, denom, 1), 0)))
    return r * d[None, :] / math.sqrt(mu), comp


def backward_error(a: np.ndarray, r: np.ndarray) -> float:
    return float(np.linalg.norm(a - r.T @ r, 2) / np.linalg.norm(a, 2))


def refine(a: np.ndarray, r: np.ndarray, steps: int) -> list:
    """Forward errors of Cholesky-IR with float64 residuals and solves with the factor r."""
    n = a.shape[0]
    b = a @ np.ones(n)
    xref = np.linalg.solve(a, b)

    def solve(v):
        return np.linalg.solve(r, np.linalg.solve(r.T, v))  # triangular, so exact enough in float64

    x = solve(b)
    errs = []
    for it in range(steps + 1):
        errs.append(float(np.linalg.norm(x - xref, np.inf) / np.linalg.norm(xref, np.inf)))
        if it == steps or not np.isfinite(errs[-1]) or errs[-1] > 1e6:
            break
        x = x + solve(b - a @ x)
    return errs


def cg_iterations(a: np.ndarray, r=None, tol: float = 1e-10, maxit=None) -> int:
    """Iterations of (preconditioned, M = r^T r) conjugate gradients on A x = A 1 in float64 until
    ||b - A x||_2 <= tol ||b||_2; maxit + 1 means not converged."""
    n = a.shape[0]
    maxit = 2 * n if maxit is None else maxit
    b = a @ np.ones(n)
    apply_m = (lambda v: v) if r is None else (lambda v: np.linalg.solve(r, np.linalg.solve(r.T, v)))
    x = np.zeros(n)
    res = b.copy()
    z = apply_m(res)
    p = z.copy()
    rz = res @ z
    for it in range(1, maxit + 1):
        ap_ = a @ p
        alpha = rz / (p @ ap_)
        x += alpha * p
        res -= alpha * ap_
        if np.linalg.norm(res) <= tol * np.linalg.norm(b):
            return it
        z = apply_m(res)
        rz, rz_old = res @ z, rz
        p = z + (rz / rz_old) * p
    return maxit + 1


def factorize_scaled(a: np.ndarray, fmt: str, model: str, shifts):
    """Scaled factorization, unshifted first, then with shift c for each c in shifts until one does not
    break down: (R_A, comp, c, the unshifted breakdown or None). Raises the last breakdown."""
    first = None
    for c in [0.0] + [c for c in shifts if c > 0]:
        try:
            return factorize(a, fmt, model, "scaled", c) + (c, first)
        except CholeskyBreakdown as e:
            first, last = first or e, e
    raise last


HEADER = ("| n | matrix | kappa_2 | u_f | model | prep | c | status | berr | n u_f | comp | gamma_{n+1} "
          "| IR error (steps) | PCG its | CG its |\n"
          "|---:|---|---:|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|")


def format_row(row: dict) -> str:
    ir = row["ir"]
    irs = f"{ir[-1]:.1e} ({len(ir) - 1})" if ir else ""
    return (f"| {row['n']} | {row['matrix']} | {row['kappa']:.1e} | {row['fmt']} | {row['model']} "
            f"| {row['prep']} "
            f"| {row['c']} | {row['status']} | {row['berr']:.1e} | {row['nu']:.1e} | {row['comp']:.1e} "
            f"| {row['gamma']:.1e} | {irs} | {_its(row['pcg'], row['n'])} | {_its(row['cg'], row['n'])} |")


def _its(k, n: int) -> str:
    """CG iteration count, '>2n' where it did not converge."""
    return f">{2 * n}" if k != "" and k > 2 * n else str(k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64], help="sizes (default: %(default)s)")
    ap.add_argument("--kappa", type=float, nargs="+", default=[1e1, 1e3, 1e6],
                    help="2-norm condition numbers (default: %(default)s)")
    ap.add_argument("--badly-scaled", type=float, default=3.0,
                    help="also B = D A D, D = diag(10^linspace(-s, s)), A of the smallest kappa (0: off)")
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp16", "fp8_e4m3"], help="factor formats")
    ap.add_argument("--models", nargs="+", default=["lowp", "mixed"], choices=list(FACTOR))
    ap.add_argument("--shifts", type=float, nargs="+", default=[2.0 ** k for k in range(-8, 3)],
                    help="values of c in the shift c n u_f, tried in turn after a breakdown "
                         "(default 2^-8 .. 2^2)")
    ap.add_argument("--ir-steps", type=int, default=5, help="refinement steps (0: none; default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/numerics/cholesky.md"),
                    help="where the table is written (default: %(default)s)")
    args = ap.parse_args(argv)
    if min(args.n) < 2 or min(args.kappa) < 1 or min(args.shifts) < 0 or args.ir_steps < 0:
        ap.error("need --n >= 2, --kappa >= 1, --shifts >= 0, --ir-steps >= 0")
    for fmt in args.formats:
        try:
            f = lowbit.format(fmt)
        except ValueError as e:
            ap.error(f"--formats: {e}")
        if not hasattr(f, "man"):
            ap.error(f"--formats: {fmt!r} is not a floating-point element format (e.g. bf16, fp16, fp8_e4m3)")
    t0 = time.time()
    header = (f"lowbit {lowbit.__version__}, numpy {np.__version__}, python {platform.python_version()}; "
              f"seed {args.seed}")
    print(header + "\n")
    rows = []
    for n in args.n:
        mats = []
        for kappa in args.kappa:
            mats.append((f"randsvd {kappa:.0e}", randsvd_spd(n, kappa, np.random.default_rng(args.seed))))
        if args.badly_scaled:
            dd = 10.0 ** np.linspace(-args.badly_scaled, args.badly_scaled, n)
            base = randsvd_spd(n, min(args.kappa), np.random.default_rng(args.seed))
            mats.append((f"D A D, s={args.badly_scaled:g}", base * np.outer(dd, dd)))
        for label, a in mats:
            kap = np.linalg.cond(a)
            cg_plain = cg_iterations(a)
            for fmt in args.formats:
                u = unit_roundoff(fmt)
                for model in args.models:
                    for how in PREPARATIONS:
                        row = dict(n=n, matrix=label, kappa=kap, fmt=fmt, model=model, prep=how, c="",
                                   berr=math.nan, nu=n * u, comp=math.nan, gamma=gamma(n + 1, u), ir=[],
                                   pcg="", cg=cg_plain)
                        try:
                            note = "ok"
                            if how == "scaled":
                                r, row["comp"], c, first = factorize_scaled(a, fmt, model, args.shifts)
                                row["c"] = f"2^{int(math.log2(c))}" if c > 0 else "0"
                                if first is not None:
                                    note = f"ok, shifted (unshifted: breakdown, step {first.step})"
                            else:
                                r, row["comp"] = factorize(a, fmt, model, how)
                            row["berr"] = backward_error(a, r)
                            row["ir"] = refine(a, r, args.ir_steps) if args.ir_steps else []
                            row["pcg"] = cg_iterations(a, r)
                            row["status"] = note
                        except CholeskyBreakdown as e:
                            row["status"] = f"breakdown, step {e.step}"
                        rows.append(row)
                        print(format_row(row), flush=True)
    text = "\n".join([HEADER] + [format_row(row) for row in rows])
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n\n" + text + "\n")
    print(f"wrote {args.out}")
    print(f"\n{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
