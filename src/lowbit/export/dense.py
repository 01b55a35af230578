"""``lowbit export DIR --to dense``: a lowbit checkpoint as a plain Hugging Face directory
(config.json, tokenizer, model.safetensors) whose weights are the quantized values in a float dtype,
readable by anything that reads Hugging Face models. ``auto`` picks the smallest of bf16/fp16/fp32
that holds every value exactly (a float16 scale times an integer level generally needs fp32)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from .float_storage import exactly_in
from .stored import StoredCheckpoint, read_checkpoint

DENSE_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the files of a Hugging Face directory that are not weights (lowbit's own files stay behind)
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                 "chat_template.jinja")


class DenseExportError(ValueError):
    """A dense export that cannot be written as asked."""


def dropped_features(ck: StoredCheckpoint) -> list:
    """What a float model of the same architecture cannot hold (activation/KV quantization, online
    transforms): each a short description."""
    out = []
    acts = [n for n, i in ck.meta["layers"].items() if i["act"]] + list(ck.meta["act_only"])
    if acts:
        out.append(f"activation quantization of {len(acts)} layers")
    if ck.meta.get("kv"):
        out.append("KV-cache quantization")
    if ck.meta.get("input_transforms"):
        out.append("online input transforms (rotation/smoothing)")
    return out


def copy_side_files(src: Path, dst: Path) -> None:
    """config, generation config and tokenizer files of ``src`` into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def dense_state(ck: StoredCheckpoint) -> Dict[str, torch.Tensor]:
    """Every tensor of the model as lowbit uses it: quantized layers decoded (float32), the rest as
    stored; tied names left out (the config re-ties them)."""
    state = {n: t for n, t in ck.floats.items() if n not in ck.meta["tied"]}
    for name, layer in ck.layers.items():
        state[f"{name}.weight"] = layer.weight()
    return state


def export_dense(checkpoint, out, dtype: str = "auto", allow_drop: bool = False) -> dict:
    """Write ``checkpoint`` as a Hugging Face directory ``out``; returns {path, bytes, dtype, lossless}."""
    from safetensors.torch import save_file

    if dtype not in DENSE_DTYPES:
        raise DenseExportError(f"dtype {dtype!r}: accepted {', '.join(DENSE_DTYPES)}")
    ck = read_checkpoint(checkpoint)
    if ck.meta["kind"] == "module":
        raise DenseExportError(f"{ck.path}: a user's own module has no Hugging Face config to export with; "
                               "load it with lowbit.load(DIR, model=...) and save its state_dict")
    dropped = dropped_features(ck)
    if dropped and not allow_drop:
        raise DenseExportError(f"{ck.path}: a dense float model cannot hold {', '.join(dropped)}; re-run with "
                               "--allow-requantize to export the weights without it")
    state = dense_state(ck)
    chosen: Optional[torch.dtype] = DENSE_DTYPES[dtype]
    if chosen is None:
        floats = [t for t in state.values() if t.is_floating_point()]
        chosen = next((dt for dt in (torch.bfloat16, torch.float16)
                       if all(exactly_in(t.float(), dt) for t in floats)), torch.float32)
    lossless = all(exactly_in(t.float(), chosen) for t in state.values() if t.is_floating_point())
    state = {n: (t.to(chosen) if t.is_floating_point() else t).contiguous() for n, t in state.items()}
    dst = Path(out)
    copy_side_files(ck.path, dst)
    _set_config_dtype(dst / "config.json", chosen)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return {"path": str(dst), "bytes": (dst / "model.safetensors").stat().st_size,
            "dtype": str(chosen).removeprefix("torch."), "lossless": lossless, "dropped": dropped}


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    import json

    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    path.write_text(json.dumps(cfg, indent=2))
