"""The exact allocator lives in :mod:`lowbit.optimize` (shared with ``ptq``); re-exported here."""
from ..optimize import Allocation, Infeasible, Problem, cheapest, min_cost, min_loss
from ..optimize.problem import Pairs

__all__ = ["Allocation", "Infeasible", "Pairs", "Problem", "cheapest", "min_cost", "min_loss"]
