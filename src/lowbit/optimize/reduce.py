"""Exact reductions of an allocation problem before the solver sees it.

Layers linked by pair terms form components of the pair graph. Both objectives (least loss under a
budget, least cost under a loss limit) only ever need a component's configurations that are not
dominated in (cost, loss), so:

* a layer without pair terms keeps its Pareto-optimal candidates;
* when every component is a path (each layer paired with at most its two neighbours, no cycle: the
  neighbour terms within a block), each is replaced by one group whose items are its Pareto-optimal
  configurations, found by dynamic programming along the path (a front per last choice, merged), and
  no pair term is left;
* otherwise paired layers stay layers with their pair terms; a candidate is dropped when another of the
  same layer costs no more and is no worse whatever the neighbours choose (own loss difference plus,
  per pair, the largest difference over the neighbour's candidates, <= 0), repeated to a fixpoint.

Every reduction keeps an optimal solution of either objective, so the reduced problem has the same
optimum. :class:`Reduced` maps its choices back to one candidate per original layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .problem import Problem, pareto

FRONT_CAP = 20000  # a path whose fronts grow past this many points stays a general component


@dataclass
class Reduced:
    problem: Problem             # one "layer" per group; pair terms only between general layers
    layers: List[Tuple[int, ...]]  # the original layers of each group
    configs: List[np.ndarray]    # [items, len(layers)]: original candidate index per layer of a group

    def expand(self, choice: Sequence[int], n_layers: int) -> List[int]:
        out = [0] * n_layers
        for g, i in enumerate(choice):
            for l, c in zip(self.layers[g], self.configs[g][int(i)]):
                out[l] = int(c)
        return out


def _edges(p: Problem) -> Dict[Tuple[int, int], np.ndarray]:
    """Pair terms as undirected edges (a < b), terms of the same two layers summed."""
    edges: Dict[Tuple[int, int], np.ndarray] = {}
    for (a, b), q in p.pairs.items():
        key, m = ((a, b), q) if a < b else ((b, a), q.T)
        edges[key] = edges[key] + m if key in edges else m.copy()
    return edges


def _components(n: int, edges) -> List[List[int]]:
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for a, b in edges:
        parent[find(a)] = find(b)
    comps: Dict[int, List[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return sorted(comps.values(), key=lambda c: c[0])


def _path_order(comp: List[int], edges) -> Optional[List[int]]:
    """The layers of ``comp`` in path order, or None when the component is not a path."""
    nbr: Dict[int, List[int]] = {l: [] for l in comp}
    for a, b in edges:
        if a in nbr:
            nbr[a].append(b)
            nbr[b].append(a)
    if sum(len(v) for v in nbr.values()) != 2 * (len(comp) - 1) or any(len(v) > 2 for v in nbr.values()):
        return None
    start = min(l for l in comp if len(nbr[l]) <= 1)
    order, prev = [start], None
    while len(order) < len(comp):
        nxt = [m for m in nbr[order[-1]] if m != prev]
        prev = order[-1]
        order.append(nxt[0])
    return order


def _oriented(edges, a: int, b: int) -> np.ndarray:
    return edges[(a, b)] if a < b else edges[(b, a)].T


def path_front(p: Problem, order: List[int], edges, cap: int = FRONT_CAP):
    """(cost, loss, configs) of the Pareto-optimal configurations of a path, or None past ``cap``."""
    l0 = order[0]
    # per candidate of the last layer: the front of the path so far ending in that candidate
    fronts = [(p.cost[l0][c:c + 1], p.loss[l0][c:c + 1], np.array([[c]])) for c in range(p.loss[l0].size)]
    for a, b in zip(order, order[1:]):
        q = _oriented(edges, a, b)
        cs = np.concatenate([f[0] for f in fronts])
        base = np.concatenate([f[1] for f in fronts])
        prev = np.concatenate([np.full(f[0].size, i) for i, f in enumerate(fronts)])
        cf = np.concatenate([f[2] for f in fronts])
        new = []
        for cb in range(p.loss[b].size):
            c2 = cs + p.cost[b][cb]
            l2 = base + q[prev, cb] + p.loss[b][cb]
            keep = pareto(c2, l2)
            new.append((c2[keep], l2[keep], np.concatenate([cf[keep], np.full((keep.size, 1), cb)], 1)))
        fronts = new
        if sum(f[0].size for f in fronts) > cap:
            return None
    cs = np.concatenate([f[0] for f in fronts])
    ls = np.concatenate([f[1] for f in fronts])
    cf = np.concatenate([f[2] for f in fronts])
    keep = pareto(cs, ls)
    return cs[keep], ls[keep], cf[keep]


def prune_dominated(p: Problem, layers: List[int], edges) -> Dict[int, np.ndarray]:
    """Candidates kept per layer of general components (see the module doc), to a fixpoint."""
    keep = {l: np.arange(p.loss[l].size) for l in layers}
    nbrs: Dict[int, List[Tuple[int, np.ndarray]]] = {l: [] for l in layers}
    for (a, b), q in edges.items():
        if a in nbrs:
            nbrs[a].append((b, q))
            nbrs[b].append((a, q.T))
    changed = True
    while changed:
        changed = False
        for l in layers:
            k = keep[l]
            d, c = p.loss[l][k], p.cost[l][k]
            # delta[i, j]: the largest loss change when candidate j replaces i, whatever the neighbours
            delta = d[None, :] - d[:, None]
            for o, q in nbrs[l]:
                qq = q[np.ix_(k, keep[o])]
                delta = delta + (qq[None, :, :] - qq[:, None, :]).max(axis=2)
            idx = np.arange(k.size)
            dom = (c[None, :] <= c[:, None]) & (delta <= 0)
            dom &= (c[None, :] < c[:, None]) | (delta < 0) | (idx[None, :] < idx[:, None])
            np.fill_diagonal(dom, False)
            alive = np.ones(k.size, bool)
            for i in np.lexsort((-d, -c)):  # the likeliest dominated first; a dominator must be alive
                if (dom[i] & alive).any():
                    alive[i] = False
            if not alive.all():
                keep[l] = k[alive]
                changed = True
    return keep


def reduce(p: Problem, cap: int = FRONT_CAP) -> Reduced:
    """The reduced problem (module doc) with the map back to the original layers."""
    edges = _edges(p)
    comps = _components(len(p.loss), edges)
    # fronts only when they take every pair term out of the program: measured on the decoder-shaped
    # benchmark, fronts (large groups) next to a remaining paired component make HiGHS slower than
    # the per-layer program with dominated candidates dropped
    orders = {i: _path_order(c, edges) for i, c in enumerate(comps) if len(c) > 1}
    fronts = {}
    if all(o is not None for o in orders.values()):
        for i, o in orders.items():
            fronts[i] = path_front(p, o, edges, cap)
            if fronts[i] is None:
                fronts = {}
                break
    groups: List[Tuple[Tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]] = []
    general: List[int] = []
    for i, comp in enumerate(comps):
        if len(comp) == 1:
            l = comp[0]
            k = pareto(p.cost[l], p.loss[l])
            groups.append(((l,), p.cost[l][k], p.loss[l][k], k[:, None]))
        elif i in fronts:
            groups.append((tuple(orders[i]), *fronts[i]))
        else:
            general.extend(comp)
            groups.extend(((l,), None, None, None) for l in comp)
    keep = prune_dominated(p, general, edges) if general else {}
    gen_index: Dict[int, int] = {}
    loss, cost, layers, configs = [], [], [], []
    for g, (ls, c, d, cf) in enumerate(groups):
        if c is None:
            l = ls[0]
            gen_index[l] = g
            c, d, cf = p.cost[l][keep[l]], p.loss[l][keep[l]], keep[l][:, None]
        loss.append(d)
        cost.append(c)
        layers.append(ls)
        configs.append(cf)
    pairs = {}
    for (a, b), q in edges.items():
        if a in gen_index:  # edges of path components live inside their fronts
            pairs[(gen_index[a], gen_index[b])] = q[np.ix_(keep[a], keep[b])]
    return Reduced(Problem(loss, cost, pairs), layers, configs)
