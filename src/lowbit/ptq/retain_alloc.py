"""Per-layer retention ratios chosen by a mixed-integer program under one bits-per-weight budget.

Model of the loss (measured on calibration data with the float model, block by block):

* e_l(r): layer l's output error tr(dW H dW^T) when the top-r fraction of its weights (by saliency)
  is retained and the rest rounded by RTN, for each r of a grid. Cheap: matrix products only.
* s_l: how strongly layer l's output error shows in its block's output. The layer alone is rounded
  (RTN, nothing kept) and the block rerun: E_l = ||Y_l - Y||^2 / ||Y||^2 and s_l = E_l / e_l(0).
  So the block-output error of layer l at ratio r is modelled as a_l(r) = s_l e_l(r).
* rho_ab: the inter-layer term for neighbouring layers a, b of a block (consecutive in execution
  order): both rounded together give E_ab; rho = (E_ab - E_a - E_b) / (2 sqrt(E_a E_b)) is the
  correlation of their block-output errors (clipped to [0, 1]: a negative value would let the
  program buy cancellations that a finer ratio grid or other data would not keep).

Objective: sum_l a_l(r_l) + sum_(a,b) 2 rho_ab sqrt(a_a(r_a) a_b(r_b)), i.e. ||sum_l delta_l||^2 with
the neighbours' error vectors at correlation rho -- a quadratic form in the sqrt(a_l). Over the
discrete grid it is one choice per layer with pairwise terms under one budget, sum_l bits_l(r_l) <=
the total bits of one fixed ratio everywhere: solved exactly by :func:`lowbit.optimize.min_loss`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..models.blocks import capture_block_inputs, find_blocks, linear_layers, run_block
from ..optimize import Infeasible, Problem, min_loss
from ..quant.weight import WeightQuantizer
from .retention import RetainFormat, hessian_saliency, retained_bits, rtn_retained, top_mask

GRID_MULTIPLIERS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def ratio_grid(base: float, multipliers: Sequence[float] = GRID_MULTIPLIERS) -> List[float]:
    return sorted({min(base * m, 0.5) for m in multipliers})


@dataclass
class LayerCurve:
    name: str
    shape: Tuple[int, int]
    lowbit_bits: float            # bits of the dense low-bit part (codes + scales)
    ratios: List[float]
    errors: List[float]           # e_l(r): tr(dW H dW^T)
    bits: List[float]             # total stored bits at each ratio
    sensitivity: float = 1.0      # s_l


@dataclass
class Allocation:
    ratios: Dict[str, float]
    budget_bits: float
    chosen_bits: float
    weights: int
    objective: float
    fixed_objective: float
    pairs: List[Tuple[str, str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"ratios": self.ratios, "budget_bits_per_weight": self.budget_bits / self.weights,
                "chosen_bits_per_weight": self.chosen_bits / self.weights,
                "modelled_error": self.objective, "modelled_error_fixed": self.fixed_objective,
                "interactions": [list(p) for p in self.pairs], "seconds": self.seconds}


def _out_err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = W - Q
    return float(torch.einsum("ij,jk,ik->", D, H, D))


def layer_curve(name: str, W: torch.Tensor, H: torch.Tensor, spec, rfmt: RetainFormat,
                grid: Sequence[float], score: Optional[torch.Tensor] = None, saliency: str = "obs") -> LayerCurve:
    W = W.detach().float()
    q = WeightQuantizer(spec)
    if score is None:
        score = hessian_saliency(W, H, WeightQuantizer(spec), saliency)
    rows, cols = W.shape
    low = q.bits_per_weight(cols) * rows * cols
    errs, bits = [], []
    for r in grid:
        keep = top_mask(score, r)
        res = rtn_retained(W, keep, WeightQuantizer(spec), rfmt)
        errs.append(_out_err(W, res.weight.to(W.device), H))
        bits.append(low + retained_bits(rows, cols, int(keep.sum()), rfmt))
    return LayerCurve(name, (rows, cols), low, list(grid), errs, bits)


def _first_rows(x, b: int, n: int):
    """x with every tensor whose leading dim is the batch size b cut to its first n rows."""
    if torch.is_tensor(x):
        return x[:n] if x.dim() and x.shape[0] == b else x
    if isinstance(x, tuple):
        return tuple(_first_rows(v, b, n) for v in x)
    if isinstance(x, list):
        return [_first_rows(v, b, n) for v in x]
    if isinstance(x, dict):
        return {k: _first_rows(v, b, n) for k, v in x.items()}
    return x


def _sensitivity_slice(inputs, hidden, n_seq: int):
    """The first n_seq calibration sequences (the block sensitivities need few)."""
    from ..models.blocks import BlockInput

    out_in, out_h, left = [], [], n_seq
    for inp, h in zip(inputs, hidden):
        if left <= 0:
            break
        b = h.shape[0]
        n = min(b, left)
        out_in.append(BlockInput(h[:n], _first_rows(inp.args, b, n), _first_rows(inp.kwargs, b, n)))
        out_h.append(h[:n])
        left -= n
    return out_in, out_h


def _block_rel_err(block, inputs, hidden, ref) -> float:
    num = den = 0.0
    for inp, h, y in zip(inputs, hidden, ref):
        out = run_block(block, inp, h)
        num += float((out - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return num / den if den > 0 else 0.0


def measure_curves(model: nn.Module, plan, batches: List[dict], rfmt: RetainFormat, base_ratio: float,
                   saliency: str = "obs", sens_seqs: int = 4, progress: bool = True,
                   scores: Optional[Dict[str, torch.Tensor]] = None):
    """(curves, pairs): per-layer error curves with block-output sensitivities, and the measured
    correlation of neighbouring layers' block-output errors. The model is left unchanged."""
    from .pipeline import _collect_hessians, _progress_bar

    grid = ratio_grid(base_ratio)
    blocks_path, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], batches)
    hidden = [i.hidden for i in inputs]
    curves: List[LayerCurve] = []
    pairs: List[Tuple[str, str, float]] = []
    bar = _progress_bar(len(blocks), progress)
    with torch.inference_mode():
        for bi, block in enumerate(blocks):
            layers = {n: l for n, l in linear_layers(block, f"{blocks_path}.{bi}").items()
                      if plan.weight_spec(n) is not None
                      and WeightQuantizer(plan.weight_spec(n)).check(tuple(l.weight.shape)) is None}
            hess = _collect_hessians(block, inputs, hidden, layers)
            s_in, s_h = _sensitivity_slice(inputs, hidden, sens_seqs)
            ref = [run_block(block, i, h) for i, h in zip(s_in, s_h)]
            rtn = {}
            block_curves = []
            for n, lin in layers.items():
                W = lin.weight.detach().float()
                c = layer_curve(n, W, hess[n].H, plan.weight_spec(n), rfmt, grid,
                                None if scores is None else scores[n], saliency)
                rtn[n] = WeightQuantizer(plan.weight_spec(n)).rtn(W)[0].to(lin.weight.dtype)
                block_curves.append(c)
            alone = {}
            orig = {n: lin.weight.data for n, lin in layers.items()}
            for c in block_curves:
                layers[c.name].weight.data = rtn[c.name]
                alone[c.name] = _block_rel_err(block, s_in, s_h, ref)
                layers[c.name].weight.data = orig[c.name]
                c.sensitivity = alone[c.name] / c.errors[0] if c.errors[0] > 0 else 0.0
            names = [c.name for c in block_curves]
            for a, b in zip(names, names[1:]):
                layers[a].weight.data, layers[b].weight.data = rtn[a], rtn[b]
                both = _block_rel_err(block, s_in, s_h, ref)
                layers[a].weight.data, layers[b].weight.data = orig[a], orig[b]
                denom = 2 * math.sqrt(alone[a] * alone[b])
                rho = (both - alone[a] - alone[b]) / denom if denom > 0 else 0.0
                pairs.append((a, b, float(min(max(rho, 0.0), 1.0))))
            curves.extend(block_curves)
            hidden = [run_block(block, i, h) for i, h in zip(inputs, hidden)]
            bar.update(1)
    bar.close()
    return curves, pairs


def solve_allocation(curves: List[LayerCurve], pairs: List[Tuple[str, str, float]], base_ratio: float,
                     time_limit: float = 60.0) -> Allocation:
    """Choose one grid ratio per layer minimising the modelled error under the fixed ratio's bits
    (the exact allocator of :mod:`lowbit.optimize`)."""
    t0 = time.time()
    L = len(curves)
    idx = {c.name: i for i, c in enumerate(curves)}
    a = [np.array(c.errors) * c.sensitivity for c in curves]
    scale = sum(x[0] for x in a) or 1.0
    a = [x / scale for x in a]
    npairs = [(idx[p], idx[q], rho) for p, q, rho in pairs if rho > 0 and p in idx and q in idx]
    terms: Dict[Tuple[int, int], np.ndarray] = {}
    for i, j, rho in npairs:
        t = 2 * rho * np.sqrt(np.outer(a[i], a[j]))
        terms[(i, j)] = terms[(i, j)] + t if (i, j) in terms else t
    fixed = [c.ratios.index(min(c.ratios, key=lambda r: abs(r - base_ratio))) for c in curves]
    budget = sum(c.bits[k] for c, k in zip(curves, fixed))
    problem = Problem(a, [np.array(c.bits, float) for c in curves], terms)
    try:
        choice = min_loss(problem, budget, time_limit=time_limit).choice
    except Infeasible as e:
        raise RuntimeError(f"the ratio allocation program found no solution: {e}") from None
    ratios = {c.name: c.ratios[k] for c, k in zip(curves, choice)}
    chosen = sum(c.bits[k] for c, k in zip(curves, choice))
    weights = sum(c.shape[0] * c.shape[1] for c in curves)
    return Allocation(ratios, budget, chosen, weights, problem.evaluate(choice)[0] * scale,
                      problem.evaluate(fixed)[0] * scale, [(p, q, rho) for p, q, rho in pairs], time.time() - t0)


def optimize_ratios(model: nn.Module, plan, batches: List[dict], rfmt: RetainFormat, base_ratio: float,
                    saliency: str = "obs", sens_seqs: int = 4, progress: bool = True,
                    scores: Optional[Dict[str, torch.Tensor]] = None) -> Allocation:
    """Measure the curves on ``batches`` and solve the program (see module doc)."""
    t0 = time.time()
    curves, pairs = measure_curves(model, plan, batches, rfmt, base_ratio, saliency, sens_seqs,
                                   progress, scores)
    alloc = solve_allocation(curves, pairs, base_ratio)
    alloc.seconds = time.time() - t0
    return alloc


def matching_ratio(shapes: Sequence[Tuple[int, int]], fmt_a: RetainFormat, ratio_a: float,
                   fmt_b: RetainFormat) -> float:
    """The largest ratio at which retaining in ``fmt_b`` costs no more bits over these layers than
    ``ratio_a`` in ``fmt_a`` (e.g. the fp16 ratio that matches 1% at int8)."""
    def total(fmt, r):
        return sum(retained_bits(m, n, int(round(r * m * n)), fmt) for m, n in shapes)

    budget = total(fmt_a, ratio_a)
    lo, hi = 0.0, 0.5
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(fmt_b, mid) <= budget else (lo, mid)
    return lo
