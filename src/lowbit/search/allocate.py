"""Exact allocation by mixed-integer linear programming (scipy.optimize.milp, HiGHS).

Variables: ``x[l, c]`` binary, layer ``l`` takes candidate ``c`` (one per layer). Pairwise terms
``Q[a, b][ca, cb]`` (inter-layer dependencies) use ``y[a, b, ca, cb] = x[a, ca] * x[b, cb]``,
linearised exactly by the marginal constraints ``sum_cb y = x[a, ca]`` and ``sum_ca y = x[b, cb]``
with ``y >= 0``: for binary ``x`` they force ``y`` to the product, whatever the sign of ``Q``.

* :func:`min_loss`: minimise predicted loss ``sum d[l, c] x + sum Q y`` subject to cost <= budget;
* :func:`min_cost`: the dual, minimise cost subject to predicted loss <= limit.

An infeasible budget or limit raises :class:`Infeasible` carrying the smallest achievable cost and
the smallest achievable loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

Pairs = Dict[Tuple[int, int], np.ndarray]


@dataclass
class Problem:
    """Per-layer loss and cost vectors over each layer's candidates, plus pairwise terms."""
    loss: List[np.ndarray]
    cost: List[np.ndarray]
    pairs: Pairs = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.loss) != len(self.cost):
            raise ValueError(f"{len(self.loss)} loss vectors for {len(self.cost)} cost vectors")
        self.loss = [np.asarray(v, float) for v in self.loss]
        self.cost = [np.asarray(v, float) for v in self.cost]
        for l, (d, c) in enumerate(zip(self.loss, self.cost)):
            if d.shape != c.shape or d.ndim != 1 or d.size == 0:
                raise ValueError(f"layer {l}: loss {d.shape} and cost {c.shape} must be equal non-empty vectors")
            if not (np.isfinite(d).all() and np.isfinite(c).all()):
                raise ValueError(f"layer {l}: loss and cost must be finite")
        for (a, b), q in self.pairs.items():
            if a == b or q.shape != (self.loss[a].size, self.loss[b].size):
                raise ValueError(f"pair ({a}, {b}): term of shape {q.shape} does not match its layers")

    def evaluate(self, choice: Sequence[int]) -> Tuple[float, float]:
        """(predicted loss, cost) of one candidate index per layer."""
        loss = sum(float(d[c]) for d, c in zip(self.loss, choice))
        loss += sum(float(q[choice[a], choice[b]]) for (a, b), q in self.pairs.items())
        return loss, sum(float(c[i]) for c, i in zip(self.cost, choice))


@dataclass
class Allocation:
    choice: List[int]
    loss: float
    cost: float
    seconds: float
    status: str = "optimal"


class Infeasible(ValueError):
    """No allocation meets the budget/limit; carries what is achievable."""

    def __init__(self, msg: str, min_cost: float, min_loss: float):
        super().__init__(msg)
        self.min_cost = min_cost
        self.min_loss = min_loss


def _layout(p: Problem):
    offs = np.cumsum([0] + [d.size for d in p.loss])
    nx = int(offs[-1])
    pair_offs, n = {}, nx
    for key, q in p.pairs.items():
        pair_offs[key] = n
        n += q.size
    return offs, pair_offs, n


def _solve(p: Problem, objective: str, bound: float, time_limit: float) -> Allocation:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    t0 = time.time()
    offs, pair_offs, n = _layout(p)
    nx = int(offs[-1])
    loss_vec = np.zeros(n)
    cost_vec = np.zeros(n)
    loss_vec[:nx] = np.concatenate(p.loss)
    cost_vec[:nx] = np.concatenate(p.cost)
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    for l in range(len(p.loss)):  # one candidate per layer
        k = p.loss[l].size
        rows += [r] * k
        cols += list(range(offs[l], offs[l] + k))
        vals += [1.0] * k
        lo.append(1.0)
        hi.append(1.0)
        r += 1
    for (a, b), q in p.pairs.items():
        base = pair_offs[(a, b)]
        ka, kb = q.shape
        loss_vec[base:base + q.size] = q.ravel()
        idx = base + np.arange(q.size).reshape(ka, kb)
        for i in range(ka):  # sum_cb y[i, cb] = x[a, i]
            rows += [r] * (kb + 1)
            cols += idx[i].tolist() + [offs[a] + i]
            vals += [1.0] * kb + [-1.0]
            r += 1
        for j in range(kb):  # sum_ca y[ca, j] = x[b, j]
            rows += [r] * (ka + 1)
            cols += idx[:, j].tolist() + [offs[b] + j]
            vals += [1.0] * ka + [-1.0]
            r += 1
        lo += [0.0] * (ka + kb)
        hi += [0.0] * (ka + kb)
    A = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    cons = [LinearConstraint(A, lo, hi)]
    if objective == "loss":
        c, budget_row = loss_vec, cost_vec
    else:
        c, budget_row = cost_vec, loss_vec
    if bound is not None:
        cons.append(LinearConstraint(budget_row[None, :], -np.inf, bound))
    integrality = np.zeros(n)
    integrality[:nx] = 1
    res = milp(c, constraints=cons, integrality=integrality, bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-6})
    if res.x is None:
        raise Infeasible(res.message, float("nan"), float("nan"))
    x = res.x[:nx]
    choice = [int(np.argmax(x[offs[l]:offs[l + 1]])) for l in range(len(p.loss))]
    loss, cost = p.evaluate(choice)
    status = "optimal" if res.status == 0 else f"stopped: {res.message}"
    return Allocation(choice, loss, cost, time.time() - t0, status)


def cheapest(p: Problem) -> Allocation:
    """The smallest achievable cost (each layer's cheapest candidate; ties broken by loss)."""
    choice = [int(np.lexsort((d, c))[0]) for d, c in zip(p.loss, p.cost)]
    loss, cost = p.evaluate(choice)
    return Allocation(choice, loss, cost, 0.0)


def min_loss(p: Problem, budget: Optional[float] = None, time_limit: float = 60.0) -> Allocation:
    """Smallest predicted loss with total cost <= ``budget`` (no budget: the best achievable)."""
    if budget is not None:
        low = cheapest(p)
        if budget < low.cost * (1 - 1e-12):
            best = _solve(p, "loss", None, time_limit)
            raise Infeasible(f"budget {budget:.6g} is below the smallest achievable cost {low.cost:.6g} "
                             f"(the smallest achievable predicted loss is {best.loss:.6g})", low.cost, best.loss)
    return _solve(p, "loss", budget, time_limit)


def min_cost(p: Problem, limit: float, time_limit: float = 60.0) -> Allocation:
    """Smallest cost with predicted loss <= ``limit``."""
    try:
        return _solve(p, "cost", limit, time_limit)
    except Infeasible:
        best = _solve(p, "loss", None, time_limit)
        low = cheapest(p)
        raise Infeasible(f"loss limit {limit:.6g} is below the smallest achievable predicted loss {best.loss:.6g} "
                         f"(the smallest achievable cost is {low.cost:.6g})", low.cost, best.loss) from None
