"""`lowbit search` end to end: candidates and costs, sensitivities (cached), exact allocation,
measured bisection to an accuracy limit (or one fixed budget), and the outputs in DIR: plan.json
(which `lowbit quantize --plan` applies), search.json, points.jsonl, pareto.png, layers.png and
report.html (all of it on one page)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..optimize import cheapest, min_loss
from .bisection import PointStore, accuracy_search, choice_of, uniform_choices
from .candidates import dropped_notes, layer_candidates, parse_candidates, quantizable_layers, union_specs
from .cost import CostModel, bits_per_weight, cost_matrix, true_bits
from .measure import MetricEvaluator
from .retained import check_retained, has_retained, input_power, plan_layers
from .objective import Objective, make_batches
from .portfolio import CalibrationScores, Portfolio
from .sensitivity import ESTIMATORS, SensitivitySettings, compute, rank_agreement

# Calibration for sensitivities: small on purpose (measured sensitivities re-run the model once per
# layer and candidate). Causal LMs with the measured estimator: 2 x 256 tokens, since the measured
# value is a KL to the fp32 model (no first-order noise term; 7x less noisy than the cross-entropy
# difference it replaced was on 4 x 256). Fisher and Hutchinson keep 4 x 256 (fewer tokens hurt them).
CALIB = {"causal_lm": (4, 256), "encoder": (16, 128)}
MEASURED_CALIB = {"causal_lm": (2, 256)}


def calibration_size(kind: str, estimator: str = "measured") -> tuple:
    """Default (items, tokens per item) of the sensitivity calibration set."""
    return MEASURED_CALIB.get(kind, CALIB[kind]) if estimator == "measured" else CALIB[kind]


def parse_limit(text) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"--max-loss must be a fraction (0.01) or a percentage (1%), got {text!r}") from None
    if not 0 < v < 10:
        raise ValueError(f"--max-loss must be positive (a fraction or a percentage), got {text!r}")
    return v


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def run_search(model=None, out: Optional[str] = None, *, max_loss="1%", metric: Optional[str] = None,
               budget: Optional[float] = None, budget_max: Optional[float] = None, method: str = "rtn",
               candidates="default", estimator: str = "measured", pairs: bool = True, cost: str = "bits",
               calib: Optional[int] = None, seq_len: Optional[int] = None, eval_tokens: int = 4096,
               context: int = 512, sentences: int = 128, hutchinson_samples: int = 4,
               extra_estimators: Sequence[str] = (), sensitivity_cache: Optional[str] = None,
               uniform: bool = True, rank_configs: int = 0, tol: float = 0.0625, portfolio: bool = True,
               quiet: bool = False, loaded=None, device: Optional[str] = None) -> dict:
    """The search behind `lowbit search` (see the module docstring); ``portfolio``: at each budget,
    score a few exactly solved plans on the calibration data and keep the best (search.portfolio),
    instead of trusting the predicted loss of one. ``device``: where the model runs (auto | cpu |
    cuda | cuda:N; None leaves it where it is); calibration and evaluation data follow the model."""
    from ..job_common import resolve_device
    from ..models.loader import load_model

    t0 = time.time()
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    limit = parse_limit(max_loss)
    dev = resolve_device(device)  # a bad device fails before the model is loaded
    if loaded is None:
        _log(f"loading {model or 'smollm2'} ...", quiet)
        loaded = load_model(model)
    if dev is not None:
        loaded.model.to(dev)
    layers = quantizable_layers(loaded.model)
    specs = parse_candidates(candidates)
    check_retained(specs, method)
    cands = layer_candidates(layers, specs)
    cm = CostModel.parse(cost)
    costs = cost_matrix(cands, cm)
    notes = dropped_notes(cands)
    for n in notes[:10]:
        _log(f"note: {n}", quiet)
    if len(notes) > 10:
        _log(f"note: ... and {len(notes) - 10} more dropped candidates (see search.json)", quiet)

    n_cal, L = calibration_size(loaded.kind, estimator)
    n_cal, L = calib or n_cal, seq_len or L
    objective = Objective(loaded.model, loaded.kind, make_batches(loaded, n_cal, L, batch_size=2))
    if has_retained(specs):  # the retention candidates' saliency weights rounding errors by input power
        objective.input_power = input_power(lambda b: loaded.model(**b), layers, objective.batches)
    outp = Path(out) if out else None
    cache = Path(sensitivity_cache) if sensitivity_cache else (outp / "sensitivity.json" if outp else None)
    ests = list(dict.fromkeys([estimator] + list(extra_estimators)))  # pairs measure their own singles
    _log(f"sensitivities ({', '.join(ests)}{' + dependency pairs' if pairs else ''}) of {len(cands)} layers x "
         f"{len(specs)} candidates on {n_cal} calibration {'sequences' if loaded.kind == 'causal_lm' else 'sentences'} "
         f"of {L} tokens", quiet)
    t_sens = time.time()
    table = compute(objective, layers, cands, costs, ests, pairs,
                    SensitivitySettings(hutchinson_samples=hutchinson_samples), cache, loaded.name,
                    progress=not quiet, log=lambda m: _log(m, quiet))
    sens_seconds = time.time() - t_sens
    negative = sum(v < 0 for row in table.values[estimator].values() for v in row.values())
    if negative:  # a negative predicted increase looks free to the allocator
        _log(f"note: {negative} of {sum(len(r) for r in table.values[estimator].values())} {estimator} values are negative",
             quiet)
    problem = table.problem(estimator, costs, with_pairs=pairs)

    evaluator = MetricEvaluator(loaded, layers, metric, method, eval_tokens, context, sentences,
                                gptq_batches=objective.batches if method == "gptq" else None,
                                input_power=objective.input_power)
    store = PointStore(outp / "points.jsonl" if outp else None, {"method": method, **evaluator.settings})
    if store.ignored:
        _log(f"note: {store.ignored} points in {outp / 'points.jsonl'} were measured with other settings; not used", quiet)
    base = store.get({})  # the fp32 model is the empty configuration
    if base is None:
        _log("measuring the fp32 baseline ...", quiet)
        base = store.add({"kind": "baseline", "label": "fp32", "choice": {}, "bits": 32.0,
                          **evaluator.measure_baseline(), "loss": 0.0})
    evaluator.baseline = {k: base[k] for k in ("perplexity", "cosine_mean", "cosine_min", "spearman") if k in base}
    per_unit = lambda total: cm.per_unit(total, cands)

    def measure(choice, kind="search", label=""):
        pt = store.get(choice)
        if pt is None:
            m = evaluator.measure(choice)
            pt = store.add({"kind": kind, "label": label, "choice": choice, "bits": bits_per_weight(choice, cands), **m})
        return pt

    uniform_pts = []
    if uniform:
        _log(f"measuring {len(specs)} uniform configurations ({method}) ...", quiet)
        for s, choice in uniform_choices(cands, specs).items():
            pt = measure(choice, "uniform", s)
            uniform_pts.append({"spec": s, "bits": pt["bits"], "loss": pt["loss"]})
            _log(f"  uniform {s:<16} {pt['bits']:.3f} b/w  loss {pt['loss'] * 100:8.3f}%", quiet)

    def measure_search(choice):
        pt = measure(choice)
        return {k: v for k, v in pt.items() if k not in ("key", "choice", "kind", "label")}

    plan_at = None
    pf = None
    if portfolio:
        scores = CalibrationScores.rtn(objective, layers, outp / "calibration_scores.jsonl" if outp else None,
                                       loaded.name)
        pf = Portfolio(lambda with_pairs, cs, ks: table.problem(estimator, ks, with_pairs, cs), cands, costs,
                       scores, pairs=pairs, log=lambda m: _log(m, quiet))
        plan_at = lambda total: pf.best(total, problem)[0]

    lo_total = cheapest(problem).cost
    hi_total = cm.budget_total(budget_max, cands) if budget_max else float(sum(c.max() for c in costs))
    if budget is not None:
        total = cm.budget_total(budget, cands)
        alloc = plan_at(total) if plan_at else min_loss(problem, total)
        best = measure(choice_of(alloc, cands), "budget")
        result = {"mode": "budget", "budget": budget, "steps": [], "reachable": True, "note": ""}
    else:
        if loaded.kind == "causal_lm":
            pred_limit = math.log1p(limit)   # objective: cross-entropy in nats; ppl ratio = exp(delta)
        else:
            pred_limit = 2 * limit if evaluator.metric == "cosine" else None  # objective: 2 (1 - cos)
        _log(f"bisection on the budget for {evaluator.metric} loss <= {limit * 100:g}% ...", quiet)
        sr = accuracy_search(problem, cands, measure_search, limit, lo_total, hi_total, per_unit, store, tol,
                             pred_limit, log=lambda m: _log(m, quiet), plan_at=plan_at)
        best = store.get(sr.best["choice"]) if sr.best else None
        result = {"mode": "max-loss", "steps": sr.steps, "reachable": sr.reachable, "note": sr.note}
        if not sr.reachable:
            _log(f"limit not reachable: {sr.note}", quiet)
    agreement = None
    if rank_configs:
        _log(f"rank agreement of the estimators on {rank_configs} random configurations ...", quiet)
        agreement = rank_agreement(table, objective, layers, cands, costs, rank_configs, progress=not quiet)
        _log("  spearman: " + ", ".join(f"{k} {v:.3f}" for k, v in agreement["spearman"].items()), quiet)

    base_key = "perplexity" if loaded.kind == "causal_lm" else evaluator.metric
    report = {
        "model": loaded.name, "kind": loaded.kind, "method": method, "metric": evaluator.metric,
        "evaluation": evaluator.settings, "baseline": evaluator.baseline,
        "limit": {"max_loss": limit, "metric": evaluator.metric,
                  "meaning": ("perplexity <= baseline x (1 + max_loss)" if evaluator.metric == "perplexity"
                              else f"1 - {evaluator.metric} <= max_loss (absolute)")},
        "cost_model": cm.kind if cm.kind != "latency" else cm.source, "candidates": specs,
        "estimator": estimator, "pairs": len(table.pairs) if pairs else 0,
        "calibration": {"items": n_cal, "tokens": L}, "sensitivity_seconds": table.seconds,
        "sensitivity_wall_seconds": sens_seconds, "negative_values": negative, "dropped": notes, "uniform": uniform_pts,
        "search": result, "rank_agreement": agreement,
        "environment": {"torch": torch.__version__, "device": str(next(loaded.model.parameters()).device)},
        "portfolio": ({"families": list(pf.families), "pairs": pairs, "score": "calibration loss increase, RTN",
                       "budgets": [{**h, "budget": per_unit(h["budget"])} for h in pf.history]} if pf else None),
    }
    if best is not None:
        plan = {"name": f"search-{loaded.name}", **plan_layers(best["choice"]), "bits_per_weight": best["bits"],
                "baseline": evaluator.baseline,
                "measured": {k: best[k] for k in ("perplexity", "cosine_mean", "cosine_min", "spearman") if k in best},
                "loss": best["loss"], "limit": report["limit"] if budget is None else None,
                "budget": budget, "method": method, "cost_model": report["cost_model"],
                "cost": per_unit(problem.evaluate([c.specs.index(best["choice"][c.name]) for c in cands])[1])}
        report["plan"] = plan
        within = [u for u in uniform_pts if u["loss"] <= limit]
        report["smallest_uniform_within_limit"] = min(within, key=lambda u: u["bits"]) if within else None
        _log(f"plan: {best['bits']:.3f} bits/weight, {evaluator.metric} loss {best['loss'] * 100:.3f}% "
             f"(limit {limit * 100:g}%)", quiet)
    report["seconds"] = time.time() - t0
    if outp:
        outp.mkdir(parents=True, exist_ok=True)
        if best is not None:
            (outp / "plan.json").write_text(json.dumps(report["plan"], indent=1))
        (outp / "search.json").write_text(json.dumps(report, indent=1))
        rows = _figures(outp, store, table, cands, best, limit if budget is None else None, evaluator.metric,
                        loaded.name)
        from ..report_html import write_search_html

        write_search_html(report, outp, list(store.points.values()), rows)
    return report


def _figures(outp: Path, store: PointStore, table, cands, best, limit, metric, name) -> list:
    """pareto.png and layers.png; returns the per-layer rows of the chosen plan (for report.html)."""
    from .plots import layer_chart, pareto_plot

    label = {"perplexity": "perplexity increase", "cosine": "1 - cosine to fp32",
             "spearman": "1 - Spearman of similarities"}[metric]
    pts = list(store.points.values())
    pareto_plot(pts, outp / "pareto.png", label, limit, best, title=f"{name}: measured configurations")
    rows = []
    if best is not None:
        cheapest_sens = {}
        bits = {}
        meas = table.values.get("measured") or next(iter(table.values.values()))
        for c in cands:
            cheapest_sens[c.name] = max(meas[c.name].values())
            for s in c.specs:
                bits[f"{c.name}|{s}"] = true_bits(s, c.shape)
            spec = best["choice"].get(c.name)
            if spec is not None:
                rows.append({"name": c.name, "spec": spec, "bits": bits[f"{c.name}|{spec}"],
                             "at_choice": meas[c.name].get(spec), "sensitivity": cheapest_sens[c.name]})
        layer_chart(best["choice"], cheapest_sens, bits, outp / "layers.png", title=f"{name}: chosen formats")
    return rows
