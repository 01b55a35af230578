"""The model verbs of lowbit's Python API, re-exported by the top-level package:

    model = lowbit.quantize_model(model, "w4g64", "gptq", tokenizer=tok)   # in place, returned too
    lowbit.save(model, "out", tokenizer=tok)
    ckpt = lowbit.load("out")                                            # .model, .tokenizer, .meta
    lowbit.evaluate(ckpt)                                                # {"perplexity": ...}

Each verb takes a scheme string (``"w4g64"``, ``"int4:g64+int8:token"``) or a :class:`Plan` and
calls the same code as the command line (``lowbit quantize`` / ``lowbit eval``), so the numbers
agree. The formats and emulation verbs (``lowbit.quantize``, ``encode``, ``decode``, ``format``)
live in ``lowbit.emulate`` and ``lowbit.formats``. See docs/api.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

# imported before the top-level package binds the name ``evaluate`` to the function below: a first
# import of the subpackage after that would put the module back in its place
from . import evaluate as _evaluate_pkg  # noqa: F401
from .jobs import DEFAULT_CALIB, DEFAULT_SEQ_LEN
from .quant.plan import Plan, as_plan

SchemeOrPlan = Union[str, Plan]

#: Attribute of a model quantized by :func:`quantize_model` holding its ``QuantizationResult``
#: (per-layer errors, bits per weight, and the packed codes :func:`save` writes).
RESULT_ATTR = "lowbit_result"

__all__ = ["quantize_model", "save", "load", "evaluate", "Checkpoint", "as_plan", "SchemeOrPlan", "RESULT_ATTR",
           "prepare_qat", "convert"]


def _check_module(model, what: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batch(item, i: int, dev: torch.device):
    """One calibration batch as the pipeline takes it: integer tensors are token ids (a row, or
    rows of equal length) -> {"input_ids": ...}; dicts are keyword arguments of the model's
    forward; float tensors and tuples are positional inputs (CNNs, MLPs)."""
    if isinstance(item, torch.Tensor):
        if item.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if item.dim() not in (1, 2) or item.numel() == 0:
                raise ValueError(f"data[{i}]: token ids must be a non-empty 1-D or 2-D (batch, tokens) tensor, "
                                 f"got shape {tuple(item.shape)}")
            ids = item if item.dim() == 2 else item.unsqueeze(0)
            return {"input_ids": ids.to(dev, torch.long)}
        return item.to(dev)
    if isinstance(item, dict):
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(v.to(dev) if isinstance(v, torch.Tensor) else v for v in item)
    raise ValueError(f"data[{i}] is a {type(item).__name__}; accepted: a tensor of token ids, a dict of the "
                     "model's keyword inputs (e.g. {'input_ids': ...}), or a tensor/tuple of its inputs")


def _calibration(model: nn.Module, data, method: str, tokenizer, calib: int, seq_len: int, seed: int) -> list:
    dev = _device_of(model)
    if data is None:
        if method != "gptq":
            return []  # RTN needs no data
        if tokenizer is None:
            raise ValueError("GPTQ needs calibration data: pass data=[token-id tensors or batches], or "
                             "tokenizer=... to draw the default batches from lowbit's stdlib corpus")
        if calib < 1 or seq_len < 2:
            raise ValueError(f"need at least one calibration sequence of 2+ tokens, got {calib} x {seq_len}")
        from .jobs import calibration_batches
        from .models.loader import load_model

        # the very batches `lowbit quantize` draws, so that both give the same model
        return calibration_batches(load_model(model, tokenizer=tokenizer), calib, seq_len, seed=seed)
    if isinstance(data, (torch.Tensor, dict)):
        data = [data]
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise ValueError(f"data must be a list of calibration batches (token-id tensors or dicts), "
                         f"got {type(data).__name__}")
    if method == "gptq" and len(data) == 0:
        raise ValueError("GPTQ needs calibration data, and data is empty")
    return [_batch(item, i, dev) for i, item in enumerate(data)]


def quantize_model(model: nn.Module, scheme_or_plan: SchemeOrPlan, method: str = "rtn", data=None, *,
                   tokenizer=None, calib: int = DEFAULT_CALIB, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0,
                   act_order: bool = True, percdamp: float = 0.01, calibration: str = "auto",
                   progress: bool = False) -> nn.Module:
    """Quantize ``model``'s linear (and conv) layers as the scheme or plan says, in place; returns
    the model, whose ``lowbit_result`` then holds the per-layer results.

    ``method``: ``"rtn"`` (round to nearest, no data) or ``"gptq"`` (error feedback from
    calibration data). ``data``: a list of batches, each a tensor of token ids or a dict of the
    model's inputs (tensors go to the model's device); None with ``tokenizer`` draws ``calib``
    windows of ``seq_len`` tokens from lowbit's stdlib calibration corpus, as ``lowbit quantize``
    does. The model runs where it is (move it to a GPU first to quantize there)."""
    from .ptq.pipeline import METHODS
    from .ptq.pipeline import quantize_model as _quantize
    from .quant.linear import QuantLinear

    _check_module(model)
    plan = as_plan(scheme_or_plan)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    done = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_spec is not None]
    if done or getattr(model, RESULT_ATTR, None) is not None:
        raise ValueError(f"the model is already quantized ({len(done)} quantized layers, e.g. {done[:1]}); "
                         "quantize a fresh float model")
    batches = _calibration(model, data, method, tokenizer, calib, seq_len, seed)
    result = _quantize(model, plan, batches, method, act_order=act_order, percdamp=percdamp,
                       progress=progress, calibration=calibration)
    setattr(model, RESULT_ATTR, result)
    return model


def _kind(model: nn.Module) -> str:
    """causal_lm | encoder for Hugging Face models (they have a config), module for anything else."""
    from .models.loader import infer_kind

    return infer_kind(model) if getattr(model, "config", None) is not None else "module"


def save(model: nn.Module, path: Union[str, os.PathLike], *, tokenizer=None,
         source: Optional[str] = None, float_storage: str = "auto") -> Path:
    """Write a model quantized by :func:`quantize_model` as a packed checkpoint in directory
    ``path`` (model.safetensors, lowbit.json, the config and ``tokenizer``), the format
    ``lowbit quantize --out`` writes and ``lowbit eval`` and :func:`load` read; returns the path.
    ``source``: the float model's name or path (``lowbit eval`` measures an encoder against it).
    ``float_storage``: auto | fp16 | bf16 | fp32, the dtype of the unquantized tensors (embeddings,
    norms); the model's own tensors are rounded in place to the stored values (docs/checkpoints.md)."""
    from .export.checkpoint import save_quantized

    _check_module(model)
    from .train.qat import packed_weights

    result = getattr(model, RESULT_ATTR, None)
    trained = packed_weights(model)
    if result is None and not trained:
        raise ValueError("the model carries no lowbit quantization result: quantize it with "
                         "lowbit.quantize_model (or train it with lowbit.prepare_qat and lowbit.convert) first "
                         "(a loaded checkpoint is already saved)")
    name = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    if result is None:
        specs = sorted({str(m.weight_spec) for m in model.modules() if getattr(m, "packed", None) is not None})
        meta = {"model": name, "scheme": ", ".join(specs), "method": "qat"}
        packed, kv = trained, None
    else:
        meta = {"model": name, "scheme": Plan.from_dict(result.plan).describe(), "method": result.method}
        packed, kv = result.packed, result.kv
    if source is not None:
        meta["model_spec"] = os.path.abspath(source) if os.path.exists(source) else source
    if kv:
        meta["kv"] = kv
    save_quantized(model, packed, path, kind=_kind(model), tokenizer=tokenizer, extra=meta,
                   float_storage=float_storage)
    return Path(path)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the quantized model, its tokenizer (None if none was saved) and the
    metadata of lowbit.json. Unpacks as ``model, tokenizer, meta = lowbit.load(path)``."""
    model: nn.Module
    tokenizer: Any
    meta: dict

    def __iter__(self) -> Iterator:
        return iter((self.model, self.tokenizer, self.meta))


def load(path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> Checkpoint:
    """Read a checkpoint written by ``lowbit quantize --out`` or :func:`save`. Hugging Face models
    are rebuilt from the saved config; a user's own module (kind ``module``) is loaded into
    ``model``, a fresh instance of the same architecture (or rebuilt by the factory the checkpoint
    recorded, for ``--model-factory`` runs)."""

    from .export.checkpoint import META_FILE, WEIGHTS_FILE, load_quantized
    from .export.validate import read_manifest

    d = Path(path)
    if not (d / META_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a lowbit checkpoint (needs {META_FILE} and {WEIGHTS_FILE}); "
                                "write one with lowbit.save or `lowbit quantize --out DIR`")
    meta = read_manifest(d)  # a corrupt or hand-edited manifest is a CheckpointError, not a traceback
    if meta.get("kind") == "module":
        if model is not None:
            from .export.module_checkpoint import load_quantized_into

            _check_module(model)
            return Checkpoint(model, None, load_quantized_into(model, d))
        if meta.get("model_factory"):
            from .module_job import load_factory_checkpoint

            built, meta = load_factory_checkpoint(d)
            return Checkpoint(built, None, meta)
        raise ValueError(f"{d} holds a user's own module without a recorded factory: pass model=a fresh "
                         "instance of its architecture, e.g. lowbit.load(path, model=MyNet())")
    if model is not None:
        raise ValueError(f"{d} holds a Hugging Face {meta.get('kind')} model, rebuilt from its saved config; "
                         "model= is only for a user's own module (kind 'module')")
    return Checkpoint(*load_quantized(d))


def evaluate(model: Union[nn.Module, Checkpoint], tokenizer=None, *, reference: Optional[nn.Module] = None,
             eval_tokens: Optional[int] = None, context: Optional[int] = None, sentences: Optional[int] = None,
             progress: bool = False) -> dict:
    """The numbers ``lowbit eval`` prints: perplexity on the held-out stdlib text (causal LMs), or
    the embeddings' fidelity to the float ``reference`` model (encoders: cosine mean/min, Spearman
    of pairwise similarities). ``model`` may be a :class:`Checkpoint` (its tokenizer and, unless
    given here, its recorded evaluation settings are used). Runs where the model is.

    Defaults: 8,192 tokens in windows of 512 (``eval_tokens=0``: the whole split); 256 sentences."""
    from .jobs import EvalSettings, evaluate_model

    recorded = {}
    if isinstance(model, Checkpoint):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        recorded = model.meta.get("evaluation", {})
        model = model.model
    _check_module(model)
    kind = _kind(model)
    if kind == "module":
        raise ValueError(f"lowbit.evaluate measures Hugging Face causal LMs (perplexity) and encoders (embedding "
                         f"fidelity); {type(model).__name__} has no config: measure it with your own metric")
    if tokenizer is None:
        raise ValueError("evaluate needs the model's tokenizer (tokenizer=...) to tokenize the held-out text")
    if kind == "encoder":
        if reference is None:
            raise ValueError("embedding fidelity needs reference=the float encoder the embeddings are compared to")
        _check_module(reference, "reference")
    elif reference is not None:
        raise ValueError("reference= applies to encoders (embedding fidelity); a causal LM is measured by perplexity")
    for name, v in (("eval_tokens", eval_tokens), ("context", context), ("sentences", sentences)):
        if v is not None and (not isinstance(v, int) or v < (0 if name == "eval_tokens" else 1)):
            raise ValueError(f"{name} must be a positive integer{' or 0 (the whole split)' if name == 'eval_tokens' else ''}, "
                             f"got {v!r}")
    settings = EvalSettings(**recorded)
    if eval_tokens is not None:
        settings.eval_tokens = eval_tokens or None
    settings.context = context or settings.context
    settings.sentences = sentences or settings.sentences
    if kind == "causal_lm" and settings.context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {settings.context}")
    was_training = model.training
    model.eval()
    try:
        return evaluate_model(model, tokenizer, kind, settings, reference, progress=progress)
    finally:
        model.train(was_training)


# --- training verbs ---------------------------------------------------------------------------------

def prepare_qat(model: nn.Module, scheme_or_plan: Optional[SchemeOrPlan] = None, *, scaling: str = "learned",
                gradient: str = "clipped", act_scaling: str = "fixed") -> nn.Module:
    """Swap the plan's linear layers for trainable ``QATLinear`` (fp32 master weights, learned LSQ
    scales or the spec's own rule, straight-through gradients) in place; returns the model. Train it
    with any loop; :func:`convert` then freezes it. A model loaded from a ``lowbit quantize``
    checkpoint keeps its own specs (``scheme_or_plan`` may be None) -- ``lowbit train --init DIR``
    also starts its scales at the stored ones. ``act_scaling="learned"``: inputs in element formats
    learn a clipping ratio of their dynamic amax (start it with
    ``lowbit.train.calibrate_act_clips(model, batches)``)."""
    from .train.qat import prepare_qat as _prepare

    _check_module(model)
    return _prepare(model, as_plan(scheme_or_plan) if scheme_or_plan is not None else None,
                    scaling=scaling, gradient=gradient, act_scaling=act_scaling)


def convert(model: nn.Module) -> nn.Module:
    """Freeze a model prepared by :func:`prepare_qat` into ``QuantLinear`` layers holding exactly the
    values the training forward used, with their packed codes; :func:`save` writes them."""
    from .train.qat import convert as _convert

    _check_module(model)
    return _convert(model)
