"""Adapter files.

lowbit's own: a directory with ``adapter.safetensors`` (per layer, ``{layer}.lora_A.*`` and
``{layer}.lora_B.*``: the packed codes and fp16 scales of a grid format, or the float matrix;
B is stored transposed so that its rank components are rows) and ``adapter.json`` (format, each
layer's rank, alpha and shape, the base it was trained on, the exact byte count and the file's
SHA-256, checked on load). Loading puts exactly the stored matrices in place, so saving again
writes the same bytes.

PEFT's: ``adapter_config.json`` + ``adapter_model.safetensors`` with the dequantized float
matrices under PEFT's names, loadable by ``peft.PeftModel.from_pretrained`` on the float base;
:func:`load_peft` reads such a directory back (PEFT's own LoRA adapters included).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..export.validate import file_sha256
from ..models.blocks import replace_module
from .adapter_quant import AdapterFormat
from .lora import LoRALinear, lora_layers

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"
ADAPTER_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def layer_tensors(layer: LoRALinear) -> Dict[str, torch.Tensor]:
    """The stored tensors of one adapter layer (kept from loading when it was loaded)."""
    stored = getattr(layer, "stored", None)
    if stored is not None:
        return stored
    out = {}
    for k, v in layer.fmt.pack(layer.lora_A).items():
        out[f"lora_A.{k}"] = v
    for k, v in layer.fmt.pack(layer.lora_B.t()).items():
        out[f"lora_B.{k}"] = v
    return out


def adapter_bytes(model: nn.Module) -> int:
    """Exact bytes of every adapter's stored tensors (codes, scales or float matrices)."""
    return sum(v.numel() * v.element_size() for layer in lora_layers(model).values()
               for v in layer_tensors(layer).values())


def save_adapter(model: nn.Module, out_dir, base: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """Write the model's adapters to ``out_dir``; returns the manifest."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model carries no LoRA adapter to save")
    fmts = {l.fmt.name for l in layers.values()}
    if len(fmts) != 1:
        raise ValueError(f"adapters of several formats in one model ({sorted(fmts)}); save them one format at a time")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, info = {}, {}
    for name, layer in layers.items():
        for k, v in layer_tensors(layer).items():
            state[f"{name}.{k}"] = v.detach().cpu().contiguous()
        info[name] = {"rank": layer.rank, "alpha": layer.alpha, "in": layer.in_features, "out": layer.out_features}
    save_file(state, str(out / ADAPTER_FILE))
    meta = {"lowbit_adapter": ADAPTER_VERSION, "format": fmts.pop(), "layers": info, "base": base or {},
            "bytes": sum(v.numel() * v.element_size() for v in state.values()),
            "parameters": sum(l.rank * (l.in_features + l.out_features) for l in layers.values()),
            "sha256": file_sha256(out / ADAPTER_FILE), **(extra or {})}
    tmp = out / (ADAPTER_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / ADAPTER_META)
    return meta


def read_adapter_meta(path) -> dict:
    d = Path(path)
    if not (d / ADAPTER_META).is_file() or not (d / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a lowbit adapter directory (needs {ADAPTER_META} and {ADAPTER_FILE}); "
                                "write one with `lowbit finetune --out DIR`")
    try:
        meta = json.loads((d / ADAPTER_META).read_text())
    except ValueError as e:
        raise ValueError(f"{d / ADAPTER_META}: not valid JSON ({e})") from None
    if meta.get("lowbit_adapter") != ADAPTER_VERSION:
        raise ValueError(f"{d / ADAPTER_META}: lowbit_adapter: expected {ADAPTER_VERSION}, found "
                         f"{meta.get('lowbit_adapter')!r}")
    return meta


def load_adapter(model: nn.Module, path, replace: bool = False) -> dict:
    """Attach the adapters stored in ``path`` to ``model`` (in place, frozen: the stored matrices
    are used as they are); ``replace`` first removes adapters already there (one base, many
    adapters). Returns the manifest."""
    from safetensors.torch import load_file

    d = Path(path)
    meta = read_adapter_meta(d)
    if file_sha256(d / ADAPTER_FILE) != meta.get("sha256"):
        raise ValueError(f"{d / ADAPTER_FILE}: its SHA-256 does not match {ADAPTER_META} (a changed or damaged file)")
    if lora_layers(model):
        if not replace:
            raise ValueError("the model already carries adapters; pass replace=True to swap them")
        from .lora import remove_lora

        remove_lora(model)
    fmt = AdapterFormat.parse(meta["format"])
    state = load_file(str(d / ADAPTER_FILE))
    for name, info in meta["layers"].items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{d}: adapter layer {name!r} is not in this model (an adapter of another base?)") from None
        if not isinstance(base, nn.Linear) or (base.in_features, base.out_features) != (info["in"], info["out"]):
            raise ValueError(f"{d}: adapter layer {name!r} expects a {info['in']} -> {info['out']} linear, the model "
                             f"has {type(base).__name__} {getattr(base, 'in_features', '?')} -> "
                             f"{getattr(base, 'out_features', '?')}")
        layer = LoRALinear(base, info["rank"], info["alpha"], fmt)
        tensors = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".lora_")}
        put_matrices(layer, tensors)
        replace_module(model, name, layer)
    return meta


def put_matrices(layer: LoRALinear, tensors: Dict[str, torch.Tensor]) -> None:
    """Set ``layer``'s adapter to the stored tensors, exactly, and freeze it."""
    fmt = layer.fmt
    a = fmt.unpack({k[7:]: v for k, v in tensors.items() if k.startswith("lora_A.")}, (layer.rank, layer.in_features))
    b = fmt.unpack({k[7:]: v for k, v in tensors.items() if k.startswith("lora_B.")}, (layer.rank, layer.out_features))
    dev = layer.lora_A.device
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b.t())
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    layer.stored = tensors
    layer.fixed_A, layer.fixed_B = a.to(dev), b.t().contiguous().to(dev)


# --- PEFT ---------------------------------------------------------------------------------------

def export_peft(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the model's adapters (dequantized, float32) as a PEFT LoRA directory."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model carries no LoRA adapter to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, layer in layers.items():
        with torch.no_grad():
            a, b = layer.adapter_matrices()
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    ranks = {l.rank for l in layers.values()}
    r = max(ranks, key=lambda x: sum(l.rank == x for l in layers.values()))
    alpha = max((l.alpha for l in layers.values() if l.rank == r), key=lambda x: sum(l.alpha == x for l in layers.values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(layers), "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        # full names, escaped: PEFT matches these keys as regular expressions ending a module's name
        "rank_pattern": {re.escape(n): l.rank for n, l in layers.items() if l.rank != r},
        "alpha_pattern": {re.escape(n): l.alpha for n, l in layers.items() if l.alpha != alpha},
        "modules_to_save": None, "layers_to_transform": None,
    }
    save_file(state, str(out / PEFT_WEIGHTS))
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=1))
    return out


def load_peft(model: nn.Module, path) -> dict:
    """Attach the LoRA adapters of a PEFT directory to ``model`` as float32 lowbit adapters (in
    place, frozen); returns PEFT's config."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / PEFT_CONFIG).is_file() or not (d / PEFT_WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} is not a PEFT adapter directory (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    config = json.loads((d / PEFT_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{d}: only plain LoRA adapters are read (peft_type LORA, no DoRA/rsLoRA), found "
                         f"{config.get('peft_type')}")
    state = load_file(str(d / PEFT_WEIGHTS))
    fmt = AdapterFormat.parse("32bit")
    names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k})
    for name in names:
        a = state[f"{PEFT_PREFIX}{name}.lora_A.weight"].float()
        b = state[f"{PEFT_PREFIX}{name}.lora_B.weight"].float()
        alpha = config["lora_alpha"]
        for pat, v in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pat})$", name):
                alpha = v
        base = model.get_submodule(name)
        layer = LoRALinear(base, a.shape[0], alpha, fmt)
        put_matrices(layer, {"lora_A.weight": a, "lora_B.weight": b.t().contiguous()})
        replace_module(model, name, layer)
    return config
