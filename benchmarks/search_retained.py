"""Retention candidates in the search, measured on MiniLM: the best plan at a few budgets (true
bits per weight, side tensors included) from the INT candidates alone and from the INT candidates
plus "with high-impact retention" variants (SPEC+keepR@int8). Metric: 1 - mean cosine to the fp32
embeddings (%) on held-out sentences; RTN; measured sensitivities, no pair terms.

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 benchmarks/search_retained.py --out runs/retained
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit.jobs import run_search
from lowbit.models.loader import load_model
from lowbit.search.candidates import INT_CANDIDATES

RETAINED = ("int2:g64+keep1%@int8", "int3:g64+keep1%@int8", "int3:g128+keep1%@int8", "int3:g128+keep0.5%@int8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/retained")
    ap.add_argument("--budgets", default="3.0,3.5,4.25")
    ap.add_argument("--sentences", type=int, default=128)
    args = ap.parse_args()
    loaded = load_model("minilm")
    sets = {"int": list(INT_CANDIDATES), "int + retention": list(INT_CANDIDATES) + list(RETAINED)}
    rows = []
    for label, cands in sets.items():
        out = Path(args.out) / label.replace(" ", "").replace("+", "_")
        for b in map(float, args.budgets.split(",")):
            t = time.time()
            rep = run_search(None, str(out), budget=b, candidates=",".join(cands), pairs=False,
                             sentences=args.sentences, uniform=False, quiet=True, loaded=loaded)
            plan = rep["plan"]
            n_ret = len((plan.get("retain") or {}).get("ratios", {}))
            rows.append((label, b, plan["bits_per_weight"], plan["loss"], n_ret, time.time() - t))
            print(f"{label:<16} budget {b:5.2f}: {plan['bits_per_weight']:.3f} b/w, 1-cos {plan['loss'] * 100:.3f}%, "
                  f"{n_ret} layers retain ({time.time() - t:.0f} s)", flush=True)
    print(f"\n| budget (b/w) | {' | '.join(sets)} |\n|---|" + "---|" * len(sets))
    for b in map(float, args.budgets.split(",")):
        cells = [next(f"{r[3] * 100:.3f}% [{r[2]:.3f}, {r[4]} retain]" for r in rows if r[0] == s and r[1] == b)
                 for s in sets]
        print(f"| {b:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
