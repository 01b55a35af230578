"""Block formats: an element format, a shared scale per block of ``size`` elements, optionally a
per-tensor fp32 scale on top (NVFP4)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

from .base import ElementFormat, FormatError
from .minifloat import FloatFormat


@dataclass(frozen=True)
class BlockFormat:
    element: ElementFormat
    scale: ElementFormat
    size: int
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.element, BlockFormat) or isinstance(self.scale, BlockFormat):
            raise FormatError("block formats cannot be nested")
        if not 1 <= self.size <= 65536:
            raise FormatError(f"block size must be 1..65536, got {self.size}")
        if self.scale.min_subnormal <= 0 or self.scale.max <= 0:
            raise FormatError(f"scale format {self.scale} must have positive values")

    @property
    def pow2_scale(self) -> bool:
        """Power-of-two scales (E8M0) use the OCP MX rule 2**(floor(log2 amax) - emax_elem)."""
        return isinstance(self.scale, FloatFormat) and self.scale.man == 0

    @property
    def bits(self) -> float:
        """Storage bits per element, counting the block scale (not the single tensor scale)."""
        return self.element.bits + self.scale.bits / self.size

    @property
    def name(self) -> str:
        from .registry import canonical_block_name

        alias = canonical_block_name(self)
        if alias:
            return alias
        ts = ",tensor" if self.tensor_scale else ""
        return f"block({self.element},{self.scale},{self.size}{ts})"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"lowbit.format({self.name!r})"

    @property
    def max(self) -> float:
        return self.element.max * self.scale.max

    def describe(self) -> dict:
        return {
            "name": self.name,
            "bits": self.bits,
            "element": str(self.element),
            "scale": str(self.scale),
            "block": self.size,
            "tensor_scale": self.tensor_scale,
            "scale_rule": "2^(floor(log2 amax) - emax_elem)" if self.pow2_scale else "amax / max_elem",
        }


def block(element, scale="e8m0", size: int = 32, tensor_scale: bool = False) -> BlockFormat:
    """Any element format with a shared scale per block: ``block("e2m1", scale="e4m3", size=16)``."""
    from .registry import format as parse

    elem = parse(element) if isinstance(element, str) else element
    sc = parse(scale) if isinstance(scale, str) else scale
    if isinstance(elem, BlockFormat) or isinstance(sc, BlockFormat):
        raise FormatError("block formats cannot be nested")
    try:
        size = operator.index(size)
    except TypeError:
        raise FormatError(f"block size must be an integer, got {size!r}") from None
    return BlockFormat(elem, sc, size, bool(tensor_scale))
