"""LU factorization in emulated low precision (bf16, fp16, fp8 e4m3) followed by mixed-precision
iterative refinement, against an fp64 solve. Every rounding is done by lowbit.arith.

    python3 examples/iterative_refinement.py                  # the tables in docs/emulation.md
    python3 examples/iterative_refinement.py --n 50 --kappa 1e2 1e5 --formats fp16 e5m2

The problem is given in fp32 (the working precision u): A = randsvd(n, kappa) rounded to fp32 and
b = A @ ones rounded to fp32. The reference x* is numpy's fp64 solve of that fp32 system.

Two models of a low-precision LU (partial pivoting, right-looking), factor format u_f:
  lowp   every elementary operation (div, mul, sub) rounded to u_f, as on a scalar u_f unit; the
         triangular solves also in u_f arithmetic.
  mixed  a tensor-core-like unit: the multipliers and the rank-1 update's operands are rounded to u_f,
         products are exact and every addition is rounded to fp32 (lowbit.arith.matmul with
         input_format=u_f, accum_format="fp32", c=A22); the factors are stored in u_f; the
         triangular solves run in fp32 with those u_f factors.
Before factorizing, A is scaled by the power of two mu with max|mu A| in (M/2, M], M = min(max(u_f)/8,
1024), so fp8 values stay normal and no product overflows fp32; solutions are scaled back exactly.
The right-hand side of each low-precision solve is scaled to max|r| = 1 for the same reason.

Refinement (LU-IR, Carson & Higham 2018): x0 from the factors, then repeat
  r = b - A x in the residual precision u_r  (fp64: numpy fp64 then rounded to fp32; fp32:
      lowbit.arith.matmul with an fp32 accumulator rounded at every addition, then an fp32 subtraction),
  d = LU solve of r,  x = x + d rounded to fp32.
Printed per iteration: forward error ||x - x*||_inf / ||x*||_inf and normwise backward error
||b - A x||_inf / (||A||_inf ||x||_inf + ||b||_inf), both evaluated in fp64.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np

import lowbit
from lowbit import arith


def randsvd(n: int, kappa: float, rng: np.random.Generator) -> np.ndarray:
    """n x n, singular values geometrically spaced from 1 to 1/kappa (Higham's randsvd, mode 3)."""
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = kappa ** (-np.arange(n) / (n - 1))
    return (u * s) @ v.T


def _pivot(lu: np.ndarray, perm: np.ndarray, j: int) -> None:
    p = j + int(np.argmax(np.abs(lu[j:, j])))
    if p != j:
        lu[[j, p]] = lu[[p, j]]
        perm[[j, p]] = perm[[p, j]]
    if lu[j, j] == 0:
        raise ZeroDivisionError(f"zero pivot at step {j}")


def lu_lowp(a: np.ndarray, fmt: str):
    """PA = LU with every operation rounded to fmt. Returns (LU in one array, perm)."""
    ch = arith.Chop(fmt)
    lu = ch(a)
    perm = np.arange(lu.shape[0])
    for j in range(lu.shape[0] - 1):
        _pivot(lu, perm, j)
        lu[j + 1:, j] = ch.div(lu[j + 1:, j], lu[j, j])
        lu[j + 1:, j + 1:] = ch.sub(lu[j + 1:, j + 1:], ch.mul(lu[j + 1:, j, None], lu[None, j, j + 1:]))
    return lu, perm


def lu_mixed(a: np.ndarray, fmt: str):
    """PA = LU on a unit that multiplies fmt operands exactly and adds in fp32; factors stored in fmt."""
    lu = lowbit.quantize(a, "fp32")
    perm = np.arange(lu.shape[0])
    for j in range(lu.shape[0] - 1):
        _pivot(lu, perm, j)
        lu[j + 1:, j] = arith.div(lu[j + 1:, j], lu[j, j], "fp32")
        # A22 <- fl32(A22 - l u^T), l and u rounded to fmt, products exact
        lu[j + 1:, j + 1:] = arith.matmul(-lu[j + 1:, j:j + 1], lu[j:j + 1, j + 1:], input_format=fmt,
                                          accum_format="fp32", c=lu[j + 1:, j + 1:])
    return lowbit.quantize(lu, fmt), perm


def lu_solve(lu: np.ndarray, perm: np.ndarray, b: np.ndarray, ch: arith.Chop) -> np.ndarray:
    """Solve LU x = P b by column-oriented substitution, every operation rounded by ch."""
    n = lu.shape[0]
    y = ch(b[perm])
    for j in range(n - 1):  # L has a unit diagonal
        y[j + 1:] = ch.sub(y[j + 1:], ch.mul(lu[j + 1:, j], y[j]))
    for j in range(n - 1, -1, -1):
        y[j] = ch.div(y[j], lu[j, j])
        if j:
            y[:j] = ch.sub(y[:j], ch.mul(lu[:j, j], y[j]))
    return y


class Solver:
    """Factors of mu*A in fmt under one LU model; solve(r) returns A^-1 r (approximately)."""

    def __init__(self, a64: np.ndarray, fmt: str, model: str):
        f = lowbit.format(fmt)
        target = min(f.max / 8, 1024.0)
        self.mu = 2.0 ** np.floor(np.log2(target / np.max(np.abs(a64))))  # exact power-of-two scaling
        factor = lu_lowp if model == "lowp" else lu_mixed
        self.lu, self.perm = factor(a64 * self.mu, fmt)
        self.ch = arith.Chop(fmt if model == "lowp" else "fp32")

    def solve(self, r: np.ndarray) -> np.ndarray:
        s = float(np.max(np.abs(r)))
        if s == 0 or not np.isfinite(s):
            return np.zeros_like(r) if s == 0 else np.full_like(r, np.nan)
        return lu_solve(self.lu, self.perm, r / s, self.ch) * (s * self.mu)  # exact rescaling in fp64


def errors(a64, b64, x, xref):
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        return float("nan"), float("nan")
    ferr = np.linalg.norm(x - xref, np.inf) / np.linalg.norm(xref, np.inf)
    berr = np.linalg.norm(b64 - a64 @ x, np.inf) / (np.linalg.norm(a64, np.inf) * np.linalg.norm(x, np.inf)
                                                   + np.linalg.norm(b64, np.inf))
    return float(ferr), float(berr)


def residual(a32: np.ndarray, b32: np.ndarray, x32: np.ndarray, precision: str) -> np.ndarray:
    """r = b - A x in fp64 or emulated fp32 arithmetic, rounded to fp32 (float64 array out)."""
    a64, b64, x64 = (v.astype(np.float64) for v in (a32, b32, x32))
    if precision == "fp64":
        return lowbit.quantize(b64 - a64 @ x64, "fp32")
    ax = arith.matmul(a64, x64, accum_format="fp32", accum_every=1)  # exact products, fp32 sums
    return arith.sub(b64, ax, "fp32")


def refine(a32, b32, xref, fmt: str, model: str, res_prec: str, iters: int):
    """LU-IR; returns [(forward error, backward error)] for iterations 0..iters."""
    a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
    try:
        solver = Solver(a64, fmt, model)
    except ZeroDivisionError:
        return [(float("nan"), float("nan"))]
    x = lowbit.quantize(solver.solve(b64), "fp32")
    out = []
    for it in range(iters + 1):
        out.append(errors(a64, b64, x, xref))
        if it == iters or not np.isfinite(out[-1][0]):
            break
        d = solver.solve(residual(a32, b32, x, res_prec))
        x = arith.add(x, d, "fp32")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="matrix size (default 100)")
    ap.add_argument("--kappa", type=float, nargs="+", default=[1e1, 1e3], help="2-norm condition numbers")
    ap.add_argument("--formats", nargs="+", default=["bf16", "fp16", "fp8_e4m3"], help="factor formats")
    ap.add_argument("--runs", nargs="+", default=["lowp:fp64", "mixed:fp64", "mixed:fp32"],
                    help="LU model:residual precision pairs (models lowp, mixed; residual fp64, fp32)")
    ap.add_argument("--iters", type=int, default=8, help="refinement steps (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    print(f"lowbit {lowbit.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    print(f"n = {args.n}, seed = {args.seed}, working precision fp32, {args.iters} refinement steps\n")
    table = []  # (matrix, model, fmt, residual, [(ferr, berr)])
    for kappa in args.kappa:
        rng = np.random.default_rng(args.seed)
        a32 = randsvd(args.n, kappa, rng).astype(np.float32)
        b32 = (a32.astype(np.float64) @ np.ones(args.n)).astype(np.float32)
        a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
        xref = np.linalg.solve(a64, b64)
        label = f"kappa_2 = {kappa:.0e}, kappa_inf = {np.linalg.cond(a64, np.inf):.1e}"
        print(f"== {label}")
        print(f"   fp64 solve: backward error {errors(a64, b64, xref, xref)[1]:.2e}; its fp32 rounding: "
              "forward {:.2e}, backward {:.2e}".format(*errors(a64, b64, xref.astype(np.float32), xref)))
        for run in args.runs:
            model, res_prec = run.split(":")
            for fmt in args.formats:
                hist = refine(a32, b32, xref, fmt, model, res_prec, args.iters)
                print(f"   LU {model} {fmt}, residual {res_prec}:")
                for it, (fe, be) in enumerate(hist):
                    print(f"      iter {it}: forward {fe:.2e}  backward {be:.2e}")
                table.append((f"{kappa:.0e}", model, fmt, res_prec, hist))
    cols = list(range(args.iters + 1))
    for name, k in (("forward error", 0), ("backward error", 1)):
        print(f"\n{name} per refinement step (step 0: the LU solve)\n")
        print("| kappa_2 | LU | u_f | u_r | " + " | ".join(str(c) for c in cols) + " |")
        print("|---|---|---|---|" + "---:|" * len(cols))
        for kap, model, fmt, rp, hist in table:
            cells = [f"{hist[i][k]:.1e}" if i < len(hist) else "" for i in cols]
            print(f"| {kap} | {model} | {fmt} | {rp} | " + " | ".join(cells) + " |")
    print(f"\n{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
