"""Backends that do the arithmetic. ``reference`` is the oracle; faster backends must match its bits
for every deterministic rounding mode. Dispatch is by device and format; users never choose by hand
unless they pass ``backend=``."""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import BlockFormat, ElementFormat
from . import reference

BACKENDS = ("auto", "reference")


def quantize_element(x: torch.Tensor, fmt: ElementFormat, mode: str, overflow: str, generator=None,
                     sr_bits: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Round every element of float tensor ``x`` to ``fmt``; same dtype out."""
    _check_backend(backend)
    return reference.round_element(x.double(), fmt, mode, overflow, generator, sr_bits).to(x.dtype)


def quantize_block(x: torch.Tensor, fmt: BlockFormat, mode: str, axis: int, generator=None,
                   sr_bits: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    _check_backend(backend)
    out, _, _, _ = reference.quantize_block(x, fmt, mode, axis, generator, sr_bits)
    return out.to(x.dtype)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
