"""Per-layer retention ratios chosen by a mixed-integer program under one bits-per-weight budget.

For each layer l and each ratio r of a grid (multiples of the base ratio), the program needs a_l(r):
how much the model's loss grows when layer l keeps the top-r fraction of its weights (by saliency)
and rounds the rest. Everything is measured on calibration data with the float model, block by block.

Layer output error. With the GPTQ Hessian H = (2/N) X^T X of the layer's N calibration inputs,
e_li(r) = [dW H dW^T]_ii is the output error of output row (channel) i, dW = W - Q_r. ``curves``
says how Q_r is made: ``rtn`` rounds the kept-out weights to nearest (cheap), ``gptq`` runs GPTQ
with the keep mask (the quantizer that will actually be used; the grid's copies of the weight are
stacked into one GPTQ call sharing one Hessian inverse).

Objective ``fisher`` (default; downstream sensitivity, :mod:`lowbit.ptq.retain_fisher`):

    a_l(r) = 1/4 sum_i G_li e_li(r),   G_li = mean over calibration tokens of (dL / dy_li)^2,

the diagonal-Fisher (K-FAC with a diagonal output factor) second-order estimate of the increase of
the mean calibration loss L from the layer's output error. G_li carries everything downstream of
the layer, so a_l is in loss units and comparable between layers at different depths: the budget
goes where the *loss* falls most, not where a layer's local error falls most.

Objective ``block`` (the first formulation): a_l(r) = s_l sum_i e_li(r), where s_l = E_l / e_l(0)
and E_l = ||Y_l - Y||^2 / ||Y||^2 is the relative error of the block's output when layer l alone is
rounded (RTN, nothing kept) and the block rerun on a few calibration sequences. Every block's
relative output error counts the same, whatever its depth and however much the loss cares.

Inter-layer term (both objectives): for neighbouring layers a, b of a block (consecutive in
execution order), both rounded together give E_ab, and rho_ab = (E_ab - E_a - E_b) / (2 sqrt(E_a E_b))
is the correlation of their block-output errors (clipped to [0, 1]: a negative value would let the
program buy cancellations that a finer ratio grid or other data would not keep).

Program: minimise sum_l a_l(r_l) + sum_(a,b) 2 rho_ab sqrt(a_a(r_a) a_b(r_b)), i.e. ||sum_l delta_l||^2
with the neighbours' error vectors at correlation rho -- a quadratic form in the sqrt(a_l) -- over
one grid choice per layer with sum_l bits_l(r_l) <= the total bits of the base ratio everywhere
(bits_l counts every stored bit: codes, scales, retained values, their positions and scales). The
pair products are linearised exactly; solved by :func:`lowbit.optimize.min_loss`.
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
OBJECTIVES = ("fisher", "block")
CURVES = ("rtn", "gptq")


def ratio_grid(base: float, multipliers: Sequence[float] = GRID_MULTIPLIERS) -> List[float]:
    if not multipliers or any(not (m >= 0 and math.isfinite(m)) for m in multipliers):
        raise ValueError(f"ratio grid multipliers must be finite and >= 0, got {list(multipliers)}")
    if not any(abs(m - 1.0) < 1e-12 for m in multipliers):
        raise ValueError(f"ratio grid multipliers {list(multipliers)} must include 1 (the base ratio, "
                         "which sets the budget)")
    return sorted({min(base * m, 0.5) for m in multipliers})


@dataclass
class LayerCurve:
    name: str
    shape: Tuple[int, int]
    lowbit_bits: float            # bits of the dense low-bit part (codes + scales)
    ratios: List[float]
    errors: List[float]           # the objective's error at each ratio: tr(dW H dW^T) or 1/4 sum_i G_i e_i
    bits: List[float]             # total stored bits at each ratio
    sensitivity: float = 1.0      # s_l (objective "block"; 1 for "fisher", whose errors are in loss units)
    local_errors: List[float] = field(default_factory=list)  # tr(dW H dW^T) at each ratio, unweighted
    block_sensitivity: float = 0.0                            # s_l, measured under either objective


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


def _row_err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """[dW H dW^T]_ii for every output row i (float64)."""
    D = (W - Q).double()
    return ((D @ H.double()) * D).sum(1)


def _out_err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, row_weights: Optional[torch.Tensor] = None) -> float:
    """tr(dW H dW^T), or 1/4 sum_i G_i [dW H dW^T]_ii with ``row_weights`` G (the Fisher objective)."""
    e = _row_err(W, Q, H)
    if row_weights is None:
        return float(e.sum())
    return 0.25 * float((row_weights.double().to(e.device) * e).sum())


def _gptq_grid_weights(W: torch.Tensor, H: torch.Tensor, spec, rfmt: RetainFormat, keeps: List[torch.Tensor],
                       gptq_kw: dict) -> List[torch.Tensor]:
    """The final weight (low-bit + retained values) of GPTQ with each keep mask, as
    :func:`~lowbit.ptq.retention.gptq_retained` makes it; one GPTQ call over the copies stacked
    (rows never interact in GPTQ, so each equals its own call)."""
    from .gptq import gptq_shared
    from .retention import finish_retained

    res = gptq_shared([W.masked_fill(k.to(W.device), 0.0) for k in keeps], H,
                      [WeightQuantizer(spec) for _ in keeps], keeps=[k.to(W.device) for k in keeps], **gptq_kw)
    out = []
    for k, r in zip(keeps, res):
        k = k.to(W.device)
        out.append(finish_retained(torch.where(k, W + r.weight, r.weight), k, rfmt, r.params).weight)
    return out


def layer_curve(name: str, W: torch.Tensor, H: torch.Tensor, spec, rfmt: RetainFormat,
                grid: Sequence[float], score: Optional[torch.Tensor] = None, saliency: str = "obs",
                row_weights: Optional[torch.Tensor] = None, curves: str = "rtn",
                gptq_kw: Optional[dict] = None) -> LayerCurve:
    """Error and stored bits of one layer at every ratio of ``grid`` (see the module doc)."""
    if curves not in CURVES:
        raise ValueError(f"unknown retention curves {curves!r}; accepted: {', '.join(CURVES)}")
    W = W.detach().float()
    q = WeightQuantizer(spec)
    if score is None:
        score = hessian_saliency(W, H, WeightQuantizer(spec), saliency)
    rows, cols = W.shape
    low = q.bits_per_weight(cols) * rows * cols
    keeps = [top_mask(score, r) for r in grid]
    if curves == "gptq":
        weights = _gptq_grid_weights(W, H, spec, rfmt, keeps, dict(gptq_kw or {}))
    else:
        weights = [rtn_retained(W, k, WeightQuantizer(spec), rfmt).weight for k in keeps]
    rows_err = [_row_err(W, Q.to(W.device), H) for Q in weights]
    local = [float(e.sum()) for e in rows_err]
    errs = local if row_weights is None else \
        [0.25 * float((row_weights.double().to(e.device) * e).sum()) for e in rows_err]
    bits = [low + retained_bits(rows, cols, int(k.sum()), rfmt) for k in keeps]
    return LayerCurve(name, (rows, cols), low, list(grid), errs, bits, local_errors=local)


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
                   scores: Optional[Dict[str, torch.Tensor]] = None, objective: str = "fisher",
                   curves: str = "rtn", multipliers: Sequence[float] = GRID_MULTIPLIERS,
                   gptq_kw: Optional[dict] = None, fisher_seqs: int = 8):
    """(curves, pairs): per-layer error curves in the objective's units, and the measured
    correlation of neighbouring layers' block-output errors. The model is left unchanged."""
    from .pipeline import block_hessians, input_hessian, progress_bar

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown retention objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
    grid = ratio_grid(base_ratio, multipliers)
    blocks_path, blocks = find_blocks(model)
    fisher = None
    if objective == "fisher":  # before any inference-mode pass: it needs gradients
        from .retain_fisher import output_fisher

        names = [n for bi, b in enumerate(blocks) for n, l in linear_layers(b, f"{blocks_path}.{bi}").items()
                 if plan.weight_spec(n) is not None
                 and WeightQuantizer(plan.weight_spec(n)).check(tuple(l.weight.shape)) is None]
        fisher = output_fisher(model, batches, names, seqs=fisher_seqs)
    inputs = capture_block_inputs(model, blocks[0], batches)
    hidden = [i.hidden for i in inputs]
    curves_out: List[LayerCurve] = []
    pairs: List[Tuple[str, str, float]] = []
    bar = progress_bar(len(blocks), progress)
    with torch.inference_mode():
        for bi, block in enumerate(blocks):
            layers = {n: l for n, l in linear_layers(block, f"{blocks_path}.{bi}").items()
                      if plan.weight_spec(n) is not None
                      and WeightQuantizer(plan.weight_spec(n)).check(tuple(l.weight.shape)) is None}
            hess = block_hessians(block, inputs, hidden, layers)
            s_in, s_h = _sensitivity_slice(inputs, hidden, sens_seqs)
            ref = [run_block(block, i, h) for i, h in zip(s_in, s_h)]
            rtn = {}
            block_curves = []
            for n, lin in layers.items():
                W = lin.weight.detach().float()
                # a layer with an online input transform (rotation/smoothing) stores W T and sees
                # x T: its output error needs T^T H T, as GPTQ gets it in the pipeline
                c = layer_curve(n, W, input_hessian(lin, hess[n].H), plan.weight_spec(n), rfmt, grid,
                                None if scores is None else scores[n], saliency,
                                None if fisher is None else fisher[n], curves, gptq_kw)
                rtn[n] = WeightQuantizer(plan.weight_spec(n)).rtn(W)[0].to(lin.weight.dtype)
                block_curves.append(c)
            alone = {}
            orig = {n: lin.weight.data for n, lin in layers.items()}
            for c in block_curves:
                layers[c.name].weight.data = rtn[c.name]
                alone[c.name] = _block_rel_err(block, s_in, s_h, ref)
                layers[c.name].weight.data = orig[c.name]
                e0 = _out_err(orig[c.name].float(), rtn[c.name].float(), input_hessian(layers[c.name], hess[c.name].H))
                c.block_sensitivity = alone[c.name] / e0 if e0 > 0 else 0.0
                if objective == "block":
                    c.sensitivity = c.block_sensitivity
            names = [c.name for c in block_curves]
            for a, b in zip(names, names[1:]):
                layers[a].weight.data, layers[b].weight.data = rtn[a], rtn[b]
                both = _block_rel_err(block, s_in, s_h, ref)
                layers[a].weight.data, layers[b].weight.data = orig[a], orig[b]
                denom = 2 * math.sqrt(alone[a] * alone[b])
                rho = (both - alone[a] - alone[b]) / denom if denom > 0 else 0.0
                pairs.append((a, b, float(min(max(rho, 0.0), 1.0))))
            curves_out.extend(block_curves)
            hidden = [run_block(block, i, h) for i, h in zip(inputs, hidden)]
            bar.update(1)
    bar.close()
    return curves_out, pairs


def as_block_objective(c: LayerCurve) -> LayerCurve:
    """The same measurement under the ``block`` objective (s_l times the unweighted error)."""
    return LayerCurve(c.name, c.shape, c.lowbit_bits, c.ratios, list(c.local_errors), c.bits,
                      c.block_sensitivity, list(c.local_errors), c.block_sensitivity)


def restrict(c: LayerCurve, ratios: Sequence[float]) -> LayerCurve:
    """The curve on a sub-grid (ratios must be points of c's grid)."""
    idx = [min(range(len(c.ratios)), key=lambda k: abs(c.ratios[k] - r)) for r in ratios]
    if any(abs(c.ratios[k] - r) > 1e-12 for k, r in zip(idx, ratios)):
        raise ValueError(f"ratios {list(ratios)} are not all on the measured grid {c.ratios}")
    pick = lambda xs: [xs[k] for k in idx] if xs else []
    return LayerCurve(c.name, c.shape, c.lowbit_bits, pick(c.ratios), pick(c.errors), pick(c.bits),
                      c.sensitivity, pick(c.local_errors), c.block_sensitivity)


def solve_allocation(curves: List[LayerCurve], pairs: List[Tuple[str, str, float]], base_ratio: float,
                     time_limit: float = 60.0) -> Allocation:
    """Choose one grid ratio per layer minimising the modelled error under the fixed ratio's bits
    (the exact allocator of :mod:`lowbit.optimize`)."""
    t0 = time.time()
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
                    scores: Optional[Dict[str, torch.Tensor]] = None, objective: str = "fisher",
                    curves: str = "rtn", multipliers: Sequence[float] = GRID_MULTIPLIERS,
                    gptq_kw: Optional[dict] = None) -> Allocation:
    """Measure the curves on ``batches`` and solve the program (see module doc)."""
    t0 = time.time()
    curves_, pairs = measure_curves(model, plan, batches, rfmt, base_ratio, saliency, sens_seqs,
                                    progress, scores, objective, curves, multipliers, gptq_kw)
    alloc = solve_allocation(curves_, pairs, base_ratio)
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
