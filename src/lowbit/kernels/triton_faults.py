"""Fused fault injection for CUDA: one pass that copies integer codes and flips their bits.

The flips have the law of ``arith.faults.flip_bits`` (read its module docstring): per="bit", every
allowed bit flips independently with probability p; per="element", each element is hit with
probability p and then one allowed bit, uniformly chosen, flips. The construction reads each element
group only once and draws one 32-bit random word per group in the common case:

* A *group* is G consecutive codes (G = 4 / itemsize for 1- and 2-byte codes, else 1): U "units" in
  order, U = G * nb (per="bit": the allowed bits, element by element) or U = G (per="element").
* Each unit fails independently with probability p, so the first failing unit K has
  P(K <= m) = 1 - (1-p)^(m+1) = T[m] (K = U: none). With a uniform u in [0, 1),
  K = #{m < U : T[m] <= u} has exactly that law; K < U (a hit) with probability T[U-1].
* After a failure at unit k the next one is k + 1 + gap, gap having the same law (the units are
  independent), from a fresh uniform; the chain stops when it passes the last unit.
* per="element": every failing element flips bit ``pos[(w * nb) >> 32]`` of a fresh word w.

Uniforms have 63 bits: u = (w0 << 31) | (w1 >> 1) from two Philox4x32 words, thresholds
T[m] = round(2^63 (1 - (1-p)^(m+1))) computed in float64 on the host (-expm1((m+1) log1p(-p))), so
every probability of the law is represented to float64's relative precision (a few 2^-53) plus 2^-63:
no floor on p (a 32-bit uniform alone could not go below 2^-32 per group). w1 matters only when w0
equals the high 32 bits of a threshold (probability ~2^-32 per comparison), so it is drawn only
then: the common path is one Philox word per group and a compare. Everything after the first
candidate of a tile (binary search for K, the chain, the ties) runs only in tiles that have one.
The per="element" bit choice has 32-bit resolution: each bit's probability is within 2^-32 of 1/nb.

Random words: Philox4x32 with N_ROUNDS rounds (the project's count, see triton_quant), key = the
63-bit seed, counter (c0, c1, c2, c3) = (group // 4, stream, step, 0), word = group % 4. Streams:
0 the gate word w0 of the first failure, 1 the chain's gap words (step s = the s-th gap), 2 the
low words w1 (step 0: the first failure's, step s + 1: gap s's), 3 per="element" bit choices
(step s = the s-th failing element of the group). tests/_faults_ref.py recomputes all of this in
torch and must agree bit for bit.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .triton_quant import N_ROUNDS

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (tests without a GPU)

_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
CALLS = 256          # Philox calls per program: 1024 groups, 1-4 KiB of codes per element size
STREAM_GATE, STREAM_GAP, STREAM_LOW, STREAM_BIT = 0, 1, 2, 3


@triton.jit
def _philox(k0, k1, c0, c1, c2, c3, NR: tl.constexpr):
    """Philox4x32 (Salmon et al. 2011) on uint32 tensors; (k0, k1) the key, c the counter."""
    for _ in tl.static_range(NR):
        a = c0
        b = c2
        c0 = tl.umulhi(b, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a, 0xD2511F53) ^ c3 ^ k1
        c1 = b * 0xCD9E8D57
        c3 = a * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _word(k0, k1, call, lane, stream, step, NR: tl.constexpr):
    """Word ``lane`` (0..3, shape (1, 4)) of Philox(call, stream, step): (calls, 4) uint32."""
    c0 = call.to(tl.uint32)
    z = c0 * 0
    r0, r1, r2, r3 = _philox(k0, k1, c0, z + stream, z + step, z, NR)
    r0 = r0[:, None]
    r1 = r1[:, None]
    r2 = r2[:, None]
    r3 = r3[:, None]
    return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))


@triton.jit
def _count_below(w, k0, k1, call, lane, tie_step, TH, TL, U: tl.constexpr, LOGU: tl.constexpr,
                 NR: tl.constexpr):
    """#{m < U : T[m] <= u} for u = (w << 31) | (w1 >> 1), w1 from stream 2 drawn only on ties.
    TH / TL: high 32 / low 31 bits of T, TH padded past U with 2^32 (above every word)."""
    wl = w.to(tl.int64)
    idx = tl.zeros(w.shape, tl.int32)
    for b in tl.static_range(LOGU):
        step = 1 << (LOGU - 1 - b)
        t = tl.load(TH + idx + (step - 1))
        idx = tl.where(t < wl, idx + step, idx)
    tie = tl.load(TH + idx) == wl           # idx <= U: the padding never ties
    if tl.max(tl.max(tie.to(tl.int32), axis=1), axis=0) > 0:
        low = (_word(k0, k1, call, lane, 2, tie_step, NR) >> 1).to(tl.int64)
        for m in tl.static_range(U):
            idx += ((tl.load(TH + m) == wl) & (tl.load(TL + m) <= low)).to(tl.int32)
    return idx


@triton.jit
def _flip_mask(k, live, wbit, POS, elem, NB: tl.constexpr, PER_ELEMENT: tl.constexpr,
               WIDE: tl.constexpr):
    """XOR mask over (calls, 4, G) of the failing unit k of each live group."""
    if PER_ELEMENT:
        e = k
        slot = tl.umulhi(wbit, NB).to(tl.int32)
    else:
        e = k // NB
        slot = k % NB
    bit = tl.load(POS + slot, mask=live, other=0)
    if WIDE:
        one = tl.full(bit.shape, 1, tl.int64)
        bit = bit.to(tl.int64)
    else:
        one = tl.full(bit.shape, 1, tl.int32)
    hit = (elem == e[:, :, None]) & live[:, :, None]
    return tl.where(hit, (one << bit)[:, :, None], 0)


@triton.jit
def _faults_kernel(x_ptr, out_ptr, n, ngroups, seed, TH, TL, POS, NB: tl.constexpr, U: tl.constexpr,
                   LOGU: tl.constexpr, G: tl.constexpr, PER_ELEMENT: tl.constexpr, WIDE: tl.constexpr,
                   CALLS: tl.constexpr, NR: tl.constexpr):
    pid = tl.program_id(0)
    call = pid * CALLS + tl.arange(0, CALLS)
    lane = tl.arange(0, 4)[None, :]
    grp = call[:, None] * 4 + lane                                  # (CALLS, 4)
    elem = tl.arange(0, G)[None, None, :]
    offs = grp.to(tl.int64)[:, :, None] * G + elem                  # (CALLS, 4, G)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0)

    s64 = tl.to_tensor(seed).to(tl.uint64)
    k0 = (s64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w = _word(k0, k1, call, lane, 0, 0, NR)
    cand = (w.to(tl.int64) <= tl.load(TH + (U - 1))) & (grp < ngroups)
    if WIDE:
        flips = tl.zeros(offs.shape, tl.int64)
    else:
        flips = tl.zeros(offs.shape, tl.int32)
    if tl.max(tl.max(cand.to(tl.int32), axis=1), axis=0) > 0:
        k = _count_below(w, k0, k1, call, lane, 0, TH, TL, U, LOGU, NR)
        live = cand & (k < U)
        wbit = w
        if PER_ELEMENT:
            wbit = _word(k0, k1, call, lane, 3, 0, NR)
        flips = flips ^ _flip_mask(k, live, wbit, POS, elem, NB, PER_ELEMENT, WIDE)
        s = 0
        while tl.max(tl.max(live.to(tl.int32), axis=1), axis=0) > 0:
            wg = _word(k0, k1, call, lane, 1, s, NR)
            k = k + 1 + _count_below(wg, k0, k1, call, lane, s + 1, TH, TL, U, LOGU, NR)
            live = live & (k < U)
            if PER_ELEMENT:
                wbit = _word(k0, k1, call, lane, 3, s + 1, NR)
            flips = flips ^ _flip_mask(k, live, wbit, POS, elem, NB, PER_ELEMENT, WIDE)
            s += 1
    tl.store(out_ptr + offs, x ^ flips.to(x.dtype), mask=m)


def group_size(dtype: torch.dtype) -> int:
    """Codes per random word: 4 bytes of 1- and 2-byte codes, one wider code."""
    size = torch.empty((), dtype=dtype).element_size()
    return max(1, 4 // size)


def thresholds(p: float, units: int) -> list:
    """T[m] = round(2^63 * P(first failure among independent p-units is at most m)), m < units."""
    lq = math.log1p(-p)
    return [min(int(round(-math.expm1((m + 1) * lq) * 2.0**63)), 2**63 - 1) for m in range(units)]


@lru_cache(maxsize=64)
def _tables(p: float, units: int, positions: tuple, device: str):
    t = thresholds(p, units)
    logu = max(1, (units - 1).bit_length())
    th = [v >> 31 for v in t] + [2**32] * ((1 << logu) + 1 - units)
    tl_ = [v & 0x7FFFFFFF for v in t]
    dev = torch.device(device)
    return (torch.tensor(th, dtype=torch.int64, device=dev), torch.tensor(tl_, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int32, device=dev), logu)


def claims(codes: torch.Tensor, p: float) -> bool:
    """Whether the kernel takes this call: CUDA (or the interpreter), a supported integer dtype,
    0 < p <= 1/16 (the dense draw of arith.faults is better above), int32-indexable groups."""
    return ((codes.is_cuda or _INTERPRET) and codes.dtype in _DTYPES and 0 < p <= 1.0 / 16
            and codes.numel() // group_size(codes.dtype) < 2**31 - 4 * CALLS)


def flip_bits(codes: torch.Tensor, p: float, positions: tuple, per: str, seed: int,
              tables=None) -> torch.Tensor:
    """A copy of ``codes`` with the allowed bit ``positions`` flipped (law in the module doc); seed
    in [0, 2^63). ``tables``: (TH, TL, POS, LOGU) in place of those of p (tests craft ties)."""
    if not claims(codes, p):
        raise ValueError("triton_faults.flip_bits: needs a CUDA tensor of uint8/int8/int16/int32/int64 codes "
                         f"and 0 < p <= 1/16 (got {codes.dtype} on {codes.device}, p={p})")
    x = codes.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out.view(codes.shape)
    g = group_size(x.dtype)
    nb = len(positions)
    units = g * nb if per == "bit" else g
    th, tl_, pos, logu = tables if tables is not None else _tables(float(p), units, tuple(positions),
                                                                    str(x.device))
    ngroups = -(-n // g)
    grid = (triton.cdiv(ngroups, 4 * CALLS),)
    _faults_kernel[grid](x, out, n, ngroups, int(seed), th, tl_, pos, NB=nb, U=units, LOGU=logu, G=g,
                         PER_ELEMENT=per == "element", WIDE=x.dtype == torch.int64, CALLS=CALLS,
                         NR=N_ROUNDS, num_warps=4)
    return out.view(codes.shape)
