"""``lowbit train``, end to end: start from a PTQ result (``lowbit quantize`` run here with RTN or
GPTQ, or a checkpoint directory), train under quantization against the fp32 teacher on the stdlib
training corpus, freeze into the packed checkpoint ``lowbit quantize`` writes, evaluate before and
after, and write report.json, report.html and the loss curve.

A killed run started again with the same command resumes: the PTQ start is kept in OUT/init and the
training state in OUT/.train."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch

from ..job_common import log
from ..job_common import dense_bytes, resolve_device
from ..jobs import EvalSettings, evaluate_model, run_quantize
from ..quant.plan import Plan
from .act_quant import ACT_SCALINGS, calibrate_act_clips, clip_summary
from .loop import TrainConfig, discard_state, run_state_dir, train
from .objectives import causal_lm_objective, encoder_objective
from .qat import convert, packed_weights, prepare_qat, trainable_groups

INITS = ("rtn", "gptq")
ACT_CLIP_INITS = ("mse", "one")
CLIP_CALIB_BATCHES = 2  # training batches the input clipping ratios are calibrated on



def checkpoint_scales(directory: Path, meta: dict) -> Dict[str, Dict[str, torch.Tensor]]:
    """Each quantized layer's stored scales and zero points (what the learned scales start from),
    read alone: the codes were already loaded with the model."""
    from safetensors import safe_open

    out: Dict[str, Dict[str, torch.Tensor]] = {}
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name in meta.get("layers", {}):
            if name.startswith("_"):
                continue
            out[name] = {k: f.get_tensor(f"{name}.weight.{k}") for k in ("scales", "zeros")
                         if f"{name}.weight.{k}" in keys}
    return out


def _start_from(init: str, model: Optional[str], plan: Optional[Plan], out: Optional[Path], *, calib: int,
                seq_len: int, settings: EvalSettings, device: Optional[str], quiet: bool) -> Path:
    """The directory of the PTQ checkpoint training starts from (made here for rtn/gptq)."""
    if init not in INITS:
        d = Path(init)
        if not (d / "lowbit.json").is_file():
            raise ValueError(f"--init {init!r} is neither one of {', '.join(INITS)} nor a checkpoint directory "
                             "written by `lowbit quantize --out DIR` (no lowbit.json there)")
        return d
    if plan is None:
        raise ValueError("--init rtn|gptq quantizes the model first: give --scheme or --plan")
    d = (out / "init") if out else Path(os.environ.get("TMPDIR", "/tmp")) / f"lowbit-train-init-{os.getpid()}"
    if (d / "report.json").is_file():
        log(f"starting from the {init} checkpoint already in {d}", quiet)
        return d
    log(f"quantizing with {init} to start from ...", quiet)
    run_quantize(model, None, init, str(d), plan=plan, calib=calib, seq_len=seq_len, settings=settings,
                 device=device, quiet=quiet)
    return d


def training_data(kind: str, tokenizer, batch_size: int, seq_len: int, seed: int):
    """``batches(step)`` of the stdlib training corpus: token windows (causal LMs) or padded
    sentences (encoders), a pure function of (seed, step)."""
    from ..data import train_corpus

    if kind == "causal_lm":
        source = train_corpus.training_batches(tokenizer, seq_len, batch_size, seed=seed)
        return lambda step: {"input_ids": source.batch(step)}
    sentences = train_corpus.training_sentences(seed=seed)

    def batch(step: int):
        n = len(sentences)
        picked = [sentences[(step * batch_size + i) % n] for i in range(batch_size)]
        enc = tokenizer(picked, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return batch


def run_train(model: Optional[str] = None, scheme: Optional[str] = None, out: Optional[str] = None, *,
              plan: Optional[Plan] = None, init: str = "gptq", config: Optional[TrainConfig] = None,
              batch_size: int = 8, seq_len: int = 512, teacher: str = "fp32", objective: str = "kl",
              hidden_mse: float = 0.0, scaling: str = "learned", gradient: str = "clipped",
              act_scaling: str = "learned", act_clip_init: str = "mse", calib: int = 128, settings: Optional[EvalSettings] = None, device: Optional[str] = "auto",
              quiet: bool = False) -> dict:
    """Train ``model`` under ``scheme``/``plan`` from ``init``; returns the report (also written to
    ``out`` with the checkpoint). See the module docstring."""
    from ..export.checkpoint import load_quantized, save_quantized
    from ..models.loader import load_model

    t_start = time.time()
    cfg = config or TrainConfig()
    settings = settings or EvalSettings()
    if teacher not in ("fp32", "none"):
        raise ValueError(f"--teacher must be fp32 or none, got {teacher!r}")
    if teacher == "none" and objective != "ce":
        raise ValueError(f"objective {objective!r} distils from the teacher: use --teacher fp32, or --objective ce")
    if act_scaling not in ACT_SCALINGS:
        raise ValueError(f"--act-scaling must be one of {', '.join(ACT_SCALINGS)}, got {act_scaling!r}")
    if act_clip_init not in ACT_CLIP_INITS:
        raise ValueError(f"--act-clip-init must be one of {', '.join(ACT_CLIP_INITS)}, got {act_clip_init!r}")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need a batch of 1+ sequences of 2+ tokens, got {batch_size} x {seq_len}")
    dev = resolve_device(device)
    if scheme and plan is None:
        plan = Plan.from_scheme(scheme)
    if plan is not None and init not in INITS:  # before anything is loaded or quantized
        raise ValueError("--init DIR trains the checkpoint's own specs: leave out --scheme/--plan")
    out_dir = Path(out) if out else None
    init_dir = _start_from(init, model, plan, out_dir, calib=calib, seq_len=seq_len, settings=settings,
                           device=device, quiet=quiet)
    init_report = json.loads((init_dir / "report.json").read_text()) if (init_dir / "report.json").is_file() else {}

    student, tokenizer, meta = load_quantized(init_dir)
    source = meta.get("model_spec") if model is None else model
    log(f"loading the fp32 teacher ({source or 'smollm2'}) ...", quiet)
    loaded = load_model(source)
    kind = loaded.kind
    tokenizer = tokenizer or loaded.tokenizer
    prepare_qat(student, None, scaling=scaling, gradient=gradient, scales=checkpoint_scales(init_dir, meta),
                act_scaling=act_scaling)
    if dev is not None:
        student.to(dev)
        loaded.model.to(dev)
    ref = loaded.model
    baseline = init_report.get("baseline") or evaluate_model(ref, tokenizer, kind, settings)
    before = init_report.get("quantized")
    if before is None:
        with torch.no_grad():
            before = evaluate_model(student.eval(), tokenizer, kind, settings, ref if kind == "encoder" else None)
    batches = training_data(kind, tokenizer, batch_size, seq_len, cfg.seed)
    calibrated = None
    # a ratio already in the start (a trained checkpoint) is kept; a fresh one starts at 1 or the MSE pick
    fresh = act_scaling == "learned" and not meta.get("act_clips")
    if fresh and act_clip_init == "mse" and clip_summary(student)["layers"]:
        log(f"calibrating the input clipping ratios on {CLIP_CALIB_BATCHES} batches ...", quiet)
        calibrate_act_clips(student, (batches(k) for k in range(CLIP_CALIB_BATCHES)))
        with torch.no_grad():
            calibrated = evaluate_model(student.eval(), tokenizer, kind, settings, ref if kind == "encoder" else None)
        calibrated["act_clips"] = clip_summary(student)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log(f"training {n_train / 1e6:.1f}M parameters for {cfg.steps} steps of {batch_size} x {seq_len} tokens "
         f"({objective}{' + hidden MSE' if hidden_mse else ''}, teacher {teacher})", quiet)
    obj = (causal_lm_objective(objective, hidden_mse=hidden_mse) if kind == "causal_lm" else encoder_objective())
    res = train(student, batches, obj, trainable_groups(student),
                cfg, teacher=ref if teacher == "fp32" else None,
                state_dir=run_state_dir(out_dir), progress=not quiet)
    convert(student)
    from ..export.float_storage import round_to_storage

    round_to_storage(student, {f"{n}.weight" for n in packed_weights(student)})  # measured as it is stored
    log("evaluating the trained model ...", quiet)
    after = evaluate_model(student, tokenizer, kind, settings, ref if kind == "encoder" else None, progress=not quiet)
    if kind == "causal_lm":
        from ..data.corpus import evaluation_tokens
        from ..evaluate.kl import token_kl_divergence

        after["kl_to_fp32"] = token_kl_divergence(student, ref, evaluation_tokens(tokenizer, settings.eval_tokens),
                                                  settings.context)
    layers = meta.get("layers", {})
    report = {
        "model": loaded.name, "kind": kind, "scheme": meta.get("scheme"), "init": init,
        "init_dir": str(init_dir), "method": "qat",
        "training": {**asdict(cfg), "batch_size": batch_size, "seq_len": seq_len, "objective": objective,
                     "hidden_mse": hidden_mse, "teacher": teacher, "scaling": scaling, "gradient": gradient,
                     "act_scaling": act_scaling, "act_clip_init": act_clip_init if act_scaling == "learned" else None,
                     "corpus": "python-stdlib-sources (training split)"},
        "evaluation": settings.describe(kind),
        "baseline": {**baseline, "size_bytes": dense_bytes(ref)},
        "before": before,
        "after": {**after, "bits_per_weight": (before or {}).get("bits_per_weight"), "act_clips": clip_summary(student)},
        **({"calibrated": calibrated} if calibrated else {}),
        "steps": res.steps, "tokens": res.tokens, "seconds": res.seconds,
        "tokens_per_second": res.tokens_per_second(), "teacher_seconds": res.teacher_seconds,
        "resumed_from": res.resumed_from, "history": res.history,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": str(next(student.parameters()).device)},
        "layers": len([n for n in layers if not n.startswith("_")]),
    }
    if out_dir:
        extra = {k: v for k, v in meta.items() if k not in ("lowbit_checkpoint", "kind", "layers", "act_only",
                                                          "input_transforms", "act_clips")}
        extra.update({"method": "qat", "init": init if init in INITS else os.path.abspath(init),
                      "training": report["training"]})
        size = save_quantized(student, packed_weights(student), out_dir, kind=kind, tokenizer=tokenizer, extra=extra)
        report["after"]["size_bytes"] = size
        from .report import plot_loss, write_train_html

        plot_loss(res.history, out_dir / "loss.png", title=f"{loaded.name} {meta.get('scheme')} QAT")
        report["wall_seconds"] = time.time() - t_start
        report["quantized"] = report["after"]  # the key `lowbit eval` and quantize's reports share
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
        write_train_html(report, out_dir)
        discard_state(out_dir)
    report["wall_seconds"] = time.time() - t_start
    return report
