"""Layer-by-layer post-training quantization for models without repeated transformer blocks:
CNNs (nn.Conv1d / nn.Conv2d), MLPs, any nn.Module.

Layers (nn.Linear, nn.Conv1d, nn.Conv2d) are taken in registration order. For each: run the model,
already quantized up to that layer, on the calibration batches and stop the forward at the layer's
input, accumulating its Hessian (convolutions: over the unfolded inputs, one per conv group);
quantize its weight (RTN or GPTQ) and swap in QuantLinear / QuantConv. Later layers are thus
calibrated on the outputs of the quantized earlier ones, as GPTQ's sequential mode does. Each layer
costs one partial forward per batch: fine for CNNs of tens of layers, quadratic-ish for deep ones.

Batches are what the model is called with: a tensor (``model(x)``), a tuple/list (``model(*b)``) or
a dict (``model(**b)``). RTN needs none. With a progress folder, an interrupted run resumes after the
last finished layer (``lowbit.ptq.layer_progress``).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..quant.packed import pack_weight
from .retention import unpack_weight
from ..formats import BlockFormat
from ..quant.conv import CONV_TYPES, conv_weight_matrix, quant_conv_from, unfold_conv_input
from ..quant.linear import QuantLinear
from ..quant.plan import Plan
from ..quant.spec import QuantSpec
from ..quant.weight import GroupParams, WeightQuantizer
from .gptq import HessianAccumulator, gptq
from .layer_progress import fingerprint, load_progress, save_progress
from ..models.blocks import replace_module
from .pipeline import METHODS, LayerResult, QuantizationResult, progress_bar

LAYER_TYPES = (nn.Linear,) + CONV_TYPES


def quantizable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Linear and conv layers not yet quantized, in registration order."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and getattr(m, "weight_spec", None) is None}


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, CONV_TYPES) for m in model.modules())


def run_batch(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _Stop(Exception):
    pass


def _layer_rows(layer: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The rows whose X^T X is the layer's Hessian, one matrix per conv group."""
    if isinstance(layer, CONV_TYPES):
        return unfold_conv_input(layer, x)
    return [x.reshape(-1, x.shape[-1])]


def collect_hessians(model: nn.Module, layer: nn.Module, batches) -> List[HessianAccumulator]:
    """Run the model on each batch up to ``layer``'s input and accumulate its Hessian(s)."""
    hess: List[HessianAccumulator] = []

    def hook(mod, args):
        for g, rows in enumerate(_layer_rows(mod, args[0].detach())):
            if len(hess) <= g:
                hess.append(HessianAccumulator(rows.shape[1], rows.device))
            hess[g].add(rows)
        raise _Stop

    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for b in batches:
                try:
                    run_batch(model, b)
                except _Stop:
                    pass
    finally:
        h.remove()
    if not hess:
        raise RuntimeError(f"the model never called {type(layer).__name__} on the calibration batches")
    return hess


def _merge_params(per_group: List[List[GroupParams]]) -> List[GroupParams]:
    """Stack the column groups' parameters of each conv group along the rows."""
    out = []
    for ps in zip(*per_group):
        zero = None if ps[0].zero is None else torch.cat([p.zero for p in ps])
        out.append(GroupParams(torch.cat([p.scale for p in ps]), zero))
    return out


def _why_not(layer: nn.Module, q: WeightQuantizer, rows: int, cols: int) -> Optional[str]:
    why = q.check((rows, cols))
    groups = getattr(layer, "groups", 1)
    if why is None and groups > 1 and ((isinstance(q.fmt, BlockFormat) and q.fmt.tensor_scale)
                                       or q.spec.granularity == "tensor"):
        why = f"{q.spec} has one tensor-wide scale, not supported with a grouped convolution ({groups} groups)"
    return why


def quantize_layerwise(
    model: nn.Module,
    plan: Plan,
    batches,
    method: str = "gptq",
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    progress_dir: Optional[Path] = None,
    on_layer: Optional[Callable[[LayerResult], None]] = None,
    progress: bool = True,
) -> QuantizationResult:
    """Quantize every linear / conv layer the plan names, in place, one layer at a time.

    With ``progress_dir``, each finished layer is saved there and a rerun with the same folder (same
    model, plan, method, options and batches) resumes after the last finished layer, with the same
    result as an uninterrupted run (``lowbit.ptq.layer_progress``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    if plan.kv:
        raise ValueError(f"plan has KV-cache rules but {type(model).__name__} is quantized layer by layer "
                         "(no transformer attention); drop the kv rules")
    if method == "gptq" and not batches:
        raise ValueError("GPTQ needs calibration batches; RTN runs without data")
    t0 = time.time()
    result = QuantizationResult(method, plan.to_dict())
    layers = quantizable_layers(model)
    done, fp = -1, None
    if progress_dir is not None:
        progress_dir = Path(progress_dir)
        options = {"block_size": block_size, "percdamp": percdamp, "act_order": act_order}
        fp = fingerprint(model, list(layers), batches if method == "gptq" else None, method, plan.to_dict(), options)
        done, saved, packed = load_progress(progress_dir, fp)
        if done >= 0:
            _restore(model, plan, list(layers.items())[:done + 1], saved, packed, result)
    bar = progress_bar(len(layers), progress, initial=done + 1, desc="layers")
    for i, (name, layer) in enumerate(layers.items()):
        if i <= done:
            continue
        bar.update(1)
        lr = _quantize_layer(model, name, layer, plan, batches, method, result,
                             block_size=block_size, percdamp=percdamp, act_order=act_order)
        if progress_dir is not None:
            save_progress(progress_dir, i, fp, result, name if lr is not None else None)
        if lr is not None and on_layer:
            on_layer(lr)
    bar.close()
    result.seconds = time.time() - t0
    return result


def _swap_act_only(model: nn.Module, name: str, layer: nn.Module, aspec) -> None:
    """A layer whose input is quantized and whose weight is kept."""
    new = quant_conv_from(layer, layer.weight, None, aspec) if isinstance(layer, CONV_TYPES) else \
        QuantLinear.from_linear(layer, layer.weight, None, aspec)
    replace_module(model, name, new)


def _quantize_layer(model, name, layer, plan, batches, method, result, *, block_size, percdamp,
                    act_order) -> Optional[LayerResult]:
    """Quantize one layer and swap it in; None when its weight is kept (no rule, or the format cannot
    fit it: then listed in ``result.skipped``)."""
    wspec, aspec = plan.weight_spec(name), plan.act_spec(name)
    is_conv = isinstance(layer, CONV_TYPES)
    if wspec is None:
        if aspec is not None:
            _swap_act_only(model, name, layer, aspec)
        return None
    ts = time.time()
    W = conv_weight_matrix(layer.weight.detach()).float() if is_conv else layer.weight.detach().float()
    groups = getattr(layer, "groups", 1)
    rows, cols = W.shape[0] // groups, W.shape[1]
    q = WeightQuantizer(wspec)
    why = _why_not(layer, q, rows, cols)
    if why:
        warnings.warn(f"{name} left in full precision: {why}", stacklevel=3)
        result.skipped[name] = why
        return None
    hess = collect_hessians(model, layer, batches) if method == "gptq" else None
    parts, plist, num, den, damping = [], [], 0.0, 0.0, percdamp
    with torch.inference_mode():
        for g in range(groups):
            Wg = W[g * rows:(g + 1) * rows]
            q = WeightQuantizer(wspec)
            if hess is not None:
                res = gptq(Wg, hess[g].H, q, block_size=block_size, percdamp=percdamp, act_order=act_order)
                Qg, params, damping = res.weight, res.params, max(damping, res.damping)
                H = hess[g].H
                D = Wg - Qg
                num += float(torch.einsum("ij,jk,ik->", D, H, D))
                den += float(torch.einsum("ij,jk,ik->", Wg, H, Wg))
            else:
                Qg, params = q.rtn(Wg)
                num += float((Wg - Qg).pow(2).sum())
                den += float(Wg.pow(2).sum())
            parts.append(Qg)
            plist.append(params)
    Q = torch.cat(parts)
    if not torch.isfinite(Q).all():
        raise FloatingPointError(f"quantizing {name} to {wspec} produced nan/inf")
    params = plist[0] if groups == 1 else _merge_params(plist)
    result.packed[name] = dict(sorted(pack_weight(Q.cpu(), q, params).items()))  # name order, as _restore
    new = quant_conv_from(layer, Q, wspec, aspec) if is_conv else QuantLinear.from_linear(layer, Q, wspec, aspec)
    replace_module(model, name, new)
    note = f"conv weight {tuple(layer.weight.shape)} as ({W.shape[0]}, {cols})" if is_conv else ""
    if groups > 1:
        note += f", {groups} conv groups of {rows} rows, one Hessian each"
    if damping > percdamp:
        note += f"; damping {damping:g}"
    lr = LayerResult(name, str(wspec), str(aspec) if aspec else None, tuple(W.shape),
                     q.describe_groups(cols), q.bits_per_weight(cols),
                     num / den if den > 0 else float("nan"), time.time() - ts, note.strip("; "))
    result.layers.append(lr)
    return lr


def _restore(model, plan, finished, saved: dict, packed, result: QuantizationResult) -> None:
    """Put the finished layers of a previous run back: quantized ones from their packed weights
    (bit-identical), activation-only ones from the plan (the same plan, checked by the fingerprint)."""
    lrs = {}
    for d in saved["layers"]:
        d["shape"] = tuple(d["shape"])
        lrs[d["name"]] = LayerResult(**d)
    result.skipped.update(saved["skipped"])
    for name, layer in finished:
        lr = lrs.get(name)
        if lr is None:
            aspec = plan.act_spec(name)
            if plan.weight_spec(name) is None and aspec is not None:
                _swap_act_only(model, name, layer, aspec)
            continue
        wspec = QuantSpec.parse(lr.weight_spec)
        aspec = QuantSpec.parse(lr.act_spec) if lr.act_spec else None
        W = unpack_weight(packed[name], wspec, lr.shape)
        new = quant_conv_from(layer, W, wspec, aspec) if isinstance(layer, CONV_TYPES) else \
            QuantLinear.from_linear(layer, W, wspec, aspec)
        replace_module(model, name, new)
        result.packed[name] = dict(sorted(packed[name].items()))
        result.layers.append(lr)
