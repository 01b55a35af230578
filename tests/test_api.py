"""The model verbs of the Python API (lowbit.quantize_model, save, load, evaluate) on tiny random
models: real quantization, a checkpoint round trip, the numbers `lowbit eval` gives, clear errors."""
import copy
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.data.corpus import calibration_batches  # noqa: E402
from lowbit.ptq.pipeline import quantize_model as pipeline_quantize  # noqa: E402
from lowbit.quant.linear import QuantLinear  # noqa: E402
from lowbit.quant.plan import Plan  # noqa: E402

from _factories import tiny_mlp  # noqa: E402
from _tiny import tiny_bert_loader  # noqa: E402
from _tiny_lm import byte_llama, byte_tokenizer  # noqa: E402

EVAL = dict(eval_tokens=1024, context=128)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _ids(n=2, length=24, seed=3):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _quantized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_spec is not None}


def test_rtn_in_place_from_a_scheme_or_a_plan():
    model = byte_llama()
    float_model = copy.deepcopy(model)
    out = lowbit.quantize_model(model, "w4g32")
    assert out is model  # in place, returned too
    q = _quantized(model)
    assert len(q) == 14 and all(str(m.weight_spec) == "int4:g32" for m in q.values())  # 2 blocks x 7 linears
    assert model.lowbit_result.bits_per_weight() == pytest.approx(4.5)
    assert not torch.equal(_logits(model, _ids()), _logits(float_model, _ids()))
    # the same as the pipeline called by hand, and a Plan works as the scheme does
    by_hand = copy.deepcopy(float_model)
    pipeline_quantize(by_hand, Plan.from_scheme("w4g32"), [], "rtn", progress=False)
    via_plan = lowbit.quantize_model(copy.deepcopy(float_model), Plan({"*": "int4:g32"}))
    for m in (by_hand, via_plan):
        assert torch.equal(_logits(m, _ids()), _logits(model, _ids()))


def test_gptq_with_given_data_or_the_default_corpus_batches(tok):
    ids = calibration_batches(tok, 8, 64)
    rtn = lowbit.quantize_model(byte_llama(), "int3:g32", "rtn")
    given = lowbit.quantize_model(byte_llama(), "int3:g32", "gptq", [ids[:4], ids[4:]])
    assert [l.name for l in given.lowbit_result.layers] == [l.name for l in rtn.lowbit_result.layers]
    assert given.lowbit_result.calibration in ("sequential", "parallel")
    assert not torch.equal(_logits(given, _ids()), _logits(rtn, _ids()))
    # data=None with a tokenizer: `calib` windows of `seq_len` tokens from the stdlib corpus, batched by 8
    drawn = lowbit.quantize_model(byte_llama(), "int3:g32", "gptq", tokenizer=tok, calib=8, seq_len=64)
    batches = lowbit.quantize_model(byte_llama(), "int3:g32", "gptq", [{"input_ids": ids}])
    assert torch.equal(_logits(drawn, _ids()), _logits(batches, _ids()))
    # 1-D token rows are batches of one; weight + activation schemes install input quantizers
    w4a8 = lowbit.quantize_model(byte_llama(), "int4:g32+int8:token", "gptq", [ids[0], ids[1]])
    assert all(str(m.act_spec) == "int8:token" for m in _quantized(w4a8).values())


def test_gptq_beats_rtn_in_output_error(tok):
    ids = calibration_batches(tok, 8, 64)
    rtn = lowbit.quantize_model(byte_llama(), "int3:g32", "rtn")
    gptq = lowbit.quantize_model(byte_llama(), "int3:g32", "gptq", [ids])
    float_model = byte_llama()
    x = calibration_batches(tok, 2, 64, seed=7)
    ref = _logits(float_model, x)
    assert (_logits(gptq, x) - ref).pow(2).mean() < (_logits(rtn, x) - ref).pow(2).mean()


def test_save_load_round_trip_and_lowbit_eval_agree(tmp_path, tok):
    from lowbit.jobs import run_eval

    ids = calibration_batches(tok, 4, 64)
    model = lowbit.quantize_model(byte_llama(), "w4g32", "gptq", [ids])
    assert lowbit.save(model, tmp_path / "ck", tokenizer=tok) == tmp_path / "ck"
    ck = lowbit.load(tmp_path / "ck")
    assert ck.meta["scheme"] == "w4g32" and ck.meta["method"] == "gptq" and ck.meta["kind"] == "causal_lm"
    assert set(_quantized(ck.model)) == set(_quantized(model))
    assert torch.equal(_logits(ck.model, _ids()), _logits(model, _ids()))
    assert ck.tokenizer("tokenize me").input_ids == tok("tokenize me").input_ids
    loaded_model, loaded_tok, meta = lowbit.load(str(tmp_path / "ck"))  # unpacks too
    assert meta == ck.meta and loaded_tok is not None
    # lowbit.evaluate of the model, of the checkpoint, and `lowbit eval DIR`: the same perplexity
    direct = lowbit.evaluate(model, tok, **EVAL)
    assert math.isfinite(direct["perplexity"]) and direct["perplexity"] > 1 and direct["eval_tokens"] == 1024
    assert lowbit.evaluate(ck, **EVAL)["perplexity"] == direct["perplexity"]
    cli = run_eval(str(tmp_path / "ck"), quiet=True, device="cpu")
    assert cli["perplexity"] == lowbit.evaluate(ck)["perplexity"]  # the recorded (default) settings
    assert json.loads((tmp_path / "ck" / "lowbit.json").read_text())["layers"]


def test_a_users_own_module_round_trips(tmp_path):
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    model = lowbit.quantize_model(tiny_mlp(), "int4", "gptq", [x])
    lowbit.save(model, tmp_path / "mlp")
    ck = lowbit.load(tmp_path / "mlp", model=tiny_mlp())
    assert ck.meta["kind"] == "module" and ck.tokenizer is None
    with torch.no_grad():
        assert torch.equal(ck.model(x), model(x))
    with pytest.raises(ValueError, match="pass model=a fresh instance"):
        lowbit.load(tmp_path / "mlp")
    with pytest.raises(ValueError, match="has no config"):
        lowbit.evaluate(model, object())


def test_encoder_fidelity_against_its_float_reference():
    loaded = tiny_bert_loader()()
    reference = copy.deepcopy(loaded.model)
    same = lowbit.evaluate(loaded.model, loaded.tokenizer, reference=reference, sentences=16)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["sentences"] == 16
    q = lowbit.quantize_model(loaded.model, "int2:g32")
    res = lowbit.evaluate(q, loaded.tokenizer, reference=reference, sentences=16)
    assert all(math.isfinite(res[k]) for k in ("cosine_mean", "cosine_min", "spearman"))
    assert res["cosine_min"] <= res["cosine_mean"] < 1 - 1e-5  # a random BERT barely notices int2
    with pytest.raises(ValueError, match="needs reference="):
        lowbit.evaluate(q, loaded.tokenizer, sentences=16)


def test_evaluate_the_function_and_the_subpackage_both_reachable():
    from lowbit.evaluate import perplexity
    from lowbit.evaluate.perplexity import windows

    import lowbit.evaluate.embedding  # noqa: F401  (a submodule import must not rebind lowbit.evaluate)

    assert callable(perplexity) and callable(windows)
    assert lowbit.evaluate is lowbit.api.evaluate


@pytest.mark.parametrize("call, message", [
    (lambda m, t: lowbit.quantize_model("model", "w4g64"), "must be a torch.nn.Module, got str"),
    (lambda m, t: lowbit.quantize_model(m, "bogus"), "unknown scheme 'bogus'"),
    (lambda m, t: lowbit.quantize_model(m, ""), "the scheme is empty"),
    (lambda m, t: lowbit.quantize_model(m, 4), "expected a scheme string .* or a lowbit Plan, got int"),
    (lambda m, t: lowbit.quantize_model(m, "w4g64", "awq"), "unknown method 'awq'; accepted: rtn, gptq"),
    (lambda m, t: lowbit.quantize_model(m, "w4g64", "gptq"), "GPTQ needs calibration data: pass data="),
    (lambda m, t: lowbit.quantize_model(m, "w4g64", "gptq", []), "data is empty"),
    (lambda m, t: lowbit.quantize_model(m, "w4g64", "gptq", ["text"]), r"data\[0\] is a str; accepted"),
    (lambda m, t: lowbit.quantize_model(m, "w4g64", "gptq", "text"), "data must be a list"),
    (lambda m, t: lowbit.quantize_model(m, "w4g64", "gptq", [torch.zeros(1, 2, 3, dtype=torch.long)]),
     r"token ids must be a non-empty 1-D or 2-D"),
    (lambda m, t: lowbit.quantize_model(m, "w4g64", "gptq", tokenizer=t, calib=0), "at least one calibration"),
    (lambda m, t: lowbit.quantize_model(lowbit.quantize_model(m, "w4g64"), "w4g64"), "already quantized"),
    (lambda m, t: lowbit.save(m, "/nonexistent/x"), "quantize it with lowbit.quantize_model"),
    (lambda m, t: lowbit.evaluate(m), "needs the model's tokenizer"),
    (lambda m, t: lowbit.evaluate(m, t, reference=m), "reference= applies to encoders"),
    (lambda m, t: lowbit.evaluate(m, t, eval_tokens=-5), "eval_tokens must be a positive integer or 0"),
    (lambda m, t: lowbit.evaluate(m, t, context=1), "context must be at least 2"),
])
def test_bad_inputs_are_named(call, message, tok):
    with pytest.raises(ValueError, match=message):
        call(byte_llama(), tok)


def test_load_of_a_directory_that_is_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a lowbit checkpoint"):
        lowbit.load(tmp_path)
    model = lowbit.quantize_model(byte_llama(), "w4g64")
    lowbit.save(model, tmp_path / "ck")
    with pytest.raises(ValueError, match="model= is only for a user's own module"):
        lowbit.load(tmp_path / "ck", model=byte_llama())
