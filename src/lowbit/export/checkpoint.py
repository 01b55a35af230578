"""Quantized checkpoints: a directory with the model's config and tokenizer, ``model.safetensors``
(packed codes + scales for quantized layers, the other tensors as they were; no pickle) and
``lowbit.json`` describing each quantized layer. ``load_quantized`` rebuilds the same model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..models.blocks import replace_module
from ..quant.conv import QuantConv1d, QuantConv2d
from ..quant.linear import QuantLinear

QUANT_CONVS = (QuantConv1d, QuantConv2d)
from ..quant.spec import QuantSpec
from .packing import unpack_weight

CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "lowbit.json"


def save_quantized(model: nn.Module, packed: Dict[str, Dict[str, torch.Tensor]], out_dir, *,
                   kind: str, tokenizer=None, extra: Optional[dict] = None) -> int:
    """Write the checkpoint; returns the size of model.safetensors in bytes."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: Dict[str, torch.Tensor] = {}
    layers = {}
    seen = {}
    quantized = {f"{n}.weight" for n in packed}
    for name, t in model.state_dict().items():
        if name in quantized:
            continue
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.data_ptr() and key in seen:  # tied weights (lm_head = embed_tokens) are stored once
            layers.setdefault("_tied", {})[name] = seen[key]
            continue
        seen[key] = name
        state[name] = t.detach().contiguous()
    for name, tensors in packed.items():
        mod = model.get_submodule(name)
        for k, v in tensors.items():
            state[f"{name}.weight.{k}"] = v.contiguous()
        layers[name] = {
            "weight": str(mod.weight_spec),
            "act": str(mod.act_spec) if mod.act_spec else None,
            "shape": list(mod.weight.shape),
        }
        if getattr(mod, "retain", None):  # high-impact weights stored beside the codes
            layers[name]["retain"] = mod.retain
    act_only = {n: str(m.act_spec) for n, m in model.named_modules()
                if isinstance(m, (QuantLinear,) + QUANT_CONVS) and n not in packed and m.act_spec is not None}
    # online input transforms (rotation/smoothing): their scales are in the state dict already
    transforms = {n: m.input_transform.to_dict() for n, m in model.named_modules()
                  if isinstance(m, QuantLinear) and getattr(m, "input_transform", None) is not None}
    meta = {"lowbit_checkpoint": CHECKPOINT_VERSION, "kind": kind, "layers": layers,
            "act_only": act_only, **({"input_transforms": transforms} if transforms else {}), **(extra or {})}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    if getattr(model, "config", None) is not None:
        model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return (out / WEIGHTS_FILE).stat().st_size


def load_quantized(path, dtype=torch.float32):
    """(model, tokenizer, meta) from a directory written by ``save_quantized``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    d = Path(path)
    if not (d / META_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a lowbit checkpoint (needs {META_FILE} and {WEIGHTS_FILE}); "
                                "create one with `lowbit quantize --out DIR`")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("lowbit_checkpoint") != CHECKPOINT_VERSION:
        raise ValueError(f"{d} holds checkpoint version {meta.get('lowbit_checkpoint')}; this lowbit reads "
                         f"version {CHECKPOINT_VERSION}")
    if meta.get("kind") == "module":  # no HF config: the architecture comes from the user's code
        raise ValueError(f"{d} holds a user's own model (kind 'module'); load it with "
                         "lowbit.module_job.load_factory_checkpoint(DIR) or "
                         "lowbit.export.module_checkpoint.load_quantized_into(model, DIR)")
    config = AutoConfig.from_pretrained(d)
    auto = AutoModelForCausalLM if meta["kind"] == "causal_lm" else AutoModel
    model = auto.from_config(config, dtype=dtype)
    state = load_file(str(d / WEIGHTS_FILE))
    tied = meta["layers"].pop("_tied", {})
    for name, info in meta["layers"].items():
        prefix = f"{name}.weight."
        tensors = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        wspec = QuantSpec.parse(info["weight"])
        aspec = QuantSpec.parse(info["act"]) if info["act"] else None
        W = unpack_weight(tensors, wspec, tuple(info["shape"]), retain=info.get("retain"))
        lin = model.get_submodule(name)
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, wspec, aspec)
        q.retain = info.get("retain")
        replace_module(model, name, q)
        state[f"{name}.weight"] = W.to(dtype)
    for name, spec in meta.get("act_only", {}).items():
        lin = model.get_submodule(name)
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, None,
                        QuantSpec.parse(spec))
        replace_module(model, name, q)
    _restore_transforms(model, meta.get("input_transforms", {}))
    for name, source in tied.items():
        state[name] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in tied]
    if unexpected or missing:
        raise ValueError(f"checkpoint {d} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if meta.get("kv"):  # KV-cache quantization is a runtime hook: re-attach it
        from ..models.kv_cache import apply_kv_specs

        apply_kv_specs(model, meta["kv"])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(d) if (d / "tokenizer_config.json").is_file() else None
    return model, tokenizer, meta


def _restore_transforms(model: nn.Module, transforms: dict) -> None:
    """Re-create each layer's online input transform (before the state dict, which holds its scales)."""
    if not transforms:
        return
    from ..transforms.online import InputTransform

    for name, d in transforms.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, QuantLinear):
            q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, None, None)
            replace_module(model, name, q)
            lin = q
        lin.input_transform = InputTransform.from_dict(d)
