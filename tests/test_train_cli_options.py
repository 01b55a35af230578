"""The training commands (train, finetune, lptrain) parse their options to the values, and hand their
job runner the TrainConfig and arguments, pinned here: the shared option declarations must not
change any command's names, defaults or the config it trains with. The runners are replaced by a
stub that records its call, so nothing is loaded or trained."""
from __future__ import annotations

import dataclasses
import importlib
import json
import re

import pytest

from lowbit import cli


class Called(Exception):
    """Raised by the stub runner once it has recorded its call."""


RUNNERS = {"train": ("lowbit.train.job", "run_train"), "finetune": ("lowbit.adapters.job", "run_finetune"),
           "lptrain": ("lowbit.lowp.job", "run_lptrain")}


def plain(value):
    """Dataclasses (TrainConfig, EvalSettings, Plan) as dicts, so calls compare by value."""
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__name__, **dataclasses.asdict(value)}
    return value


def parse_and_call(monkeypatch, argv):
    """The parsed namespace (without func) and the runner's call: (positional, keyword) arguments."""
    module, name = RUNNERS[argv[0]]
    seen = {}

    def stub(*args, **kwargs):
        seen["call"] = (list(args), {k: plain(v) for k, v in kwargs.items()})
        raise Called

    monkeypatch.setattr(importlib.import_module(module), name, stub)
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(Called):
        args.func(args)
    namespace = {k: v for k, v in vars(args).items() if k != "func"}
    return namespace, seen["call"]


def train_config(**changes):
    base = dict(type="TrainConfig", steps=100, lr=1e-5, scale_lr=None, weight_decay=0.0, warmup=0,
                min_lr_ratio=0.1, grad_accum=1, grad_clip=1.0, save_every=50, seed=0, autocast="auto",
                grad_checkpointing=False, dropout=False)
    return {**base, **changes}


SHARED_DEFAULTS = dict(steps=100, batch_size=8, seq_len=512, warmup=0, grad_accum=1, save_every=50, seed=0,
                       autocast="auto", device="auto", out=None, json=False, quiet=False)

EXPLICIT = ["--steps", "7", "--batch-size", "3", "--seq-len", "64", "--lr", "2e-4", "--warmup", "2",
            "--grad-accum", "4", "--save-every", "5", "--seed", "9", "--device", "cpu"]
SHARED_EXPLICIT = dict(steps=7, batch_size=3, seq_len=64, lr=2e-4, warmup=2, grad_accum=4, save_every=5, seed=9,
                       device="cpu")


def test_train_defaults(monkeypatch):
    ns, (args, kwargs) = parse_and_call(monkeypatch, ["train"])
    assert ns == dict(command="train", model=None, scheme=None, plan=None, init="gptq", lr=1e-5, scale_lr=None,
                      weight_decay=0.0, teacher="fp32", objective="kl", hidden_mse=0.0, scaling="learned",
                      gradient="clipped", act_scaling="learned", act_clip_init="mse", grad_checkpointing=False,
                      calib=128, eval_tokens=8192, context=512, sentences=256, resume=False, **SHARED_DEFAULTS)
    assert args == [None, "w3g64", None]
    assert kwargs == dict(plan=None, init="gptq", config=train_config(), batch_size=8, seq_len=512, teacher="fp32",
                          objective="kl", hidden_mse=0.0, scaling="learned", gradient="clipped",
                          act_scaling="learned", act_clip_init="mse", calib=128,
                          settings=dict(type="EvalSettings", eval_tokens=8192, context=512, sentences=256),
                          device="auto", quiet=False)


def test_train_explicit(monkeypatch, tmp_path):
    (tmp_path / ".train").mkdir()
    (tmp_path / ".train" / "train_state.pt").write_bytes(b"")   # --resume only checks that it exists
    argv = ["train", "m", "--scheme", "w4g32", "--init", "rtn", *EXPLICIT, "--scale-lr", "1e-3",
            "--weight-decay", "0.1", "--grad-checkpointing", "--autocast", "none", "--eval-tokens", "0",
            "--context", "128", "--sentences", "16", "--resume", "--out", str(tmp_path), "--json", "--quiet"]
    ns, (args, kwargs) = parse_and_call(monkeypatch, argv)
    assert {k: ns[k] for k in SHARED_EXPLICIT} == SHARED_EXPLICIT
    assert (ns["scale_lr"], ns["weight_decay"], ns["grad_checkpointing"], ns["autocast"]) == (1e-3, 0.1, True, "none")
    assert (ns["eval_tokens"], ns["context"], ns["sentences"], ns["resume"]) == (0, 128, 16, True)
    assert (ns["out"], ns["json"], ns["quiet"]) == (str(tmp_path), True, True)
    assert args == ["m", "w4g32", str(tmp_path)]
    assert kwargs["config"] == train_config(steps=7, lr=2e-4, scale_lr=1e-3, weight_decay=0.1, warmup=2,
                                            grad_accum=4, save_every=5, seed=9, autocast="none",
                                            grad_checkpointing=True)
    assert kwargs["settings"] == dict(type="EvalSettings", eval_tokens=None, context=128, sentences=16)
    assert (kwargs["batch_size"], kwargs["seq_len"], kwargs["device"], kwargs["quiet"]) == (3, 64, "cpu", True)


def test_train_resume_without_state_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--resume", "--out", str(tmp_path)]) == 2
    assert "--resume: no interrupted training run" in capsys.readouterr().err


def test_finetune_defaults(monkeypatch):
    ns, (args, kwargs) = parse_and_call(monkeypatch, ["finetune"])
    assert ns == dict(command="finetune", base=None, adapter="lora", task="docs", target=None, rank=16, alpha=None,
                      scheme=None, method="rtn", lr=1e-4, scale_lr=None, eval_tokens=8192, context=512, peft=False,
                      **SHARED_DEFAULTS)
    assert args == [None, "lora", None]
    assert kwargs == dict(task="docs", targets=("*",), rank=16, alpha=None, scheme=None, method="rtn",
                          config=train_config(lr=1e-4), batch_size=8, seq_len=512, eval_tokens=8192, context=512,
                          peft=False, device="auto", quiet=False)


def test_finetune_explicit(monkeypatch, tmp_path):
    argv = ["finetune", "base", "--adapter", "lrqat", *EXPLICIT, "--scale-lr", "1e-3", "--autocast", "bf16",
            "--eval-tokens", "0", "--context", "128", "--out", str(tmp_path), "--json"]
    ns, (args, kwargs) = parse_and_call(monkeypatch, argv)
    assert {k: ns[k] for k in SHARED_EXPLICIT} == SHARED_EXPLICIT
    assert (ns["scale_lr"], ns["autocast"], ns["eval_tokens"], ns["context"]) == (1e-3, "bf16", 0, 128)
    assert args == ["base", "lrqat", str(tmp_path)]
    assert kwargs["config"] == train_config(steps=7, lr=2e-4, scale_lr=1e-3, warmup=2, grad_accum=4, save_every=5,
                                            seed=9, autocast="bf16")
    assert (kwargs["eval_tokens"], kwargs["context"], kwargs["batch_size"], kwargs["seq_len"]) == (None, 128, 3, 64)
    assert (kwargs["device"], kwargs["quiet"]) == ("cpu", True)   # --json silences progress


def test_lptrain_defaults(monkeypatch):
    ns, (args, kwargs) = parse_and_call(monkeypatch, ["lptrain"])
    assert ns == dict(command="lptrain", model=None, halo="fp8:2", block=256, backend="auto", grad_rounding=None,
                      lr=1e-5, weight_decay=0.0, objective="ce", val_batches=8, grad_checkpointing=False,
                      save_model=False, fsdp=False, gather="bf16", lora=None, lora_rank=16, **SHARED_DEFAULTS)
    assert args == [None, "fp8:2", None]
    assert kwargs == dict(config=train_config(), batch_size=8, seq_len=512, objective="ce", block=256,
                          backend="auto", grad_rounding=None, val_batches=8, device="auto", save_model=False,
                          quiet=False, fsdp=False, gather="bf16", lora=None, lora_rank=16)


def test_lptrain_explicit(monkeypatch, tmp_path):
    argv = ["lptrain", "m", "--halo", "int8:1", *EXPLICIT, "--weight-decay", "0.1", "--grad-checkpointing",
            "--autocast", "none", "--out", str(tmp_path), "--quiet"]
    ns, (args, kwargs) = parse_and_call(monkeypatch, argv)
    assert {k: ns[k] for k in SHARED_EXPLICIT} == SHARED_EXPLICIT
    assert (ns["weight_decay"], ns["grad_checkpointing"], ns["autocast"], ns["quiet"]) == (0.1, True, "none", True)
    assert args == ["m", "int8:1", str(tmp_path)]
    assert kwargs["config"] == train_config(steps=7, lr=2e-4, weight_decay=0.1, warmup=2, grad_accum=4,
                                            save_every=5, seed=9, autocast="none", grad_checkpointing=True)
    assert (kwargs["batch_size"], kwargs["seq_len"], kwargs["device"], kwargs["quiet"]) == (3, 64, "cpu", True)


def options_of(command, capsys) -> set:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--help"])
    # each option's own line in the help starts at column 2 (help text wraps further in)
    return set(re.findall(r"^  (?:-h, )?(--[a-z][a-z0-9-]*)", capsys.readouterr().out, flags=re.M))


SHARED_OPTIONS = {"--steps", "--batch-size", "--seq-len", "--lr", "--warmup", "--grad-accum", "--save-every",
                  "--seed", "--autocast", "--device", "--out", "--json", "--quiet", "--help"}


@pytest.mark.parametrize("command, own", [
    ("train", {"--scheme", "--plan", "--init", "--scale-lr", "--weight-decay", "--teacher", "--objective",
               "--hidden-mse", "--scaling", "--gradient", "--act-scaling", "--act-clip-init", "--grad-checkpointing",
               "--calib", "--eval-tokens", "--context", "--sentences", "--resume"}),
    ("finetune", {"--adapter", "--task", "--target", "--rank", "--alpha", "--scheme", "--method", "--scale-lr",
                  "--eval-tokens", "--context", "--peft"}),
    ("lptrain", {"--halo", "--block", "--backend", "--grad-rounding", "--weight-decay", "--objective",
                 "--val-batches", "--grad-checkpointing", "--save-model", "--fsdp", "--gather",
                 "--lora", "--lora-rank"}),
])
def test_option_names(command, own, capsys):
    assert options_of(command, capsys) == SHARED_OPTIONS | own


@pytest.mark.parametrize("argv", [["finetune", "--weight-decay", "0.1"], ["finetune", "--grad-checkpointing"],
                                  ["lptrain", "--scale-lr", "1e-3"], ["lptrain", "--eval-tokens", "0"],
                                  ["train", "--autocast", "fp16"]])
def test_options_a_command_lacks_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_print_report_drops_the_history_from_json_and_otherwise_prints_the_summary(capsys):
    from lowbit.train.cli_options import print_report

    report = {"steps": 3, "history": [{"step": 0, "loss": 1.0}]}
    print_report(report, True, lambda r: ["unused"])
    assert json.loads(capsys.readouterr().out) == {"steps": 3}
    print_report(report, False, lambda r: [f"{r['steps']} steps", "done"])
    assert capsys.readouterr().out == "3 steps\ndone\n"


def test_saved_state_location_and_removal(tmp_path):
    from lowbit.train.loop import STATE_FILE, discard_state, has_saved_state, run_state_dir

    assert run_state_dir(None) is None and not has_saved_state(None)
    state_dir = run_state_dir(tmp_path)
    assert state_dir == tmp_path / ".train" and not has_saved_state(tmp_path)
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_bytes(b"")
    assert has_saved_state(str(tmp_path))
    discard_state(tmp_path)
    assert not state_dir.exists() and not has_saved_state(tmp_path)
    discard_state(tmp_path)   # nothing left to remove is fine


@pytest.mark.parametrize("autocast, device, expected", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("bf16", "cpu", True), ("none", "cuda", False)])
def test_autocast_bf16_follows_the_option_and_the_device(autocast, device, expected):
    import torch

    from lowbit.train.loop import TrainConfig

    assert TrainConfig(autocast=autocast).autocast_bf16(torch.device(device)) is expected
