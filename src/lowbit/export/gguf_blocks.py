"""GGUF's block types for lowbit's group-wise integer weights: which spec each type holds exactly,
and the block bytes built from a layer's levels and scales. Pure tensor functions; the file is
written by the ``gguf`` package (``export.gguf_export``) and every tensor is checked by decoding its
blocks with ``gguf.quants.dequantize``.

The exact matches (GGML's dequantization, per block of 32 along a row):

- Q4_0: ``d * (q - 8)``, d float16, q in 0..15  <=  ``int4:g32``: level in -8..7 times a float16 scale;
- Q4_1: ``d * q + m``, d and m float16         <=  ``int4:g32:asym``: ``(q - z) * s``, with m = -z*s
  (exact only where -z*s is a float16 number: checked per block);
- Q8_0: ``d * q``, d float16, q int8             <=  ``int8:g32``.

Both sides multiply in float32, and a float16 scale times a level of at most 8 bits is exact in
float32, so equal inputs give equal bits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..formats import IntFormat
from ..quant.spec import QuantSpec
from .float_storage import exactly_in

BLOCK = 32
EXACT = {"Q4_0": "int4:g32", "Q4_1": "int4:g32:asym", "Q8_0": "int8:g32"}


def exact_type(spec: QuantSpec, cols: int) -> Tuple[Optional[str], str]:
    """(the GGUF type that holds ``spec`` exactly for rows of ``cols``, "") or (None, why not)."""
    fmt = spec.fmt
    accepted = ", ".join(f"{s} -> {t}" for t, s in EXACT.items())
    if not (isinstance(fmt, IntFormat) and fmt.is_signed and fmt.frac == 0 and fmt.width in (4, 8)
            and spec.granularity == "group" and spec.group_size == BLOCK):
        return None, f"{spec} has no GGUF type that holds it exactly (exact: {accepted})"
    if fmt.width == 8 and not spec.symmetric:
        return None, f"{spec}: GGUF has no asymmetric 8-bit type (exact: {accepted})"
    if cols % BLOCK:
        return None, f"{spec}: rows of {cols} values do not split into GGUF blocks of {BLOCK}"
    if fmt.width == 8:
        return "Q8_0", ""
    return ("Q4_0" if spec.symmetric else "Q4_1"), ""


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) float16-exact values -> (..., 2) little-endian bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 32) codes 0..15 -> (rows, blocks, 16) bytes: element j in the low nibble of
    byte j, element j + 16 in its high nibble (GGML's layout)."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def scales_fp16(scales: torch.Tensor, what: str) -> torch.Tensor:
    """The stored scales as float16 values, or a ValueError when float16 does not hold them."""
    s = scales.float()
    if not (torch.isfinite(s).all() and exactly_in(s, torch.float16)):
        bad = int((s.to(torch.float16).float() != s).sum())
        raise ValueError(f"{what}: {bad} of {s.numel()} scales are not float16 numbers (GGUF stores the scale "
                         "of a block in float16)")
    return s


def encode(gtype: str, levels: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
           what: str, round_offset: bool = False) -> np.ndarray:
    """The (rows, blocks * block bytes) uint8 array of ``gtype`` for levels (rows, cols) and
    per-block scales (and zero points) (rows, cols // 32); ValueError when the values do not fit.
    ``round_offset``: Q4_1 rounds an offset float16 does not hold instead (lossy, the nearest
    GGUF has: codes and scales stay)."""
    rows, cols = levels.shape
    nb = cols // BLOCK
    s = scales_fp16(scales, what).reshape(rows, nb, 1)
    lv = levels.reshape(rows, nb, BLOCK)
    if lv.ne(lv.round()).any():
        raise ValueError(f"{what}: levels are not integers")
    if gtype == "Q8_0":
        if lv.min() < -128 or lv.max() > 127:
            raise ValueError(f"{what}: levels outside Q8_0's -128..127")
        body = lv.to(torch.int8).view(torch.uint8)
        out = torch.cat([_fp16_bytes(s), body], dim=2)
    elif gtype == "Q4_0":
        if lv.min() < -8 or lv.max() > 7:
            raise ValueError(f"{what}: levels outside Q4_0's -8..7")
        out = torch.cat([_fp16_bytes(s), _nibbles(lv + 8)], dim=2)
    elif gtype == "Q4_1":
        if zeros is None:
            raise ValueError(f"{what}: Q4_1 needs the zero points of an asymmetric spec")
        if lv.min() < 0 or lv.max() > 15:
            raise ValueError(f"{what}: levels outside Q4_1's 0..15")
        m = -(zeros.float().reshape(rows, nb, 1) * s)
        if not round_offset and not exactly_in(m, torch.float16):
            bad = int((m.to(torch.float16).float() != m).sum())
            raise ValueError(f"{what}: in {bad} of {m.numel()} blocks the offset -zero*scale is not a float16 "
                             "number (Q4_1 stores it in float16)")
        out = torch.cat([_fp16_bytes(s), _fp16_bytes(m), _nibbles(lv)], dim=2)
    else:
        raise ValueError(f"{what}: no lossless encoder for {gtype}; lossless types: {', '.join(EXACT)}")
    return out.reshape(rows, -1).numpy()
