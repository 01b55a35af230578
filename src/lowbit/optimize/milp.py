"""The allocation as a mixed-integer linear program for HiGHS (scipy.optimize.milp).

Binary ``x[l, c]`` (one per layer); each pair term ``Q[a, b][ca, cb]`` gets ``y[a, b, ca, cb] = x[a, ca]
x[b, cb]``, linearised exactly by the marginal constraints ``sum_cb y = x[a, ca]``, ``sum_ca y =
x[b, cb]``, ``y >= 0``: for binary ``x`` they force ``y`` to the product whatever the sign of ``Q``,
and their relaxation is the local marginal polytope, tighter than McCormick's inequalities.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import List, Optional, Tuple

import numpy as np

from .problem import Problem

MIP_REL_GAP = 1e-6


@contextmanager
def native_stdout_silenced():
    """Send what native code writes to file descriptor 1 to /dev/null meanwhile: some scipy builds
    of HiGHS print a debug line ("HighsMipSolverData::transformNewIntegerFeasibleSolution ...") from
    C++ with ``disp`` off. Python's own stdout is flushed first; anything raised passes through."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real descriptor 1 (e.g. an embedded interpreter)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve_milp(p: Problem, objective: str, bound: Optional[float], time_limit: float,
               presolve: bool = True, scale_row: bool = False,
               objective_scale: float = 1.0) -> Tuple[Optional[List[int]], int, str]:
    """(choice or None, HiGHS status, message): minimise ``objective`` ("loss" or "cost") subject to
    the other <= ``bound`` (no constraint when None). ``scale_row`` divides the bound row by |bound|;
    ``objective_scale`` multiplies the objective (HiGHS's absolute gap 1e-6 then means the same
    relative to a value of about 1)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    sizes = np.array([d.size for d in p.loss])
    offs = np.concatenate([[0], np.cumsum(sizes)])
    nx = int(offs[-1])
    blocks = [(key, q) for key, q in p.pairs.items()]
    n = nx + sum(q.size for _, q in blocks)
    loss_vec, cost_vec = np.zeros(n), np.zeros(n)
    loss_vec[:nx] = np.concatenate(p.loss)
    cost_vec[:nx] = np.concatenate(p.cost)
    rows, cols, vals = [np.repeat(np.arange(len(sizes)), sizes)], [np.arange(nx)], [np.ones(nx)]
    r, base = len(sizes), nx
    for (a, b), q in blocks:
        ka, kb = q.shape
        loss_vec[base:base + q.size] = q.ravel()
        idx = base + np.arange(q.size).reshape(ka, kb)
        # rows r .. r+ka-1: sum_cb y[i, cb] - x[a, i] = 0; rows r+ka .. r+ka+kb-1: sum_ca y[ca, j] - x[b, j] = 0
        rows += [np.repeat(r + np.arange(ka), kb), r + ka + np.tile(np.arange(kb), ka),
                 r + np.arange(ka), r + ka + np.arange(kb)]
        cols += [idx.ravel(), idx.ravel(), offs[a] + np.arange(ka), offs[b] + np.arange(kb)]
        vals += [np.ones(q.size), np.ones(q.size), -np.ones(ka), -np.ones(kb)]
        r += ka + kb
        base += q.size
    A = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n))
    lo = np.zeros(r)
    lo[:len(sizes)] = 1.0
    cons = [LinearConstraint(A, lo, lo)]
    c, row = (loss_vec, cost_vec) if objective == "loss" else (cost_vec, loss_vec)
    if bound is not None:
        s = 1.0 / abs(bound) if scale_row and bound != 0 else 1.0
        cons.append(LinearConstraint(row[None, :] * s, -np.inf, bound * s))
    integrality = np.zeros(n)
    integrality[:nx] = 1
    with native_stdout_silenced():
        res = milp(c * objective_scale, constraints=cons, integrality=integrality, bounds=Bounds(0, 1),
                   options={"time_limit": time_limit, "mip_rel_gap": MIP_REL_GAP, "presolve": presolve})
    if res.x is None:
        return None, res.status, res.message
    x = res.x[:nx]
    return [int(np.argmax(x[offs[l]:offs[l + 1]])) for l in range(len(sizes))], res.status, res.message
