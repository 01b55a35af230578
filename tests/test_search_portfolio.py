"""The search's portfolio: at a budget, a few exactly solved plans are scored by measurement and the
best kept, so a wrong prediction cannot make the INT+FP plan worse (as measured) than the INT-only
plan, a subset of its choices."""
import json

import numpy as np
import pytest
import torch
from _tiny import tiny_bert_loader, tiny_llama, token_ids
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.optimize import Infeasible, Problem, min_loss
from lowbit.search.candidates import LayerCandidates, layer_candidates, parse_candidates, quantizable_layers, restrict
from lowbit.search.cost import CostModel, cost_matrix
from lowbit.search.portfolio import CalibrationScores, Portfolio, family_specs, is_integer

SPECS = ["int2:g64", "int4:g64", "nvfp4", "int8:g128"]
BITS = np.array([2.25, 4.25, 4.5, 8.125])


def test_families_split_integer_from_float_and_block_formats():
    assert [is_integer(s) for s in SPECS] == [True, True, False, True]
    assert is_integer("int3:g64+keep1%@e4m3fn") and not is_integer("e2m1fn:g32")
    cands = [LayerCandidates("a", (4, 64), SPECS), LayerCandidates("b", (4, 64), ["int4:g64", "nvfp4"])]
    assert family_specs(cands, "all") is None
    assert family_specs(cands, "int") == ["int2:g64", "int4:g64", "int8:g128"]
    assert family_specs(cands, "float") == ["nvfp4"]
    cands.append(LayerCandidates("c", (4, 64), ["int8:g128"]))  # c has no float candidate: family skipped
    assert family_specs(cands, "float") is None


def _portfolio(pred, truth, pairs_terms=None):
    cands = [LayerCandidates(f"l{i}", (1, 64), list(SPECS)) for i in range(len(pred))]
    costs = [BITS * 64 for _ in cands]
    table = {n: dict(zip(SPECS, row)) for n, row in zip((c.name for c in cands), pred)}

    def problem_of(with_pairs, cs, ks):
        loss = [np.array([table[c.name][s] for s in c.specs]) for c in cs]
        pairs = {}
        if with_pairs and pairs_terms:
            for (a, b), q in pairs_terms.items():
                ia = [SPECS.index(s) for s in cs[a].specs]
                ib = [SPECS.index(s) for s in cs[b].specs]
                pairs[(a, b)] = q[np.ix_(ia, ib)]
        return Problem(loss, ks, pairs)

    scored = []

    def score(choice):
        scored.append(choice)
        return sum(truth[int(n[1:])][SPECS.index(s)] for n, s in choice.items())

    pf = Portfolio(problem_of, cands, costs, score, pairs=bool(pairs_terms))
    return pf, problem_of(bool(pairs_terms), cands, costs), cands, costs, scored


def test_a_wrong_prediction_is_caught_by_measurement():
    # predicted: nvfp4 is nearly free everywhere; measured: it is the worst choice of all
    pred = [[9.0, 1.0, 0.1, 0.0]] * 3
    truth = [[9.0, 1.0, 50.0, 0.0]] * 3
    pf, full, cands, costs, scored = _portfolio(pred, truth)
    budget = 4.5 * 64 * 3
    alloc, win = pf.best(budget, full)
    plans = {p["label"]: p["calibration_loss"] for p in pf.history[-1]["plans"]}
    assert list(plans)[0] == "all" and plans["all"] == pytest.approx(150.0)  # the program's optimum: all nvfp4
    assert win.label == "int" and alloc.choice == [1, 1, 1] and alloc.cost <= budget
    assert alloc.loss == pytest.approx(3.0) and alloc.status == "portfolio:int"  # predicted loss of the full model
    # the float family's plan (all nvfp4) is the program's optimum again: scored once
    assert len(scored) == len(pf.history[-1]["plans"]) == 2


def test_one_plan_is_not_scored():
    pf, full, *_, scored = _portfolio([[9.0, 1.0, 0.5, 0.0]] * 2, [[9.0, 1.0, 0.5, 0.0]] * 2)
    pf.families = ("all",)
    alloc, win = pf.best(BITS[-1] * 64 * 2, full)
    assert win.calibration_loss is None and not scored and alloc.choice == [3, 3]


def test_an_infeasible_budget_is_reported_as_by_the_program():
    pf, full, *_ = _portfolio([[1.0, 0.5, 0.4, 0.0]] * 2, [[1.0, 0.5, 0.4, 0.0]] * 2)
    with pytest.raises(Infeasible, match="below the smallest achievable cost"):
        pf.best(2.0 * 64 * 2, full)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.floats(2.3, 8.0), st.integers(0, 10_000), st.booleans())
def test_never_worse_than_the_int_only_plan_or_the_program(n, bits, seed, with_pairs):
    rng = np.random.default_rng(seed)
    pred = np.sort(rng.lognormal(0, 1, (n, 4)), axis=1)[:, ::-1] * np.array([1, 1, rng.uniform(0, 2), 1])
    truth = pred * rng.lognormal(0, 0.7, (n, 4))
    pairs = {(0, 1): rng.normal(0, 0.3, (4, 4))} if with_pairs else None
    pf, full, cands, costs, _ = _portfolio(pred.tolist(), truth.tolist(), pairs)
    budget = bits * 64 * n
    try:
        alloc, win = pf.best(budget, full)
    except Infeasible:
        with pytest.raises(Infeasible):
            min_loss(full, budget)
        return
    measured = lambda idx: sum(truth[l][i] for l, i in enumerate(idx))
    assert alloc.cost <= budget + 1e-9
    best = measured(alloc.choice)
    assert best <= measured(min_loss(full, budget).choice) + 1e-9  # never worse than the program's optimum
    ci, ki = restrict(cands, costs, [s for s in SPECS if is_integer(s)])
    int_only = Portfolio(pf.problem_of, ci, ki, pf.score, pairs=pf.pairs)
    try:
        ai, wi = int_only.best(budget, pf.problem_of(pf.pairs, ci, ki))
    except Infeasible:
        return
    idx = [SPECS.index(wi.choice[c.name]) for c in cands]
    assert best <= measured(idx) + 1e-9  # never worse than what the INT-only search returns


def test_calibration_scores_are_the_whole_configuration_kl_and_cached(tmp_path):
    from lowbit.search.objective import Objective
    from lowbit.search.sensitivity import rtn_weight

    pytest.importorskip("transformers")
    model = tiny_llama(vocab_size=160, intermediate_size=128)
    ids = token_ids(4, 24, vocab_size=160, seed=3)
    batches = [{"input_ids": ids[i:i + 2]} for i in (0, 2)]
    obj = Objective(model, "causal_lm", batches, kl_dtype=torch.float32)
    layers = quantizable_layers(model)
    calls = []

    def weight_of(name, spec):
        calls.append(name)
        return rtn_weight(layers[name].weight, spec)

    path = tmp_path / "scores.jsonl"
    scores = CalibrationScores(obj, layers, weight_of, path, {"method": "rtn"})
    choice = {n: ("int2:g64" if i % 2 else "int8:g128") for i, n in enumerate(layers)}
    v = scores(choice)
    direct = obj.increase_with(layers, {n: rtn_weight(layers[n].weight, s) for n, s in choice.items()})
    assert v == pytest.approx(direct, rel=1e-6) and v > 0
    assert v > scores({n: "int8:g128" for n in layers})  # 2-bit layers move the model further than 8-bit
    n_calls = len(calls)
    again = CalibrationScores(obj, layers, weight_of, path, {"method": "rtn"})
    assert again(choice) == v and len(calls) == n_calls  # read back from disk, nothing recomputed
    other = Objective(model, "causal_lm", [{"input_ids": ids[:2]}], kl_dtype=torch.float32)
    assert not CalibrationScores(other, layers, weight_of, path, {"method": "rtn"}).cache  # other data: not used


def test_budget_search_keeps_the_best_scored_plan_and_resumes(tmp_path):
    from lowbit.jobs import run_search

    loaded = tiny_bert_loader()()
    kw = dict(budget=4.6, candidates="int2:g32,int4:g32,nvfp4,int8:g32", calib=2, seq_len=16, sentences=8,
              uniform=False, quiet=True)
    rep = run_search(None, str(tmp_path), loaded=loaded, **kw)
    pf = rep["portfolio"]
    assert pf["families"] == ["all", "int", "float"] and len(pf["budgets"]) == 1
    step = pf["budgets"][0]
    assert step["budget"] == pytest.approx(4.6) and len(step["plans"]) >= 2
    losses = {p["label"]: p["calibration_loss"] for p in step["plans"]}
    assert losses[step["chosen"]] == min(losses.values())
    assert rep["plan"]["bits_per_weight"] <= 4.6 + 1e-9
    lines = (tmp_path / "calibration_scores.jsonl").read_text().splitlines()
    assert len(lines) == len(step["plans"])
    rep2 = run_search(None, str(tmp_path), loaded=loaded, **kw)  # resumed: nothing scored again
    assert rep2["plan"]["layers"] == rep["plan"]["layers"]
    assert (tmp_path / "calibration_scores.jsonl").read_text().splitlines() == lines
    off = run_search(None, str(tmp_path / "off"), loaded=loaded, portfolio=False, **kw)
    assert off["portfolio"] is None and not (tmp_path / "off" / "calibration_scores.jsonl").exists()
