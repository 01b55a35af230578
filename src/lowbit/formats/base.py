"""The common interface of every element format: which values exist, and how codes map to them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_ENUMERABLE_BITS = 24


def exact_ldexp(x: torch.Tensor, e) -> torch.Tensor:
    """``x * 2**e`` exactly, on every device (``e`` integer-valued, 2**e a float64 number: -1074..1023).

    torch.ldexp multiplies by ``pow(2, e)``, which CUDA computes inexactly for some exponents (a
    float64 2**-4 a hair too small, say); ``exp2`` is exact for integers.
    """
    e = torch.as_tensor(e, dtype=torch.float64, device=x.device)
    return x * torch.exp2(e)


class FormatError(ValueError):
    """A format name or parameter that lowbit cannot represent."""


@dataclass(frozen=True)
class ElementFormat:
    """A scalar number format. Subclasses define the code -> value map; everything else derives from it.

    Codes are unsigned integers of ``bits`` bits (the raw bit pattern as hardware would store it).
    """

    @property
    def bits(self) -> int:
        raise NotImplementedError

    @property
    def name(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        # formats are immutable and str() runs on hot paths (per matmul operand): built once
        name = self.__dict__.get("_str")
        if name is None:
            name = self.__dict__["_str"] = self.name
        return name

    def __repr__(self) -> str:
        return f"lowbit.format({self.name!r})"

    # --- value set -------------------------------------------------------------------------
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Map integer codes (int64) to their float64 values (nan/inf where the code means that)."""
        raise NotImplementedError

    def code_values(self) -> torch.Tensor:
        """float64 value of every code 0 .. 2**bits - 1, indexed by code."""
        if self.bits > MAX_ENUMERABLE_BITS:
            raise FormatError(
                f"{self.name} has 2**{self.bits} codes; listing is limited to formats of at most "
                f"{MAX_ENUMERABLE_BITS} bits"
            )
        return self.decode_codes(torch.arange(2**self.bits, dtype=torch.int64))

    def values(self) -> torch.Tensor:
        """Sorted float64 tensor of the distinct finite representable values (one zero, no nan/inf)."""
        v = self.code_values()
        v = v[torch.isfinite(v)]
        v = torch.where(v == 0, torch.zeros_like(v), v)  # -0 and +0 are one value
        return torch.unique(v)

    # --- properties ------------------------------------------------------------------------
    @property
    def max(self) -> float:
        raise NotImplementedError

    @property
    def min(self) -> float:
        """Most negative finite value (0 or the smallest value for unsigned formats)."""
        raise NotImplementedError

    @property
    def min_normal(self) -> float:
        raise NotImplementedError

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value."""
        raise NotImplementedError

    @property
    def epsilon(self) -> float:
        """Distance from 1.0 to the next larger value (for integers: the step)."""
        raise NotImplementedError

    @property
    def has_inf(self) -> bool:
        return False

    @property
    def has_nan(self) -> bool:
        return False

    @property
    def has_zero(self) -> bool:
        return True

    @property
    def has_negative_zero(self) -> bool:
        return False

    @property
    def signed(self) -> bool:
        return True

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two not above ``max`` (OCP MX calls it emax_elem)."""
        return math.floor(math.log2(self.max))

    def describe(self) -> dict:
        """Properties as a plain dict (for tables and JSON)."""
        return {
            "name": self.name,
            "bits": self.bits,
            "max": self.max,
            "min": self.min,
            "min_normal": self.min_normal,
            "min_subnormal": self.min_subnormal,
            "epsilon": self.epsilon,
            "inf": self.has_inf,
            "nan": self.has_nan,
        }
