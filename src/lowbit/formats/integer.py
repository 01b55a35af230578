"""Integers and fixed point: values k * 2**-frac for k in a contiguous integer range."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ElementFormat, FormatError, exact_ldexp


@dataclass(frozen=True, repr=False)
class IntFormat(ElementFormat):
    """Two's complement (signed) or plain binary (unsigned) integers with ``frac`` fractional bits.

    ``narrow`` drops the most negative code so the range is symmetric (int4n: -7..7).
    """

    width: int
    is_signed: bool = True
    narrow: bool = False
    frac: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.width <= 32:
            raise FormatError(f"integer width must be 1..32 bits, got {self.width}")
        if self.narrow and not self.is_signed:
            raise FormatError("narrow (symmetric) range only applies to signed integers")
        if self.is_signed and self.width == 1 and self.narrow:
            raise FormatError("int1n would hold only 0; use int1 (values -1, 0) or uint1")
        if not -64 <= self.frac <= 64:
            raise FormatError(f"fractional bits must be in -64..64, got {self.frac}")

    @property
    def bits(self) -> int:
        return self.width

    @property
    def name(self) -> str:
        n = "n" if self.narrow else ""
        if self.frac:
            return f"{'' if self.is_signed else 'u'}fixed{self.width}.{self.frac}{n}"
        return f"{'int' if self.is_signed else 'uint'}{self.width}{n}"

    @property
    def signed(self) -> bool:
        return self.is_signed

    @property
    def step(self) -> float:
        return 2.0 ** -self.frac

    @property
    def qmin(self) -> int:
        if not self.is_signed:
            return 0
        return -(2 ** (self.width - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.width - 1) - 1 if self.is_signed else 2**self.width - 1

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        k = codes.to(torch.int64)
        if self.is_signed:
            k = torch.where(k >= 2 ** (self.width - 1), k - 2**self.width, k)
        v = k.to(torch.float64) * self.step
        if self.narrow:  # the dropped code (the most negative pattern) is unused
            v = torch.where(k < self.qmin, torch.full_like(v, float("nan")), v)
        return v

    def encode_values(self, v: torch.Tensor) -> torch.Tensor:
        """Exactly representable values to their bit patterns (two's complement when signed)."""
        k = exact_ldexp(v.double(), float(self.frac))
        return torch.remainder(k.to(torch.int64), 2**self.width)

    @property
    def max(self) -> float:
        return self.qmax * self.step

    @property
    def min(self) -> float:
        return self.qmin * self.step

    @property
    def min_normal(self) -> float:
        return self.step

    @property
    def min_subnormal(self) -> float:
        return self.step

    @property
    def epsilon(self) -> float:
        return self.step
