"""The dtype a checkpoint stores each unquantized float tensor in (embeddings, norms, biases, layers
left in float) and the rounding of the in-memory model to those values, so that what a job measures
is the model as stored.

``auto`` (the default) keeps a tensor exact when a 16-bit type holds it exactly (bfloat16 first:
models published in bf16 round-trip losslessly), else rounds it to float16 when float16's range
covers it, else to bfloat16. ``fp16`` / ``bf16`` cast every float tensor; ``fp32`` keeps the
tensors' own dtypes (what checkpoints before this option stored).
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import nn

FLOAT_STORAGE = ("auto", "fp16", "bf16", "fp32")
DEFAULT_FLOAT_STORAGE = "auto"
_FIXED = {"fp16": torch.float16, "bf16": torch.bfloat16}
_FP16_MAX = torch.finfo(torch.float16).max


def check_float_storage(choice: str) -> str:
    """``choice`` if it is one of FLOAT_STORAGE, else a ValueError naming the accepted ones."""
    if choice not in FLOAT_STORAGE:
        raise ValueError(f"unknown float storage {choice!r}; accepted: {', '.join(FLOAT_STORAGE)}")
    return choice


def exactly_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of ``t`` survives a round trip through ``dtype`` (NaN stays NaN)."""
    back = t.to(dtype).to(t.dtype)
    return bool(((back == t) | (torch.isnan(back) & torch.isnan(t))).all())


def storage_dtype(t: torch.Tensor, choice: str = DEFAULT_FLOAT_STORAGE) -> torch.dtype:
    """The dtype ``t`` is stored in under ``choice`` (non-float tensors keep theirs)."""
    check_float_storage(choice)
    if not t.is_floating_point() or choice == "fp32" or t.element_size() <= 2:
        return t.dtype
    if choice in _FIXED:
        return _FIXED[choice]
    for dt in (torch.bfloat16, torch.float16):
        if exactly_in(t, dt):
            return dt
    finite = t[torch.isfinite(t)]
    fits = finite.numel() == 0 or float(finite.abs().max()) <= _FP16_MAX
    return torch.float16 if fits else torch.bfloat16


def float_tensors(model: nn.Module, skip: Iterable[str]) -> Dict[str, torch.Tensor]:
    """The state-dict tensors of ``model`` a checkpoint stores as they are (not those in ``skip``,
    the quantized weights), sharing storage with the model."""
    skip = set(skip)
    return {n: t for n, t in model.state_dict().items() if n not in skip}


def round_to_storage(model: nn.Module, skip: Iterable[str],
                     choice: str = DEFAULT_FLOAT_STORAGE) -> Dict[str, torch.dtype]:
    """Round ``model``'s float tensors (but the names in ``skip``) in place to the values their
    storage dtype holds, keeping their own dtypes; returns {name: storage dtype}. Idempotent: a
    rounded tensor is exact in its storage dtype."""
    dtypes = {}
    with torch.no_grad():
        for name, t in float_tensors(model, skip).items():
            dt = storage_dtype(t, choice)
            dtypes[name] = dt
            if dt != t.dtype:
                t.copy_(t.to(dt).to(t.dtype))
    return dtypes
