"""Quantized checkpoints: a directory with the model's config and tokenizer, ``model.safetensors``
(packed codes + scales for quantized layers, the other tensors as they were; no pickle) and
``lowbit.json``, the manifest: each quantized layer's specs and shape, and the shape, dtype and
checksums that ``load_quantized`` checks (``export.validate``) before it rebuilds the same model.
docs/checkpoints.md describes the format."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..models.blocks import replace_module
from ..quant.conv import QuantConv1d, QuantConv2d
from ..quant.linear import QuantLinear
from ..quant.spec import QuantSpec
from .float_storage import DEFAULT_FLOAT_STORAGE, round_to_storage
from .packing import unpack_weight
from .validate import (CHECKPOINT_VERSION, META_FILE, RESERVED_KEYS, WEIGHTS_FILE, CheckpointError, dtype_name,
                       file_sha256, manifest_digest, read_manifest, read_tensors)

QUANT_CONVS = (QuantConv1d, QuantConv2d)
LOADABLE_KINDS = ("causal_lm", "encoder")

__all__ = ["save_quantized", "load_quantized", "size_breakdown", "CheckpointError", "CHECKPOINT_VERSION", "META_FILE", "WEIGHTS_FILE"]


def save_quantized(model: nn.Module, packed: Dict[str, Dict[str, torch.Tensor]], out_dir, *,
                   kind: str, tokenizer=None, extra: Optional[dict] = None,
                   float_storage: str = DEFAULT_FLOAT_STORAGE) -> int:
    """Write the checkpoint; returns the size of model.safetensors in bytes. ``extra``: further
    JSON-serialisable keys for the manifest (keys the manifest defines itself, such as ``layers``
    or ``files``, are taken from this save, not from ``extra``). ``float_storage``: the dtype of
    the unquantized float tensors (``export.float_storage``); the model's own tensors are rounded
    in place to the stored values, so that the model in memory is the model on disk."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: Dict[str, torch.Tensor] = {}
    layers, tied = {}, {}
    seen = {}
    quantized = {f"{n}.weight" for n in packed}
    dtypes = round_to_storage(model, quantized, float_storage)
    for name, t in model.state_dict().items():
        if name in quantized:
            continue
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.data_ptr() and key in seen:  # tied weights (lm_head = embed_tokens) are stored once
            tied[name] = seen[key]
            continue
        seen[key] = name
        state[name] = t.detach().to(dtypes[name]).contiguous()
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
            layers[name]["retain"] = str(mod.retain)
    act_only = {n: str(m.act_spec) for n, m in model.named_modules()
                if isinstance(m, (QuantLinear,) + QUANT_CONVS) and n not in packed and m.act_spec is not None}
    # online input transforms (rotation/smoothing): their scales are in the state dict already
    transforms = {n: m.input_transform.to_dict() for n, m in model.named_modules()
                  if isinstance(m, QuantLinear) and getattr(m, "input_transform", None) is not None}
    # input clipping ratios learned in training (lowbit.train.act_quant): numbers, kept exactly by JSON
    act_clips = {n: float(m.act_clip) for n, m in model.named_modules()
                 if isinstance(m, QuantLinear) and m.act_clip is not None}
    save_file(state, str(out / WEIGHTS_FILE))
    extra = {k: v for k, v in (extra or {}).items() if k not in RESERVED_KEYS}
    meta = {"lowbit_checkpoint": CHECKPOINT_VERSION, "kind": kind, "layers": layers, "act_only": act_only,
            "tied": tied, **({"input_transforms": transforms} if transforms else {}),
            **({"act_clips": act_clips} if act_clips else {}),
            "files": {WEIGHTS_FILE: {"sha256": file_sha256(out / WEIGHTS_FILE),
                                     "bytes": (out / WEIGHTS_FILE).stat().st_size}},
            "tensors": {n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for n, t in state.items()},
            "extra": sorted(extra), **extra}
    meta = json.loads(json.dumps(meta))  # the digest is over what a reader will parse (int keys become str)
    meta["manifest_sha256"] = manifest_digest(meta)
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / META_FILE)  # a reader never sees half a manifest
    if getattr(model, "config", None) is not None:
        model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return (out / WEIGHTS_FILE).stat().st_size


def size_breakdown(meta: dict) -> Dict[str, int]:
    """Every byte of a checkpoint's model.safetensors by what it holds: the quantized layers' packed
    tensors, the float tensors per stored dtype, and the file's header (from the manifest)."""
    prefixes = tuple(f"{n}.weight." for n in meta["layers"])
    out: Dict[str, int] = {"packed_layers": 0}
    for name, rec in meta["tensors"].items():
        n = getattr(torch, rec["dtype"]).itemsize
        for s in rec["shape"]:
            n *= s
        key = "packed_layers" if name.startswith(prefixes) else f"{rec['dtype']}_tensors"
        out[key] = out.get(key, 0) + n
    out["header"] = meta["files"][WEIGHTS_FILE]["bytes"] - sum(out.values())
    return out


def load_quantized(path, dtype=torch.float32):
    """(model, tokenizer, meta) from a directory written by ``save_quantized``; a checkpoint that does
    not match what its manifest records raises ``CheckpointError`` before any model is built."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    d = Path(path)
    meta = read_manifest(d)
    if meta["kind"] == "module":  # no HF config: the architecture comes from the user's code
        raise CheckpointError(f"{d} holds a user's own model (kind 'module'); load it with "
                              "lowbit.module_job.load_factory_checkpoint(DIR) or "
                              "lowbit.export.module_checkpoint.load_quantized_into(model, DIR)")
    if meta["kind"] not in LOADABLE_KINDS:
        raise CheckpointError(f"{d / META_FILE}: kind: expected {' or '.join(LOADABLE_KINDS)} (a Hugging Face "
                              f"model this loader rebuilds), found {meta['kind']!r}; load other models with "
                              "lowbit.export.module_checkpoint.load_quantized_into(model, DIR)")
    state = read_tensors(d, meta)
    try:
        config = AutoConfig.from_pretrained(d)
        auto = AutoModelForCausalLM if meta["kind"] == "causal_lm" else AutoModel
        model = auto.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / 'config.json'}: expected a Hugging Face config of a {meta['kind']} "
                              f"model, found one that does not load ({e})") from None
    where = d / META_FILE
    for name, info in meta["layers"].items():
        lin = submodule(model, name, where, f"layers[{name!r}]", nn.Linear)
        if [lin.out_features, lin.in_features] != info["shape"]:
            raise CheckpointError(f"{where}: layers[{name!r}].shape: expected the model's "
                                  f"{[lin.out_features, lin.in_features]} (from config.json), found {info['shape']}")
        prefix = f"{name}.weight."
        tensors = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        wspec = QuantSpec.parse(info["weight"])
        aspec = QuantSpec.parse(info["act"]) if info["act"] else None
        W = decode_layer(d, name, tensors, wspec, tuple(info["shape"]), info.get("retain"))
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, wspec, aspec)
        q.retain = info.get("retain")
        replace_module(model, name, q)
        state[f"{name}.weight"] = W.to(dtype)
    for name, spec in meta["act_only"].items():
        lin = submodule(model, name, where, f"act_only[{name!r}]", nn.Linear)
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, None,
                        QuantSpec.parse(spec))
        replace_module(model, name, q)
    _restore_transforms(model, meta.get("input_transforms", {}), where)
    restore_act_clips(model, meta.get("act_clips", {}), where)
    # float tensors stored in 16 bits come back in the model's dtype (assign keeps a tensor's dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tied = meta["tied"]
    for name, source in tied.items():
        state[name] = state[source]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a stored tensor of another shape than the config's model has
        raise CheckpointError(f"{d / WEIGHTS_FILE}: expected the tensors of the model config.json "
                              f"describes, found others: {' '.join(str(e).split())[:300]}") from None
    if unexpected or missing:
        raise CheckpointError(f"{d / WEIGHTS_FILE}: expected the tensors of the model config.json describes, "
                              f"found missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if meta.get("kv"):  # KV-cache quantization is a runtime hook: re-attach it
        from ..models.kv_cache import apply_kv_specs

        try:
            apply_kv_specs(model, meta["kv"])
        except ValueError as e:
            raise CheckpointError(f"{where}: kv: {e}") from None
    model.eval()
    tokenizer = None
    if (d / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{d}: expected a tokenizer beside tokenizer_config.json, found one that "
                                  f"does not load ({e})") from None
    return model, tokenizer, meta


def submodule(model: nn.Module, name: str, where, entry: str, kinds) -> nn.Module:
    """``model``'s module ``name`` (one of ``kinds``), or a CheckpointError naming the manifest entry."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = " or ".join(k.__name__ for k in kinds)
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: {entry}: the checkpoint does not match this {type(model).__name__}: "
                              f"expected a {names} of that name, found none") from None
    if not isinstance(mod, kinds):
        raise CheckpointError(f"{where}: {entry}: the checkpoint does not match this {type(model).__name__}: "
                              f"expected a {names}, found a {type(mod).__name__}")
    return mod


def decode_layer(d: Path, name: str, tensors: Dict[str, torch.Tensor], spec: QuantSpec, shape, retain):
    """The float weight of one layer's packed tensors (already checked against its spec)."""
    try:
        return unpack_weight(tensors, spec, shape, retain=retain)
    except (RuntimeError, IndexError, ValueError) as e:  # only reachable for version 1 files (no checksum)
        raise CheckpointError(f"{d / WEIGHTS_FILE}: layer {name!r}: expected packed tensors that decode to "
                              f"a {list(shape)} weight, found ones that do not ({e})") from None


def restore_act_clips(model: nn.Module, clips: dict, where) -> None:
    """Give each layer its learned input clipping ratio (the manifest checked them already)."""
    for name, clip in clips.items():
        lin = submodule(model, name, where, f"act_clips[{name!r}]", QuantLinear)
        lin.act_clip = float(clip)


def _restore_transforms(model: nn.Module, transforms: dict, where) -> None:
    """Re-create each layer's online input transform (before the state dict, which holds its scales)."""
    if not transforms:
        return
    from ..transforms.online import InputTransform

    for name, d in transforms.items():
        lin = submodule(model, name, where, f"input_transforms[{name!r}]", nn.Linear)
        if not isinstance(lin, QuantLinear):
            q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, None, None)
            replace_module(model, name, q)
            lin = q
        if d["features"] != lin.in_features:
            raise CheckpointError(f"{where}: input_transforms[{name!r}].features: expected the layer's "
                                  f"{lin.in_features} inputs, found {d['features']}")
        try:
            lin.input_transform = InputTransform.from_dict(d)
        except ValueError as e:
            raise CheckpointError(f"{where}: input_transforms[{name!r}]: {e}") from None
