"""Soft errors: bit flips in the stored codes of any lowbit format, for fault-tolerance studies.

    y = lowbit.arith.inject_faults(x, "e4m3", 1e-4, fields=("exponent",), seed=0)

A tensor is encoded in the format (lowbit.encode), bits of its codes are flipped, and the codes are
decoded: what a memory or register upset does to stored numbers. ``per="bit"``: every allowed bit
flips independently with probability p (a bit error rate); ``per="element"``: each element is hit with
probability p and then has exactly one allowed bit flipped (MATLAB chop's flip). ``fields`` names the
bits that may flip: sign, exponent, mantissa (integers: sign and mantissa = the magnitude bits of the
two's complement code; codebooks: mantissa = the index bits) and, for block formats (MX, NVFP4, BFP),
``scale``: the shared scale's code (its own bit error rate, ``p_scale``, defaults to p).

CUDA codes (uint8, int8, int16, int32, int64) with 0 < p <= 1/16 go to one Triton kernel
(kernels/triton_faults) that copies them and draws the failing units by geometric gaps over chunks of
units, XORing them into the copy: same law, cost a copy plus O(flips). Elsewhere sampling is sparse: the number of flips is drawn from
the binomial distribution and their positions as a uniform random subset, so the cost is a copy of
the codes plus O(flips); at rates above 1/16 per candidate bit a dense Bernoulli draw per bit is used
instead. Seeds: the same int seed gives the same flips on the same device type (CPU and CUDA streams
differ; on CUDA the int is the Philox key itself, a torch.Generator or None gives a key drawn from
that generator or torch's default one).
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..emulate import Encoded, decode, encode
from ..formats import BlockFormat, Codebook, ElementFormat, FloatFormat, IntFormat, format as parse_format
from ..kernels.cpu_fast import draw_seeds

FIELDS = ("sign", "exponent", "mantissa", "scale")
PER = ("bit", "element")
_DENSE_ABOVE = 1.0 / 16


def field_mask(fmt: ElementFormat, fields: Iterable[str]) -> int:
    """Bit mask, within one code of ``fmt``, of the bits belonging to ``fields``."""
    fields = set(fields)
    bad = fields - set(FIELDS)
    if bad:
        raise ValueError(f"unknown bit fields {sorted(bad)}; accepted: {', '.join(FIELDS)}")
    mask = 0
    if isinstance(fmt, FloatFormat):
        man_bits = (1 << fmt.man) - 1
        exp_bits = ((1 << fmt.exp) - 1) << fmt.man
        sign = (1 << (fmt.exp + fmt.man)) if fmt.signed else 0
        parts = {"sign": sign, "exponent": exp_bits, "mantissa": man_bits}
    elif isinstance(fmt, IntFormat):
        top = 1 << (fmt.width - 1)
        parts = {"sign": top if fmt.is_signed else 0,
                 "mantissa": (top - 1) if fmt.is_signed else (1 << fmt.width) - 1, "exponent": 0}
    elif isinstance(fmt, Codebook):
        parts = {"sign": 0, "exponent": 0, "mantissa": (1 << fmt.bits) - 1}
    else:
        raise ValueError(f"no bit layout known for {fmt}")
    for f in fields - {"scale"}:
        mask |= parts[f]
    return mask


def _positions(mask: int) -> list:
    return [b for b in range(mask.bit_length()) if mask >> b & 1]


def _generator(seed, device) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        g.manual_seed(int(seed))
    else:
        raise ValueError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    return g


def _sorted_unique(v: torch.Tensor) -> torch.Tensor:
    if v.device.type == "cpu":  # NumPy's sort is ~100x faster than torch's here for int64 keys
        return torch.from_numpy(np.unique(v.numpy()))
    return torch.unique(v)


def _distinct(total: int, k: int, gen: torch.Generator, device) -> torch.Tensor:
    """k distinct uniform integers in [0, total) (sorted), by drawing with replacement and topping up."""
    got = _sorted_unique(torch.randint(0, total, (k,), generator=gen, device=device))
    while got.numel() < k:
        more = torch.randint(0, total, (k - got.numel(),), generator=gen, device=device)
        got = _sorted_unique(torch.cat([got, more]))
    return got


def _binomial(n: int, p: float, gen: torch.Generator) -> int:
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    return int(np.random.default_rng(seed).binomial(n, p))


_fused_error = []   # the first failure of the fused kernel (then the sparse path answers, warned once)


def _fused(codes: torch.Tensor, p: float, positions: list):
    """kernels.triton_faults where it takes this call (CUDA, or Triton's interpreter in tests)."""
    if _fused_error or not (codes.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    try:
        from ..kernels import triton_faults
    except Exception:  # no triton, no driver: the sparse path answers
        return None
    return triton_faults if triton_faults.claims(codes, p, positions) else None


def _philox_key(seed, device) -> int:
    """A 63-bit Philox key: an int seed itself, else two words drawn from the generator."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return int(seed) % 2**63
    if seed is not None and not isinstance(seed, torch.Generator):
        raise ValueError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    a, b = draw_seeds(seed, device)
    return ((a & 0xFFFFFFFF) << 31 | (b & 0x7FFFFFFF)) & (2**63 - 1)


def flip_bits(codes: torch.Tensor, p: float, mask: int, *, per: str = "bit", seed=None) -> torch.Tensor:
    """A copy of integer ``codes`` with bits of ``mask`` flipped (see the module doc)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError("flip_bits expects an integer tensor of codes (lowbit.encode(...).codes)")
    if per not in PER:
        raise ValueError(f"per must be one of {', '.join(PER)}, got {per!r}")
    if not (isinstance(p, (int, float)) and 0 <= p <= 1):
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    pos = _positions(mask)
    if not pos or p == 0 or codes.numel() == 0:
        return codes.clone()
    fused = _fused(codes, p, pos)
    if fused is not None:
        key = _philox_key(seed, codes.device)
        try:
            return fused.flip_bits(codes, p, tuple(pos), per, key)
        except Exception as e:  # a Triton that cannot compile the kernel: same law, slower path
            _fused_error.append(e)
            warnings.warn(f"lowbit fault injection: fused Triton kernel failed ({type(e).__name__}: {e}); "
                          "using the sparse path")
    out = codes.clone()
    n = out.numel()
    gen = _generator(seed, out.device)
    flat = out.view(-1)
    bits = torch.tensor([1 << b for b in pos], dtype=torch.int64, device=out.device)
    nb = len(pos)
    if per == "element":
        hit = (torch.rand(n, generator=gen, device=out.device) < p).nonzero().squeeze(1) if p > _DENSE_ABOVE \
            else _distinct(n, _binomial(n, p, gen), gen, out.device)
        which = torch.randint(0, nb, (hit.numel(),), generator=gen, device=out.device)
        flat[hit] ^= bits[which].to(out.dtype)
        return out
    if p > _DENSE_ABOVE:
        for b in pos:
            hit = torch.rand(n, generator=gen, device=out.device) < p
            flat ^= torch.where(hit, 1 << b, 0).to(out.dtype)
        return out
    flips = _distinct(n * nb, _binomial(n * nb, p, gen), gen, out.device)
    elem, slot = flips // nb, flips % nb
    uniq, inv = torch.unique_consecutive(elem, return_inverse=True)  # flips are sorted
    xor = torch.zeros(uniq.numel(), dtype=torch.int64, device=out.device).index_add_(0, inv, bits[slot])
    flat[uniq] ^= xor.to(out.dtype)
    return out


def inject_encoded(enc: Encoded, p: float, fields: Sequence[str] = ("sign", "exponent", "mantissa"), *,
                   per: str = "bit", p_scale: Optional[float] = None, seed=None) -> Encoded:
    """An Encoded tensor with bit flips in its element codes (and, with "scale" in fields, in its
    block-scale codes, at rate p_scale, default p)."""
    f = enc.format
    elem = f.element if isinstance(f, BlockFormat) else f
    gen = _generator(seed, enc.codes.device)
    codes = flip_bits(enc.codes, p, field_mask(elem, fields), per=per, seed=gen)
    scales = enc.scales
    if "scale" in fields:
        if not isinstance(f, BlockFormat):
            raise ValueError(f"{f} has no block scale; 'scale' applies to block formats (mxfp8, nvfp4, ...)")
        scale_mask = (1 << f.scale.bits) - 1
        scales = flip_bits(enc.scales, p if p_scale is None else p_scale, scale_mask, per=per, seed=gen)
    return Encoded(f, codes, enc.dtype, enc.axis, scales, enc.tensor_scale)


def inject_faults(x, fmt, p: float, fields: Sequence[str] = ("sign", "exponent", "mantissa"), *,
                  per: str = "bit", p_scale: Optional[float] = None, seed=None, rounding: str = "nearest_even",
                  axis: int = -1):
    """``x`` stored in ``fmt`` with soft errors: encode, flip bits, decode (torch or NumPy in and out,
    same dtype)."""
    is_np = isinstance(x, np.ndarray)
    t = torch.from_numpy(x) if is_np else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"inject_faults expects a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    f = parse_format(fmt)
    enc = encode(t.detach(), f, rounding, "saturate", axis=axis)
    y = decode(inject_encoded(enc, p, fields, per=per, p_scale=p_scale, seed=seed))
    return y.numpy() if is_np else y


__all__ = ["FIELDS", "field_mask", "flip_bits", "inject_encoded", "inject_faults"]
