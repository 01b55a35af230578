"""``lowbit lptrain``: fine-tune a causal LM with every selected linear layer's three matmuls in low
precision (HALO recipes), through lowbit.train's loop (data, objective, checkpoint and resume,
progress), and report the held-out loss before and after.

The held-out loss is the mean next-token loss on the training corpus's validation modules (never
trained on). ``after`` evaluates the trained master weights with ordinary matmuls (what the
fine-tuning produced); ``after_lowp`` with the low-precision forward the model trained under. A run
killed and started again with the same command resumes from OUT/.train.

``fsdp``: data-parallel under ``torchrun`` (FSDP2, ``fsdp.py``): every rank loads the model, the
global batch (``batch_size``) is split over the ranks, rank 0 alone prints and writes; ``gather``
picks the weights' all-gather format (HQ-FSDP: fp8, fp8row, int8)."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ..job_common import log
from ..job_common import resolve_device
from ..train.job import training_data
from ..train.loop import TrainConfig, discard_state, run_state_dir, train
from ..train.objectives import causal_lm_objective
from .recipe import parse_recipe
from .surgery import prepare_lowp, set_lowp


def held_out_loss(model, batches: torch.Tensor, bf16: bool) -> float:
    """Mean next-token loss over ``batches`` (n, batch, seq_len) of token ids, no gradients."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        for ids in batches:
            ids = ids.to(dev)
            total += float(model(input_ids=ids, labels=ids).loss)
    model.train(was_training)
    return total / len(batches)



def run_lptrain(model=None, halo: str = "fp8:2", out: Optional[str] = None, *, config: Optional[TrainConfig] = None,
                batch_size: int = 8, seq_len: int = 512, objective: str = "ce", block: int = 256,
                backend: str = "auto", grad_rounding: Optional[str] = None, val_batches: int = 8,
                device: Optional[str] = "auto", save_model: bool = False, tokenizer=None,
                quiet: bool = False, fsdp: bool = False, gather: str = "bf16", lora: Optional[str] = None,
                lora_rank: int = 16) -> dict:
    """Fine-tune ``model`` (a causal LM spec, or a module with ``tokenizer``; a module is trained in
    place) under the recipe ``halo`` (``fp8:2``, ``int8:0``, ``e3m2:1``, ``mxfp4:1``, ``bf16`` ...);
    returns the report (also written to ``out``). ``lora`` (adapter targets, e.g. ``*q_proj,*v_proj``
    or ``*q_proj=16:32``): train LoRA adapters of rank ``lora_rank`` on the frozen base instead of all
    weights; the base's matmuls (forward and input gradient) stay in the recipe's precision."""
    from ..data.train_corpus import validation_batches
    from ..models.loader import load_model

    t_start = time.time()
    cfg = config or TrainConfig()
    recipe = parse_recipe(halo, block=block, backend=backend, grad_rounding=grad_rounding)  # bad text: fail first
    if batch_size < 1 or seq_len < 2 or val_batches < 1:
        raise ValueError(f"need a batch of 1+ sequences of 2+ tokens and 1+ validation batches, got {batch_size} x "
                         f"{seq_len}, {val_batches}")
    if lora is not None and fsdp:
        raise ValueError("lora with fsdp is not supported: the adapters train on one process (drop --fsdp)")
    rules = None
    if lora is not None:
        from ..adapters import parse_targets

        rules = parse_targets(lora, lora_rank)   # bad text: fail before loading
    parallel = None
    if fsdp:
        from ..train.distributed import init_distributed

        if isinstance(model, torch.nn.Module):
            raise ValueError("fsdp: give the model as a name or path that every process loads, not a module")
        from .gather import parse_gather

        parse_gather(gather)   # bad text: fail before the process group forms
        parallel, dev = init_distributed(device)
        quiet = quiet or not parallel.is_main
    elif gather not in (None, "bf16"):
        raise ValueError(f"gather={gather!r} is the FSDP all-gather format: add --fsdp (under torchrun)")
    else:
        dev = resolve_device(device)
    loaded = load_model(model, tokenizer=tokenizer)
    if loaded.kind != "causal_lm":
        raise ValueError(f"lptrain fine-tunes causal language models; {loaded.name} is a {loaded.kind}")
    student, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise ValueError(f"{loaded.name} has no tokenizer: the training corpus needs one")
    teacher = copy.deepcopy(student) if objective != "ce" else None
    layers = [] if recipe is None else prepare_lowp(student, recipe)
    adapters = {}
    if rules is not None:
        from ..adapters import add_lora

        adapters = add_lora(student, rules, seed=cfg.seed)   # freezes the base
    if dev is not None:
        student.to(dev)
        if teacher is not None:
            teacher.to(dev)
    if parallel is not None:
        from .fsdp import shard_model

        shard_model(student, gather=gather)
    device_name = str(next(student.parameters()).device)
    bf16 = cfg.autocast_bf16(next(student.parameters()).device)
    val = validation_batches(tokenizer, seq_len, batch_size, val_batches)
    before = held_out_loss(student, val, bf16)
    what = f"LoRA on {len(adapters)} layers (rank {lora_rank}), frozen base" if adapters else "all weights"
    log(f"{loaded.name}: {len(layers)} linear layers in {recipe.describe() if recipe else 'bf16/fp32'}; held-out "
         f"loss {before:.4f}; training {what}: {cfg.steps} steps of {batch_size} x {seq_len} tokens ({objective})",
         quiet)
    out_dir = Path(out) if out else None
    weights = [p for p in student.parameters() if p.requires_grad]
    res = train(student, training_data("causal_lm", tokenizer, batch_size, seq_len, cfg.seed),
                causal_lm_objective(objective), {"weights": weights}, cfg, teacher=teacher,
                state_dir=run_state_dir(out_dir), progress=not quiet, parallel=parallel)
    after_lowp = held_out_loss(student, val, bf16)
    if parallel is not None:
        # the master weights, gathered in full: the sharded model all-gathers low-precision codes
        student = _unsharded(student, model, tokenizer, recipe, dev, parallel)
    after = None
    if student is not None:
        set_lowp(student, False)
        after = held_out_loss(student, val, bf16)
        set_lowp(student, True)
    report = {
        "model": loaded.name, "halo": halo, "recipe": recipe.to_dict() if recipe else None,
        "recipe_text": recipe.describe() if recipe else "bf16/fp32 (unquantized)", "lowp_layers": len(layers),
        "training": {**asdict(cfg), "batch_size": batch_size, "seq_len": seq_len, "objective": objective,
                     "corpus": "python-stdlib-sources (training split)"},
        "held_out": {"before": before, "after": after, "after_lowp": after_lowp,
                     "perplexity_after": None if after is None else math.exp(after), "batches": int(val.shape[0]),
                     "tokens": int(val.numel()), "split": "python-stdlib-sources (validation modules)"},
        "steps": res.steps, "tokens": res.tokens, "seconds": res.seconds,
        "tokens_per_second": res.tokens_per_second(), "resumed_from": res.resumed_from, "history": res.history,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device_name,
                        "processes": parallel.world if parallel else 1},
        "fsdp": {"gather": gather, "processes": parallel.world} if parallel else None,
        "lora": _lora_summary(student, lora, lora_rank, adapters) if adapters else None,
    }
    report["wall_seconds"] = time.time() - t_start
    if out_dir and student is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        from ..train.report import plot_loss

        plot_loss(res.history, out_dir / "loss.png", title=f"{loaded.name} {report['recipe_text']}")
        if save_model and adapters:   # the adapters alone; the base is the model named above
            from ..adapters.io import save_adapter

            save_adapter(student, out_dir, base={"model": loaded.name, "halo": halo})
        elif save_model:
            student.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        discard_state(out_dir)
    if parallel is not None:
        parallel.barrier()
    return report


def _lora_summary(model, targets: str, rank: int, adapters: dict) -> dict:
    from ..adapters.io import adapter_bytes

    return {"targets": targets, "rank": rank, "layers": len(adapters), "adapter_bytes": adapter_bytes(model),
            "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _unsharded(sharded, model, tokenizer, recipe, dev, parallel):
    """On rank 0: a fresh copy of the model holding the sharded model's trained master weights
    (every rank takes part in gathering them); None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..models.loader import load_model

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = None
    if parallel.is_main:
        full = load_model(model, tokenizer=tokenizer).model
        if recipe is not None:
            prepare_lowp(full, recipe)
        full.load_state_dict(state, strict=False)
        full.to(dev)
    parallel.barrier()
    return full


def summary_lines(report: dict) -> list:
    h = report["held_out"]
    lora = report.get("lora")
    head = f" + LoRA rank {lora['rank']} on {lora['layers']} layers" if lora else ""
    return [f"{report['model']} {report['recipe_text']}{head}: held-out loss {h['before']:.4f} -> {h['after']:.4f} "
            f"(master weights; {h['after_lowp']:.4f} with the low-precision forward)",
            f"{report['steps']} steps, {report['tokens']:,} tokens in {report['seconds']:.1f} s "
            f"({report['tokens_per_second']:,.0f} tokens/s)"]
