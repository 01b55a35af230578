"""The reference implementation: readable torch arithmetic in float64, the project's oracle.

Rounding to a float format works on values, not bits: a magnitude ``a`` in binade ``2**e`` has
neighbours on the grid ``ulp = 2**(e - man)``; ``a / ulp`` is exact (a power-of-two scaling), so
rounding reduces to choosing between floor and floor + 1 of that quotient. Carry into the next
binade, subnormals (the binade clamps at emin) and overflow all fall out of the same arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import BlockFormat, Codebook, ElementFormat, FloatFormat, FormatError, IntFormat
from ..formats.base import exact_ldexp
from ..rounding import STOCHASTIC_MODES, round_up, rounds_toward_zero, uniform

NAN = float("nan")


def _random(x: torch.Tensor, mode: str, generator) -> Optional[torch.Tensor]:
    return uniform(x.shape, generator, x.device) if mode in STOCHASTIC_MODES else None


def round_float(x: torch.Tensor, fmt: FloatFormat, mode: str, overflow: str, generator=None,
                sr_bits=None) -> torch.Tensor:
    """Round float64 ``x`` to the values of ``fmt``; returns float64."""
    negative = torch.signbit(x)
    a = x.abs()
    positive = torch.isfinite(a) & (a > 0)
    safe = torch.where(positive, a, torch.ones_like(a))
    e = torch.frexp(safe).exponent.to(torch.int64) - 1
    man = fmt.man
    if fmt.subnormals or fmt.special == "fnu":
        e = torch.clamp(e, min=fmt.emin)
        ulp_exp = e - man
    else:  # flushed: below min_normal the only neighbours are 0 and min_normal
        tiny = e < fmt.emin
        e = torch.clamp(e, min=fmt.emin)
        ulp_exp = torch.where(tiny, e, e - man)
    y = exact_ldexp(safe, (-ulp_exp).double())
    lo = torch.floor(y)
    frac = y - lo
    # where the grid is coarser than 1 (ulp_exp > 0), a float64 subnormal x can scale to 0: still inexact
    frac = torch.where(positive & (y == 0), torch.full_like(frac, 2.0**-1074), frac)
    # parity of lo's code: code = (e + bias - 1) * 2**man + lo, so only man == 0 needs the exponent
    parity = lo.to(torch.int64) + ((e + fmt.bias - 1) if man == 0 else 0)
    lo_odd = (parity % 2) == 1
    up = round_up(mode, frac, lo_odd, negative, _random(x, mode, generator), sr_bits)
    mag = exact_ldexp(lo + up.double(), ulp_exp.double())
    mag = torch.where(positive, mag, torch.where(torch.isnan(a), a, torch.zeros_like(a)))

    # overflow (finite inputs rounded past max) and infinite inputs
    over = (mag > fmt.max) | torch.isinf(a)
    if overflow == "saturate":
        big = torch.full_like(mag, fmt.max)
    else:
        signal = float("inf") if (overflow == "inf" and fmt.has_inf) else NAN
        big = torch.full_like(mag, signal)
        if overflow == "inf":
            big = torch.where(rounds_toward_zero(mode, negative) & torch.isfinite(a), fmt.max, big)
            if fmt.has_inf:
                big = torch.where(torch.isinf(a), float("inf"), big)
    mag = torch.where(over, big, mag)

    if fmt.special == "fnu":  # unsigned without zero: negatives are not representable
        mag = torch.clamp(mag, min=fmt.min_subnormal)
        return torch.where(negative & ~torch.isnan(a) & (a > 0), NAN, mag)
    out = torch.where(negative, -mag, mag)
    if not fmt.has_negative_zero:
        out = torch.where(out == 0, torch.zeros_like(out), out)
    return out


def round_int(x: torch.Tensor, fmt: IntFormat, mode: str, generator=None, sr_bits=None) -> torch.Tensor:
    """Round float64 ``x`` to fixed-point/integer values of ``fmt`` (always saturating)."""
    y = exact_ldexp(x, float(fmt.frac))
    negative = torch.signbit(y)
    a = y.abs()
    lo = torch.floor(a)
    frac = a - lo
    # a negative ``frac`` (steps above 1) can scale a float64 subnormal x to 0: it is still inexact
    frac = torch.where((a == 0) & (x != 0), torch.full_like(frac, 2.0**-1074), frac)
    up = round_up(mode, frac, (lo % 2) == 1, negative, _random(x, mode, generator), sr_bits)
    k = torch.where(negative, -(lo + up.double()), lo + up.double())
    k = torch.clamp(k, fmt.qmin, fmt.qmax) + 0.0  # + 0.0 turns -0 into +0
    return exact_ldexp(k, float(-fmt.frac))


def round_codebook(x: torch.Tensor, fmt: Codebook, mode: str, generator=None, sr_bits=None) -> torch.Tensor:
    """Round float64 ``x`` to codebook entries (saturating at both ends). Codebooks are not
    sign-magnitude, so modes act in value order: ties of nearest_even/odd go by the index parity."""
    table = fmt.values().to(x.device)
    n = table.numel()
    xc = torch.clamp(x, table[0], table[-1])
    lo_i = torch.clamp(torch.searchsorted(table, xc.contiguous(), right=True) - 1, 0, n - 2)
    lo, hi = table[lo_i], table[lo_i + 1]
    inexact = xc > lo
    # Compare x with the midpoint exactly: lo + hi == s + err (TwoSum), and 2x - s is exact near the
    # midpoint (Sterbenz), so x > (lo + hi) / 2 iff 2x - s > err. (Distances xc - lo, hi - xc would
    # round in float64 and turn near-ties of arbitrary table values into false ties.)
    s = lo + hi
    bb = s - lo
    err = (lo - (s - bb)) + (hi - bb)
    d = 2 * xc - s
    nearer_hi, tie = d > err, d == err
    hi_is_away = xc > 0  # the neighbour farther from zero
    if mode == "nearest_even":
        pick_hi = nearer_hi | (tie & (lo_i % 2 == 1))
    elif mode == "nearest_away":
        pick_hi = nearer_hi | (tie & hi_is_away)
    elif mode == "nearest_zero":
        pick_hi = nearer_hi | (tie & ~hi_is_away)
    elif mode == "toward_zero":
        pick_hi = inexact & (xc < 0)
    elif mode == "up":
        pick_hi = inexact
    elif mode == "down":
        pick_hi = torch.zeros_like(inexact)
    elif mode == "odd":
        pick_hi = inexact & (lo_i % 2 == 0)
    else:
        frac = (xc - lo) / (hi - lo)
        pick_hi = round_up(mode, frac, lo_i % 2 == 1, torch.zeros_like(inexact), _random(x, mode, generator),
                           sr_bits)
    out = torch.where(pick_hi | (xc == table[-1]), hi, lo)
    return torch.where(torch.isnan(x), x, out)


def round_element(x: torch.Tensor, fmt: ElementFormat, mode: str, overflow: str, generator=None,
                  sr_bits=None) -> torch.Tensor:
    """Round float64 ``x`` to the element format; float64 out."""
    if isinstance(fmt, FloatFormat):
        return round_float(x, fmt, mode, overflow, generator, sr_bits)
    if isinstance(fmt, IntFormat):
        return round_int(x, fmt, mode, generator, sr_bits)
    if isinstance(fmt, Codebook):
        return round_codebook(x, fmt, mode, generator, sr_bits)
    raise FormatError(f"no rounding rule for {type(fmt).__name__}")


# --- block formats ------------------------------------------------------------------------------

def _blocks(x: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """Move ``axis`` last and split it into blocks: (..., nblocks, size)."""
    xt = x.movedim(axis, -1)
    n = xt.shape[-1]
    if n % size:
        raise ValueError(
            f"block size {size} does not divide axis {axis} of length {n} (shape {tuple(x.shape)}); "
            f"pad the axis to a multiple of {size} or choose another axis"
        )
    return xt.reshape(*xt.shape[:-1], n // size, size)


def tensor_scale(x: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """NVFP4's per-tensor fp32 scale: amax / (max_elem * max_scale); 1 for an all-zero tensor.
    The amax is over the finite values: a nan or inf makes its own block nan (block_scales), it must
    not change the scale of every other block."""
    a = x.abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    amax = a.amax().float() if x.numel() else torch.zeros((), device=x.device)
    return tensor_scale_of_amax(amax, fmt)


def tensor_scale_of_amax(amax, fmt: BlockFormat) -> torch.Tensor:
    """The per-tensor fp32 scale from a float32 amax (a 0-d tensor or a number that float32 holds):
    amax / (max_elem * max_scale) in float32, 1 where that is not a positive finite number."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    s = amax / torch.tensor(fmt.element.max * fmt.scale.max, dtype=torch.float32, device=amax.device)
    good = torch.isfinite(s) & (s > 0)
    return torch.where(good, s, torch.ones_like(s))


def block_scales(xb: torch.Tensor, fmt: BlockFormat, ts: Optional[torch.Tensor]) -> torch.Tensor:
    """Scale value per block (float64, exactly representable in the scale format, nan for a block
    holding nan/inf under a power-of-two scale). ``xb`` is (..., nblocks, size) float64."""
    amax = xb.abs().amax(dim=-1)
    bad = ~torch.isfinite(amax)
    if fmt.pow2_scale:
        sc: FloatFormat = fmt.scale
        safe = torch.where((amax > 0) & ~bad, amax, torch.ones_like(amax))
        shared = torch.frexp(safe).exponent.double() - 1 - fmt.element.emax
        shared = torch.where((amax > 0) & ~bad, shared, torch.full_like(shared, sc.emin))
        shared = torch.clamp(shared, sc.emin, sc.emax)
        scale = exact_ldexp(torch.ones_like(shared), shared)
        return torch.where(bad, NAN, scale)
    # amax rule, computed in float32 as hardware recipes do
    s32 = amax.float() / torch.tensor(fmt.element.max, dtype=torch.float32, device=amax.device)
    if ts is not None:
        s32 = s32 / ts
    s = round_element(s32.double(), fmt.scale, "nearest_even", "saturate")
    return torch.where(bad, NAN, s)


def block_elements(xb: torch.Tensor, scale: torch.Tensor, fmt: BlockFormat, ts, mode, generator,
                   sr_bits) -> torch.Tensor:
    """Element values (float64, in the element format) of every block given its scale."""
    if fmt.pow2_scale:
        y = xb / scale.unsqueeze(-1)  # exact: power of two
    else:
        d = scale.float() if ts is None else scale.float() * ts
        y = (xb.float() / d.unsqueeze(-1)).double()
    y = torch.where(scale.unsqueeze(-1) > 0, y, torch.zeros_like(y))
    q = round_element(y, fmt.element, mode, "saturate", generator, sr_bits)
    return torch.where(torch.isnan(scale).unsqueeze(-1), NAN, q)


def block_values(q: torch.Tensor, scale: torch.Tensor, fmt: BlockFormat, ts) -> torch.Tensor:
    """Dequantized values: q * scale (* tensor scale), the same arithmetic decode uses."""
    if fmt.pow2_scale:
        return q * scale.unsqueeze(-1)
    d = scale.float() if ts is None else scale.float() * ts
    return (q.float() * d.unsqueeze(-1)).double()


def block_elements_of_values(vb: torch.Tensor, scale: torch.Tensor, fmt: BlockFormat, ts) -> torch.Tensor:
    """The inverse of block_values: element values (float64) of dequantized blocks ``vb`` under their
    scales (the division undoes block_values' product; rounding to the element grid removes the
    float32 rounding of that product in the amax-rule case)."""
    if fmt.pow2_scale:
        y = vb / scale.unsqueeze(-1)
    else:
        d = scale.float() if ts is None else scale.float() * ts
        y = (vb.float() / d.unsqueeze(-1)).double()
    y = torch.where(scale.unsqueeze(-1) > 0, y, torch.zeros_like(y))
    q = round_element(y, fmt.element, "nearest_even", "saturate")
    return torch.where(torch.isnan(scale).unsqueeze(-1), NAN, q)


def quantize_block(x: torch.Tensor, fmt: BlockFormat, mode: str, axis: int, generator=None,
                   sr_bits=None, tensor_amax: Optional[float] = None):
    """Returns (values in x's layout, element values, scales, tensor scale); all float64 but ts.
    ``tensor_amax`` (formats with a tensor scale): the amax to build the tensor scale from, a float32
    number given by the caller (delayed scaling), instead of the tensor's own."""
    xd = x.double()
    ts = None
    if fmt.tensor_scale:
        ts = tensor_scale(xd, fmt) if tensor_amax is None else tensor_scale_of_amax(tensor_amax, fmt)
        ts = ts.to(x.device)
    xb = _blocks(xd, fmt.size, axis)
    scale = block_scales(xb, fmt, ts)
    q = block_elements(xb, scale, fmt, ts, mode, generator, sr_bits)
    vals = block_values(q, scale, fmt, ts)
    xt_shape = x.movedim(axis, -1).shape
    out = vals.reshape(xt_shape).movedim(-1, axis)
    return out, q, scale, ts
