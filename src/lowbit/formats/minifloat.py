"""Minifloats ExMy: sign, X exponent bits, Y mantissa bits, and a policy for special values.

Policies (``special``):
  ieee    all-ones exponent holds inf (mantissa 0) and nan (otherwise), like IEEE 754.
  fn      finite: no inf; nan at the all-ones code (float8_e4m3fn).
  finite  finite and no nan: every code is a number (OCP FP6/FP4: float6_e3m2fn, float4_e2m1fn).
  fnuz    finite, no negative zero: nan is the code 1000..0 (float8_e4m3fnuz); bias 2**(X-1).
  fnu     unsigned, finite, nan at all-ones, no zero: exponent field 0 is a normal number (E8M0).
  p3109   IEEE P3109: nan at 1000..0, +-inf at the two all-ones magnitudes, no negative zero,
          bias 2**(X-1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import ElementFormat, FormatError, exact_ldexp

POLICIES = ("ieee", "fn", "finite", "fnuz", "fnu", "p3109")


@dataclass(frozen=True, repr=False)
class FloatFormat(ElementFormat):
    exp: int
    man: int
    special: str = "ieee"
    bias_override: Optional[int] = None
    subnormals: bool = True

    def __post_init__(self) -> None:
        if self.special not in POLICIES:
            raise FormatError(f"unknown special-value policy {self.special!r}; accepted: {', '.join(POLICIES)}")
        if not 1 <= self.exp <= 8:
            raise FormatError(f"exponent bits must be 1..8, got e{self.exp}m{self.man}")
        if not 0 <= self.man <= 23:
            raise FormatError(f"mantissa bits must be 0..23, got e{self.exp}m{self.man}")
        if self.bias_override is not None and abs(self.bias_override) > 1000:
            raise FormatError(f"exponent bias must be within -1000..1000, got {self.bias_override}")
        if self.special == "ieee" and self.man == 0 and self.exp < 2:
            raise FormatError("e1m0 leaves no finite nonzero value under the ieee policy")
        if self._top_field() < (0 if self.special == "fnu" else 1):
            raise FormatError(
                f"e{self.exp}m{self.man} with policy {self.special!r} has no normal numbers; "
                "use more exponent bits or a finite policy (suffix fn/f)"
            )
        low = self.emin - (self.man if self.subnormals and self.special != "fnu" else 0)
        high = self._top_field() - self.bias
        if high > 1023 or low < -1074:
            raise FormatError(
                f"e{self.exp}m{self.man} with bias {self.bias} spans 2**{low} .. 2**{high + 1}, beyond "
                "float64 (2**-1074 .. 2**1024), in which lowbit computes; choose a bias closer to "
                f"{2 ** (self.exp - 1) - 1}"
            )

    # --- layout --------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.exp + self.man + (0 if self.special == "fnu" else 1)

    @property
    def signed(self) -> bool:
        return self.special != "fnu"

    @property
    def bias(self) -> int:
        if self.bias_override is not None:
            return self.bias_override
        if self.special in ("fnuz", "p3109"):
            return 2 ** (self.exp - 1)
        return 2 ** (self.exp - 1) - 1

    @property
    def default_bias(self) -> bool:
        return self.bias_override is None

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return -self.bias if self.special == "fnu" else 1 - self.bias

    def _top_field(self) -> int:
        """Exponent field of the largest finite value."""
        all_ones = 2**self.exp - 1
        if self.special == "ieee":
            return all_ones - 1
        if self.special in ("fn", "fnu", "p3109") and self.man == 0:
            return all_ones - 1
        return all_ones

    def _top_mantissa(self) -> int:
        all_ones = 2**self.man - 1
        if self.special in ("fn", "fnu", "p3109") and self.man > 0:
            return all_ones - 1
        return all_ones

    # --- naming --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.special == "p3109":
            base = f"p3109_k{self.bits}p{self.man + 1}"
        else:
            suffix = {
                "ieee": "",
                "fn": "fn" if self.bits >= 8 else "fnan",
                "finite": "fn" if self.bits < 8 else "f",
                "fnuz": "fnuz",
                "fnu": "fnu",
            }[self.special]
            base = f"e{self.exp}m{self.man}{suffix}"
        if self.bias_override is not None:
            base += f"_b{self.bias_override}"
        if not self.subnormals:
            base += "_ftz"
        return base

    # --- properties ----------------------------------------------------------------------------
    @property
    def max(self) -> float:
        return float(2 ** (self._top_field() - self.bias) * (1 + self._top_mantissa() / 2**self.man))

    @property
    def min(self) -> float:
        return self.min_subnormal if self.special == "fnu" else -self.max

    @property
    def min_normal(self) -> float:
        return float(2.0**self.emin)

    @property
    def min_subnormal(self) -> float:
        if self.subnormals and self.man > 0 and self.special != "fnu":
            return float(2.0 ** (self.emin - self.man))
        return self.min_normal

    @property
    def epsilon(self) -> float:
        # 1.0 is normal (spacing 2**-man) unless emin > 0, where it lies among the subnormals
        return float(2.0 ** (max(0, self.emin) - self.man))

    @property
    def emax(self) -> int:
        return self._top_field() - self.bias

    @property
    def has_inf(self) -> bool:
        return self.special in ("ieee", "p3109")

    @property
    def has_nan(self) -> bool:
        if self.special == "ieee":
            return self.man > 0
        return self.special != "finite"

    @property
    def has_zero(self) -> bool:
        return self.special != "fnu"

    @property
    def has_negative_zero(self) -> bool:
        return self.special in ("ieee", "fn", "finite")

    # --- codes <-> values ----------------------------------------------------------------------
    @property
    def _sign_bit(self) -> int:
        return 1 << (self.exp + self.man)

    @property
    def nan_code(self) -> int:
        if not self.has_nan:
            raise FormatError(f"{self.name} has no nan")
        if self.special in ("fnuz", "p3109"):
            return self._sign_bit
        return (1 << (self.exp + self.man)) - 1  # all ones below the sign (sign 0)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int64)
        m_mask = (1 << self.man) - 1
        field = (c >> self.man) & ((1 << self.exp) - 1)
        mant = c & m_mask
        negative = (c & self._sign_bit) != 0 if self.signed else torch.zeros_like(c, dtype=torch.bool)
        if self.special == "fnu":
            mag = exact_ldexp((mant + (1 << self.man)).double(), (field - self.bias - self.man).double())
        else:
            normal = exact_ldexp((mant + (1 << self.man)).double(), (field - self.bias - self.man).double())
            sub_mant = mant if self.subnormals else torch.zeros_like(mant)
            sub = exact_ldexp(sub_mant.double(), torch.full_like(c, self.emin - self.man).double())
            mag = torch.where(field == 0, sub, normal)
        val = torch.where(negative, -mag, mag)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        all_ones = (1 << self.exp) - 1
        if self.special == "ieee":
            top = field == all_ones
            inf = torch.where(negative, -torch.inf, torch.inf).double()
            val = torch.where(top, torch.where(mant == 0, inf, nan), val)
        elif self.special in ("fn", "fnu"):
            val = torch.where((field == all_ones) & (mant == m_mask), nan, val)
        elif self.special == "fnuz":
            val = torch.where(c == self._sign_bit, nan, val)
        elif self.special == "p3109":
            top = (c & (self._sign_bit - 1)) == self._sign_bit - 1
            inf = torch.where(negative, -torch.inf, torch.inf).double()
            val = torch.where(top, inf, val)
            val = torch.where(c == self._sign_bit, nan, val)
        return val

    def encode_values(self, v: torch.Tensor) -> torch.Tensor:
        """Exactly representable float64 values (nan/inf included where they exist) to codes."""
        v = v.double()
        a = v.abs()
        finite_pos = torch.isfinite(a) & (a > 0)
        safe = torch.where(finite_pos, a, torch.ones_like(a))
        e = torch.frexp(safe).exponent.to(torch.int64) - 1
        if self.special == "fnu":
            is_normal = torch.ones_like(finite_pos)
        else:
            is_normal = e >= self.emin
        e_n = torch.where(is_normal, e, torch.full_like(e, self.emin))
        field = torch.where(is_normal, e_n + self.bias, torch.zeros_like(e))
        scaled = exact_ldexp(safe, (self.man - e_n).double())
        mant = torch.where(is_normal, scaled - 2**self.man, scaled).to(torch.int64)
        code = (field << self.man) | mant
        code = torch.where(finite_pos, code, torch.zeros_like(code))
        if self.signed and self.has_negative_zero:
            code = code | torch.where(torch.signbit(v), self._sign_bit, 0)
        elif self.signed:
            code = code | torch.where(torch.signbit(v) & (a > 0), self._sign_bit, 0)
        if self.has_inf:
            if self.special == "ieee":
                inf_mag = ((1 << self.exp) - 1) << self.man
            else:
                inf_mag = self._sign_bit - 1
            sign = torch.where(v < 0, self._sign_bit, 0)
            code = torch.where(torch.isinf(v), inf_mag | sign, code)
        if self.has_nan:
            code = torch.where(torch.isnan(v), torch.full_like(code, self.nan_code), code)
        return code
