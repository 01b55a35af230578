"""Rounding modes: how a real value between two neighbours ``lo`` < ``hi`` picks one.

Every mode is expressed on the magnitude of the value (floats are sign-magnitude): given the fraction
``frac`` of the way from lo to hi, whether lo's code is odd, and the sign, decide whether to step up.
Formats supply lo, hi and parity; this module knows nothing of formats.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

ROUNDING_MODES = (
    "nearest_even",
    "nearest_away",
    "nearest_zero",
    "toward_zero",
    "up",
    "down",
    "odd",
    "stochastic",
    "stochastic_half",
)
STOCHASTIC_MODES = ("stochastic", "stochastic_half")
OVERFLOW_POLICIES = ("saturate", "inf", "nan")

_ALIASES = {
    "nearest": "nearest_even",
    "rne": "nearest_even",
    "rna": "nearest_away",
    "rtz": "toward_zero",
    "truncate": "toward_zero",
    "ceil": "up",
    "floor": "down",
    "sr": "stochastic",
}


def check_rounding(mode: str) -> str:
    if not isinstance(mode, str):
        raise ValueError(f"rounding must be a string, got {type(mode).__name__}")
    m = _ALIASES.get(mode.lower(), mode.lower())
    if m not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {mode!r}; accepted: {', '.join(ROUNDING_MODES)}")
    return m


def check_overflow(policy: str) -> str:
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"unknown overflow policy {policy!r}; accepted: {', '.join(OVERFLOW_POLICIES)}")
    return policy


def make_generator(generator: Union[None, int, torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """A torch.Generator from a seed, a generator, or None (torch's global RNG)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int):
        g = torch.Generator(device=device)
        g.manual_seed(generator)
        return g
    raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def uniform(shape, generator, device) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1) (53 random bits)."""
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)


def round_up(
    mode: str,
    frac: torch.Tensor,
    lo_odd: torch.Tensor,
    negative: torch.Tensor,
    rand: Optional[torch.Tensor] = None,
    sr_bits: Optional[int] = None,
) -> torch.Tensor:
    """Whether the magnitude steps from lo up to hi (bool tensor).

    ``frac`` in [0, 1) is the position of the magnitude between lo and hi; ``rand`` is uniform [0, 1)
    for the stochastic modes. With ``sr_bits=k`` stochastic rounding behaves like hardware adding k
    random bits below the kept ones: the fraction is truncated to k bits before the comparison.
    """
    inexact = frac > 0
    if mode == "nearest_even":
        return (frac > 0.5) | ((frac == 0.5) & lo_odd)
    if mode == "nearest_away":
        return frac >= 0.5
    if mode == "nearest_zero":
        return frac > 0.5
    if mode == "toward_zero":
        return torch.zeros_like(inexact)
    if mode == "up":
        return inexact & ~negative
    if mode == "down":
        return inexact & negative
    if mode == "odd":
        return inexact & ~lo_odd
    if rand is None:
        raise ValueError(f"rounding {mode!r} needs random numbers")
    if mode == "stochastic":
        if sr_bits is not None:
            scale = float(2**sr_bits)
            return torch.floor(frac * scale) + torch.floor(rand * scale) >= scale
        return rand < frac
    if mode == "stochastic_half":
        return inexact & (rand < 0.5)
    raise ValueError(f"unknown rounding mode {mode!r}")


def rounds_toward_zero(mode: str, negative: torch.Tensor) -> torch.Tensor:
    """Where the mode never increases the magnitude (IEEE: such overflow gives max, not inf)."""
    if mode == "toward_zero":
        return torch.ones_like(negative)
    if mode == "up":
        return negative
    if mode == "down":
        return ~negative
    return torch.zeros_like(negative)
