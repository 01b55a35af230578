"""prepare_qat / convert on a tiny Llama, and the one training loop: it lowers the loss, freezes
into exactly what it trained, saves and reloads bit for bit, and resumes to the same weights."""
import copy

import pytest
import torch

from _tiny import tiny_llama, token_ids
from lowbit.quant.linear import QuantLinear
from lowbit.train import QATLinear, convert, packed_weights, prepare_qat, trainable_groups
from lowbit.train.loop import TrainConfig, TrainResult, train
from lowbit.train.objectives import causal_lm_objective


def _data(step):
    return {"input_ids": token_ids(4, 24, seed=1000 + step)}


def _held_out():
    return token_ids(4, 24, seed=7)


def _kl(student, teacher):
    from lowbit.train.objectives import token_kl

    ids = _held_out()
    with torch.no_grad():
        return float(token_kl(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


@pytest.mark.parametrize("scheme", ["w4g32", "int3:g32:asym", "w4a4", "e2m1fn:g32+int8:token", "mxfp4", "nf4:g32"])
def test_prepare_convert_forward_is_identical(scheme):
    model = tiny_llama()
    prepare_qat(model, scheme)
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    assert len(layers) == 14  # 7 linears in each of 2 blocks; lm_head and embeddings are skipped by default
    ids = _held_out()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    convert(model)
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    assert len(packed_weights(model)) == 14
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_prepare_matches_ptq_rtn_exactly():
    from lowbit.ptq.pipeline import quantize_model
    from lowbit.quant.plan import Plan

    ptq, qat = tiny_llama(), tiny_llama()
    quantize_model(ptq, Plan.from_scheme("int3:g32"), [], "rtn", progress=False)
    prepare_qat(qat, "int3:g32")
    ids = _held_out()
    with torch.no_grad():
        assert torch.equal(ptq(input_ids=ids).logits, qat(input_ids=ids).logits)


def test_training_lowers_kl_to_teacher_and_freezes_exactly(tmp_path):
    teacher = tiny_llama()
    student = prepare_qat(copy.deepcopy(teacher), "w2g32")
    kl0 = _kl(student, teacher)
    cfg = TrainConfig(steps=30, lr=3e-4, scale_lr=3e-3, save_every=100)
    res = train(student, _data, causal_lm_objective("kl"), trainable_groups(student), cfg, teacher=teacher,
                progress=False)
    kl1 = _kl(student, teacher)
    assert kl1 < 0.6 * kl0, (kl0, kl1)  # measured 0.0062 -> 0.0022
    assert res.steps == 30 and res.tokens == 30 * 4 * 24 and len(res.history) == 30
    ids = _held_out()
    with torch.no_grad():
        trained = student(input_ids=ids).logits
    convert(student)
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, trained)
    # the checkpoint lowbit quantize writes, reloaded: the same logits
    from lowbit.export.checkpoint import load_quantized, save_quantized

    # (the unquantized tensors are stored in 16 bits: saving rounds the student to the stored values)
    save_quantized(student, packed_weights(student), tmp_path, kind="causal_lm")
    reloaded, _, meta = load_quantized(tmp_path)
    with torch.no_grad():
        stored = student(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, stored)
        assert (stored - trained).abs().max() < 1e-2
    assert all(isinstance(reloaded.get_submodule(n), QuantLinear) for n in packed_weights(student))


def test_scales_get_their_own_learning_rate_and_move():
    teacher = tiny_llama()
    student = prepare_qat(copy.deepcopy(teacher), "w2g32")
    groups = trainable_groups(student)
    assert len(groups["scales"]) == 14
    scales0 = [p.detach().clone() for p in groups["scales"]]
    cfg = TrainConfig(steps=3, lr=1e-9, scale_lr=1e-2)
    from lowbit.train.loop import optimizer_for

    opt = optimizer_for(groups, cfg)
    assert [g["lr"] for g in opt.param_groups] == [1e-9, 1e-2]
    train(student, _data, causal_lm_objective("kl"), groups, cfg, teacher=teacher, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(scales0, groups["scales"]))


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    teacher = tiny_llama()
    cfg = TrainConfig(steps=8, lr=1e-3, save_every=3, warmup=2)
    obj = causal_lm_objective("kl+ce")

    straight = prepare_qat(copy.deepcopy(teacher), "int3:g32:asym+int8:token")
    train(straight, _data, obj, trainable_groups(straight), cfg, teacher=teacher, progress=False)

    resumed = prepare_qat(copy.deepcopy(teacher), "int3:g32:asym+int8:token")

    def stop_at_5(rec):
        if rec["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(resumed, _data, obj, trainable_groups(resumed), cfg, teacher=teacher, state_dir=tmp_path,
              progress=False, on_step=stop_at_5)
    fresh = prepare_qat(copy.deepcopy(teacher), "int3:g32:asym+int8:token")  # a new process: nothing in memory
    res = train(fresh, _data, obj, trainable_groups(fresh), cfg, teacher=teacher, state_dir=tmp_path, progress=False)
    assert res.resumed_from == 5 and res.steps == 8 and len(res.history) == 8
    a, b = straight.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_next_token_objective_without_teacher_and_bad_config():
    model = prepare_qat(tiny_llama(), "w4g32")
    res = train(model, _data, causal_lm_objective("ce"), trainable_groups(model), TrainConfig(steps=2, lr=1e-4),
                progress=False)
    assert res.steps == 2
    with pytest.raises(ValueError, match="needs a teacher"):
        train(model, _data, causal_lm_objective("kl"), trainable_groups(model), TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown objective"):
        causal_lm_objective("mse")
    with pytest.raises(ValueError, match="no linear layer"):
        prepare_qat(tiny_llama(), {"weight": {"nothing.*": "int4"}})


def test_kv_cache_quantization_trains_through_the_rounding():
    from lowbit.models.kv_cache import apply_kv_plan
    from lowbit.quant.plan import Plan

    teacher = tiny_llama()
    student = prepare_qat(copy.deepcopy(teacher), "w4g32")
    specs, skipped = apply_kv_plan(student, Plan(kv={"*": "int2:token:asym"}))
    assert specs and not skipped
    ids = _held_out()
    with torch.no_grad():
        eval_logits = student(input_ids=ids).logits
        plain = copy.deepcopy(teacher)(input_ids=ids).logits
    assert not torch.allclose(eval_logits, plain)
    student.train()
    out = student(input_ids=ids, labels=ids)
    out.loss.backward()
    k = student.model.layers[0].self_attn.k_proj.weight.grad  # reaches k_proj only through the quantized keys
    assert k is not None and k.abs().sum() > 0


def test_encoder_distillation_lowers_the_cosine_gap():
    from _tiny import tiny_bert_loader
    from lowbit.train.objectives import encoder_objective

    loaded = tiny_bert_loader()()
    teacher, tok = loaded.model, loaded.tokenizer
    sentences = ["The quick brown fox jumps over the lazy dog.", "Return the number of items in the list.",
                 "A module for reading and writing files.", "Raise an error when the value is negative."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    student = prepare_qat(copy.deepcopy(teacher), "int2:g32")
    obj = encoder_objective()
    with torch.no_grad():
        before, _ = obj(student.eval(), teacher, batch)
    train(student, lambda k: batch, obj, trainable_groups(student), TrainConfig(steps=15, lr=1e-4), teacher=teacher,
          progress=False)
    with torch.no_grad():
        after, _ = obj(student, teacher, batch)
    assert float(after) < 0.7 * float(before), (float(before), float(after))


def test_qat_starts_exactly_from_a_rotated_and_smoothed_w4a4_checkpoint(tmp_path):
    """`lowbit train --init DIR` from `quantize --rotate hadamard --smooth auto`: the prepared student
    computes what the PTQ checkpoint computes, so training starts from the PTQ figure."""
    from _tiny_lm import save_byte_llama
    from lowbit.export.checkpoint import load_quantized
    from lowbit.jobs import EvalSettings, run_quantize
    from lowbit.train.job import checkpoint_scales

    model_dir = save_byte_llama(tmp_path / "model", hidden_size=64, intermediate_size=128)
    out = tmp_path / "w4a4"
    run_quantize(model_dir, "w4a4", "gptq", str(out), calib=4, seq_len=32, settings=EvalSettings(eval_tokens=256),
                 rotate="hadamard", smooth="auto", quiet=True)
    ptq, _, meta = load_quantized(out)
    student = copy.deepcopy(ptq)
    prepare_qat(student, None, scales=checkpoint_scales(out, meta))
    assert sum(isinstance(m, QATLinear) for m in student.modules()) == 14
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ptq(input_ids=ids).logits, student(input_ids=ids).logits)


def test_steady_rate_leaves_out_warmup_steps():
    h = [{"tokens": 100, "seconds": 10.0}] + [{"tokens": 100, "seconds": 1.0} for _ in range(9)]
    r = TrainResult(steps=10, tokens=1000, seconds=19.0, teacher_seconds=0.0, history=h)
    assert abs(r.tokens_per_second() - 1000 / 19) < 1e-9
    assert r.steady_tokens_per_second() == 100.0            # the first 3 steps left out
    assert abs(r.steady_tokens_per_second(skip=0) - 1000 / 19) < 1e-9
    assert r.steady_tokens_per_second(skip=10) != r.steady_tokens_per_second(skip=10)   # nan: no steps left
    assert r.to_dict()["steady_tokens_per_second"] == 100.0
