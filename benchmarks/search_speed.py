"""Speed of the exact allocator on synthetic instances shaped like a 32-block decoder: 7 linears per
block (224 layers) x 10 candidates, convex-ish loss-vs-bits curves; without pair terms, with a pair
term for every two neighbours within a block (paths), and with those plus every pair among the 6
most sensitive layers (a cyclic component across blocks, as ``lowbit search`` builds). Each program
is solved by the default (``fast``: exact reductions, then HiGHS or the knapsack programme) and by
the plain HiGHS program (``reference``), in the same run; the last column checks that both reach
the same optimum.

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 benchmarks/search_speed.py [--blocks 32] [--repeat 1]
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from lowbit.optimize import Problem, min_cost, min_loss

BITS = np.array([2.25, 3.25, 3.125, 4.25, 4.125, 4.5, 4.25, 4.5, 8.125, 8.03])


def synthetic(blocks: int, per_block: int = 7, seed: int = 0, with_pairs: bool = True, top: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    loss, cost, pairs, sens = [], [], {}, []
    for b in range(blocks):
        for j in range(per_block):
            n = rng.choice([576 * 576, 576 * 192, 576 * 1536])
            s = rng.lognormal(0, 1.5)
            noise = rng.uniform(0.7, 1.3, BITS.size)
            loss.append(s * 4.0 ** (-BITS) * noise)       # error ~ 4^-bits
            cost.append(BITS * n)
            sens.append(s)
    if with_pairs:
        L = len(loss)
        for a in range(L - 1):
            if a // per_block == (a + 1) // per_block:
                rho = rng.uniform(-0.3, 0.6)
                pairs[(a, a + 1)] = rho * np.sqrt(np.outer(loss[a], loss[a + 1]))
        for a, b in itertools.combinations(sorted(int(i) for i in np.argsort(sens)[-top:]) if top else [], 2):
            if (a, b) not in pairs:
                pairs[(a, b)] = rng.uniform(-0.3, 0.6) * np.sqrt(np.outer(loss[a], loss[b]))
    return Problem(loss, cost, pairs)


def _timed(fn, repeat):
    """(result or the exception it raised, best seconds)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.time()
        try:
            out = fn()
        except Exception as e:  # a solver that gives up is a result of the benchmark, not an error
            out = e
        best = min(best, time.time() - t)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="best of this many solves per cell")
    args = ap.parse_args()
    print(f"{'layers':>6} {'cands':>5} {'pairs':>5} {'objective':>22} {'reference s':>11} {'fast s':>7} "
          f"{'speed-up':>8} {'b/w':>6} {'optimum (fast)':>15} {'rel. diff':>9} status")
    for with_pairs, top in ((False, 0), (True, 0), (True, 6)):
        p = synthetic(args.blocks, with_pairs=with_pairs, top=top)
        n = sum(c[0] / BITS[0] for c in p.cost)
        limit = min_loss(p, budget=3.5 * n).loss
        cases = [(f"min loss @ {t} b/w", lambda m, t=t: min_loss(p, budget=t * n, method=m), "loss")
                 for t in (3.0, 3.5, 4.25)]
        cases.append(("min cost @ loss limit", lambda m: min_cost(p, limit, method=m), "cost"))
        for label, solve, obj in cases:
            ref, t_ref = _timed(lambda: solve("reference"), args.repeat)
            fast, t_fast = _timed(lambda: solve("fast"), args.repeat)
            head = f"{len(p.loss):>6} {BITS.size:>5} {len(p.pairs):>5} {label:>22} {t_ref:>11.2f} {t_fast:>7.2f} "
            if isinstance(fast, Exception) or isinstance(ref, Exception):
                print(head + f"fast: {fast if isinstance(fast, Exception) else 'ok'} | "
                      f"reference: {ref if isinstance(ref, Exception) else 'ok'}", flush=True)
                continue
            a, b = getattr(fast, obj), getattr(ref, obj)
            print(head + f"{t_ref / t_fast:>7.1f}x {fast.cost / n:>6.3f} {a:>15.9g} {(a - b) / abs(b):>9.1e} "
                  f"{fast.status}/{ref.status}", flush=True)


if __name__ == "__main__":
    main()
