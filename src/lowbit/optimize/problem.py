"""The allocation problem: per-layer loss and cost vectors over candidates, plus pairwise loss terms."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

Pairs = Dict[Tuple[int, int], np.ndarray]


@dataclass
class Problem:
    """``loss[l][c]`` and ``cost[l][c]`` for candidate ``c`` of layer ``l``; ``pairs[(a, b)][ca, cb]`` is
    added to the loss when layer ``a`` takes ``ca`` and layer ``b`` takes ``cb`` (any sign)."""
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
        pairs = {}
        for (a, b), q in self.pairs.items():
            q = np.asarray(q, float)
            if not (0 <= a < len(self.loss) and 0 <= b < len(self.loss)):
                raise ValueError(f"pair ({a}, {b}): layer index out of range 0..{len(self.loss) - 1}")
            if a == b or q.shape != (self.loss[a].size, self.loss[b].size):
                raise ValueError(f"pair ({a}, {b}): term of shape {q.shape} does not match its layers")
            if not np.isfinite(q).all():
                raise ValueError(f"pair ({a}, {b}): terms must be finite")
            pairs[(a, b)] = q
        self.pairs = pairs

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


def pareto(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated in (cost, loss), cheapest first; of equal points the first."""
    o = np.lexsort((loss, cost))
    lo = loss[o]
    keep = np.ones(o.size, bool)
    keep[1:] = lo[1:] < np.minimum.accumulate(lo)[:-1]
    return o[keep]
