"""Accuracy-targeted search: the smallest configuration whose *measured* loss is within a limit.

Bisection on the budget: each step solves the exact allocation at that budget (predicted loss from
the sensitivity table), builds the model with real quantization, measures the metric, and narrows
the bracket [cheapest, budget_max] until it is narrower than ``tol`` (in budget units). The first
probe is the dual solution (min cost s.t. predicted loss <= the limit in the objective's units),
which often lands close. Every measured point is appended to ``points.jsonl`` keyed by its
configuration, so a rerun re-uses them and an interrupted search resumes.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..optimize import Allocation, Infeasible, Problem, cheapest, min_cost, min_loss
from .candidates import LayerCandidates


def config_key(choice: Dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(sorted(choice.items())).encode()).hexdigest()[:16]


class PointStore:
    """Measured points on disk (JSON lines), one per configuration. ``context`` (how points are
    measured: method, metric, evaluation slice) is stored with each point; points measured in
    another context are ignored, so changing --eval-tokens or --method never re-uses them."""

    def __init__(self, path: Optional[Path], context: Optional[dict] = None):
        self.path = Path(path) if path else None
        self.context = context
        self.points: Dict[str, dict] = {}
        self.ignored = 0
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    p = json.loads(line)
                    if p.get("context") != context:
                        self.ignored += 1
                        continue
                    self.points[p["key"]] = p

    def get(self, choice: Dict[str, str]) -> Optional[dict]:
        return self.points.get(config_key(choice))

    def add(self, point: dict) -> dict:
        point = {**point, "key": config_key(point["choice"]), "context": self.context}
        self.points[point["key"]] = point
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(point) + "\n")
        return point


@dataclass
class SearchResult:
    best: Optional[dict]
    steps: List[dict] = field(default_factory=list)
    reachable: bool = True
    note: str = ""


def choice_of(alloc, cands: List[LayerCandidates]) -> Dict[str, str]:
    return {c.name: c.specs[i] for c, i in zip(cands, alloc.choice)}


def accuracy_search(problem: Problem, cands: List[LayerCandidates], measure: Callable[[Dict[str, str]], dict],
                    limit: float, budget_lo: float, budget_hi: float, per_unit: Callable[[float], float],
                    store: PointStore, tol: float, predicted_limit: Optional[float] = None,
                    max_steps: int = 12, log=print, label: str = "search",
                    plan_at: Optional[Callable[[float], Allocation]] = None) -> SearchResult:
    """Bisection on the budget (totals in cost units; ``per_unit`` converts to what users read).
    ``plan_at(budget)`` picks the plan at a budget (default: the exact optimum of ``problem``)."""
    dual_is_the_plan = plan_at is None  # else the dual's cost is probed with plan_at's plan there
    plan_at = plan_at or (lambda b: min_loss(problem, b))

    def probe(budget: float, how: str, alloc=None) -> dict:
        alloc = alloc or plan_at(budget)
        choice = choice_of(alloc, cands)
        pt = store.get(choice)
        if pt is None:
            m = measure(choice)
            pt = store.add({"kind": label, "budget": per_unit(budget), "cost": per_unit(alloc.cost),
                            "predicted": alloc.loss, "choice": choice, **m})
            tag = "measured"
        else:
            tag = "cached"
        ok = pt["loss"] <= limit
        log(f"  {how:<10} budget {per_unit(budget):8.4f} -> cost {per_unit(alloc.cost):8.4f}  "
            f"loss {pt['loss'] * 100:7.3f}% {'within' if ok else 'over  '} limit ({tag}, {pt.get('seconds', 0):.0f} s)")
        pt = {**pt, "cost": per_unit(alloc.cost), "predicted": alloc.loss}
        steps.append({"how": how, "budget": per_unit(budget), **{k: pt[k] for k in ("cost", "loss", "key")}})
        return pt

    steps: List[dict] = []
    top = probe(budget_hi, "budget-max")
    if top["loss"] > limit:
        return SearchResult(None, steps, False,
                            f"even at budget-max ({per_unit(budget_hi):.4f}) the measured loss is "
                            f"{top['loss'] * 100:.3f}%, over the limit {limit * 100:.3f}%")
    best, lo, hi = top, budget_lo, min(budget_hi, _total(top, problem, cands))
    if predicted_limit is not None:
        try:
            guess = min_cost(problem, predicted_limit)
            if lo < guess.cost < hi:
                pt = probe(guess.cost, "dual", guess if dual_is_the_plan else None)
                if pt["loss"] <= limit:
                    best, hi = pt, min(hi, guess.cost)
                else:
                    lo = guess.cost
        except Infeasible:
            pass
    for _ in range(max_steps):
        if per_unit(hi) - per_unit(lo) <= tol:
            break
        mid = (lo + hi) / 2
        pt = probe(mid, "bisect")
        cost = _total(pt, problem, cands)
        if pt["loss"] <= limit:
            if cost < _total(best, problem, cands):
                best = pt
            hi = min(mid, cost)
        else:
            lo = mid
    return SearchResult(best, steps)


def _total(pt: dict, problem: Problem, cands: List[LayerCandidates]) -> float:
    idx = [c.specs.index(pt["choice"][c.name]) for c in cands]
    return problem.evaluate(idx)[1]


def uniform_choices(cands: List[LayerCandidates], specs: List[str]) -> Dict[str, Dict[str, str]]:
    """spec -> the uniform configuration, for each spec every layer can take."""
    return {s: {c.name: s for c in cands} for s in specs if all(s in c.specs for c in cands)}
