"""lowbit.search: exact allocation against brute force, infeasible reporting, candidates, the
sensitivity cache and its invalidation, the bisection with resume, and plan.json through Plan."""
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant.plan import Plan
from lowbit.optimize import Infeasible, Problem, cheapest, min_cost, min_loss
from lowbit.search.bisection import PointStore, accuracy_search, choice_of
from lowbit.search.candidates import (LayerCandidates, dropped_notes, layer_candidates, parse_candidates,
                                      quantizable_layers)
from lowbit.search.cost import CostModel, bits_per_weight, cost_matrix, true_bits


# --- the integer program ------------------------------------------------------------------------

@st.composite
def problems(draw):
    n_layers = draw(st.integers(2, 4))
    sizes = [draw(st.integers(1, 3)) for _ in range(n_layers)]
    val = st.floats(0, 10, allow_nan=False, allow_infinity=False, width=32)
    loss = [np.array([draw(val) for _ in range(k)]) for k in sizes]
    cost = [np.array([float(draw(st.integers(1, 9))) for _ in range(k)]) for k in sizes]
    pairs = {}
    for a, b in itertools.combinations(range(n_layers), 2):
        if draw(st.booleans()):
            pairs[(a, b)] = np.array([[draw(st.floats(-3, 3, width=32)) for _ in range(sizes[b])]
                                      for _ in range(sizes[a])])
    return Problem(loss, cost, pairs)


def _brute(p):
    return [(*p.evaluate(c), c) for c in itertools.product(*[range(d.size) for d in p.loss])]


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(0, 1))
def test_min_loss_matches_brute_force(p, frac):
    allc = _brute(p)
    lo, hi = min(c for _, c, _ in allc), max(c for _, c, _ in allc)
    budget = lo + frac * (hi - lo)
    best = min(l for l, c, _ in allc if c <= budget + 1e-9)
    a = min_loss(p, budget)
    assert a.cost <= budget + 1e-6
    assert a.loss == pytest.approx(best, abs=1e-5 * max(1, abs(best)))
    assert p.evaluate(a.choice) == pytest.approx((a.loss, a.cost))


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(0, 1))
def test_min_cost_matches_brute_force(p, frac):
    allc = _brute(p)
    lmin, lmax = min(l for l, _, _ in allc), max(l for l, _, _ in allc)
    limit = lmin + frac * (lmax - lmin)
    best = min(c for l, c, _ in allc if l <= limit + 1e-9)
    a = min_cost(p, limit + 1e-9)
    assert a.loss <= limit + 1e-5 * max(1, abs(limit))
    assert a.cost == pytest.approx(best)


def test_infeasible_budget_and_limit_report_what_is_achievable():
    p = Problem([np.array([1.0, 5.0]), np.array([2.0, 3.0])], [np.array([4.0, 2.0]), np.array([3.0, 1.0])],
                {(0, 1): np.array([[-0.5, 0.0], [0.0, 1.0]])})
    # cheapest: (1, 1) cost 3; best loss: (0, 0) = 1 + 2 - 0.5 = 2.5
    with pytest.raises(Infeasible, match="smallest achievable cost 3") as e:
        min_loss(p, budget=2.5)
    assert e.value.min_cost == 3.0 and e.value.min_loss == pytest.approx(2.5)
    with pytest.raises(Infeasible, match="smallest achievable predicted loss 2.5") as e:
        min_cost(p, limit=2.0)
    assert e.value.min_cost == 3.0 and e.value.min_loss == pytest.approx(2.5)
    assert cheapest(p).cost == 3.0


def test_problem_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="loss .* and cost"):
        Problem([np.array([1.0, 2.0])], [np.array([1.0])])
    with pytest.raises(ValueError, match="pair"):
        Problem([np.ones(2), np.ones(2)], [np.ones(2), np.ones(2)], {(0, 1): np.ones((3, 2))})


# --- candidates and costs -------------------------------------------------------------------------

def tiny():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(seed=1):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i:i + 2]} for i in range(0, 4, 2)]


def test_candidates_that_cannot_apply_are_dropped_with_a_note():
    model = tiny()
    layers = quantizable_layers(model)
    assert len(layers) == 14 and not any("lm_head" in n for n in layers)
    cands = layer_candidates(layers, parse_candidates("int4:g64,mxfp4,nvfp4"))
    down = [c for c in cands if c.name.endswith("down_proj")]
    assert all(c.specs == ["int4:g64"] for c in down)
    notes = dropped_notes(cands)
    assert len(notes) == 4 and all("multiple of" in n for n in notes)
    with pytest.raises(ValueError, match="bad candidate"):
        parse_candidates("int4:g64,int99")


def test_costs_are_true_bits():
    assert true_bits("int4:g64", (8, 128)) == pytest.approx(4 + 16 / 64)
    assert true_bits("mxfp4", (8, 128)) == pytest.approx(4.25)
    c = [LayerCandidates("a", (4, 128), ["int4:g64", "int8:g128"]), LayerCandidates("b", (4, 64), ["int2:g64"])]
    costs = cost_matrix(c, CostModel("bits"))
    assert costs[0][0] == pytest.approx(4.25 * 512)
    assert bits_per_weight({"a": "int8:g128", "b": "int2:g64"}, c) == pytest.approx((8.125 * 512 + 2.25 * 256) / 768)
    assert cost_matrix(c, CostModel("bops", act_bits=8))[1][0] == pytest.approx(2.25 * 8 * 256)


def test_latency_table_prices_and_drops(tmp_path):
    t = tmp_path / "lat.json"
    t.write_text(json.dumps({"int4:g64": 2.0, "layers": {"b": {"int2:g64": 0.5}}}))
    cm = CostModel.parse(str(t))
    c = [LayerCandidates("a", (1000, 1000), ["int4:g64", "int8:g128"]), LayerCandidates("b", (4, 64), ["int2:g64"])]
    costs = cost_matrix(c, cm)
    assert c[0].specs == ["int4:g64"] and "int8:g128" in c[0].dropped
    assert costs[0][0] == pytest.approx(2.0) and costs[1][0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="latency-table JSON"):
        CostModel.parse(str(tmp_path / "nope.json"))


# --- objective and sensitivities --------------------------------------------------------------------

def _setup(model=None, seed=1, specs="int2:g64,int4:g64,int8:g128"):
    from lowbit.search.objective import Objective

    model = model or tiny()
    layers = quantizable_layers(model)
    cands = layer_candidates(layers, parse_candidates(specs))
    costs = cost_matrix(cands, CostModel("bits"))
    return model, layers, cands, costs, Objective(model, "causal_lm", _batches(seed))


def test_block_cached_loss_equals_the_whole_model():
    from lowbit.search.sensitivity import rtn_weight

    model, layers, cands, costs, obj = _setup()
    name = "model.layers.1.self_attn.v_proj"
    q = rtn_weight(layers[name].weight, "int2:g64")
    fast = obj.loss_with(layers, {name: q})
    assert obj.loss_with(layers, {}) == pytest.approx(obj.loss(), rel=1e-5)
    with torch.no_grad():
        old = layers[name].weight.clone()
        layers[name].weight.copy_(q)
        full = obj.loss()
        layers[name].weight.copy_(old)
    assert fast == pytest.approx(full, rel=1e-5)
    assert fast != pytest.approx(obj.loss(), rel=1e-6)  # the swap was undone and did matter


@pytest.mark.filterwarnings("ignore:.*Hessian trace estimates are negative")  # a random model's Hessian
def test_estimators_rank_candidates_and_pairs_are_measured(tmp_path):
    from lowbit.search.sensitivity import SensitivitySettings, compute

    model, layers, cands, costs, obj = _setup()
    table = compute(obj, layers, cands, costs, ("hutchinson", "fisher", "measured"), True,
                    SensitivitySettings(hutchinson_samples=2, top_layers=3), tmp_path / "s.json", progress=False)
    for est in ("hutchinson", "fisher", "measured"):
        # over the model 2-bit hurts more than 8-bit (one layer of a random model may not)
        tot = {s: sum(table.values[est][n][s] for n in table.layers) for s in ("int2:g64", "int8:g128")}
        assert abs(tot["int2:g64"]) > 10 * abs(tot["int8:g128"]), (est, tot)
        if est != "hutchinson":  # a random model's Hessian is not PSD: its trace may be negative
            assert tot["int2:g64"] > 0, (est, tot)
    assert all(v >= 0 for n in table.layers for v in table.values["fisher"][n].values())
    assert len(table.pairs) >= 12 and all(-0.9 <= p["rho"] <= 5 for p in table.pairs)
    p = table.problem("measured", costs, with_pairs=True)
    assert len(p.pairs) == len(table.pairs)


def test_sensitivity_cache_is_reused_and_invalidated(tmp_path):
    from lowbit.search.sensitivity import SensitivitySettings, compute

    cache = tmp_path / "sens.json"
    model, layers, cands, costs, obj = _setup()
    st_ = SensitivitySettings()
    t1 = compute(obj, layers, cands, costs, ("measured",), False, st_, cache, progress=False)
    logs = []
    t2 = compute(obj, layers, cands, costs, ("measured",), False, st_, cache, progress=False, log=logs.append)
    assert t2.values == t1.values and any("using the cache" in m for m in logs)
    # another data set: detected, not used
    _, _, _, _, obj2 = _setup(model, seed=7)
    with pytest.warns(UserWarning, match="calibration data"):
        t3 = compute(obj2, layers, cands, costs, ("measured",), False, st_, cache, progress=False)
    assert t3.key["data"] != t1.key["data"]
    # another model (weights changed): detected, not used, and the values change
    with torch.no_grad():
        layers["model.layers.0.mlp.up_proj"].weight.mul_(3)
    with pytest.warns(UserWarning, match="model weights"):
        t4 = compute(obj2, layers, cands, costs, ("measured",), False, st_, cache, progress=False)
    assert t4.values["measured"]["model.layers.0.mlp.up_proj"] != t3.values["measured"]["model.layers.0.mlp.up_proj"]
    # another candidate set
    cands2 = layer_candidates(layers, parse_candidates("int3:g64,int8:g128"))
    with pytest.warns(UserWarning, match="candidate set"):
        compute(obj2, layers, cands2, cost_matrix(cands2, CostModel("bits")), ("measured",), False, st_, cache,
                progress=False)


# --- bisection ---------------------------------------------------------------------------------------

def test_bisection_finds_the_smallest_within_limit_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    n, bits = 12, np.array([2.0, 3.0, 4.0, 8.0])
    sens = rng.lognormal(0, 1, n)
    cands = [LayerCandidates(f"l{i}", (1, 64), ["a", "b", "c", "d"]) for i in range(n)]
    p = Problem([s * 4.0 ** -bits for s in sens], [bits * 64 for _ in range(n)])
    truth = lambda choice: sum(sens[int(k[1:])] * 4.0 ** -bits["abcd".index(v)] for k, v in choice.items())
    calls = []

    def measure(choice):
        calls.append(1)
        return {"loss": 1.3 * truth(choice)}  # the real metric: the prediction off by a factor

    limit = 1.3 * min_loss(p, 3.5 * 64 * n).loss
    per_unit = lambda t: t / (64 * n)
    store = PointStore(tmp_path / "points.jsonl")
    r = accuracy_search(p, cands, measure, limit, cheapest(p).cost, p.cost[0].max() * n, per_unit, store,
                        tol=0.01, predicted_limit=None, log=lambda m: None)
    assert r.reachable and r.best["loss"] <= limit
    # nothing cheaper is within the limit: the true optimum of this separable problem
    exact = min_cost(p, limit / 1.3 + 1e-12)
    assert per_unit(exact.cost) >= r.best["cost"] - 0.01 - 1e-9
    n_calls = len(calls)
    r2 = accuracy_search(p, cands, measure, limit, cheapest(p).cost, p.cost[0].max() * n, per_unit,
                         PointStore(tmp_path / "points.jsonl"), tol=0.01, log=lambda m: None)
    assert len(calls) == n_calls and r2.best["key"] == r.best["key"]  # resumed from disk
    other = PointStore(tmp_path / "points.jsonl", {"eval_tokens": 99})  # measured otherwise: not re-used
    assert not other.points and other.ignored == len(store.points)
    r3 = accuracy_search(p, cands, measure, 1e-12, cheapest(p).cost, 2.5 * 64 * n, per_unit, store, tol=0.01,
                         log=lambda m: None)
    assert not r3.reachable and "over the limit" in r3.note


# --- plan.json ------------------------------------------------------------------------------------------

def test_search_plan_round_trips_through_plan_and_quantize(tmp_path):
    from lowbit.ptq.pipeline import quantize_model
    from lowbit.quant.linear import QuantLinear

    model = tiny()
    layers = quantizable_layers(model)
    names = list(layers)
    choice = {n: ("int2:g64" if i % 3 == 0 else "int8:g128" if i % 3 == 1 else "int4:g64") for i, n in enumerate(names)}
    plan_json = {"name": "search-tiny", "layers": choice, "bits_per_weight": 4.0,
                 "baseline": {"perplexity": 10.0}, "measured": {"perplexity": 10.1}, "limit": {"max_loss": 0.01}}
    (tmp_path / "plan.json").write_text(json.dumps(plan_json))
    plan = Plan.load(tmp_path / "plan.json")
    assert all(str(plan.weight_spec(n)) == choice[n] for n in names)
    assert plan.weight_spec("lm_head") is None
    quantize_model(model, plan, [], "rtn", progress=False)
    for n in names:
        m = model.get_submodule(n)
        assert isinstance(m, QuantLinear) and str(m.weight_spec) == choice[n]


# --- end to end on the real encoder (small slices) -----------------------------------------------------

@pytest.mark.slow
def test_search_on_minilm_writes_a_plan_quantize_applies(tmp_path, capsys):
    pytest.importorskip("transformers")
    from lowbit.cli import main

    out = tmp_path / "s"
    args = ["search", "minilm", "--max-loss", "2%", "--candidates", "int3:g64,int8:g128", "--no-pairs",
            "--calib", "4", "--sentences", "16", "--tol", "0.5", "--quiet", "--out", str(out)]
    assert main(args) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["measured"]["cosine_mean"] >= 0.98 and 3.25 <= plan["bits_per_weight"] <= 8.125
    uni = {u["spec"]: u for u in json.loads((out / "search.json").read_text())["uniform"]}
    assert plan["bits_per_weight"] < uni["int8:g128"]["bits"] and uni["int3:g64"]["loss"] > 0.02
    p = Plan.load(out / "plan.json")
    assert str(p.weight_spec("encoder.layer.0.attention.self.query")) == plan["layers"]["encoder.layer.0.attention.self.query"]
    assert (out / "pareto.png").stat().st_size > 0 and (out / "layers.png").stat().st_size > 0
    # a rerun measures nothing new (every point is on disk) and an unreachable limit is reported
    n = len((out / "points.jsonl").read_text().splitlines())
    assert main(args[:2] + ["--max-loss", "0.001%"] + args[4:] + ["--budget-max", "3.25"]) == 1
    assert "over the limit" in capsys.readouterr().err
    assert len((out / "points.jsonl").read_text().splitlines()) == n
