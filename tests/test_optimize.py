"""lowbit.optimize: the exact allocator's reductions (fronts, dominance, Lagrangian fixing, knapsack
dynamic programme) against brute force and against the plain HiGHS program."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.optimize import Infeasible, Problem, min_cost, min_loss
from lowbit.optimize.lagrange import fix_items, knapsack_exact
from lowbit.optimize.reduce import reduce


@st.composite
def problems(draw):
    """Up to 6 layers; pair graphs that are empty, paths, trees or cyclic, terms of either sign,
    repeated (a, b)/(b, a) terms, ties in cost and in loss."""
    n = draw(st.integers(1, 6))
    sizes = [draw(st.integers(1, 4)) for _ in range(n)]
    val = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]) | st.floats(0, 5, allow_nan=False, width=32)
    loss = [np.array([draw(val) for _ in range(k)]) for k in sizes]
    cost = [np.array([float(draw(st.integers(1, 6))) for _ in range(k)]) for k in sizes]
    kind = draw(st.sampled_from(["none", "path", "random"]))
    keys = []
    if kind == "path":
        keys = [(i, i + 1) for i in range(n - 1)]
    elif kind == "random":
        keys = [k for k in itertools.permutations(range(n), 2) if draw(st.integers(0, 2)) == 0]
    term, scale = st.floats(-2, 2, allow_nan=False, width=32), draw(st.sampled_from([0.05, 1.0]))
    pairs = {(a, b): scale * np.array([[draw(term) for _ in range(sizes[b])] for _ in range(sizes[a])])
             for a, b in keys}
    return Problem(loss, cost, pairs)


def _all(p):
    return [(*p.evaluate(c), c) for c in itertools.product(*[range(d.size) for d in p.loss])]


@settings(max_examples=120, deadline=None)
@given(problems(), st.floats(0, 1))
def test_min_loss_and_min_cost_match_brute_force(p, frac):
    allc = _all(p)
    lo, hi = min(c for _, c, _ in allc), max(c for _, c, _ in allc)
    budget = lo + frac * (hi - lo)
    best = min(l for l, c, _ in allc if c <= budget + 1e-9)
    a = min_loss(p, budget)
    assert a.cost <= budget + 1e-6 and a.loss == pytest.approx(best, abs=1e-5 * max(1, abs(best)))
    lmin, lmax = min(l for l, _, _ in allc), max(l for l, _, _ in allc)
    limit = lmin + frac * (lmax - lmin)
    cbest = min(c for l, c, _ in allc if l <= limit + 1e-9)
    b = min_cost(p, limit + 1e-9)
    assert b.loss <= limit + 1e-5 * max(1, abs(limit)) and b.cost == pytest.approx(cbest)
    assert p.evaluate(b.choice) == pytest.approx((b.loss, b.cost))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_reduction_keeps_every_pareto_point(p):
    """The reduced problem's Pareto front of (cost, loss) is the original one, point for point."""
    def front(pts):
        pts = sorted(pts)
        out, best = [], np.inf
        for c, l in pts:
            if l < best - 1e-9:
                out.append((c, l))
                best = l
        return out
    orig = front([(c, l) for l, c, _ in _all(p)])
    red = reduce(p)
    got = []
    for ch in itertools.product(*[range(d.size) for d in red.problem.loss]):
        l, c = p.evaluate(red.expand(ch, len(p.loss)))
        assert (l, c) == pytest.approx(red.problem.evaluate(ch))
        got.append((c, l))
    # pytest.approx takes flat sequences only (pytest 9.2 rejects a list of tuples), so pair by pair
    got_front = front(got)
    assert len(got_front) == len(orig)
    for g, o in zip(got_front, orig):
        assert g == pytest.approx(o)


def test_paths_become_groups_unless_a_cycle_keeps_the_pairs():
    rng = np.random.default_rng(0)
    loss = [rng.uniform(0, 1, 4) for _ in range(7)]
    cost = [rng.integers(1, 9, 4).astype(float) for _ in range(7)]
    paths = {(0, 1): rng.normal(size=(4, 4)), (2, 1): rng.normal(size=(4, 4)),   # path 0-1-2
             (3, 4): rng.normal(size=(4, 4)), (4, 5): rng.normal(size=(4, 4))}   # path 3-4-5; 6 alone
    red = reduce(Problem(loss, cost, paths))
    assert red.layers == [(0, 1, 2), (3, 4, 5), (6,)] and not red.problem.pairs
    cyclic = {**paths, (5, 3): rng.normal(size=(4, 4))}                          # 3-4-5 a cycle
    red = reduce(Problem(loss, cost, cyclic))
    assert red.layers == [(l,) for l in range(7)] and len(red.problem.pairs) == 5


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000), st.floats(0, 1))
def test_knapsack_fixing_and_dynamic_programme_are_exact(groups, seed, frac):
    rng = np.random.default_rng(seed)
    f = [np.round(rng.uniform(0, 4, rng.integers(1, 5)), 1) for _ in range(groups)]
    g = [np.round(rng.uniform(0, 4, v.size), 1) for v in f]
    combos = list(itertools.product(*[range(v.size) for v in f]))
    tot = [(sum(f[k][c] for k, c in enumerate(ch)), sum(g[k][c] for k, c in enumerate(ch))) for ch in combos]
    lo, hi = min(t[1] for t in tot), max(t[1] for t in tot)
    bound = lo + frac * (hi - lo)
    best = min(t[0] for t in tot if t[1] <= bound + 1e-12)
    fixed = fix_items(f, g, bound)
    assert fixed is not None
    keep, inc, ub, lb, lam = fixed
    assert lb <= best + 1e-9 <= ub + 2e-9
    sub_f, sub_g = [v[k] for v, k in zip(f, keep)], [v[k] for v, k in zip(g, keep)]
    ch = knapsack_exact(sub_f, sub_g, bound, lam, ub)
    assert ch is not None
    assert sum(v[c] for v, c in zip(sub_f, ch)) == pytest.approx(best)
    assert sum(v[c] for v, c in zip(sub_g, ch)) <= bound + 1e-9


def _blocks(blocks, seed=0, top=0):
    """Decoder-shaped instance: 7 layers a block, neighbour pairs; ``top`` adds every pair among the
    most sensitive layers (a cyclic component across blocks)."""
    rng = np.random.default_rng(seed)
    bits = np.array([2.25, 3.25, 3.125, 4.25, 4.125, 4.5, 4.25, 4.5, 8.125, 8.03])
    loss, cost, sens = [], [], []
    for _ in range(blocks * 7):
        s = rng.lognormal(0, 1.5)
        sens.append(s)
        loss.append(s * 4.0 ** (-bits) * rng.uniform(0.7, 1.3, bits.size))
        cost.append(bits * rng.choice([1.0, 3.0, 8.0]))
    pairs = {(a, a + 1): rng.uniform(-0.3, 0.6) * np.sqrt(np.outer(loss[a], loss[a + 1]))
             for a in range(blocks * 7 - 1) if a // 7 == (a + 1) // 7}
    for a, b in itertools.combinations(sorted(np.argsort(sens)[-top:]) if top else [], 2):
        pairs.setdefault((a, b), rng.uniform(-0.3, 0.6) * np.sqrt(np.outer(loss[a], loss[b])))
    return Problem(loss, cost, pairs)


@pytest.mark.parametrize("top", [0, 4])
def test_fast_path_matches_the_plain_program(top):
    p = _blocks(4, seed=top, top=top)
    per = sum(c[0] for c in p.cost) / 2.25
    for target in (3.0, 4.25):
        fast, ref = min_loss(p, target * per), min_loss(p, target * per, method="reference")
        assert fast.loss == pytest.approx(ref.loss, rel=2e-6) and fast.cost <= target * per * (1 + 1e-9)
    limit = min_loss(p, 3.5 * per).loss
    fast, ref = min_cost(p, limit), min_cost(p, limit, method="reference")
    assert fast.cost == pytest.approx(ref.cost, rel=2e-6) and fast.loss <= limit * (1 + 1e-7)


def test_bad_input_and_infeasible_bounds():
    with pytest.raises(ValueError, match="method 'milp'"):
        min_loss(Problem([np.ones(2)], [np.ones(2)]), 5.0, method="milp")
    with pytest.raises(ValueError, match="out of range"):
        Problem([np.ones(2)], [np.ones(2)], {(0, 3): np.ones((2, 2))})
    p = Problem([np.array([1.0, 5.0]), np.array([2.0, 3.0])], [np.array([4.0, 2.0]), np.array([3.0, 1.0])],
                {(0, 1): np.array([[-0.5, 0.0], [0.0, 1.0]])})
    for method in ("fast", "reference"):
        with pytest.raises(Infeasible, match="smallest achievable cost 3") as e:
            min_loss(p, budget=2.5, method=method)
        assert e.value.min_loss == pytest.approx(2.5)
        with pytest.raises(Infeasible, match="smallest achievable predicted loss 2.5"):
            min_cost(p, limit=2.0, method=method)


def test_cyclic_components_with_small_terms_match_brute_force():
    """Dense pair graphs (general components, where candidates are pruned by dominance) with terms
    small against the loss differences, so that dominance decides often."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(3, 6))
        loss = [np.round(rng.uniform(0, 1, rng.integers(2, 4)), 2) for _ in range(n)]
        cost = [rng.integers(1, 5, v.size).astype(float) for v in loss]
        pairs = {(a, b): rng.normal(0, 0.03, (loss[a].size, loss[b].size))
                 for a, b in itertools.combinations(range(n), 2) if rng.random() < 0.7}
        p = Problem(loss, cost, pairs)
        allc = _all(p)
        budget = float(np.median([c for _, c, _ in allc]))
        assert min_loss(p, budget).loss == pytest.approx(min(l for l, c, _ in allc if c <= budget), abs=1e-6)
        limit = float(np.median([l for l, _, _ in allc]))
        assert min_cost(p, limit).cost == pytest.approx(min(c for l, c, _ in allc if l <= limit))


def test_native_stdout_is_silenced_only_inside_the_solver_call(capfd):
    import os

    from lowbit.optimize.milp import native_stdout_silenced

    print("before", flush=True)
    with native_stdout_silenced():
        os.write(1, b"native noise\n")
    with pytest.raises(KeyError):
        with native_stdout_silenced():
            raise KeyError("passes through")
    os.write(1, b"native after\n")
    print("after", flush=True)
    out = capfd.readouterr().out
    assert "before" in out and "native after" in out and "after\n" in out and "native noise" not in out
