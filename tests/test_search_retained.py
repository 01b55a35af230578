"""Retention candidates in the search (SPEC+keepR@FMT): bit accounting, the retained weight, bad
input, and plan.json through `lowbit quantize --plan` on a tiny random BERT (MiniLM's tokenizer)."""
import json
from types import SimpleNamespace

import pytest
import torch
from _tiny import tiny_bert_loader

from lowbit.ptq.retention import RetainFormat, retained_bits, rtn_retained, top_mask
from lowbit.quant.plan import Plan
from lowbit.quant.spec import QuantSpec
from lowbit.quant.weight import WeightQuantizer
from lowbit.search.candidates import parse_candidates
from lowbit.search.cost import true_bits
from lowbit.search.retained import check_retained, plan_layers, split, weight


def test_bits_and_weight_of_a_retention_candidate():
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    spec = "int3:g32+keep2%@int8"
    q = WeightQuantizer(QuantSpec.parse("int3:g32"))
    plain, kept = q.rtn(W)[0], weight(W, spec)
    k = round(0.02 * W.numel())
    ref = rtn_retained(W, top_mask((W - plain).pow(2), 0.02), q, RetainFormat.parse("int8"))
    assert torch.equal(kept, ref.weight) and int(ref.keep.sum()) == k
    # the kept weights are those RTN rounds worst
    assert (W - plain).abs()[ref.keep].min() >= (W - plain).abs()[~ref.keep].max()
    assert (W - kept).pow(2).sum() < 0.92 * (W - plain).pow(2).sum()  # 2% kept: 12% less error here
    # true bits: dense codes and scales + the side tensor as stored (values, positions, row scales)
    assert true_bits(spec, W.shape) == pytest.approx(q.bits_per_weight(64) + ref.side_bits / W.numel())
    assert ref.side_bits == retained_bits(48, 64, k, RetainFormat.parse("int8"))
    assert true_bits("int3:g32", W.shape) == q.bits_per_weight(64)
    # with the layer's input power the saliency follows the inputs: a loud input feature's weights go first
    power = torch.ones(64)
    power[7] = 1e4
    loud = weight(W, spec, power)
    changed = (loud != plain)
    assert changed[:, 7].sum() >= 40 and torch.equal(loud[:, 7], rtn_retained(
        W, top_mask((W - plain).pow(2) * power, 0.02), q, RetainFormat.parse("int8")).weight[:, 7])


def test_retention_candidates_parse_and_bad_input():
    assert parse_candidates("int3:g64+keep0.01@int8,int4:g64") == ["int3:g64+keep1%@int8", "int4:g64"]
    assert split("int3:g64+keep1%@int8")[1] == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"SPEC\+keepRATIO@FORMAT"):
        parse_candidates("int3:g64+keep1%")
    with pytest.raises(ValueError, match="kept fraction"):
        parse_candidates("int3:g64+keep60%@int8")
    with pytest.raises(ValueError, match="one retain format"):
        check_retained(["int3:g64+keep1%@int8", "int3:g64+keep1%@fp16"], "rtn")
    with pytest.raises(ValueError, match="--method rtn"):
        check_retained(["int3:g64+keep1%@int8"], "gptq")
    out = plan_layers({"a": "int3:g64+keep1%@int8", "b": "int8:g128"})
    assert out == {"layers": {"a": "int3:g64", "b": "int8:g128"},
                   "retain": {"format": "int8", "saliency": "diag", "ratios": {"a": 0.01}}}
    assert "retain" not in plan_layers({"b": "int8:g128"})


@pytest.fixture(scope="module")
def tiny_loaded():
    return tiny_bert_loader()


def test_search_with_retention_writes_a_plan_quantize_applies(tiny_loaded, tmp_path):
    from lowbit.cli import _retain_config
    from lowbit.jobs import EvalSettings, run_quantize, run_search

    rep = run_search(None, str(tmp_path / "s"), budget=4.5, candidates="int2:g32+keep5%@int8,int8:g32",
                     pairs=False, calib=2, seq_len=16, sentences=8, uniform=False, quiet=True, loaded=tiny_loaded())
    path = tmp_path / "s" / "plan.json"
    plan = json.loads(path.read_text())
    assert rep["plan"]["bits_per_weight"] <= 4.5 and set(plan["layers"].values()) <= {"int2:g32", "int8:g32"}
    assert plan["retain"]["format"] == "int8" and plan["retain"]["ratios"]
    assert all(plan["layers"][n] == "int2:g32" and r == pytest.approx(0.05) for n, r in plan["retain"]["ratios"].items())
    retain = _retain_config(SimpleNamespace(retain=None, plan=str(path)))
    q = run_quantize(None, None, "rtn", None, plan=Plan.load(path), calib=2, seq_len=16, retain=retain,
                     settings=EvalSettings(sentences=8), quiet=True, loaded=tiny_loaded())
    # the same true bits: quantize counts the packed side tensors, the search the same layout
    assert q["quantized"]["bits_per_weight"] == pytest.approx(plan["bits_per_weight"], rel=1e-9)
    kept = {l["name"]: l["retain"]["kept"] for l in q["layers"] if l.get("retain")}
    assert set(kept) >= set(plan["retain"]["ratios"])


def test_diag_saliency_is_rounding_error_times_input_power():
    from lowbit.ptq.retention import hessian_saliency

    torch.manual_seed(1)
    W, h = torch.randn(8, 32), torch.rand(32) + 0.1
    q = WeightQuantizer(QuantSpec.parse("int3:g32"))
    s = hessian_saliency(W, torch.diag(h), q, "diag")
    assert torch.allclose(s, (W - q.rtn(W)[0]).pow(2) * h)
    # the search's rule with the same input power keeps the same weights
    keep = top_mask(s, 0.05)
    assert torch.equal(weight(W, "int3:g32+keep5%@int8", h), rtn_retained(W, keep, q, RetainFormat.parse("int8")).weight)
