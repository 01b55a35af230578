"""QuantSpec: a complete, serialisable recipe for quantizing one tensor.

String form (round-trips through ``QuantSpec.parse``)::

    FORMAT[:gN|:channel|:tensor|:token][:asym][:mse|:4over6|:pNN.N][:ROUNDING]

``int3:g64`` (int3, groups of 64 along the input axis, symmetric absmax), ``int4:g128:asym:mse``,
``e2m1fn:g32``, ``mxfp4`` (block formats carry their own scaling), ``e4m3fn:tensor`` (fp8 with a
per-tensor scale), ``int8:token`` (activations: one dynamic scale per token), ``nvfp4:4over6``
(each NVFP4 block's amax onto E2M1's 6 or 4, whichever rounds the block better: quant/four_over_six.py).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Optional

from ..formats import BlockFormat, FormatError, IntFormat, format
from ..rounding import check_rounding

GRANULARITIES = ("tensor", "channel", "group", "token", "block", "head")  # head: KV states only
SCALE_METHODS = ("absmax", "mse", "percentile", "4over6")


@dataclass(frozen=True)
class QuantSpec:
    format: str
    granularity: str = "channel"
    group_size: Optional[int] = None
    symmetric: bool = True
    scale_method: str = "absmax"
    percentile: float = 100.0
    rounding: str = "nearest_even"

    def __post_init__(self) -> None:
        fmt = format(self.format)
        object.__setattr__(self, "format", str(fmt))
        object.__setattr__(self, "rounding", check_rounding(self.rounding))
        if isinstance(fmt, BlockFormat):
            if self.granularity not in ("block", "channel"):
                raise ValueError(f"{fmt} is a block format: its scales are per block of {fmt.size}; "
                                 f"granularity {self.granularity!r} does not apply")
            object.__setattr__(self, "granularity", "block")
            object.__setattr__(self, "group_size", fmt.size)
            if self.scale_method == "percentile":  # the format's rule sets each block's scale
                raise ValueError(f"{fmt} is a block format: its block scales follow the format's amax rule "
                                 "or an MSE search; accepted scale methods: absmax (the rule) or mse, "
                                 "not a percentile")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group" and (not self.group_size or self.group_size < 1):
            raise ValueError("granularity 'group' needs group_size >= 1")
        if self.scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method must be one of {', '.join(SCALE_METHODS)}, got {self.scale_method!r}")
        if self.scale_method == "4over6":
            from .four_over_six import check_four_over_six

            reason = check_four_over_six(fmt, self.rounding)
            if reason:
                raise ValueError(reason)
        if not self.symmetric and not isinstance(fmt, IntFormat):
            raise ValueError(f"asymmetric (zero-point) quantization needs an integer format, got {fmt}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")

    @property
    def fmt(self):
        return format(self.format)

    @property
    def is_block(self) -> bool:
        return self.granularity == "block"

    def __str__(self) -> str:
        parts = [self.format]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity in ("tensor", "token", "head"):
            parts.append(self.granularity)
        if not self.symmetric:
            parts.append("asym")
        if self.scale_method in ("mse", "4over6"):
            parts.append(self.scale_method)
        elif self.scale_method == "percentile":
            parts.append(f"p{self.percentile:g}")
        if self.rounding != "nearest_even":
            parts.append(self.rounding)
        return ":".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**d)

    @classmethod
    def parse(cls, text) -> "QuantSpec":
        if isinstance(text, QuantSpec):
            return text
        if isinstance(text, dict):
            return cls.from_dict(text)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a quant spec is a string like 'int4:g64', got {text!r}")
        return _parse_text(cls, text)

    @classmethod
    def _from_text(cls, text: str) -> "QuantSpec":
        fmt_name, *opts = text.strip().split(":")
        kw: dict = {"format": fmt_name}
        for o in opts:
            ol = o.lower()
            if m := re.fullmatch(r"g(\d+)", ol):
                kw["granularity"], kw["group_size"] = "group", int(m[1])
            elif ol in ("channel", "tensor", "token", "block", "head"):
                kw["granularity"] = ol
            elif ol in ("asym", "sym"):
                kw["symmetric"] = ol == "sym"
            elif ol in ("mse", "absmax", "4over6"):
                kw["scale_method"] = ol
            elif m := re.fullmatch(r"p(\d+(?:\.\d*)?)", ol):
                kw["scale_method"], kw["percentile"] = "percentile", float(m[1])
            else:
                try:
                    kw["rounding"] = check_rounding(ol)
                except ValueError:
                    raise ValueError(
                        f"unknown option {o!r} in quant spec {text!r}; accepted: gN, channel, tensor, token, head (KV), "
                        "asym, sym, mse, absmax, 4over6 (NVFP4 block scales), pNN (percentile), or a rounding mode"
                    ) from None
        try:
            return cls(**kw)
        except FormatError as e:
            raise ValueError(f"in quant spec {text!r}: {e}") from None


# Named schemes: weight spec, input-activation spec (None = unquantized).
SCHEMES = {
    "w8": ("int8:channel", None),
    "w4g128": ("int4:g128", None),
    "w4g64": ("int4:g64", None),
    "w4g32": ("int4:g32", None),
    "w3g64": ("int3:g64", None),
    "w3g128": ("int3:g128", None),
    "w2g64": ("int2:g64", None),
    "w2g32": ("int2:g32", None),
    "w4g32asym": ("int4:g32:asym", None),
    "w4": ("int4:channel", None),
    "w3": ("int3:channel", None),
    "fp4g32": ("e2m1fn:g32", None),
    "nf4g64": ("nf4:g64", None),
    "mxfp4": ("mxfp4", None),
    "mxfp6": ("mxfp6_e3m2", None),
    "mxfp8": ("mxfp8_e4m3", None),
    "nvfp4": ("nvfp4", None),
    "w4a8": ("int4:g64", "int8:token"),
    "w4a4": ("int4:g64", "int4:token"),
    "w8a8": ("int8:channel", "int8:token"),
    "fp8": ("e4m3fn:channel", "e4m3fn:token"),
    "w8a8fp8": ("e4m3fn:channel", "e4m3fn:token"),
    "nvfp4a": ("nvfp4", "nvfp4"),
    "mxfp4a": ("mxfp4", "mxfp4"),
}


def scheme(name: str) -> tuple:
    """(weight QuantSpec, activation QuantSpec or None) of a named scheme, or of 'W_SPEC[+A_SPEC]'."""
    key = name.strip()
    if key.lower() in SCHEMES:
        w, a = SCHEMES[key.lower()]
    elif "+" in key:
        w, a = key.split("+", 1)
    else:
        try:
            QuantSpec.parse(key)
        except ValueError as e:
            raise ValueError(
                f"unknown scheme {name!r}: not one of {', '.join(SCHEMES)} and not a quant spec ({e})"
            ) from None
        w, a = key, None
    return QuantSpec.parse(w), (QuantSpec.parse(a) if a else None)


@lru_cache(maxsize=1024)
def _parse_text(cls, text: str) -> QuantSpec:
    # specs are immutable and parsed again on hot paths (each matmul of a low-precision layer)
    return cls._from_text(text)
