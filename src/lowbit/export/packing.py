"""Packed weights as checkpoints store them: the dense codes and scales of ``lowbit.quant.packed``
plus, for layers with high-impact weight retention, the retained values stored beside them.

``pack_bits``, ``unpack_bits``, ``pack_weight`` and ``packed_nbytes`` are defined in
``lowbit.quant.packed`` (the quant layer, which the methods that pack import) and re-exported here.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..ptq.retention import RetainFormat, apply_retained
from ..quant.packed import pack_bits, pack_weight, packed_nbytes, unpack_bits, unpack_dense
from ..quant.spec import QuantSpec

__all__ = ["pack_bits", "unpack_bits", "pack_weight", "unpack_weight", "packed_nbytes"]


def unpack_weight(t: Dict[str, torch.Tensor], spec: QuantSpec, shape, retain=None) -> torch.Tensor:
    """The float32 weight stored by ``pack_weight``; with ``retain`` (a retain format name) the
    retained high-impact values stored beside the codes are written over their positions."""
    W = unpack_dense(t, spec, shape)
    if retain:
        W = apply_retained(W, t, RetainFormat.parse(retain))
    return W
