"""Pieces the jobs share: ``jobs`` (Hugging Face models by name), ``module_job`` (a user's own
``nn.Module`` from a factory) and the search, training, fine-tuning and sweep jobs (``--device``).
Kept apart so that no job imports another's internals, and no package imports back into ``jobs``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def log(msg: str, quiet: bool) -> None:
    """Print a progress line unless ``quiet``."""
    if not quiet:
        print(msg, flush=True)


def dense_bytes(model) -> int:
    """Bytes of the model's tensors, tied ones (lm_head = embeddings) counted once."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(seen.values())


def estimated_bytes(model, res, float_storage: str = "auto") -> int:
    """Bytes the checkpoint of ``model`` quantized as ``res`` (a ``QuantizeResult``) would hold,
    its float tensors in their storage dtypes (``export.float_storage``), the file header aside."""
    from .export.float_storage import storage_dtype
    from .quant.packed import packed_nbytes

    quantized = {f"{n}.weight" for n in res.packed}
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        if name in quantized or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * storage_dtype(t, float_storage).itemsize
    return total + sum(packed_nbytes(p) for p in res.packed.values())


def clear_progress(d: Optional[Path]) -> None:
    """Remove a finished job's resume folder (OUT/.progress)."""
    if d and d.is_dir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def reported_bits(path) -> Optional[float]:
    """bits_per_weight from the report.json beside a checkpoint (None when there is no report)."""
    import json

    from .export.validate import CheckpointError

    rep = Path(path) / "report.json"
    if not rep.is_file():
        return None
    try:
        bits = json.loads(rep.read_text())["quantized"].get("bits_per_weight")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{rep}: expected the report lowbit quantize writes (with quantized."
                              f"bits_per_weight), found one that does not read ({type(e).__name__}: {e})") from None
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float))):
        raise CheckpointError(f"{rep}: quantized.bits_per_weight: expected a number, found {bits!r}")
    return bits


DEVICES = "auto, cpu, cuda, cuda:N"


def resolve_device(device: Optional[str]) -> Optional[torch.device]:
    """``auto``: the GPU when torch sees one, else the CPU; None: leave the model where it is."""
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; accepted: {DEVICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; accepted: {DEVICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device here; accepted: {DEVICES}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev
