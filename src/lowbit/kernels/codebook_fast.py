"""Codebooks (nf4, fp4_bnb, any table) on the fast paths, deterministic modes.

The arithmetic is reference.round_codebook's in float32: the lower neighbour's index is the number
of table values (after the first, before the last) at or below x, clamped into the table; x is
compared with the midpoint of its neighbours exactly (TwoSum of lo + hi, then 2x - s, exact near
the midpoint by Sterbenz's lemma), which works in float32 because the claimed tables hold float32
numbers only. The code is the index itself. Stochastic modes stay on the reference.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from ..formats import Codebook
from . import cpu_fast

MODES = ("nearest_even", "nearest_away", "nearest_zero", "toward_zero", "up", "down", "odd")
MAX_ENTRIES = 256


@lru_cache(maxsize=64)
def table_f32(fmt) -> Optional[torch.Tensor]:
    """The float32 table of a codebook the fast path claims (float32-exact values, at most 256)."""
    if not isinstance(fmt, Codebook) or len(fmt.table) > MAX_ENTRIES:
        return None
    v = fmt.values()
    t = v.float()
    return t if torch.equal(t.double(), v) else None


def claims(fmt, mode: str) -> bool:
    return mode in MODES and table_f32(fmt) is not None


def pick(x: torch.Tensor, tab: torch.Tensor, mode: str) -> tuple:
    """(values, indices int32) of float32 ``x`` rounded to the float32 table ``tab``."""
    n = tab.numel()
    xc = torch.clamp(x, tab[0], tab[n - 1])
    # index of the lower neighbour: how many of tab[1 .. n-2] are <= x (a fused loop of compares
    # when compiled; inductor's bucketize was ~10x slower)
    lo_i = torch.zeros(xc.shape, dtype=torch.int32, device=xc.device)
    for k in range(1, n - 1):
        lo_i = lo_i + (xc >= tab[k]).to(torch.int32)
    lo, hi = tab[lo_i], tab[lo_i + 1]
    s = lo + hi
    bb = s - lo
    err = (lo - (s - bb)) + (hi - bb)
    d = 2 * xc - s
    nearer_hi, tie = d > err, d == err
    inexact = xc > lo
    odd = (lo_i & 1) == 1
    if mode == "nearest_even":
        up = nearer_hi | (tie & odd)
    elif mode == "nearest_away":
        up = nearer_hi | (tie & (xc > 0))
    elif mode == "nearest_zero":
        up = nearer_hi | (tie & ~(xc > 0))
    elif mode == "toward_zero":
        up = inexact & (xc < 0)
    elif mode == "up":
        up = inexact
    elif mode == "down":
        up = torch.zeros_like(inexact)
    else:  # odd
        up = inexact & ~odd
    up = up | (xc == tab[n - 1])
    idx = lo_i + up.to(torch.int32)
    return torch.where(torch.isnan(x), x, torch.where(up, hi, lo)), idx


def _quantize_fn(x, tab, *, static):
    return pick(x, tab, static)[0]


def _encode_fn(x, tab, *, static):
    mode, cdt = static
    return pick(x, tab, mode)[1].to(cdt), torch.isnan(x).any()


def quantize_element(x: torch.Tensor, fmt, mode: str) -> Optional[torch.Tensor]:
    """Rounded copy of CPU tensor ``x`` (same dtype), or None where not claimed."""
    if x.device.type != "cpu" or x.dtype not in cpu_fast.DTYPES or not claims(fmt, mode):
        return None
    x32 = x.float().contiguous()
    if not x32.numel():
        return x.clone()
    out = cpu_fast.run_kernel("cb", _quantize_fn, mode, (x32.view(-1), table_f32(fmt)), x32.numel())
    return out.view(x.shape).to(x.dtype)


def encode_element(x: torch.Tensor, fmt, mode: str) -> Optional[tuple]:
    """(indices as codes, whether x holds nan) for CPU tensor ``x``, or None."""
    from .codes import code_dtype
    if x.device.type != "cpu" or x.dtype not in cpu_fast.DTYPES or not claims(fmt, mode):
        return None
    x32 = x.float().contiguous()
    cdt = code_dtype(fmt.bits)
    if not x32.numel():
        return torch.zeros(x.shape, dtype=cdt), False
    codes, has_nan = cpu_fast.run_kernel("cb_enc", _encode_fn, (mode, cdt), (x32.view(-1), table_f32(fmt)), x32.numel())
    return codes.view(x.shape), bool(has_nan)
