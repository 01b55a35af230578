"""Exact discrete allocation (one choice per item under one budget or one loss limit).

Pure numerics on arrays: no model code, importable by ``ptq`` and ``search`` alike.
"""
from .allocate import cheapest, min_cost, min_loss
from .problem import Allocation, Infeasible, Problem

__all__ = ["Allocation", "Infeasible", "Problem", "cheapest", "min_cost", "min_loss"]
