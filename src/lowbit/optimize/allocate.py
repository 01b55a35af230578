"""Exact allocation: one candidate per layer, least predicted loss under a cost budget
(:func:`min_loss`) or least cost under a predicted-loss limit (:func:`min_cost`).

The problem is first reduced exactly (:mod:`.reduce`: Pareto fronts of single layers and of paths of
paired layers, dominated candidates of the rest). When no pair terms remain (every pair component was
a path) it is a multiple-choice knapsack: a Lagrangian bound and a local-search incumbent remove the
items that cannot be optimal (:mod:`.lagrange`) and HiGHS solves what is left. Otherwise HiGHS solves
the reduced program with the pair terms linearised (:mod:`.milp`). Either way the optimum is the one
of the full program, to HiGHS's relative gap of 1e-6.

``method="reference"`` skips every reduction and hands the full program to HiGHS (the plain
formulation; kept to check and time the fast path against).

An infeasible budget or limit raises :class:`Infeasible` with the smallest achievable cost and the
smallest achievable loss.
"""
from __future__ import annotations

import time
from typing import List, Optional

import numpy as np

from .lagrange import fix_items, knapsack_exact
from .milp import solve_milp
from .problem import Allocation, Infeasible, Problem
from .reduce import reduce

METHODS = ("fast", "reference")


def _finish(p: Problem, choice: List[int], t0: float, status: str = "optimal") -> Allocation:
    loss, cost = p.evaluate(choice)
    return Allocation(list(choice), loss, cost, time.time() - t0, status)


def _status(code: int, message: str) -> str:
    return "optimal" if code == 0 else f"stopped: {message}"


def _no_solution(code: int, message: str):
    """HiGHS returned no solution: infeasible (status 2), or stopped by its limits before finding one,
    which is not a statement about the budget."""
    if code == 2:
        return Infeasible(message, float("nan"), float("nan"))
    return RuntimeError(f"the allocation program stopped without a solution ({message}); raise time_limit")


def _solve(p: Problem, objective: str, bound: Optional[float], time_limit: float, method: str) -> Allocation:
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    t0 = time.time()
    if method == "reference":
        choice, code, msg = solve_milp(p, objective, bound, time_limit)
        if choice is None:
            raise _no_solution(code, msg)
        return _finish(p, choice, t0, _status(code, msg))
    red = reduce(p)
    q = red.problem
    f, g = (q.loss, q.cost) if objective == "loss" else (q.cost, q.loss)
    if q.pairs:
        # a dense loss row makes HiGHS's presolve slow (seconds) and buys nothing for the dual
        choice, code, msg = solve_milp(q, objective, bound, time_limit, presolve=objective == "loss",
                                       scale_row=True)
        if choice is None:
            raise _no_solution(code, msg)
        return _finish(p, red.expand(choice, len(p.loss)), t0, _status(code, msg))
    if bound is None:  # no constraint: each group's best item (ties: the smaller other term)
        return _finish(p, red.expand([int(np.lexsort((b, a))[0]) for a, b in zip(f, g)], len(p.loss)), t0)
    if sum(float(v.min()) for v in g) > bound + 1e-12 * max(1.0, abs(bound)):
        raise Infeasible("no choice meets the bound", float("nan"), float("nan"))
    fixed = fix_items(f, g, bound)
    if fixed is None:
        keep, scale = [np.arange(v.size) for v in f], 1.0
    else:
        keep, incumbent, ub, lb, lam = fixed
        scale = 1.0 / abs(ub) if ub != 0 else 1.0
        if ub - lb <= 1e-12 * max(1.0, abs(ub)) or all(k.size == 1 for k in keep):
            return _finish(p, red.expand(incumbent, len(p.loss)), t0)
        best = knapsack_exact([v[k] for v, k in zip(f, keep)], [v[k] for v, k in zip(g, keep)], bound, lam, ub)
        if best is not None:
            return _finish(p, red.expand([int(k[c]) for k, c in zip(keep, best)], len(p.loss)), t0)
    sub = Problem([v[k] for v, k in zip(q.loss, keep)], [v[k] for v, k in zip(q.cost, keep)])
    choice, code, msg = solve_milp(sub, objective, bound, time_limit, presolve=True, scale_row=True,
                                   objective_scale=scale)
    if choice is None:
        raise _no_solution(code, msg)
    return _finish(p, red.expand([int(k[c]) for k, c in zip(keep, choice)], len(p.loss)), t0, _status(code, msg))


def cheapest(p: Problem) -> Allocation:
    """The smallest achievable cost (each layer's cheapest candidate; ties broken by loss)."""
    choice = [int(np.lexsort((d, c))[0]) for d, c in zip(p.loss, p.cost)]
    loss, cost = p.evaluate(choice)
    return Allocation(choice, loss, cost, 0.0)


def min_loss(p: Problem, budget: Optional[float] = None, time_limit: float = 60.0,
             method: str = "fast") -> Allocation:
    """Smallest predicted loss with total cost <= ``budget`` (no budget: the best achievable)."""
    if budget is not None:
        low = cheapest(p)
        if budget < low.cost * (1 - 1e-12):
            best = _solve(p, "loss", None, time_limit, method)
            raise Infeasible(f"budget {budget:.6g} is below the smallest achievable cost {low.cost:.6g} "
                             f"(the smallest achievable predicted loss is {best.loss:.6g})", low.cost, best.loss)
    return _solve(p, "loss", budget, time_limit, method)


def min_cost(p: Problem, limit: float, time_limit: float = 60.0, method: str = "fast") -> Allocation:
    """Smallest cost with predicted loss <= ``limit``."""
    try:
        return _solve(p, "cost", limit, time_limit, method)
    except Infeasible:
        best = _solve(p, "loss", None, time_limit, method)
        low = cheapest(p)
        raise Infeasible(f"loss limit {limit:.6g} is below the smallest achievable predicted loss {best.loss:.6g} "
                         f"(the smallest achievable cost is {low.cost:.6g})", low.cost, best.loss) from None
