"""`lowbit finetune` end to end on a tiny random Llama and a text-file task: report, adapter files,
resume after an interruption, `lowbit eval --adapter`, LR-QAT's plain checkpoint, bad input."""
import inspect
import json

import pytest
import torch

from lowbit import cli
from lowbit.adapters import job as finetune_job
from lowbit.train.loop import TrainConfig
from _tiny_lm import save_byte_llama

ARGS = dict(targets=["*proj=4"], batch_size=2, seq_len=32, eval_tokens=256, context=32, quiet=True, device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    import lowbit.data.corpus as corpus_module

    (d / "task.txt").write_text(inspect.getsource(corpus_module) * 2)
    return save_byte_llama(d / "tiny"), str(d / "task.txt"), d


def test_lora_1bit_run_report_and_eval(setup, capsys):
    model, task, d = setup
    out = d / "one"
    rep = finetune_job.run_finetune(model, "lora:1bit", str(out), task=task, config=TrainConfig(steps=4, lr=1e-2), **ARGS)
    saved = json.loads((out / "report.json").read_text())
    assert saved["after"]["adapter_bytes"] == json.loads((out / "adapter/adapter.json").read_text())["bytes"]
    assert saved["steps"] == 4 and len(saved["history"]) == 4 and (out / "report.html").is_file()
    assert rep["after"]["perplexity"] < rep["before"]["perplexity"]
    assert not (out / ".train").exists()
    code = cli.main(["eval", model, "--adapter", str(out / "adapter"), "--eval-tokens", "256", "--context", "32",
                     "--json", "--device", "cpu"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["perplexity"] == pytest.approx(rep["after"]["perplexity"], rel=1e-6)


def test_interrupted_run_resumes_to_the_same_adapter(setup, monkeypatch):
    model, task, d = setup
    cfg = TrainConfig(steps=4, lr=1e-2, save_every=1)
    finetune_job.run_finetune(model, "lora:4bit", str(d / "straight"), task=task, config=cfg, **ARGS)
    real_train = finetune_job.train

    def stopped(*a, **kw):
        def stop(rec):
            if rec["step"] == 2:
                raise KeyboardInterrupt

        return real_train(*a, **kw, on_step=stop)

    monkeypatch.setattr(finetune_job, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        finetune_job.run_finetune(model, "lora:4bit", str(d / "resumed"), task=task, config=cfg, **ARGS)
    monkeypatch.setattr(finetune_job, "train", real_train)
    rep = finetune_job.run_finetune(model, "lora:4bit", str(d / "resumed"), task=task, config=cfg, **ARGS)
    assert rep["resumed_from"] == 2
    assert (d / "straight/adapter/adapter.safetensors").read_bytes() == \
        (d / "resumed/adapter/adapter.safetensors").read_bytes()


def test_lrqat_writes_a_plain_checkpoint(setup):
    model, task, d = setup
    out = d / "lrqat"
    rep = finetune_job.run_finetune(model, "lrqat", str(out), task=task, scheme="int4:g32",
                                    config=TrainConfig(steps=3, lr=1e-2), **ARGS)
    assert rep["after"]["inference_extra_parameters"] == 0
    from lowbit.adapters.tasks import heldout_tokens, load_task
    from lowbit.export.checkpoint import load_quantized

    m, tok, meta = load_quantized(out)
    assert all(info["weight"] == "int4:g32" for info in meta["layers"].values())
    assert not any("lora" in k for k in m.state_dict())
    tokens = heldout_tokens(load_task(task), tok, 256, 32)
    assert finetune_job.heldout_perplexity(m, tokens, 32) == pytest.approx(rep["after"]["perplexity"], rel=1e-6)


@pytest.mark.parametrize("argv, msg", [
    (["--adapter", "dora"], "expected lora"),
    (["--adapter", "lrqat:4bit"], "no adapter format"),
    (["--adapter", "lora:mxfp4"], "block format"),
    (["--task", "nope.txt"], "neither"),
    (["--target", "*q_proj=abc"], "PATTERN=RANK"),
])
def test_bad_input_exits_2_with_one_line(setup, capsys, argv, msg):
    model, _, _ = setup
    assert cli.main(["finetune", model, "--steps", "1", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]


def test_lora_on_a_checkpoint_base_keeps_it_compact_and_eval_swaps_in(setup, capsys):
    import lowbit
    from lowbit.models.loader import load_model

    model, task, d = setup
    loaded = load_model(model)
    lowbit.save(lowbit.quantize_model(loaded.model, "int4:g32"), d / "q4", tokenizer=loaded.tokenizer, source=model)
    rep = finetune_job.run_finetune(str(d / "q4"), "lora:2bit", str(d / "on-q4"), task=task,
                                    config=TrainConfig(steps=2, lr=1e-2), **ARGS)
    assert rep["base"]["checkpoint"] == str((d / "q4").resolve())
    assert rep["base_bytes_saved_in_memory"] > 0  # the base trained as int8 levels
    assert cli.main(["eval", str(d / "q4"), "--adapter", str(d / "on-q4/adapter"), "--eval-tokens", "256",
                     "--context", "32", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["perplexity"] == pytest.approx(rep["after"]["perplexity"], rel=1e-6)
