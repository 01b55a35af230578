"""Packed weights as checkpoints store them: the dense codes and scales of ``lowbit.quant.packed``
plus, for layers with high-impact weight retention, the retained values stored beside them.

``pack_bits``, ``unpack_bits``, ``pack_weight`` and ``packed_nbytes`` are defined in
``lowbit.quant.packed`` (the quant layer, which the methods that pack import), ``unpack_weight`` in
``lowbit.ptq.retention`` (the retained values it writes back are retention's); all re-exported here.
"""
from __future__ import annotations

from ..ptq.retention import unpack_weight
from ..quant.packed import pack_bits, pack_weight, packed_nbytes, unpack_bits

__all__ = ["pack_bits", "unpack_bits", "pack_weight", "unpack_weight", "packed_nbytes"]
