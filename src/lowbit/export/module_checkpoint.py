"""Loading a lowbit checkpoint into a user's own ``nn.Module`` (a CNN, an MLP): models without a
Hugging Face config cannot be rebuilt from the directory, so the caller passes a fresh instance of
the same architecture and the quantized layers are swapped in. ``save_quantized`` writes such
checkpoints as for any model (conv weights are packed as their flattened matrix)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..models.blocks import replace_module
from ..quant.conv import CONV_TYPES, quant_conv_from
from ..quant.linear import QuantLinear
from ..quant.spec import QuantSpec
from .checkpoint import CHECKPOINT_VERSION, META_FILE, WEIGHTS_FILE
from .packing import unpack_weight


def load_quantized_into(model: nn.Module, path) -> dict:
    """Swap the quantized layers stored at ``path`` into ``model`` (same architecture, any weights)
    and load every other tensor; returns the checkpoint's metadata."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / META_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a lowbit checkpoint (needs {META_FILE} and {WEIGHTS_FILE})")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("lowbit_checkpoint") != CHECKPOINT_VERSION:
        raise ValueError(f"{d} holds checkpoint version {meta.get('lowbit_checkpoint')}; expected {CHECKPOINT_VERSION}")
    state = load_file(str(d / WEIGHTS_FILE))
    layers = dict(meta["layers"])
    tied = layers.pop("_tied", {})
    names = dict(model.named_modules())
    absent = [n for n in list(layers) + list(meta.get("act_only", {})) if n not in names]
    if absent:
        raise ValueError(f"checkpoint {d} does not match this model: it has no layers {absent[:5]}")
    for name, info in layers.items():
        mod = model.get_submodule(name)
        shape = tuple(info["shape"])
        if len(shape) > 2:  # a convolution: packed as (out, in/groups * prod(kernel))
            shape = (shape[0], math.prod(shape[1:]))
        prefix = f"{name}.weight."
        tensors = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        wspec = QuantSpec.parse(info["weight"])
        aspec = QuantSpec.parse(info["act"]) if info["act"] else None
        W = unpack_weight(tensors, wspec, shape)
        if isinstance(mod, CONV_TYPES):
            new = quant_conv_from(mod, W, wspec, aspec)
        elif isinstance(mod, nn.Linear):
            new = QuantLinear.from_linear(mod, W, wspec, aspec)
        else:
            raise ValueError(f"checkpoint layer {name} is a {type(mod).__name__} in this model; expected a "
                             "Linear, Conv1d or Conv2d")
        replace_module(model, name, new)
        state[f"{name}.weight"] = new.weight.detach()
    for name, spec in meta.get("act_only", {}).items():
        mod = model.get_submodule(name)
        new = quant_conv_from(mod, mod.weight.detach(), None, QuantSpec.parse(spec)) if isinstance(mod, CONV_TYPES) \
            else QuantLinear.from_linear(mod, mod.weight.detach(), None, QuantSpec.parse(spec))
        replace_module(model, name, new)
    for name, source in tied.items():
        state[name] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {d} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        model.eval()
    return meta
