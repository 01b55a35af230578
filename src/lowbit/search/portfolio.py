"""Plans checked by measurement before they are used.

The allocator's model of the loss (single-layer values plus pair terms) is exact near the fp32
model and wrong far from it: at 3 bits per weight on SmolLM2 the allocation over INT and FP/block
candidates together measured *worse* than the allocation over INT alone, a subset of its choices.
So at each budget a few plans are solved, each exactly, from variants of the model (with and
without the pair terms; over all candidates, over the integer candidates only, over the
non-integer ones only), and each is scored on the calibration data by its real loss increase
(:meth:`Objective.increase_with` with every layer quantized at once: the KL to the fp32 model for
causal LMs). The plan with the lowest measured loss is kept. The first plan is always the full
model's optimum, so the portfolio can only improve on it as measured on calibration data, and
since the restricted plans are among the candidates, the plan over INT and FP together is never
worse there than the plan over INT alone.

The calibration score of each configuration is kept in a JSON-lines file keyed by the
configuration and the calibration data, so a resumed search does not score it twice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from ..formats import IntFormat, format as parse_format
from ..optimize import Allocation, Infeasible, Problem, min_loss
from ..quant.spec import QuantSpec
from .bisection import config_key
from .candidates import LayerCandidates, restrict
from .objective import Objective
from .retained import base_spec

FAMILIES = ("all", "int", "float")


def is_integer(spec: str) -> bool:
    """Whether the spec's element format (retained side tensors aside) is an integer format."""
    return isinstance(parse_format(QuantSpec.parse(base_spec(spec)).format), IntFormat)


def family_specs(cands: List[LayerCandidates], family: str) -> Optional[List[str]]:
    """The specs of one family ('all': None, meaning no restriction), or None as well where some
    layer would be left without a candidate (the family is then skipped)."""
    if family == "all":
        return None
    keep = [s for s in dict.fromkeys(s for c in cands for s in c.specs) if is_integer(s) == (family == "int")]
    if not keep or any(not any(s in keep for s in c.specs) for c in cands):
        return None
    return keep


@dataclass
class Candidate:
    """One plan of the portfolio: how it was solved, its configuration and its full-model indices."""
    label: str
    choice: Dict[str, str]
    index: List[int]
    calibration_loss: Optional[float] = None


@dataclass
class Portfolio:
    """Builds and scores the plans at a budget. ``problem_of(with_pairs, cands, costs)`` returns the
    allocation problem of the chosen estimator for a (possibly restricted) candidate list."""
    problem_of: Callable[[bool, List[LayerCandidates], List[np.ndarray]], Problem]
    cands: List[LayerCandidates]
    costs: List[np.ndarray]
    score: Callable[[Dict[str, str]], float]
    pairs: bool = True
    families: Sequence[str] = FAMILIES
    log: Callable[[str], None] = lambda m: None
    history: List[dict] = field(default_factory=list)

    def plans(self, budget: float) -> List[Candidate]:
        """The distinct plans at ``budget`` (a total in cost units); the full optimum first."""
        out: List[Candidate] = []
        seen = set()
        variants = [(fam, p) for fam in self.families for p in ((True, False) if self.pairs else (False,))]
        for fam, with_pairs in variants:
            subset = family_specs(self.cands, fam)
            if fam != "all" and subset is None:
                continue
            cs, ks = restrict(self.cands, self.costs, subset) if subset else (self.cands, self.costs)
            try:
                alloc = min_loss(self.problem_of(with_pairs, cs, ks), budget)
            except Infeasible:
                continue
            choice = {c.name: c.specs[i] for c, i in zip(cs, alloc.choice)}
            key = tuple(sorted(choice.items()))
            if key in seen:
                continue
            seen.add(key)
            index = [c.specs.index(choice[c.name]) for c in self.cands]
            out.append(Candidate(f"{fam}{'+pairs' if with_pairs else ''}", choice, index))
        if not out:  # the full problem is infeasible at this budget: let min_loss say why
            min_loss(self.problem_of(self.pairs, self.cands, self.costs), budget)
        return out

    def best(self, budget: float, full: Problem) -> Tuple[Allocation, Candidate]:
        """The plan with the lowest measured calibration loss at ``budget``, as an Allocation of the
        full problem ``full`` (its predicted loss and cost), and that plan."""
        plans = self.plans(budget)
        for p in plans:
            p.calibration_loss = self.score(p.choice) if len(plans) > 1 else None
        win = min(plans, key=lambda p: p.calibration_loss if p.calibration_loss is not None else 0.0)
        if len(plans) > 1:
            self.log("    portfolio: " + ", ".join(f"{p.label} {p.calibration_loss:.4g}" for p in plans)
                     + f" -> {win.label}")
        self.history.append({"budget": budget, "chosen": win.label,
                             "plans": [{"label": p.label, "calibration_loss": p.calibration_loss} for p in plans]})
        loss, cost = full.evaluate(win.index)
        return Allocation(win.index, loss, cost, 0.0, f"portfolio:{win.label}"), win


class CalibrationScores:
    """Calibration loss of whole configurations (RTN, every layer at once), cached on disk."""

    def __init__(self, objective: Objective, layers: Dict[str, nn.Linear], weight_of: Callable,
                 path: Optional[Path] = None, context: Optional[dict] = None):
        self.objective, self.layers, self.weight_of = objective, layers, weight_of
        self.path = Path(path) if path else None
        self.context = {"data": objective.fingerprint(), **(context or {})}
        self.cache: Dict[str, float] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if r.get("context") == self.context:
                        self.cache[r["key"]] = r["loss"]

    @classmethod
    def rtn(cls, objective: Objective, layers: Dict[str, nn.Linear], path: Optional[Path], model_name: str
            ) -> "CalibrationScores":
        """Scores of RTN configurations (retention candidates weighted by the objective's input power)."""
        from .sensitivity import rtn_weight

        power = objective.input_power or {}
        return cls(objective, layers, lambda n, s: rtn_weight(layers[n].weight, s, power.get(n)), path,
                   {"model": model_name, "method": "rtn"})

    def __call__(self, choice: Dict[str, str]) -> float:
        key = config_key(choice)
        if key not in self.cache:
            w = {n: self.weight_of(n, s) for n, s in choice.items()}
            self.cache[key] = float(self.objective.increase_with(self.layers, w))
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "context": self.context, "loss": self.cache[key]}) + "\n")
        return self.cache[key]
