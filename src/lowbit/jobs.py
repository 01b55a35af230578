"""The main job, end to end: load a model, calibrate, quantize (RTN or GPTQ), evaluate against the
baseline, write the checkpoint and the report. ``lowbit quantize`` and ``lowbit eval`` call these."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .job_common import clear_progress, dense_bytes, estimated_bytes, log as _log, reported_bits, resolve_device
from .quant.plan import Plan

DEFAULT_CALIB = 128
DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_TOKENS = 8192
DEFAULT_CONTEXT = 512
DEFAULT_SENTENCES = 256


@dataclass
class EvalSettings:
    eval_tokens: Optional[int] = DEFAULT_EVAL_TOKENS   # None: the whole held-out split
    context: int = DEFAULT_CONTEXT
    sentences: int = DEFAULT_SENTENCES

    def describe(self, kind: str) -> dict:
        if kind == "causal_lm":
            return {"metric": "perplexity", "split": "evaluation", "tokens": self.eval_tokens,
                    "context": self.context, "stride": self.context,
                    "windows": "non-overlapping windows of `context` tokens; every token after the "
                               "first of each window is predicted"}
        return {"metric": "embedding fidelity", "sentences": self.sentences,
                "pooling": "mean over the attention mask"}


def evaluate_model(model, tokenizer, kind: str, settings: EvalSettings, reference=None, progress=False) -> dict:
    """The metrics of one model: perplexity (causal LM) or fidelity to ``reference`` (encoder)."""
    from .data.corpus import evaluation_sentences, evaluation_tokens

    if kind == "causal_lm":
        from .evaluate import perplexity

        tokens = evaluation_tokens(tokenizer, settings.eval_tokens)
        t = time.time()
        ppl = perplexity(model, tokens, context=settings.context, progress=progress)
        return {"perplexity": ppl, "eval_tokens": int(tokens.numel()), "eval_seconds": time.time() - t}
    from .evaluate.embedding import embedding_fidelity

    sentences = evaluation_sentences(settings.sentences)
    if reference is None:
        return {"cosine_mean": 1.0, "cosine_min": 1.0, "spearman": 1.0, "sentences": len(sentences)}
    fid = embedding_fidelity(reference, model, tokenizer, sentences)
    return {**{k: float(v) for k, v in fid.items()}, "sentences": len(sentences)}


def _baseline_cache_key(loaded, settings: EvalSettings) -> str:
    from .data.corpus import stdlib_corpus

    h = hashlib.sha256()
    key = [loaded.name, loaded.source, settings.describe(loaded.kind), stdlib_corpus().sha256, torch.__version__]
    dev = next(loaded.model.parameters()).device
    if dev.type != "cpu":  # a GPU's figure differs in the last digits: never reuse it for the CPU
        key.append(dev.type)
    h.update(json.dumps(key, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _cached_baseline(loaded, settings: EvalSettings, quiet: bool) -> dict:
    """The baseline metrics, computed once per model and evaluation setting and cached on disk."""
    if loaded.kind != "causal_lm":
        return evaluate_model(loaded.model, loaded.tokenizer, loaded.kind, settings)
    from .data.corpus import cache_dir

    path = Path(cache_dir()) / f"baseline-{_baseline_cache_key(loaded, settings)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    _log("evaluating the baseline model ...", quiet)
    res = evaluate_model(loaded.model, loaded.tokenizer, loaded.kind, settings, progress=not quiet)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def calibration_batches(loaded, n: int, seq_len: int, batch_size: int = 8, seed: int = 0):
    """Token windows of the calibration split, on the model's device."""
    from .data.corpus import calibration_batches as windows

    ids = windows(loaded.tokenizer, n, seq_len, seed).to(next(loaded.model.parameters()).device)
    return [{"input_ids": ids[i : i + batch_size]} for i in range(0, ids.shape[0], batch_size)]


def run_quantize(
    model: Optional[str] = None,
    scheme: Optional[str] = "w3g64",
    method: str = "gptq",
    out: Optional[str] = None,
    *,
    plan: Optional[Plan] = None,
    calib: int = DEFAULT_CALIB,
    seq_len: int = DEFAULT_SEQ_LEN,
    settings: Optional[EvalSettings] = None,
    act_order: bool = True,
    percdamp: float = 0.01,
    quiet: bool = False,
    loaded=None,
    retain=None,
    rotate: str = "none",
    smooth=None,
    calibration: str = "auto",
    device: Optional[str] = None,
    offload: bool = False,
    transform_seed: int = 0,
    smooth_tokens="default",
    calib_seed: int = 0,
    float_storage: str = "auto",
) -> dict:
    """Quantize ``model`` with ``scheme`` (or ``plan``) by ``method``; returns the report dict and,
    with ``out``, writes the checkpoint, report.json, layer_error.png and report.html there.
    ``calibration``: auto | sequential | parallel (see ``lowbit.ptq.pipeline.quantize_model``).
    ``device``: where the model runs (auto | cpu | cuda | cuda:N; None leaves it where it is); with
    ``offload`` the model stays in CPU memory and only the block being quantized visits ``device``
    (evaluation then runs on the CPU). ``calib_seed`` draws another set of calibration windows.
    ``float_storage``: the dtype of the unquantized float tensors (``export.float_storage``); the
    quantized model is measured after its float tensors are rounded to it, as it is stored."""
    from .export.checkpoint import save_quantized, size_breakdown
    from .export.float_storage import check_float_storage, round_to_storage
    from .models.loader import load_model
    from .ptq.pipeline import quantize_model
    from .report import plot_layer_errors
    from .transforms.apply import ROTATIONS, parse_smooth, parse_smooth_tokens

    settings = settings or EvalSettings()
    check_float_storage(float_storage)
    smooth = parse_smooth(smooth)  # bad options fail before the model is loaded
    if smooth_tokens is not None:  # None: every calibration token; "default": STATS_TOKENS
        smooth_tokens = parse_smooth_tokens(smooth_tokens)
    if rotate not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotate!r}; accepted: {', '.join(ROTATIONS)}")
    from .ptq.pipeline import CALIBRATIONS

    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; accepted: {', '.join(CALIBRATIONS)}")
    dev = resolve_device(device)
    if calib < 1 or seq_len < 2:
        raise ValueError(f"need at least one calibration sequence of 2+ tokens, got {calib} x {seq_len}")
    t_start = time.time()
    plan = plan or Plan.from_scheme(scheme)
    if loaded is None:
        _log(f"loading {model or 'smollm2'} ...", quiet)
        loaded = load_model(model)
    if dev is not None and not offload:
        loaded.model.to(dev)
    reference = None
    if loaded.kind == "encoder":
        import copy

        reference = copy.deepcopy(loaded.model)
    baseline = _cached_baseline(loaded, settings, quiet)
    base_bytes = dense_bytes(loaded.model)
    data = f"calibrating on {calib} x {seq_len} tokens of the stdlib-docs corpus" if method == "gptq" else "no data needed"
    _log(f"{method} with {plan.describe()}: {data}", quiet)
    if retain is not None:
        data += f"; retaining {retain.ratio:.2%} of weights ({retain.alloc} ratios) at {retain.fmt}"
    needs_data = method == "gptq" or retain is not None or smooth is not None
    batches = calibration_batches(loaded, calib, seq_len, seed=calib_seed) if needs_data else []
    transforms = None
    if rotate != "none" or smooth is not None:
        from .transforms.apply import apply_outlier_transforms

        _log(f"outlier transforms: rotate={rotate}, smooth={smooth}", quiet)
        transforms = apply_outlier_transforms(loaded.model, plan, batches, rotate=rotate, smooth=smooth,
                                                seed=transform_seed, smooth_tokens=smooth_tokens)
    progress_dir = Path(out) / ".progress" if out else None
    t_q = time.time()
    res = quantize_model(loaded.model, plan, batches, method, act_order=act_order, percdamp=percdamp,
                         progress_dir=progress_dir, progress=not quiet, retain=retain,
                         calibration=calibration, device=dev if offload else None)
    q_seconds = time.time() - t_q
    round_to_storage(loaded.model, {f"{n}.weight" for n in res.packed}, float_storage)
    _log("evaluating the quantized model ...", quiet)
    quant = evaluate_model(loaded.model, loaded.tokenizer, loaded.kind, settings, reference, progress=not quiet)
    report = {
        "model": loaded.name,
        "model_source": loaded.source,
        "kind": loaded.kind,
        "scheme": plan.describe(),
        "plan": plan.to_dict(),
        "method": method,
        "method_options": {"act_order": act_order, "percdamp": percdamp, "block_size": 128},
        "float_storage": float_storage,
        "calibration": ({"sequences": calib, "seq_len": seq_len, "corpus": "python-stdlib-docstrings",
                         "seed": calib_seed, "order": res.calibration} if batches else None),
        "retain": retain.to_dict() if retain is not None else None,
        "layer_error": ("output space on the calibration data: ||X(W-Q)^T||^2 / ||XW^T||^2"
                        if method == "gptq" else "weight space: ||W-Q||^2 / ||W||^2"),
        "evaluation": settings.describe(loaded.kind),
        "baseline": {**baseline, "size_bytes": base_bytes,
                     "bits_per_weight": 8 * next(loaded.model.parameters()).element_size()},
        "quantized": {**quant, "quantize_seconds": q_seconds, "bits_per_weight": res.bits_per_weight() if res.layers
                      else 8 * next(loaded.model.parameters()).element_size()},
        "transforms": transforms,
        "layers": [vars(l) for l in res.layers],
        "skipped": res.skipped,
        "kv": res.kv,
        "groups": sorted({l.groups for l in res.layers}),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": str(next(loaded.model.parameters()).device),
                        **({"offload_to": str(dev)} if offload and dev is not None else {})},
    }
    try:
        from .data.corpus import stdlib_corpus

        report["corpus"] = stdlib_corpus().describe()
    except Exception as e:  # the report stays useful without the corpus summary
        report["corpus"] = {"error": str(e)}
    if out:
        spec = model if model is None or not os.path.exists(str(model)) else os.path.abspath(str(model))
        meta = {"model": loaded.name, "model_spec": spec, "scheme": plan.describe(),
                "method": method, "evaluation": vars(settings),
                **({"retain": retain.to_dict()} if retain is not None else {}),
                **({"transforms": {"rotate": rotate, "smooth": smooth}} if transforms else {})}
        if res.kv:
            meta["kv"] = res.kv
        size = save_quantized(loaded.model, res.packed, out, kind=loaded.kind, tokenizer=loaded.tokenizer,
                              extra=meta, float_storage=float_storage)
        report["quantized"]["size_bytes"] = size
        report["quantized"]["size_breakdown"] = size_breakdown(json.loads((Path(out) / "lowbit.json").read_text()))
        report["quantized"]["checkpoint"] = str(Path(out) / "model.safetensors")
        if res.layers:  # a KV-only plan quantizes no weight
            plot_layer_errors(res.layers, Path(out) / "layer_error.png",
                              title=f"{loaded.name} {plan.describe()} {method}", output_space=method == "gptq")
    else:
        report["quantized"]["size_bytes"] = estimated_bytes(loaded.model, res, float_storage)
    report["seconds"] = time.time() - t_start
    if out:
        (Path(out) / "report.json").write_text(json.dumps(report, indent=1))
        from .report_html import write_quantize_html

        write_quantize_html(report, out)  # report.html: the same numbers and the plot, one page
        clear_progress(progress_dir)
    return report


def run_eval(path: str, settings: Optional[EvalSettings] = None, quiet: bool = False,
             device: Optional[str] = None) -> dict:
    """Load a checkpoint written by ``run_quantize`` and measure it with the same settings (on
    ``device``: auto | cpu | cuda | cuda:N; None = the CPU)."""
    from .export.checkpoint import load_quantized
    from .export.validate import read_manifest

    dev = resolve_device(device)
    if read_manifest(path).get("model_factory"):
        from .module_job import run_eval_module  # a user's model object, rebuilt by its factory

        return run_eval_module(path, quiet=quiet)
    model, tokenizer, meta = load_quantized(path)
    if dev is not None:
        model.to(dev)
    if settings is None:
        settings = _recorded_settings(path, meta.get("evaluation", {}))
    reference = None
    if meta["kind"] == "encoder":
        from .models.loader import load_model

        reference = load_model(meta.get("model_spec")).model
        if dev is not None:
            reference.to(dev)
    res = evaluate_model(model, tokenizer, meta["kind"], settings, reference, progress=not quiet)
    res["bits_per_weight"] = reported_bits(path)
    res["size_bytes"] = os.path.getsize(Path(path) / "model.safetensors")
    return res


def _recorded_settings(path, recorded: dict) -> EvalSettings:
    """The evaluation settings lowbit.json records, checked (a bad entry names itself)."""
    from .export.validate import CheckpointError

    where = Path(path) / "lowbit.json"
    allowed = {"eval_tokens": (int, type(None)), "context": (int,), "sentences": (int,)}
    for k, v in recorded.items():
        if k not in allowed:
            raise CheckpointError(f"{where}: evaluation.{k}: expected one of {', '.join(allowed)}, found {k!r}")
        if isinstance(v, bool) or not isinstance(v, allowed[k]) or (v is not None and v < 1):
            raise CheckpointError(f"{where}: evaluation.{k}: expected a positive integer"
                                  + (" or null" if k == "eval_tokens" else "") + f", found {v!r}")
    return EvalSettings(**recorded)


def run_search(model: Optional[str] = None, out: Optional[str] = None, **options) -> dict:
    """Mixed-precision search (``lowbit search``): see :func:`lowbit.search.job.run_search`."""
    from .search.job import run_search as _run

    return _run(model, out, **options)
