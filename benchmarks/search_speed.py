"""Speed of the exact allocator on a synthetic instance shaped like a 30-block decoder: 7 linears per
block (210+ layers) x 10 candidates, convex-ish loss-vs-bits curves, pairwise terms for every pair
of neighbours within a block. Prints one row per (layers, pairs, objective).

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 benchmarks/search_speed.py [--blocks 32]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lowbit.search.allocate import Problem, min_cost, min_loss

BITS = np.array([2.25, 3.25, 3.125, 4.25, 4.125, 4.5, 4.25, 4.5, 8.125, 8.03])


def synthetic(blocks: int, per_block: int = 7, seed: int = 0, with_pairs: bool = True) -> Problem:
    rng = np.random.default_rng(seed)
    loss, cost, pairs = [], [], {}
    for b in range(blocks):
        for j in range(per_block):
            n = rng.choice([576 * 576, 576 * 192, 576 * 1536])
            sens = rng.lognormal(0, 1.5)
            noise = rng.uniform(0.7, 1.3, BITS.size)
            loss.append(sens * 4.0 ** (-BITS) * noise)       # error ~ 4^-bits
            cost.append(BITS * n)
    if with_pairs:
        L = len(loss)
        for a in range(L - 1):
            if a // per_block == (a + 1) // per_block:
                rho = rng.uniform(-0.3, 0.6)
                pairs[(a, a + 1)] = rho * np.sqrt(np.outer(loss[a], loss[a + 1]))
    return Problem(loss, cost, pairs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=32)
    args = ap.parse_args()
    print(f"{'layers':>6} {'cands':>5} {'pairs':>5} {'objective':>22} {'seconds':>8} status")
    for with_pairs in (False, True):
        p = synthetic(args.blocks, with_pairs=with_pairs)
        n = sum(c[0] / BITS[0] for c in p.cost)
        for target in (3.0, 3.5, 4.25):
            t = time.time()
            a = min_loss(p, budget=target * n)
            print(f"{len(p.loss):>6} {BITS.size:>5} {len(p.pairs):>5} {'min loss @ ' + str(target) + ' b/w':>22} "
                  f"{time.time() - t:>8.2f} {a.status} ({a.cost / n:.3f} b/w)")
        limit = min_loss(p, budget=3.5 * n).loss
        t = time.time()
        a = min_cost(p, limit)
        print(f"{len(p.loss):>6} {BITS.size:>5} {len(p.pairs):>5} {'min cost @ loss limit':>22} "
              f"{time.time() - t:>8.2f} {a.status} ({a.cost / n:.3f} b/w)")


if __name__ == "__main__":
    main()
