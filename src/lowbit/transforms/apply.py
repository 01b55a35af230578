"""The outlier transforms of ``lowbit quantize --rotate/--smooth``, applied to a float model before
quantization, in the one order in which they compose:

1. fused residual rotation (``--rotate hadamard`` on a Llama-style decoder; no run-time cost);
2. smoothing (``--smooth A|auto``): folded into norms where possible, else explicit input scales;
3. online rotations: down_proj's input (Llama, ``hadamard``), every block linear (other models,
   ``hadamard``), or every quantized linear at its format's group/block size (``--rotate block``:
   the MR-GPTQ recipe for FP4/MX/NVFP4; GPTQ then runs on ``W R`` with the Hessian ``R^T H R``, see
   ptq.pipeline.input_hessian).

``hadamard`` rotates the full width wherever a Hadamard matrix of that order is available
(powers of two, and Paley/Kronecker sizes such as 384 = 12·32, 576 = 36·16, 1536 = 12·128; see
transforms/paley.py), else the largest power-of-two block dividing it (recorded as a fallback).
``hadamard-pow2`` always uses that largest power-of-two block (the earlier behaviour: 576 is
rotated as 9 independent blocks of 64), kept for comparison.

``auto`` chooses per group of linears reading one input (Llama q/k/v, o, gate/up, down; BERT's
shared-input groups) between no rotation, the ``block`` rotation and a full-width online rotation,
by the output error under the plan's quantizers (RTN weights, the input quantizer) on calibration
rows, jointly with the smoothing alpha when ``--smooth auto`` is on. Every rotation is online (no
fused residual rotation), so each group's choice is free. Rotations are not a uniform win: on
NVFP4 W4A4, whose 16-element blocks already isolate channel outliers, a rotation that spreads
down_proj's outlier channel over every block costs more than it gains on the weights.

The float model's outputs are compared before and after on a short calibration slice; the largest
absolute change is recorded with the rest.
"""
from __future__ import annotations

import time
from typing import List, Optional, Union

import torch
from torch import nn

from ..quant.plan import Plan
from .hadamard import default_block, hadamard_block, is_power_of_two
from .rotation import batch_logits, online_rotate, rotate_llama
from .smooth import apply_smoothing

ROTATIONS = ("none", "hadamard", "hadamard-pow2", "block", "auto")


def parse_smooth(value) -> Optional[Union[float, str]]:
    """None/'none'/'off' -> None, 'auto' -> 'auto', a number in [0, 1] -> float."""
    if value is None:
        return None
    v = str(value).strip().lower()
    if v in ("none", "off", ""):
        return None
    if v == "auto":
        return "auto"
    try:
        a = float(v)
    except ValueError:
        raise ValueError(f"--smooth takes a number in [0, 1] (SmoothQuant's alpha) or 'auto', got {value!r}") from None
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"--smooth alpha must be in [0, 1], got {a}")
    return a


def parse_smooth_tokens(value):
    """--smooth-tokens as given on the command line: None (not given) or 'default' -> "default"
    (transforms.smooth.STATS_TOKENS), 'all' -> None (every calibration token), a positive integer
    (or its string) -> that many tokens."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "default"):
        return "default"
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool) or (isinstance(value, float) and value != n):
        raise ValueError(f"--smooth-tokens takes a positive number of calibration tokens, 'all' or 'default', "
                         f"got {value!r}")
    return n


def is_llama_like(model: nn.Module) -> bool:
    core = getattr(model, "model", None)
    layers = getattr(core, "layers", None)
    return (layers is not None and hasattr(model, "lm_head") and hasattr(core, "norm")
            and hasattr(core, "embed_tokens")
            and all(hasattr(l, "input_layernorm") and hasattr(l, "post_attention_layernorm")
                    and hasattr(getattr(l, "mlp", None), "down_proj") for l in layers))


def _block_linears(model: nn.Module, plan: Plan) -> List[str]:
    from ..models.blocks import find_blocks, linear_layers

    path, blocks = find_blocks(model)
    names = [n for i, b in enumerate(blocks) for n in linear_layers(b, f"{path}.{i}")]
    return [n for n in names if plan.weight_spec(n) is not None or plan.act_spec(n) is not None]


def _format_block(plan: Plan, name: str, features: int) -> int:
    """The rotation block for ``--rotate block``: the weight spec's group/block size when it is a
    power of two dividing the input size, else the largest power of two dividing it."""
    spec = plan.weight_spec(name) or plan.act_spec(name)
    g = spec.group_size if spec is not None and spec.group_size else None
    return g if g and is_power_of_two(g) and features % g == 0 else default_block(features)


def _check_batch(batches: List[dict], tokens: int = 64) -> Optional[dict]:
    if not batches:
        return None
    return {k: v[:1, :tokens] for k, v in batches[0].items() if torch.is_tensor(v)}


@torch.no_grad()
def apply_outlier_transforms(model: nn.Module, plan: Plan, batches: List[dict], *, rotate: str = "none",
                             smooth=None, seed: int = 0, smooth_grid=None, smooth_tokens="default") -> dict:
    """Apply the requested rotation/smoothing in place; returns the record for report.json.
    ``smooth_tokens``: calibration tokens the smoothing statistics are collected on (None: all;
    "default": transforms.smooth.STATS_TOKENS)."""
    if rotate not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotate!r}; accepted: {', '.join(ROTATIONS)}")
    smooth = parse_smooth(smooth)
    if smooth_tokens is not None:  # None: every calibration token
        smooth_tokens = parse_smooth_tokens(smooth_tokens)
    if smooth is not None and not batches:
        raise ValueError("smoothing needs calibration data (activation statistics); got no batches")
    t0 = time.time()
    record: dict = {"rotate": rotate, "smooth": smooth, "seed": seed}
    if rotate == "none" and smooth is None:
        return record
    check = _check_batch(batches)
    model.eval()
    before = batch_logits(model, check).float() if check is not None else None
    if rotate == "auto":
        _chosen_transforms(model, plan, batches, record, smooth, seed, smooth_grid, smooth_tokens)
    else:
        _fixed_transforms(model, plan, batches, record, rotate, smooth, seed, smooth_grid, smooth_tokens)
    if before is not None:
        after = batch_logits(model, check).float()
        record["float_check"] = {"max_abs_diff": float((after - before).abs().max()),
                                 "max_abs_output": float(before.abs().max()),
                                 "tokens": int(check["input_ids"].numel()) if "input_ids" in check else None}
    record["seconds"] = time.time() - t0
    return record


def _fixed_transforms(model, plan, batches, record, rotate, smooth, seed, smooth_grid, smooth_tokens) -> None:
    llama = is_llama_like(model)
    hadamard = rotate in ("hadamard", "hadamard-pow2")
    width = hadamard_block if rotate == "hadamard" else default_block

    # 1. fused residual rotation
    if hadamard and llama:
        hidden = model.get_input_embeddings().weight.shape[1]
        record["residual"] = rotate_llama(model, seed=seed, block=width(hidden), online_down=False,
                                          full_heads=rotate == "hadamard")

    # the online rotation each layer will get in step 3: (block, seed) or None
    def rotation_of(name: str, features: int):
        if hadamard:
            if llama:
                return (width(features), seed + 1) if name.endswith("mlp.down_proj") else None
            return width(features), seed
        if rotate == "block":
            return _format_block(plan, name, features), seed
        return None

    # 2. smoothing
    if smooth is not None:
        kw = {"grid": smooth_grid} if smooth_grid else {}
        kw["stats_tokens"] = smooth_tokens
        record["smoothing"] = apply_smoothing(model, batches, smooth, weight_spec_of=plan.weight_spec,
                                              act_spec_of=plan.act_spec, rotation_of=rotation_of, **kw)

    # 3. online rotations
    if rotate != "none":
        names = _block_linears(model, plan)
        if hadamard and llama:
            names = [n for n in names if n.endswith("mlp.down_proj")]
        recs = []
        for n in names:
            b, sd = rotation_of(n, model.get_submodule(n).in_features)
            recs.append(online_rotate(model, n, b, sd))
        record["online"] = {"layers": len(recs), "blocks": sorted({r["block"] for r in recs})}
        if rotate == "hadamard":
            widths = {model.get_submodule(n).in_features for n in names}
            partial = sorted(w for w in widths if hadamard_block(w) != w)
            if partial:  # no full Hadamard matrix of these orders: block rotation instead
                record["block_fallback"] = {w: default_block(w) for w in partial}
        if hadamard and not llama:
            record["note"] = ("no fused residual rotation for this architecture (only Llama-style RMSNorm "
                              "decoders admit one); every block linear rotates its input online")


def _chosen_transforms(model, plan, batches, record, smooth, seed, smooth_grid, smooth_tokens) -> None:
    """``--rotate auto``: each group's rotation (none, block, full width) chosen with its alpha."""
    if not batches:
        raise ValueError("--rotate auto chooses each layer's rotation on calibration data; got no batches")

    def choices(name: str, features: int):
        block = _format_block(plan, name, features)
        out = {"none": None, "block": (block, seed)}
        if hadamard_block(features) != block:
            out["full"] = (hadamard_block(features), seed)
        return out

    kw = {"grid": smooth_grid} if smooth_grid else {}
    rec = apply_smoothing(model, batches, smooth, weight_spec_of=plan.weight_spec, act_spec_of=plan.act_spec,
                          rotation_choices=choices, stats_tokens=smooth_tokens, **kw)
    chosen = rec.pop("rotation")
    recs = [online_rotate(model, n, *c["rotation"]) for c in chosen.values() if c["rotation"] is not None
            for n in c["linears"]]
    labels = [c["label"] for c in chosen.values()]
    record["online"] = {"layers": len(recs), "blocks": sorted({r["block"] for r in recs})}
    record["choice"] = {
        "groups": len(chosen), "count": {k: labels.count(k) for k in ("none", "block", "full")},
        "chosen": {first: {"rotation": c["label"], "block": None if c["rotation"] is None else c["rotation"][0]}
                   for first, c in chosen.items()},
        "search_sample": rec["search_sample"], "stats": rec["stats"], "search_error": rec.pop("search_error", {})}
    if smooth is not None:
        record["smoothing"] = rec
