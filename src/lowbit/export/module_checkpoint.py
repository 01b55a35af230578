"""Loading a lowbit checkpoint into a user's own ``nn.Module`` (a CNN, an MLP): models without a
Hugging Face config cannot be rebuilt from the directory, so the caller passes a fresh instance of
the same architecture and the quantized layers are swapped in. ``save_quantized`` writes such
checkpoints as for any model (conv weights are packed as their flattened matrix)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.blocks import replace_module
from ..quant.conv import CONV_TYPES, quant_conv_from
from ..quant.linear import QuantLinear
from ..quant.spec import QuantSpec
from .checkpoint import decode_layer, restore_act_clips, submodule
from .validate import META_FILE, WEIGHTS_FILE, CheckpointError, matrix_shape, read_manifest, read_tensors

LAYER_TYPES = (nn.Linear,) + CONV_TYPES


def load_quantized_into(model: nn.Module, path) -> dict:
    """Swap the quantized layers stored at ``path`` into ``model`` (same architecture, any weights)
    and load every other tensor; returns the checkpoint's metadata. The checkpoint is checked first
    (``export.validate``); a mismatch raises ``CheckpointError``."""
    d = Path(path)
    meta = read_manifest(d)
    state = read_tensors(d, meta)
    where = d / META_FILE
    for name, info in meta["layers"].items():
        mod = submodule(model, name, where, f"layers[{name!r}]", LAYER_TYPES)
        if list(mod.weight.shape) != info["shape"]:
            raise CheckpointError(f"{where}: layers[{name!r}].shape: the checkpoint does not match this model: "
                                  f"expected its {list(mod.weight.shape)}, found {info['shape']}")
        prefix = f"{name}.weight."
        tensors = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        wspec = QuantSpec.parse(info["weight"])
        aspec = QuantSpec.parse(info["act"]) if info["act"] else None
        W = decode_layer(d, name, tensors, wspec, matrix_shape(info["shape"]), info.get("retain"))
        if isinstance(mod, CONV_TYPES):
            new = quant_conv_from(mod, W, wspec, aspec)
        else:
            new = QuantLinear.from_linear(mod, W, wspec, aspec)
            new.retain = info.get("retain")
        replace_module(model, name, new)
        state[f"{name}.weight"] = new.weight.detach()
    for name, spec in meta["act_only"].items():
        mod = submodule(model, name, where, f"act_only[{name!r}]", LAYER_TYPES)
        aspec = QuantSpec.parse(spec)
        new = quant_conv_from(mod, mod.weight.detach(), None, aspec) if isinstance(mod, CONV_TYPES) \
            else QuantLinear.from_linear(mod, mod.weight.detach(), None, aspec)
        replace_module(model, name, new)
    restore_act_clips(model, meta.get("act_clips", {}), where)
    for name, source in meta["tied"].items():
        state[name] = state[source]
    mismatch = f"{d / WEIGHTS_FILE}: the checkpoint does not match this {type(model).__name__}: expected its tensors"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a stored tensor of another shape than this model's
        raise CheckpointError(f"{mismatch}, found others: {' '.join(str(e).split())[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{mismatch}, found missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        model.eval()
    return meta
