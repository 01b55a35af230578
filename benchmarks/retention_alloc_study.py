"""Retention ratio program, several loss models from one measurement: the layer curves are measured
once on a wide ratio grid (with the Fisher weights, the unweighted errors and the block
sensitivities), then the program is solved for each objective and sub-grid, and each allocation is
quantized and evaluated next to the fixed ratio, all at the same true bits/weight.

    python benchmarks/retention_alloc_study.py --model smollm2 --scheme w3g64 --ratio 1% \
        --calib 16 --seq-len 512 --eval-tokens 4096 --curves rtn \
        --variants fixed,block,fisher,fisher:wide --json out.json

Variants: fixed (the base ratio everywhere), OBJECTIVE[:wide] with OBJECTIVE fisher or block and
wide = the whole measured grid (0..8 x the ratio) instead of the default 0..4 x.
For every allocation the table shows the program's modelled loss (fisher: predicted increase of the
mean calibration cross-entropy in nats, summed over layers, pair terms included) next to the measured
metric, so the gap between the loss model and the model's real loss is visible.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from lowbit.jobs import EvalSettings, calibration_batches, run_quantize
from lowbit.models.loader import load_model
from lowbit.ptq.retain_alloc import (GRID_MULTIPLIERS, as_block_objective, measure_curves, ratio_grid, restrict,
                                     solve_allocation)
from lowbit.ptq.retention import RetainConfig, RetainFormat, parse_ratio
from lowbit.quant.plan import Plan

WIDE = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def _kind(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "dense" else parts[-1]  # BERT: attention.output.dense, ...


def summary(ratios: dict) -> str:
    """Mean ratio per layer type (q_proj, down_proj, ...)."""
    by = defaultdict(list)
    for n, r in ratios.items():
        by[_kind(n)].append(r)
    return ", ".join(f"{k} {sum(v) / len(v):.2%}" for k, v in sorted(by.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--scheme", default="w3g64")
    ap.add_argument("--ratio", default="1%")
    ap.add_argument("--format", default="int8")
    ap.add_argument("--curves", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--variants", default="fixed,block,fisher,fisher:wide")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--solve-only", action="store_true", help="print the allocations, quantize nothing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ratio, rfmt = parse_ratio(args.ratio), RetainFormat.parse(args.format)
    plan = Plan.from_scheme(args.scheme)
    loaded = load_model(args.model)
    batches = calibration_batches(loaded, args.calib, args.seq_len)
    t = time.time()
    curves, pairs = measure_curves(loaded.model, plan, batches, rfmt, ratio, objective="fisher",
                                   curves=args.curves, multipliers=WIDE,
                                   gptq_kw=dict(block_size=128, percdamp=0.01, act_order=True))
    print(f"curves measured in {time.time() - t:.0f} s ({len(curves)} layers, {len(pairs)} pairs)", flush=True)
    default_grid = ratio_grid(ratio, GRID_MULTIPLIERS)
    out = {"args": vars(args), "rows": []}
    allocs = {}
    fisher_curves = [restrict(c, default_grid) for c in curves]
    for v in [x for x in args.variants.split(",") if x]:
        if v == "fixed":
            allocs[v] = None
            continue
        objective, _, wide = v.partition(":")
        if objective not in ("fisher", "block") or wide not in ("", "wide"):
            raise SystemExit(f"unknown variant {v!r}; accepted: fixed, fisher[:wide], block[:wide]")
        cs = curves if wide else fisher_curves
        if objective == "block":
            cs = [as_block_objective(c) for c in cs]
        allocs[v] = solve_allocation(cs, pairs, ratio)
    # the fisher model's prediction for every allocation (fixed included), on the wide grid
    def fisher_loss(ratios):
        from lowbit.optimize import Problem
        import numpy as np

        idx = {c.name: i for i, c in enumerate(curves)}
        a = [np.array(c.errors) for c in curves]
        terms = {}
        for p, q, rho in pairs:
            if rho > 0:
                terms[(idx[p], idx[q])] = 2 * rho * np.sqrt(np.outer(a[idx[p]], a[idx[q]]))
        prob = Problem(a, [np.array(c.bits, float) for c in curves], terms)
        choice = [c.ratios.index(min(c.ratios, key=lambda r: abs(r - ratios.get(c.name, ratio)))) for c in curves]
        return prob.evaluate(choice)

    for v, alloc in allocs.items():
        ratios = alloc.ratios if alloc is not None else {c.name: ratio for c in curves}
        pred, bits = fisher_loss(ratios)
        weights = sum(c.shape[0] * c.shape[1] for c in curves)
        print(f"{v}: fisher-modelled loss increase {pred:.4f}, program bits/weight {bits / weights:.4f}; "
              f"{summary(ratios)}", flush=True)
        row = {"variant": v, "ratios": ratios, "fisher_modelled": pred, "program_bpw": bits / weights}
        if not args.solve_only:
            cfg = RetainConfig(ratio, rfmt, "obs", "fixed" if alloc is None else "optimized",
                               ratios=None if alloc is None else dict(ratios))
            t = time.time()
            rep = run_quantize(args.model, args.scheme, "gptq", None, calib=args.calib, seq_len=args.seq_len,
                               settings=EvalSettings(eval_tokens=args.eval_tokens or None), quiet=True,
                               loaded=load_model(args.model), retain=cfg)
            q = rep["quantized"]
            row.update(metric=q.get("perplexity", q.get("cosine_mean")), spearman=q.get("spearman"),
                       baseline=rep["baseline"].get("perplexity", 1.0), bits_per_weight=q["bits_per_weight"],
                       kept=sum(l["retain"]["kept"] for l in rep["layers"] if l.get("retain")),
                       seconds=time.time() - t)
            print(json.dumps({k: v for k, v in row.items() if k != "ratios"}), flush=True)
        out["rows"].append(row)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
    if not args.solve_only:
        print(f"\n{args.model} {args.scheme}, retain {args.ratio} at {args.format}, curves {args.curves}")
        print("| allocation | metric | true bits/weight | kept | fisher-modelled loss increase |")
        print("|---|---:|---:|---:|---:|")
        for r in out["rows"]:
            print(f"| {r['variant']} | {r['metric']:.4f} | {r['bits_per_weight']:.4f} | {r['kept']} | "
                  f"{r['fisher_modelled']:.4f} |")


if __name__ == "__main__":
    main()
