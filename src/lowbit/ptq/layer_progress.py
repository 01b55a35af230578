"""Resume for the layer-by-layer path (``lowbit.ptq.layerwise``): after each finished layer, its
packed weight and the results so far are written to a progress folder; a later run with the same
folder restores the finished layers and goes on from the next one.

No activations are stored: the layer-by-layer path recomputes each layer's inputs by running the
model, quantized up to that layer, on the calibration batches, so restoring the quantized prefix is
the whole state. Packed weights unpack to the identical float weights, hence a resumed run gives the
same Hessians, the same quantized weights and the same per-layer results as an uninterrupted one.

A fingerprint (method, plan, GPTQ options, the layer list, a hash of the model's tensors and of the
calibration batches) guards against resuming from another run's progress: a mismatch is warned
about and the run starts over.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

PROGRESS_FILE = "progress.json"
FORMAT = "lowbit-layerwise-progress-1"


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _hash_obj(h, obj) -> None:
    """Tensors by their bytes, containers recursively, anything else by its repr."""
    if isinstance(obj, torch.Tensor):
        _hash_tensor(h, obj)
    elif isinstance(obj, dict):
        for k in obj:
            h.update(repr(k).encode())
            _hash_obj(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for x in obj:
            _hash_obj(h, x)
    else:
        h.update(repr(obj).encode())


def fingerprint(model: nn.Module, layers: List[str], batches, method: str, plan: dict, options: dict) -> dict:
    """What a run's result depends on; computed before any layer changes."""
    hm, hd = hashlib.sha256(), hashlib.sha256()
    for name, t in model.state_dict().items():
        hm.update(name.encode())
        _hash_tensor(hm, t)
    _hash_obj(hd, list(batches) if batches is not None else None)
    return {"format": FORMAT, "method": method, "plan": plan, "options": options, "layers": list(layers),
            "model_sha256": hm.hexdigest(), "data_sha256": hd.hexdigest()}


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_progress(d: Path, index: int, fp: dict, result, packed_name=None) -> None:
    """Record that layers up to ``index`` (in the fingerprint's order) are finished; ``packed_name``:
    the layer just quantized, whose packed weight is written first (tmp file, then rename)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    if packed_name is not None:
        state = {k: v.contiguous() for k, v in result.packed[packed_name].items()}
        _atomic_write_bytes(d / f"layer_{index:04d}.safetensors", lambda p: save_file(state, str(p)))
    meta = {"done": index, "fingerprint": fp,
            "result": {k: v for k, v in result.to_dict().items() if k != "seconds"}}
    _atomic_write_bytes(d / PROGRESS_FILE, lambda p: p.write_text(json.dumps(meta)))


def load_progress(d: Path, fp: dict):
    """(last finished index, {"layers": [...], "skipped": {...}}, {layer: packed tensors}) from a
    progress folder, or (-1, None, {}) when there is none or it belongs to another run."""
    from safetensors.torch import load_file

    path = d / PROGRESS_FILE
    if not path.is_file():
        return -1, None, {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        warnings.warn(f"{path} is not readable progress; starting over", stacklevel=3)
        return -1, None, {}
    if meta.get("fingerprint") != fp:
        theirs = meta.get("fingerprint") or {}
        differs = [k for k in fp if theirs.get(k) != fp[k]]
        warnings.warn(f"{d} holds progress of another run (different {', '.join(differs)}); starting over",
                      stacklevel=3)
        return -1, None, {}
    done = int(meta["done"])
    index = {n: i for i, n in enumerate(fp["layers"])}
    packed: Dict[str, Dict[str, torch.Tensor]] = {}
    for lr in meta["result"]["layers"]:
        packed[lr["name"]] = load_file(str(d / f"layer_{index[lr['name']]:04d}.safetensors"))
    return done, meta["result"], packed

