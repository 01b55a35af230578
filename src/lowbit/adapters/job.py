"""``lowbit finetune``, end to end: load the base (a lowbit checkpoint directory, or a model with an
optional scheme quantized on the fly), add adapters (LoRA, LoRA with low-precision adapters, or
LR-QAT), train them on a task with lowbit.train's loop (next-token loss), measure the task's
held-out perplexity before and after, and write the adapter (or, for LR-QAT, the folded
checkpoint), report.json, report.html and the loss curve. A killed run started again with the same
command resumes from OUT/.train.

``run_eval_adapters``: one base, each adapter swapped in turn, measured on its task (``lowbit eval
BASE --adapter DIR ...``)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..job_common import log
from ..job_common import resolve_device
from ..train.loop import TrainConfig, discard_state, run_state_dir, train
from ..train.objectives import causal_lm_objective
from . import tasks as task_data
from .adapter_quant import AdapterFormat
from .io import adapter_bytes, export_peft, load_adapter, read_adapter_meta, save_adapter
from .lora import add_lora, lora_layers, parse_targets
from .lrqat import fold, layer_scales, prepare_lrqat

METHODS = ("lora", "lrqat")
DEFAULT_TARGETS = ("*",)



def parse_adapter(text: str) -> Tuple[str, AdapterFormat]:
    """``lora`` | ``lora:FORMAT`` (1bit, 2bit, 4bit, 8bit, 16bit, nf4, ...) | ``lrqat``."""
    method, _, fmt = (text or "").strip().partition(":")
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"--adapter {text!r}: expected lora, lora:FORMAT (e.g. lora:1bit, lora:4bit, lora:nf4) "
                         "or lrqat")
    if method == "lrqat" and fmt:
        raise ValueError("--adapter lrqat trains inside the base's integer quantizer; it takes no adapter format")
    return method, AdapterFormat.parse(fmt or None)


def own_tensors(model: nn.Module) -> None:
    """Parameters and buffers made under inference mode (PTQ) become ordinary tensors, so autograd
    can use them in the adapters' backward."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                mod._buffers[name] = b.clone()


def _packed_of_checkpoint(directory: Path, meta: dict) -> Dict[str, Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    out: Dict[str, Dict[str, torch.Tensor]] = {}
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name in meta.get("layers", {}):
            out[name] = {k: f.get_tensor(f"{name}.weight.{k}") for k in ("scales", "zeros")
                         if f"{name}.weight.{k}" in keys}
    return out


def load_base(base: Optional[str], scheme: Optional[str] = None, method: str = "rtn", *, calib: int = 128,
              calib_seq_len: int = 512, device: Optional[torch.device] = None, quiet: bool = False):
    """(model, tokenizer, info, packed) of a base: a lowbit checkpoint directory, or a model name/path
    (``smollm2`` by default) quantized on the fly by ``method`` when ``scheme`` is given (on
    ``device``, where the model is put). ``packed`` holds each quantized layer's stored scales
    (what LR-QAT starts from)."""
    from ..export.checkpoint import load_quantized

    if base and (Path(base) / "lowbit.json").is_file():
        if scheme:
            raise ValueError(f"{base} is a quantized checkpoint already; --scheme applies to a float model")
        model, tok, meta = load_quantized(base)
        info = {"checkpoint": os.path.abspath(base), "scheme": meta.get("scheme"), "model": meta.get("model"),
                "model_spec": meta.get("model_spec")}
        if tok is None:
            from ..models.loader import load_model

            tok = load_model(meta.get("model_spec")).tokenizer
        return model, tok, info, _packed_of_checkpoint(Path(base), meta)
    from ..models.loader import load_model

    loaded = load_model(base)
    if loaded.kind != "causal_lm":
        raise ValueError(f"lowbit finetune adapts causal language models; {loaded.name} is a {loaded.kind}")
    model, tok = loaded.model, loaded.tokenizer
    if device is not None:
        model.to(device)
    info = {"model": loaded.name, "model_spec": base or "smollm2", "scheme": scheme, "method": method if scheme else None}
    packed = {}
    if scheme:
        import lowbit

        log(f"quantizing the base to {scheme} with {method} ...", quiet)
        lowbit.quantize_model(model, scheme, method, tokenizer=tok, calib=calib, seq_len=calib_seq_len)
        own_tensors(model)
        packed = model.lowbit_result.packed
    return model, tok, info, packed


def heldout_perplexity(model: nn.Module, tokens: torch.Tensor, context: int, progress: bool = False) -> float:
    from ..evaluate import perplexity

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(perplexity(model, tokens, context=context, progress=progress))
    finally:
        model.train(was)


def run_finetune(base: Optional[str] = None, adapter: str = "lora", out: Optional[str] = None, *,
                 task: str = "docs", targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 16,
                 alpha: Optional[float] = None, scheme: Optional[str] = None, method: str = "rtn",
                 config: Optional[TrainConfig] = None, batch_size: int = 8, seq_len: int = 512,
                 eval_tokens: Optional[int] = 8192, context: int = 512, peft: bool = False,
                 compact: bool = True, device: Optional[str] = "auto", quiet: bool = False) -> dict:
    """Fine-tune adapters on ``base`` for ``task``; see the module docstring. Returns the report."""
    t_start = time.time()
    cfg = config or TrainConfig(lr=1e-4)
    kind, fmt = parse_adapter(adapter)
    rules = parse_targets(targets, rank, alpha)
    if batch_size < 1 or seq_len < 2 or context < 2:
        raise ValueError(f"need a batch of 1+ sequences of 2+ tokens and a context of 2+, got {batch_size} x "
                         f"{seq_len}, context {context}")
    if kind == "lrqat" and peft:
        raise ValueError("--peft exports LoRA adapters; LR-QAT folds its update into the checkpoint's codes")
    dev = resolve_device(device)
    corpus = task_data.load_task(task)
    model, tok, info, packed = load_base(base, scheme, method, device=dev, quiet=quiet)
    if dev is not None:
        model.to(dev)
    tokens = task_data.heldout_tokens(corpus, tok, eval_tokens, context)
    log(f"held-out perplexity of the base on {task} ({tokens.numel():,} tokens) ...", quiet)
    before = heldout_perplexity(model, tokens, context)
    grids = layer_scales(model, packed)
    saved = 0
    if kind == "lora":
        add_lora(model, rules, fmt, seed=cfg.seed)
        if compact:
            from .compact_base import compact_base

            saved = compact_base(model, grids)
            if saved:
                log(f"the quantized base is kept as int8 levels: {saved / 2 ** 20:.0f} MiB less memory", quiet)
        trainable = [p for l in lora_layers(model).values() for p in (l.lora_A, l.lora_B)]
        groups = {"weights": trainable, "scales": []}
    else:
        made = prepare_lrqat(model, rules, stored=grids, seed=cfg.seed)
        groups = {"weights": [p for l in made.values() for p in (l.lora_A, l.lora_B)],
                  "scales": [l.scale for l in made.values()]}
    if dev is not None:
        model.to(dev)
    n_train = sum(p.numel() for g in groups.values() for p in g)
    log(f"training {n_train:,} adapter parameters ({adapter}) for {cfg.steps} steps of {batch_size} x {seq_len} "
         f"tokens of {task}", quiet)
    out_dir = Path(out) if out else None
    res = train(model, task_data.task_batches(corpus, tok, seq_len, batch_size, cfg.seed), causal_lm_objective("ce"),
                groups, cfg, state_dir=run_state_dir(out_dir), progress=not quiet)
    report = {
        "base": info, "adapter": adapter, "method": kind, "format": fmt.name if kind == "lora" else None,
        "targets": [str(r) for r in rules], "task": task_data.describe(corpus, task),
        "training": {**asdict(cfg), "batch_size": batch_size, "seq_len": seq_len, "objective": "ce"},
        "evaluation": {"metric": "perplexity", "split": "task held-out", "tokens": int(tokens.numel()),
                       "context": context},
        "before": {"perplexity": before}, "base_bytes_saved_in_memory": saved,
        "steps": res.steps, "tokens": res.tokens, "seconds": res.seconds,
        "tokens_per_second": res.tokens_per_second(), "resumed_from": res.resumed_from, "history": res.history,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": str(next(model.parameters()).device)},
    }
    if kind == "lora":
        after = heldout_perplexity(model, tokens, context)
        layers = lora_layers(model)
        report["after"] = {"perplexity": after, "adapter_bytes": adapter_bytes(model),
                           "adapter_parameters": sum(l.rank * (l.in_features + l.out_features) for l in layers.values()),
                           "inference_extra_parameters": sum(l.rank * (l.in_features + l.out_features)
                                                             for l in layers.values())}
    else:
        new_packed = fold(model)
        from ..export.float_storage import round_to_storage
        from ..quant.linear import QuantLinear

        quantized = {f"{n}.weight" for n, m in model.named_modules()
                     if isinstance(m, QuantLinear) and m.weight_spec is not None}
        round_to_storage(model, quantized)  # measured as it is stored (embeddings and norms in 16 bits)
        after = heldout_perplexity(model, tokens, context)
        report["after"] = {"perplexity": after, "adapter_bytes": 0, "inference_extra_parameters": 0,
                           "folded_layers": len(new_packed)}
    log(f"held-out perplexity on {task}: base {before:.3f} -> {after:.3f}", quiet)
    if out_dir:
        if kind == "lora":
            save_adapter(model, out_dir / "adapter", base=info,
                         extra={"task": task if task in task_data.TASKS else os.path.abspath(task),
                                "targets": report["targets"], "steps": res.steps})
            if peft:
                export_peft(model, out_dir / "peft", info.get("model_spec"))
        else:
            _save_folded(model, new_packed, out_dir, tok, info, report)
        from ..train.report import plot_loss
        from .report import write_finetune_html

        plot_loss(res.history, out_dir / "loss.png", title=f"{adapter} on {task}")
        report["wall_seconds"] = time.time() - t_start
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        write_finetune_html(report, out_dir)
        discard_state(out_dir)
    report["wall_seconds"] = time.time() - t_start
    return report


def _save_folded(model, packed, out_dir: Path, tok, info: dict, report: dict) -> None:
    """LR-QAT's result: a plain lowbit checkpoint (the other quantized layers keep their codes)."""
    from ..export.checkpoint import save_quantized
    from ..quant.linear import QuantLinear
    from ..quant.packed import pack_weight
    from ..quant.weight import WeightQuantizer

    all_packed = dict(packed)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and mod.weight_spec is not None and name not in all_packed:
            # an untargeted quantized layer: re-pack its (unchanged) on-grid weight
            q = WeightQuantizer(mod.weight_spec)
            Q, params = q.rtn(mod.weight.detach().float())
            if not torch.equal(Q, mod.weight.detach().float()):
                raise ValueError(f"layer {name} is not on its grid any more; cannot save it packed")
            all_packed[name] = {k: v.cpu() for k, v in pack_weight(Q, q, params).items()}
    extra = {"model": info.get("model"), "scheme": info.get("scheme"), "method": "lrqat",
             "model_spec": info.get("model_spec"), "training": report["training"], "task": report["task"]["task"]}
    size = save_quantized(model, all_packed, out_dir, kind="causal_lm", tokenizer=tok, extra=extra)
    from ..quant.packed import packed_nbytes

    n_weights = sum(model.get_submodule(n).weight.numel() for n in all_packed)
    report["after"]["size_bytes"] = size
    # the key `lowbit eval` reads from a checkpoint's report
    report["quantized"] = {"bits_per_weight": 8 * sum(packed_nbytes(t) for t in all_packed.values()) / n_weights,
                           "task_perplexity": report["after"]["perplexity"]}


def run_eval_adapters(base: Optional[str], adapters: Sequence[str], task: Optional[str] = None,
                      eval_tokens: Optional[int] = 8192, context: int = 512, device: Optional[str] = None,
                      quiet: bool = False) -> List[dict]:
    """Load ``base`` once, then each adapter in turn (swapped at load time) and measure the held-out
    perplexity of its task (or of ``task``)."""
    metas = [read_adapter_meta(a) for a in adapters]
    recorded = metas[0].get("base", {}) if metas else {}
    on_the_fly = not (base and (Path(base) / "lowbit.json").is_file()) and recorded.get("scheme") \
        and not recorded.get("checkpoint")
    # a base quantized on the fly is rebuilt the way the adapter's run built it
    dev = resolve_device(device)
    model, tok, _, _ = load_base(base, recorded.get("scheme") if on_the_fly else None,
                                 recorded.get("method") or "rtn", device=dev, quiet=quiet)
    if dev is not None:
        model.to(dev)
    results = []
    for path, meta in zip(adapters, metas):
        t = task or meta.get("task")
        if not t:
            raise ValueError(f"{path}: the adapter records no task; give --task docs|code|FILE")
        tokens = task_data.heldout_tokens(task_data.load_task(t), tok, eval_tokens, context)
        load_adapter(model, path, replace=True)
        if dev is not None:
            model.to(dev)
        results.append({"adapter": str(path), "task": t, "format": meta["format"],
                        "perplexity": heldout_perplexity(model, tokens, context, progress=not quiet),
                        "adapter_bytes": meta["bytes"], "eval_tokens": int(tokens.numel())})
    return results
