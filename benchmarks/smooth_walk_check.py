"""Does descending the alpha grid (``--smooth auto``'s default search) choose what scoring every alpha
chooses? For each scheme and rotation, on one float model and one set of calibration batches:

1. the transforms with the exhaustive search (every alpha of the grid scored; report.json keeps
   every error), and, from those very errors, the alpha ``grid_walk`` would reach;
2. the transforms with the walk itself (the default), whose choices must equal that simulation
   (the errors are deterministic), and the seconds of both.

    python3 benchmarks/smooth_walk_check.py --model minilm --calib 32 --seq-len 128
    python3 benchmarks/smooth_walk_check.py --model smollm2 --calib 16 --seq-len 512 --schemes w4a4,w4a8,nvfp4

Prints, per scheme x rotation: groups, groups where the walk's alpha differs from the exhaustive
one, the largest relative excess error where it does, points scored per group, and CPU seconds of the
transforms (1 thread) each way.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from lowbit.jobs import calibration_batches
from lowbit.models.loader import load_model
from lowbit.quant.plan import Plan
from lowbit.transforms import smooth as smooth_module
from lowbit.transforms.apply import apply_outlier_transforms


def walk_choice(errs: dict, grid) -> str:
    """The key (``"none"`` or an alpha) the walk picks given every alpha's error."""
    alphas = sorted(grid)
    i = smooth_module.grid_walk(len(alphas), lambda j: errs[f"{alphas[j]:g}"])
    walked = f"{alphas[i]:g}"
    return "none" if errs["none"] <= errs[walked] else walked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--schemes", default="w4a4,w4a8,nvfp4,mxfp4")
    ap.add_argument("--rotations", default="none,hadamard")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    batches = calibration_batches(loaded, args.calib, args.seq_len)
    grid = smooth_module.ALPHA_GRID
    rows = []
    for scheme in args.schemes.split(","):
        plan = Plan.from_scheme(scheme)
        for rotate in args.rotations.split(","):
            recs, cpu = {}, {}
            for walk in (False, True):
                smooth_module.SEARCH_WALK = walk
                m = copy.deepcopy(loaded.model)
                c = time.process_time()
                recs[walk] = apply_outlier_transforms(m, plan, batches, rotate=rotate, smooth="auto")["smoothing"]
                cpu[walk] = time.process_time() - c
            smooth_module.SEARCH_WALK = True
            full, walked = recs[False], recs[True]
            differ, excess, scored, mismatch = 0, 0.0, [], 0
            for name, errs in full["search_error"].items():
                pick = walk_choice(errs, grid)
                best = min(errs, key=errs.get)
                if pick != best:
                    differ += 1
                    excess = max(excess, errs[pick] / errs[best] - 1)
                live = walked["chosen"][name]
                mismatch += (("none" if live is None else f"{live:g}") != pick)
                scored.append(len(walked["search_error"][name]))
            r = {"scheme": scheme, "rotate": rotate, "groups": len(full["chosen"]), "walk_differs": differ,
                 "max_excess_error": excess, "live_vs_simulated_mismatch": mismatch,
                 "points_scored_mean": sum(scored) / len(scored), "points_exhaustive": len(grid) + 1,
                 "cpu_exhaustive": cpu[False], "cpu_walk": cpu[True],
                 "stats": full.get("stats")}
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"args": vars(args), "rows": rows}, fh, indent=1)
    print(f"\n{args.model}, {args.calib}x{args.seq_len} calibration; --smooth auto, grid {list(grid)} + none; "
          "transforms CPU seconds (1 thread)")
    print("| scheme | rotate | groups | walk picks another alpha | worst excess error | live = simulated | "
          "points scored / group | transforms s, exhaustive | transforms s, walk |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['rotate']} | {r['groups']} | {r['walk_differs']} | "
              f"{r['max_excess_error']:.2%} | {'yes' if not r['live_vs_simulated_mismatch'] else 'NO'} | "
              f"{r['points_scored_mean']:.2f} of {r['points_exhaustive']} | {r['cpu_exhaustive']:.1f} | "
              f"{r['cpu_walk']:.1f} |")


if __name__ == "__main__":
    main()
