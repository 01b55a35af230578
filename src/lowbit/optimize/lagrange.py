"""Lagrangian bound, a local-search incumbent and exact item fixing for a multiple-choice knapsack:
pick one item per group, minimise sum f subject to sum g <= bound (no pair terms).

For any lam >= 0 and any feasible choice, sum f >= sum f + lam (sum g - bound) >= LB(lam) + r_i - min r,
where r = f + lam g within the item's group and LB(lam) = sum_groups min r - lam bound. So an item with
r_i - min r > UB - LB(lam) (UB: the value of any feasible choice) is in no choice better than UB and
can be removed before the exact solve. With lam maximising LB (the LP bound of the knapsack) and a
good UB, few items per group survive.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def _pad(vs: Sequence[np.ndarray], fill: float) -> np.ndarray:
    out = np.full((len(vs), max(v.size for v in vs)), fill)
    for i, v in enumerate(vs):
        out[i, :v.size] = v
    return out


def dual_bound(F: np.ndarray, G: np.ndarray, bound: float, iters: int = 80) -> Optional[Tuple[float, float]]:
    """(lam, LB(lam)) with lam close to the maximiser of the concave LB, its choice feasible.
    F, G: padded [groups, items] (F = inf where no item). None when no lam makes the choice feasible."""
    rows = np.arange(F.shape[0])

    def excess(lam):
        return G[rows, np.argmin(F + lam * G, axis=1)].sum() - bound

    if excess(0.0) <= 0:
        return 0.0, float(F.min(axis=1).sum())
    hi = 1.0
    for _ in range(200):
        if excess(hi) <= 0:
            break
        hi *= 2.0
    else:
        return None
    lo = 0.0
    for _ in range(iters):  # the excess is non-increasing in lam
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi, float((F + hi * G).min(axis=1).sum() - hi * bound)


def improve(f: List[np.ndarray], g: List[np.ndarray], bound: float, choice: List[int],
            rounds: int = 500) -> List[int]:
    """Best single-item change or two-group swap that lowers sum f within the bound, repeated."""
    choice = list(choice)
    n = len(choice)
    grp = np.concatenate([np.full(v.size, k) for k, v in enumerate(f)])
    item = np.concatenate([np.arange(v.size) for v in f])
    fa, ga = np.concatenate(f), np.concatenate(g)
    starts = np.cumsum([0] + [v.size for v in f])[:-1]
    for _ in range(rounds):
        cur = starts + np.asarray(choice)
        tot_f, tot_g = fa[cur].sum(), ga[cur].sum()
        df, dg = fa - fa[cur][grp], ga - ga[cur][grp]
        slack = bound - tot_g
        single = np.where(dg <= slack, df, np.inf)
        i1 = int(np.argmin(single))
        # swaps: for move i the best partner j of another group with dg_j <= slack - dg_i; prefix minima
        # over moves sorted by dg, keeping the best two of different groups
        o = np.argsort(dg, kind="stable")
        sdf, sgr = df[o], grp[o]
        m = o.size
        b1 = np.empty(m, int)
        b2 = np.empty(m, int)
        c1 = c2 = -1
        for t in range(m):
            v, k = sdf[t], sgr[t]
            if c1 < 0 or v < sdf[c1]:
                if c1 >= 0 and sgr[c1] != k:
                    c2 = c1
                c1 = t
            elif sgr[c1] != k and (c2 < 0 or v < sdf[c2]):
                c2 = t
            b1[t], b2[t] = c1, c2
        pos = np.searchsorted(dg[o], slack - dg, side="right") - 1
        ok = pos >= 0
        pos = np.maximum(pos, 0)
        first, second = b1[pos], b2[pos]
        partner = np.where(sgr[first] == grp, second, first)
        ok &= partner >= 0
        pair = np.where(ok, df + np.where(partner >= 0, sdf[np.maximum(partner, 0)], 0.0), np.inf)
        i2 = int(np.argmin(pair))
        eps = 1e-13 * max(1.0, abs(tot_f))
        if min(single[i1], pair[i2]) >= -eps:
            break
        if single[i1] <= pair[i2]:
            choice[grp[i1]] = int(item[i1])
        else:
            j = o[partner[i2]]
            choice[grp[i2]] = int(item[i2])
            choice[grp[j]] = int(item[j])
    return choice


def fix_items(f: List[np.ndarray], g: List[np.ndarray], bound: float,
              candidates: int = 4000) -> Optional[Tuple[List[np.ndarray], List[int], float, float, float]]:
    """(items kept per group, incumbent choice, UB, LB, lam) or None when the bound gives no lam
    (the caller then solves without fixing)."""
    F, G = _pad(f, np.inf), _pad(g, 0.0)
    d = dual_bound(F, G, bound)
    if d is None:
        return None
    lam, lb = d
    R = F + lam * G
    red = R - R.min(axis=1, keepdims=True)
    choice = [int(i) for i in np.argmin(R, axis=1)]  # feasible: lam is on the feasible side
    # local search over the items of smallest reduced cost (the others can hardly help)
    cut = np.partition(red[np.isfinite(red)], min(candidates, np.isfinite(red).sum()) - 1)[
        min(candidates, np.isfinite(red).sum()) - 1]
    sub = [np.nonzero(r[:v.size] <= cut)[0] for r, v in zip(red, f)]
    pos = [int(np.nonzero(s == c)[0][0]) for s, c in zip(sub, choice)]
    pos = improve([v[s] for v, s in zip(f, sub)], [v[s] for v, s in zip(g, sub)], bound, pos)
    choice = [int(s[i]) for s, i in zip(sub, pos)]
    ub = float(sum(v[c] for v, c in zip(f, choice)))
    thr = ub - lb + 1e-9 * max(abs(ub), abs(lb))
    keep = []
    for k, (r, v) in enumerate(zip(red, f)):
        kk = np.nonzero(r[:v.size] <= thr)[0]
        if choice[k] not in kk:
            kk = np.sort(np.append(kk, choice[k]))
        keep.append(kk)
    return keep, choice, ub, lb, lam


def knapsack_exact(f: List[np.ndarray], g: List[np.ndarray], bound: float, lam: float, ub: float,
                   max_states: int = 200_000) -> Optional[List[int]]:
    """The optimal choice by dynamic programming over groups on (g, f) fronts of partial choices,
    pruned by the Lagrangian bound against ``ub`` (a feasible value) and by the cheapest completion.
    None when the fronts grow past ``max_states`` (the caller then uses the MILP)."""
    from .problem import pareto

    n = len(f)
    rmin = np.array([float((a + lam * b).min()) for a, b in zip(f, g)])
    gmin = np.array([float(b.min()) for b in g])
    # what the groups after k can at best add: sum of min r (Lagrangian) and of min g (feasibility)
    r_rest = np.concatenate([np.cumsum(rmin[::-1])[::-1][1:], [0.0]])
    g_rest = np.concatenate([np.cumsum(gmin[::-1])[::-1][1:], [0.0]])
    tol = 1e-9 * max(1.0, abs(ub))
    gtol = 1e-12 * max(1.0, abs(bound))
    sf, sg = np.zeros(1), np.zeros(1)
    conf = np.zeros((1, 0), dtype=np.int64)
    for k in range(n):
        m = f[k].size
        cf = (sf[:, None] + f[k][None, :]).ravel()
        cg = (sg[:, None] + g[k][None, :]).ravel()
        ok = (cg + g_rest[k] <= bound + gtol) & (cf + r_rest[k] - lam * (bound - cg) <= ub + tol)
        idx = np.nonzero(ok)[0]
        if idx.size == 0:
            return None
        keep = idx[pareto(cg[idx], cf[idx])]
        sf, sg = cf[keep], cg[keep]
        conf = np.concatenate([conf[keep // m], (keep % m)[:, None]], axis=1)
        if sf.size > max_states:
            return None
    best = int(np.argmin(sf))
    return [int(c) for c in conf[best]]
