"""KV-cache quantization: the pure quantizer, plan/scheme parsing, and the attention hook on tiny
random Llama and BERT models."""
import copy

import pytest
import torch

from lowbit.quant.kv import KV_SCHEMES, kv_bits, kv_scheme_rules, quantize_kv, split_kv_scheme
from lowbit.quant.plan import Plan
from lowbit.quant.spec import QuantSpec

transformers = pytest.importorskip("transformers")


def _x(seed=0, shape=(2, 3, 10, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.linspace(0.1, 5, shape[-1])  # outlier channels


# --- the quantizer ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,dims", [("int8:token", (-1,)), ("int4:channel", (-2,)), ("int4:head", (-2, -1)),
                                       ("int8:tensor", (0, 1, 2, 3))])
def test_symmetric_scale_is_shared_over_the_named_dims(spec, dims):
    x = _x()
    q = quantize_kv(x, QuantSpec.parse(spec))
    qmax = QuantSpec.parse(spec).fmt.max
    s = x.abs().amax(dim=dims, keepdim=True) / qmax
    assert torch.allclose(q, torch.round(x / s).clamp(-qmax, qmax) * s, atol=1e-6)
    assert torch.allclose(q.abs().amax(dim=dims), x.abs().amax(dim=dims))  # absmax kept exactly


def test_groups_along_head_dim_and_asymmetric_zero_point():
    x = _x() + 3.0  # one-signed data: the zero point earns its keep
    sym = quantize_kv(x, QuantSpec.parse("int4:token"))
    asym = quantize_kv(x, QuantSpec.parse("int4:token:asym"))
    assert (asym - x).pow(2).mean() < (sym - x).pow(2).mean()
    for row in asym.reshape(-1, 16):
        assert len(torch.unique(row)) <= 16
    g4 = quantize_kv(x, QuantSpec.parse("int4:g4"))
    assert (g4 - x).pow(2).mean() < (sym - x).pow(2).mean()
    expect = quantize_kv(x.reshape(2, 3, 10, 4, 4), QuantSpec.parse("int4:token")).reshape(x.shape)
    assert torch.allclose(g4, expect)


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    x = _x()
    tok = quantize_kv(x, QuantSpec.parse("int4:token:asym"))
    ch = quantize_kv(x, QuantSpec.parse("int4:channel:asym"))
    assert (ch - x).pow(2).mean() < (tok - x).pow(2).mean()


def test_block_formats_run_along_head_dim_and_bad_shapes_are_named():
    x = _x()
    q = quantize_kv(x, QuantSpec.parse("nvfp4"))
    assert q.shape == x.shape and not torch.equal(q, x)
    with pytest.raises(ValueError, match="head_dim"):
        quantize_kv(torch.randn(2, 2, 4, 24), QuantSpec.parse("mxfp4"))
    with pytest.raises(ValueError, match="groups of 5"):
        quantize_kv(x, QuantSpec.parse("int4:g5"))
    assert kv_bits(QuantSpec.parse("int8:token"), 64) == 8 + 16 / 64
    assert kv_bits(QuantSpec.parse("nvfp4"), 64) == 4.5


# --- plans and scheme strings -------------------------------------------------------------------

def test_scheme_strings_with_a_kv_part():
    assert split_kv_scheme("w4a8kv4") == ("w4a8", "kv4")
    assert split_kv_scheme("int4:g64+int8:token+kv=int8:token") == ("int4:g64+int8:token", "int8:token")
    assert split_kv_scheme("w4g64") == ("w4g64", None)
    p = Plan.from_scheme("w4a8kv4c")
    assert str(p.weight_spec("model.layers.0.mlp.up_proj")) == "int4:g64"
    assert str(p.kv_spec("model.layers.0.self_attn", "key")) == "int4:asym"          # per channel
    assert str(p.kv_spec("model.layers.0.self_attn", "value")) == "int4:token:asym"
    assert Plan.from_scheme("kv8").weight == {}
    assert Plan.from_dict(p.to_dict()).kv == p.kv
    assert Plan.from_scheme("w4g64").to_dict().get("kv") is None  # old plans unchanged
    assert kv_scheme_rules("e4m3fn:token/int8:token") == {"*.key": "e4m3fn:token", "*.value": "int8:token"}
    assert set(KV_SCHEMES) >= {"kv8", "kv4", "kv4c", "kvfp8", "kvnvfp4"}


def test_bad_kv_specs_are_named():
    with pytest.raises(ValueError, match="unknown KV scheme"):
        kv_scheme_rules("kv5")
    with pytest.raises(ValueError, match="KV states"):
        Plan(weight={"*": "int4:head"})
    with pytest.raises(ValueError, match="int4:g64"):  # a block/group that would need weights' layout
        Plan(kv={"*": "int4:g64:bogus"})


# --- the hook on models -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    return model, ids


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_hook_quantizes_exactly_what_the_cache_holds(llama, monkeypatch):
    """The tensors quantized are the post-RoPE keys and the values that the cache stores."""
    from lowbit.models import kv_cache

    model, ids = llama
    m = copy.deepcopy(model)
    applied, skipped = kv_cache.apply_kv_plan(m, Plan(kv={"*": "int8:token"}))
    assert list(applied) == ["model.layers.0.self_attn", "model.layers.1.self_attn"] and not skipped
    seen = []
    real = kv_cache.quantize_kv
    monkeypatch.setattr(kv_cache, "quantize_kv", lambda x, s: (seen.append(x.clone()), real(x, s))[1])
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids, cache=cache, use_cache=True)
    assert len(seen) == 4  # key and value of two layers
    for layer in range(2):
        assert torch.equal(seen[2 * layer], cache.layers[layer].keys)        # after RoPE
        assert torch.equal(seen[2 * layer + 1], cache.layers[layer].values)


def test_no_spec_is_bit_identical_and_removal_restores(llama):
    from lowbit.models.kv_cache import apply_kv_plan, apply_kv_specs, remove_kv_quant

    model, ids = llama
    ref = _logits(model, ids)
    m = copy.deepcopy(model)
    apply_kv_specs(m, {"model.layers.0.self_attn": {"key": None, "value": None}})
    assert m.config._attn_implementation.startswith("lowbit_kv_")
    assert torch.equal(_logits(m, ids), ref)
    apply_kv_plan(m, Plan(kv={"*": "int4:token"}))
    q = _logits(m, ids)
    assert not torch.equal(q, ref) and torch.isfinite(q).all()
    remove_kv_quant(m)
    assert torch.equal(_logits(m, ids), ref)


def test_token_granularity_equals_quantizing_once_on_entry(llama):
    """Incremental decoding through the cache gives the logits of one full pass (token-local scales)."""
    from lowbit.models.kv_cache import apply_kv_plan

    model, ids = llama
    m = copy.deepcopy(model)
    apply_kv_plan(m, Plan(kv={"*": "int4:g8"}))
    full = _logits(m, ids)
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids[:, :12], cache=cache, use_cache=True)
        steps = [m(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(12, 20)]
    assert torch.allclose(torch.cat(steps, 1), full[:, 12:], atol=1e-4)


def test_pipeline_checkpoint_reapplies_kv(llama, tmp_path):
    from lowbit.export.checkpoint import load_quantized, save_quantized
    from lowbit.ptq.pipeline import quantize_model

    model, ids = llama
    m = copy.deepcopy(model)
    res = quantize_model(m, Plan.from_scheme("w4g64kv4c"), [{"input_ids": ids}], "gptq", progress=False)
    assert res.kv["model.layers.1.self_attn"] == {"key": "int4:asym", "value": "int4:token:asym"}
    assert res.to_dict()["kv"] == res.kv
    save_quantized(m, res.packed, tmp_path, kind="causal_lm", extra={"kv": res.kv})
    m2, _, meta = load_quantized(tmp_path)
    assert meta["kv"] == res.kv
    assert torch.equal(_logits(m, ids), _logits(m2, ids))
    from lowbit.models.kv_cache import remove_kv_quant

    remove_kv_quant(m2)  # the re-attached KV quantization is what made the logits match
    assert not torch.equal(_logits(m, ids), _logits(m2, ids))


def test_bert_key_value_are_quantized_the_same_way():
    from lowbit.models.kv_cache import apply_kv_plan

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    m = copy.deepcopy(model)
    applied, _ = apply_kv_plan(m, Plan(kv={"*": "int8:token"}))
    assert list(applied) == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    with torch.no_grad():
        q8 = m(ids).last_hidden_state
    apply_kv_plan(m, Plan(kv={"*": "int2:token"}))
    with torch.no_grad():
        q2 = m(ids).last_hidden_state
    e8, e2 = (q8 - ref).pow(2).mean(), (q2 - ref).pow(2).mean()
    assert 0 < e8 < e2


def test_model_without_attention_is_refused():
    from lowbit.models.kv_cache import apply_kv_plan
    from lowbit.models.loader import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="no attention module"):
        apply_kv_plan(torch.nn.Sequential(torch.nn.Linear(4, 4)), Plan(kv={"*": "int8:token"}))


def test_eager_attention_is_wrapped_too(llama):
    from lowbit.models.kv_cache import apply_kv_plan

    model, ids = llama
    m = copy.deepcopy(model)
    m.config._attn_implementation = "eager"
    ref = _logits(m, ids)
    assert torch.allclose(ref, _logits(model, ids), atol=1e-4)
    apply_kv_plan(m, Plan(kv={"*": "int8:token"}))
    assert m.config._attn_implementation == "lowbit_kv_eager"
    s = copy.deepcopy(model)
    apply_kv_plan(s, Plan(kv={"*": "int8:token"}))  # the same quantization under sdpa
    assert torch.allclose(_logits(m, ids), _logits(s, ids), atol=1e-4)
    assert not torch.equal(_logits(m, ids), ref)
