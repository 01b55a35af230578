"""Codebooks: any finite table of values; the code is the index in ascending order."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .base import ElementFormat, FormatError

# NormalFloat-4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1], as float32
# constants of the published table (the format is defined by these exact numbers).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# bitsandbytes' FP4: magnitudes 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1 with a sign bit (one zero kept), as
# the float32 constants of bitsandbytes' table (so a float32 tensor holds every value exactly).
_FP4_BNB_MAG = tuple(torch.tensor([1 / 192, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0], dtype=torch.float32).tolist())
FP4_BNB_VALUES = tuple(sorted([-m for m in _FP4_BNB_MAG] + [0.0] + list(_FP4_BNB_MAG)))

NAMED_CODEBOOKS = {"nf4": NF4_VALUES, "fp4_bnb": FP4_BNB_VALUES}


@dataclass(frozen=True, repr=False)
class Codebook(ElementFormat):
    table: tuple
    label: Optional[str] = None

    def __post_init__(self) -> None:
        if len(self.table) < 2:
            raise FormatError("a codebook needs at least two values")
        if any(not math.isfinite(v) for v in self.table):
            raise FormatError("codebook values must be finite numbers")
        if list(self.table) != sorted(set(self.table)):
            raise FormatError("codebook values must be distinct and ascending (use lowbit.codebook(values))")

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.table))))

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return "codebook(" + ",".join(repr(float(v)) for v in self.table) + ")"

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(self.table + (float("nan"),), dtype=torch.float64, device=codes.device)
        c = codes.to(torch.int64).clamp(0, len(self.table))
        return table[c]

    def values(self) -> torch.Tensor:
        return torch.tensor(self.table, dtype=torch.float64)

    def encode_values(self, v: torch.Tensor) -> torch.Tensor:
        table = self.values().to(v.device)
        idx = torch.searchsorted(table, v.double().contiguous()).clamp(0, len(self.table) - 1)
        return idx

    @property
    def max(self) -> float:
        return float(self.table[-1])

    @property
    def min(self) -> float:
        return float(self.table[0])

    @property
    def has_zero(self) -> bool:
        return 0.0 in self.table

    @property
    def signed(self) -> bool:
        return self.table[0] < 0

    @property
    def min_subnormal(self) -> float:
        pos = [v for v in self.table if v > 0]
        return float(min(pos)) if pos else float("nan")

    @property
    def min_normal(self) -> float:
        return self.min_subnormal

    @property
    def epsilon(self) -> float:
        above = [v for v in self.table if v > 1.0]
        return float(min(above) - 1.0) if 1.0 in self.table and above else float("nan")


def codebook(values: Sequence[float], name: Optional[str] = None) -> Codebook:
    """A codebook format from any sequence of finite values (sorted and de-duplicated here)."""
    vals = tuple(sorted({float(v) for v in values}))
    if name is not None and name in NAMED_CODEBOOKS and vals != NAMED_CODEBOOKS[name]:
        raise FormatError(f"{name!r} is a built-in codebook name; choose another name")
    return Codebook(vals, name)
