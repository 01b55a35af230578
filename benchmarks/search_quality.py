"""Quality of `lowbit search` at equal true bits per weight, on a real model.

For each budget (average true bits per weight: codes + scales), the exact allocator picks a plan
from each estimator's predictions, the plan is built with RTN and *measured* on held-out data:

* uniform:       the best uniform configuration whose true bits fit the budget;
* hawq-v2:       Hutchinson trace x ||dW||^2, no dependency terms (HAWQ-V2-style);
* fisher:        Fisher diagonal x dW^2;
* measured:      measured single-layer loss changes;
* measured+pairs: plus the inter-layer dependency terms (the program's optimum);
* search:        what `lowbit search` returns at that budget: the best of a few exactly solved plans
                 (measured with/without pairs; all / integer / non-integer candidates) as scored on
                 the calibration data (lowbit.search.portfolio);
* int-only:      measured+pairs restricted to the INT candidates (the program's optimum);
* int-only search: `lowbit search --candidates int` at that budget (its portfolio).

It reuses (and fills) the sensitivity cache and the measured points of a `lowbit search --out DIR`
run, so run the search first with the same calibration settings, e.g.

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 -m lowbit.cli search minilm --estimators hutchinson,fisher --out runs/minilm
    PYTHONPATH=src OMP_NUM_THREADS=1 python3 benchmarks/search_quality.py minilm --out runs/minilm

and it prints a markdown table (metric loss in %, lower is better; true bits of the measured plan
in brackets), the estimators' Spearman on random mixed configurations, and the accuracy-target
result of the search run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit.models.loader import load_model
from lowbit.optimize import Infeasible, min_loss
from lowbit.search.bisection import PointStore, choice_of, uniform_choices
from lowbit.search.candidates import (INT_CANDIDATES, layer_candidates, parse_candidates, quantizable_layers,
                                      restrict)
from lowbit.search.cost import CostModel, bits_per_weight, cost_matrix
from lowbit.search.job import calibration_size
from lowbit.search.measure import MetricEvaluator
from lowbit.search.objective import Objective, make_batches
from lowbit.search.portfolio import CalibrationScores, Portfolio
from lowbit.search.sensitivity import SensitivitySettings, compute, rank_agreement

# (column, estimator, pair terms, candidate subset, portfolio)
VARIANTS = [("hawq-v2", "hutchinson", False, None, False), ("fisher", "fisher", False, None, False),
            ("measured", "measured", False, None, False), ("measured+pairs", "measured", True, None, False),
            ("search", "measured", True, None, True), ("int-only", "measured", True, INT_CANDIDATES, False),
            ("int-only search", "measured", True, INT_CANDIDATES, True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="minilm")
    ap.add_argument("--out", required=True, help="the `lowbit search --out` directory to reuse")
    ap.add_argument("--budgets", default="3.0,3.5,4.25")
    ap.add_argument("--calib", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--hutchinson-samples", type=int, default=4)
    ap.add_argument("--rank-configs", type=int, default=16)
    ap.add_argument("--estimators", default="measured,hutchinson,fisher",
                    help="which to compute/use; without 'measured' the measured and pair variants are skipped")
    ap.add_argument("--measure-uniform", action="store_true",
                    help="measure missing uniform configurations (default: use those the search run measured)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    loaded = load_model(args.model)
    layers = quantizable_layers(loaded.model)
    specs = parse_candidates("default")
    cands = layer_candidates(layers, specs)
    costs = cost_matrix(cands, CostModel("bits"))
    n_cal, L = calibration_size(loaded.kind, "measured" if "measured" in args.estimators.split(",") else "fisher")
    obj = Objective(loaded.model, loaded.kind, make_batches(loaded, args.calib or n_cal, args.seq_len or L, batch_size=2))
    ests = tuple(args.estimators.split(","))
    table = compute(obj, layers, cands, costs, ests, "measured" in ests,
                    SensitivitySettings(hutchinson_samples=args.hutchinson_samples), out / "sensitivity.json",
                    loaded.name)
    ev = MetricEvaluator(loaded, layers, None, "rtn", args.eval_tokens, 512, args.sentences)
    store = PointStore(out / "points.jsonl", {"method": "rtn", **ev.settings})
    base = store.get({})
    ev.baseline = ({k: base[k] for k in ("perplexity", "cosine_mean", "cosine_min", "spearman") if k in base}
                   if base else ev.measure_baseline())

    def measure(choice, kind, label=""):
        pt = store.get(choice)
        if pt is None:
            pt = store.add({"kind": kind, "label": label, "choice": choice, "bits": bits_per_weight(choice, cands),
                            **ev.measure(choice)})
        return pt

    n = sum(c.numel for c in cands)
    scores = CalibrationScores.rtn(obj, layers, out / "calibration_scores.jsonl", loaded.name)
    rows = []
    variants = [v for v in VARIANTS if v[1] in table.values and (not v[2] or table.pairs)]
    for b in [float(x) for x in args.budgets.split(",")]:
        row = {"budget": b}
        for name, est, pairs, subset, portfolio in variants:
            cs, ks = restrict(cands, costs, subset) if subset else (cands, costs)
            try:
                problem = table.problem(est, ks, pairs, cs)
                if portfolio:
                    pf = Portfolio(lambda wp, c_, k_, e=est: table.problem(e, k_, wp, c_), cs, ks, scores, pairs=pairs,
                                   log=print)
                    alloc = pf.best(b * n, problem)[0]
                else:
                    alloc = min_loss(problem, b * n)
            except Infeasible as e:
                row[name] = None
                print(f"{name} @ {b}: {e}")
                continue
            pt = measure(choice_of(alloc, cs), "hawq" if est == "hutchinson" else "budget", f"{name}@{b}")
            row[name] = (pt["loss"], pt["bits"], sorted(set(pt["choice"].values())))
        rows.append(row)
        print(json.dumps(row), flush=True)
    store = PointStore(out / "points.jsonl", {"method": "rtn", **ev.settings})  # re-read: a search run may have measured uniform points meanwhile
    uni = {}
    for s_, c in uniform_choices(cands, specs).items():
        pt = store.get(c) or (measure(c, "uniform", s_) if args.measure_uniform else None)
        if pt is not None:
            uni[s_] = pt
    missing = [s_ for s_ in specs if s_ not in uni]
    for r in rows:
        fit = [(p["loss"], s_, p["bits"]) for s_, p in uni.items() if p["bits"] <= r["budget"] + 1e-9]
        r["uniform"] = min(fit) if fit else None

    metric = {"perplexity": "perplexity increase", "cosine": "1 - cosine", "spearman": "1 - spearman"}[ev.metric]
    print(f"\n{loaded.name}: {metric} in % (RTN, {json.dumps(ev.settings)}; baseline {json.dumps(ev.baseline)})\n")
    if missing:
        print(f"uniform configurations not measured (not compared): {', '.join(missing)}")
    head = ["bits/weight", "best uniform"] + [v[0] for v in variants]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        u = r["uniform"]
        cells = [f"{r['budget']:g}", f"{u[0] * 100:.3f} ({u[1]}, {u[2]:.3f})" if u else "none fits"]
        for v in variants:
            x = r[v[0]]
            cells.append(f"{x[0] * 100:.3f} [{x[1]:.3f}]" if x else "infeasible")
        print("| " + " | ".join(cells) + " |")
    if args.rank_configs:
        ra = rank_agreement(table, obj, layers, cands, costs, args.rank_configs)
        print(f"\nSpearman of predicted vs measured calibration loss on {args.rank_configs} random mixed configurations: "
              + ", ".join(f"{k} {v:.3f}" for k, v in ra["spearman"].items()))
    rep = out / "search.json"
    if rep.is_file():
        s = json.loads(rep.read_text())
        if s.get("plan"):
            p, lim = s["plan"], s["limit"]["max_loss"]
            within = [(q["bits"], sp) for sp, q in uni.items() if q["loss"] <= lim]
            print(f"\naccuracy target {lim * 100:g}%: plan {p['bits_per_weight']:.3f} b/w, measured loss "
                  f"{p['loss'] * 100:.3f}%; smallest uniform within the limit: "
                  + (f"{min(within)[1]} at {min(within)[0]:.3f} b/w" if within else "none"))
    print(f"\nsensitivity seconds: {json.dumps(table.seconds)}")


if __name__ == "__main__":
    main()
