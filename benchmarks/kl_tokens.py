"""How many calibration tokens the measured estimator needs (causal LM).

For random (layer, candidate) samples, the single-layer value is measured as KL(p_fp32 || p) on a few
calibration sizes and compared with the KL on a large calibration set (the reference); the older
estimator, the difference of two cross-entropies, is shown on the old default size. Prints the
relative error to the reference (median and 90th percentile), the Spearman rank correlation with
it, and how many values are negative.

    PYTHONPATH=src python3 benchmarks/kl_tokens.py smollm2 --samples 20 --sizes 2x256,4x256 --reference 16x256
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
from scipy.stats import spearmanr

from lowbit.models.loader import load_model
from lowbit.search.candidates import layer_candidates, parse_candidates, quantizable_layers
from lowbit.search.objective import Objective, make_batches
from lowbit.search.sensitivity import rtn_weight


def _size(s: str):
    n, L = s.lower().split("x")
    return int(n), int(L)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--sizes", default="2x256,4x256")
    ap.add_argument("--reference", default="16x256")
    ap.add_argument("--ce-size", default="4x256", help="size for the old cross-entropy difference ('' to skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    loaded = load_model(args.model)
    layers = quantizable_layers(loaded.model)
    cands = layer_candidates(layers, parse_candidates("default"))
    rng = random.Random(args.seed)
    picks = [(c.name, rng.choice(c.specs)) for c in rng.sample(cands, args.samples)]
    weights = [{n: rtn_weight(layers[n].weight, s)} for n, s in picks]

    def objective(size):
        n, L = _size(size)
        return Objective(loaded.model, loaded.kind, make_batches(loaded, n, L, batch_size=2))

    cols = {}
    secs = {}
    for size in [args.reference] + args.sizes.split(","):
        obj = objective(size)
        t = time.time()
        cols[f"KL {size}"] = np.array([obj.increase_with(layers, w) for w in weights])
        secs[f"KL {size}"] = (time.time() - t) / len(weights)
        print(f"KL {size}: {secs[f'KL {size}']:.2f} s per evaluation", flush=True)
    if args.ce_size:
        obj = objective(args.ce_size)
        base = obj.loss()
        t = time.time()
        cols[f"CE difference {args.ce_size}"] = np.array([obj.loss_with(layers, w) - base for w in weights])
        secs[f"CE difference {args.ce_size}"] = (time.time() - t) / len(weights)
    ref = cols.pop(f"KL {args.reference}")
    print(f"\n{args.samples} random (layer, candidate) samples of {loaded.name}; reference: KL on {args.reference} tokens "
          f"(values {ref.min():.2e} .. {ref.max():.2e} nats)\n")
    print("| estimate | s / evaluation | median rel. error | 90th pct rel. error | Spearman vs reference | negative |")
    print("|---|---|---|---|---|---|")
    for k, v in cols.items():
        rel = np.abs(v - ref) / ref
        print(f"| {k} | {secs[k]:.2f} | {np.median(rel):.3f} | {np.quantile(rel, 0.9):.3f} | "
              f"{spearmanr(v, ref).statistic:.3f} | {int((v < 0).sum())} |")
    print("\n| layer | spec | reference | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for i, (n, s) in enumerate(picks):
        print(f"| {n} | {s} | {ref[i]:.3e} | " + " | ".join(f"{v[i]:.3e}" for v in cols.values()) + " |")


if __name__ == "__main__":
    main()
