"""The measured estimator of causal LMs scores a change by KL(p_fp32 || p_quantized), not by a
difference of two cross-entropies (which is noisy and often negative on a finite sample)."""
import json

import pytest
import torch

from lowbit.search.candidates import layer_candidates, parse_candidates, quantizable_layers
from lowbit.search.cost import CostModel, cost_matrix


def _tiny(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def _setup(specs="int2:g64,int4:g64,int8:g128", kl_dtype=torch.float32):
    from lowbit.search.objective import Objective

    model = _tiny()
    ids = torch.randint(0, 160, (4, 24), generator=torch.Generator().manual_seed(3))
    layers = quantizable_layers(model)
    cands = layer_candidates(layers, parse_candidates(specs))
    costs = cost_matrix(cands, CostModel("bits"))
    return model, layers, cands, costs, Objective(model, "causal_lm", [{"input_ids": ids[i:i + 2]} for i in (0, 2)],
                                                  kl_dtype=kl_dtype)


def _direct_kl(model, layers, batches, weights):
    """KL(p_fp32 || p) from the whole model's logits at every position, the textbook formula."""
    from lowbit.search.objective import swapped

    def kl_from_logits(r, n):
        lp, lq = torch.log_softmax(r.double(), -1), torch.log_softmax(n.double(), -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean()

    with torch.no_grad():
        ref = [model(**b, use_cache=False).logits for b in batches]
        with swapped(layers, weights):
            new = [model(**b, use_cache=False).logits for b in batches]
    return sum(float(kl_from_logits(r, n)) for r, n in zip(ref, new)) / len(batches)


def test_measured_values_are_the_kl_to_the_fp32_model(tmp_path):
    from lowbit.search.sensitivity import SensitivitySettings, compute, rtn_weight

    model, layers, cands, costs, obj = _setup()
    table = compute(obj, layers, cands, costs, ("measured",), False, SensitivitySettings(), None, progress=False)
    vals = table.values["measured"]
    for c in cands:
        for s in c.specs:
            v = vals[c.name][s]
            assert v >= 0, (c.name, s, v)
            direct = _direct_kl(model, layers, obj.batches, {c.name: rtn_weight(layers[c.name].weight, s)})
            assert v == pytest.approx(direct, rel=1e-3, abs=1e-9), (c.name, s, v, direct)
    # the change measured is a real one: 2-bit moves the model far more than 8-bit
    tot = {s: sum(vals[n][s] for n in table.layers) for s in ("int2:g64", "int8:g128")}
    assert tot["int2:g64"] > 100 * tot["int8:g128"] > 0
    assert obj.increase_with(layers, {}) == pytest.approx(0.0, abs=1e-9)  # unchanged model: no divergence


def test_pair_terms_are_kl_interactions():
    from lowbit.search.sensitivity import SensitivitySettings, compute, rtn_weight

    model, layers, cands, costs, obj = _setup()
    table = compute(obj, layers, cands, costs, ("measured",), True, SensitivitySettings(top_layers=2), None,
                    progress=False)
    p = table.pairs[0]
    sa, sb, inter = p["points"][0]
    both = _direct_kl(model, layers, obj.batches, {p["a"]: rtn_weight(layers[p["a"]].weight, sa),
                                                   p["b"]: rtn_weight(layers[p["b"]].weight, sb)})
    m = table.values["measured"]
    assert inter == pytest.approx(both - m[p["a"]][sa] - m[p["b"]][sb], rel=1e-3, abs=1e-8)


def test_a_cache_of_the_old_format_is_not_reused(tmp_path):
    from lowbit.search.sensitivity import SensitivitySettings, compute

    cache = tmp_path / "s.json"
    model, layers, cands, costs, obj = _setup("int2:g64,int8:g128")
    compute(obj, layers, cands, costs, ("measured",), False, SensitivitySettings(), cache, progress=False)
    d = json.loads(cache.read_text())
    d["key"]["format"] = 1  # a cache written when 'measured' meant a cross-entropy difference
    cache.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="cache format"):
        compute(obj, layers, cands, costs, ("measured",), False, SensitivitySettings(), cache, progress=False)


def test_changing_the_output_head_is_refused():
    model, layers, cands, costs, obj = _setup()
    obj.increase_with(layers, {})
    with torch.no_grad():
        model.lm_head.weight.data = model.lm_head.weight.data.clone()
    with pytest.raises(RuntimeError, match="output head"):
        obj.increase_with(layers, {})


def test_bfloat16_logit_change_stays_close_to_the_exact_kl():
    from lowbit.search.sensitivity import rtn_weight

    model, layers, cands, costs, obj = _setup(kl_dtype=torch.bfloat16)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        for s in ("int2:g64", "int8:g128"):
            w = {name: rtn_weight(layers[name].weight, s)}
            v, direct = obj.increase_with(layers, w), _direct_kl(model, layers, obj.batches, w)
            assert v >= 0 and v == pytest.approx(direct, rel=0.03), (name, s, v, direct)


@pytest.mark.parametrize("kl_dtype", [torch.float32, torch.bfloat16])
def test_a_huge_change_falls_back_to_the_logsumexp_form(kl_dtype):
    model, layers, cands, costs, obj = _setup(kl_dtype=kl_dtype)
    with torch.no_grad():
        model.model.norm.weight.mul_(300)  # logits in the hundreds
    name = "model.layers.1.mlp.down_proj"
    w = {name: -layers[name].weight.detach() * 30}  # logit changes of hundreds: exp overflows in fp32
    v, direct = obj.increase_with(layers, w), _direct_kl(model, layers, obj.batches, w)
    assert direct > 10 and v == pytest.approx(direct, rel=1e-3), (v, direct)


def test_pairs_with_the_fisher_estimator_measure_only_the_pair_levels():
    from lowbit.search.sensitivity import SensitivitySettings, compute

    model, layers, cands, costs, obj = _setup()
    st_ = SensitivitySettings(top_layers=2)
    fis = compute(obj, layers, cands, costs, ("fisher",), True, st_, None, progress=False)
    assert "measured" not in fis.values and fis.pairs
    used = {(p[k], pt[j]) for p in fis.pairs for pt in p["points"] for k, j in (("a", 0), ("b", 1))}
    assert {(n, s) for n, row in fis.pair_singles.items() for s in row} == used  # the pair levels, no more
    assert len(used) < sum(len(c.specs) for c in cands)
    full = compute(obj, layers, cands, costs, ("measured",), True, SensitivitySettings(top_layers=2), None,
                   progress=False)
    for n, row in fis.pair_singles.items():  # the same measurement as the full pass
        for s, v in row.items():
            assert v == pytest.approx(full.values["measured"][n][s], rel=1e-9)
    neighbours = [(p["a"], p["b"], p["points"]) for p in fis.pairs if obj.block_of(p["a"]) == obj.block_of(p["b"])]
    assert neighbours == [(p["a"], p["b"], p["points"]) for p in full.pairs
                          if obj.block_of(p["a"]) == obj.block_of(p["b"])]
    p = fis.problem("fisher", costs, with_pairs=True)
    assert len(p.pairs) == len(fis.pairs)


def test_default_calibration_is_smaller_only_for_the_kl_estimator():
    from lowbit.search.job import calibration_size

    assert calibration_size("causal_lm", "measured") == (2, 256)
    assert calibration_size("causal_lm", "fisher") == calibration_size("causal_lm", "hutchinson") == (4, 256)
    assert calibration_size("encoder", "measured") == calibration_size("encoder", "fisher") == (16, 128)
