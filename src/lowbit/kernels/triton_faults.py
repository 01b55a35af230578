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
no floor on p (a 32-bit uniform alone could not go below 2^-32 per group).

Cost: the common path is one Philox word per group and a compare (w0 <= T[U-1] >> 31 makes a group
a *candidate*, probability T[U-1] + 2^-32). Only tiles with a candidate do more, and only on their
candidates: a cumsum ranks them, a binary search (tl.gather) picks CH of them at a time (CH from the
expected count, so one pass nearly always), each candidate draws w1, its first failure and its chain
on CH lanes, and tl.gather brings the XOR words back to the tile. The per="element" bit choice has
32-bit resolution: each bit's probability is within 2^-32 of 1/nb.

Random words: Philox4x32 with N_ROUNDS rounds (the project's count, see triton_quant), key = the
63-bit seed. The gate word w0 of group g: word g % 4 of counter (g // 4, 0, 0, 0) (one call per
four groups). Candidates only: counter (g, 1, 0, 0) gives w1 (word 0) and the per="element" bit
choice of the first failure (word 1); chain step s, counter (g, 2, s, 0), gives the gap's two words
(0, 1) and the bit choice (2). Counters depend on the group only, so the flips do not depend on
the tile size, the warps or the layout (1- and 2-byte codes that fill int32 words are loaded as
words, others code by code: same flips). tests/_faults_ref.py recomputes all of this in torch and
must agree bit for bit.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_quant import N_ROUNDS

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (tests without a GPU)

_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
CALLS = 1024         # Philox calls per program: 4096 groups, 16-32 KiB of codes
WARPS = 16           # 64 registers a thread on sm_90 (8 warps: 98, i.e. half the warps per SM)


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
def _gate_word(k0, k1, call, lane, NR: tl.constexpr):
    """Word ``lane`` (0..3, broadcast against call) of Philox(call, 0, 0, 0) as uint32."""
    c0 = call.to(tl.uint32)
    z = c0 * 0
    r0, r1, r2, r3 = _philox(k0, k1, c0, z, z, z, NR)
    return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))


@triton.jit
def _uniform(hi, lo):
    """u = (hi << 31) | (lo >> 1) as int64, from two uint32 words."""
    return (hi.to(tl.int64) << 31) | (lo >> 1).to(tl.int64)


@triton.jit
def _count(u, T, U: tl.constexpr, LOGU: tl.constexpr):
    """#{m < U : T[m] <= u} by binary search; T padded to 2^LOGU entries with 2^63 - 1 (a pad
    counts only for u = 2^63 - 1, where the minimum with U gives the same answer)."""
    at = tl.zeros(u.shape, tl.int32)
    for b in tl.static_range(LOGU):
        step = 1 << (LOGU - 1 - b)
        at = tl.where(tl.load(T + at + (step - 1)) <= u, at + step, at)
    at += (tl.load(T + at) <= u).to(tl.int32)
    return tl.minimum(at, U)


@triton.jit
def _shift(k, wbit, POS, NB: tl.constexpr, BITS: tl.constexpr, PER_ELEMENT: tl.constexpr):
    """Bit of the group's code word (element e at bits e*BITS..) that failing unit k flips."""
    if PER_ELEMENT:
        e = k
        slot = tl.umulhi(wbit, NB).to(tl.int32)
    else:
        e = k // NB
        slot = k % NB
    return e * BITS + tl.load(POS + slot)


@triton.jit
def _group_flips(grp, w0, k0, k1, T, POS, NB: tl.constexpr, U: tl.constexpr, LOGU: tl.constexpr,
                 BITS: tl.constexpr, PER_ELEMENT: tl.constexpr, WIDE: tl.constexpr, NR: tl.constexpr):
    """XOR word of each group in ``grp`` (global indices of candidate groups, w0 their gate words):
    the first failure and the whole chain."""
    if WIDE:
        one = tl.full(grp.shape, 1, tl.int64)
    else:
        one = tl.full(grp.shape, 1, tl.int32)
    g32 = grp.to(tl.uint32)
    z = g32 * 0
    lo, wbit, _, _ = _philox(k0, k1, g32, z + 1, z, z, NR)
    k = _count(_uniform(w0, lo), T, U, LOGU)
    live = k < U
    gx = tl.where(live, one << _shift(k, wbit, POS, NB, BITS, PER_ELEMENT).to(one.dtype), 0)
    s = 0
    while tl.max(live.to(tl.int32), axis=0) > 0:
        hi, lo, wbit, _ = _philox(k0, k1, g32, z + 2, z + s, z, NR)
        k = k + 1 + _count(_uniform(hi, lo), T, U, LOGU)
        live = live & (k < U)
        gx = gx | tl.where(live, one << _shift(k, wbit, POS, NB, BITS, PER_ELEMENT).to(one.dtype), 0)
        s += 1
    return gx


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 would otherwise arrive as a constexpr
def _faults_kernel(x_ptr, out_ptr, n, ngroups, seed, gate, T, POS, NB: tl.constexpr, U: tl.constexpr,
                   LOGU: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PER_ELEMENT: tl.constexpr, WIDE: tl.constexpr,
                   CALLS: tl.constexpr, CH: tl.constexpr, LOGNG: tl.constexpr, NR: tl.constexpr):
    """One tile of 4 * CALLS groups of G codes each (G = 1: x holds whole groups, e.g. int32 words
    of four uint8 codes): copy, gate words, and (only in tiles with a candidate) the candidates
    compacted CH at a time (cumsum + gather), their chains, and their XOR words back."""
    pid = tl.program_id(0)
    call = pid * CALLS + tl.arange(0, CALLS)
    lane = tl.arange(0, 4)[None, :]
    grp = call[:, None] * 4 + lane                                  # (CALLS, 4)
    elem = tl.arange(0, G)[None, None, :]
    if G == 1:      # a flat tile: contiguous offsets give 16-byte vector loads and stores
        offs = pid * (4 * CALLS) + tl.arange(0, 4 * CALLS)
    else:
        offs = grp.to(tl.int64)[:, :, None] * G + elem              # (CALLS, 4, G)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0)

    s64 = seed.to(tl.uint64)
    k0 = (s64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w = _gate_word(k0, k1, call[:, None], lane, NR)
    cand = ((w.to(tl.int64) <= gate) & (grp < ngroups)).to(tl.int32)
    if tl.max(tl.max(cand, axis=1), axis=0) > 0:
        c1 = tl.reshape(cand, (4 * CALLS,))
        cum = tl.cumsum(c1, 0)                                      # rank + 1 of each candidate
        nh = tl.sum(c1, 0)
        for c0 in range(0, nh, CH):
            j = c0 + tl.arange(0, CH)
            at = tl.zeros((CH,), tl.int32)                          # first index with cum > j
            for b in tl.static_range(LOGNG):
                step = 1 << (LOGNG - 1 - b)
                at = tl.where(tl.gather(cum, at + (step - 1), 0) <= j, at + step, at)
            g = pid * 4 * CALLS + tl.minimum(at, 4 * CALLS - 1)
            w0 = _gate_word(k0, k1, g // 4, g % 4, NR)             # recomputed: fewer live registers
            fx = _group_flips(g, w0, k0, k1, T, POS, NB, U, LOGU, BITS, PER_ELEMENT, WIDE, NR)
            fx = tl.where(j < nh, fx, 0)
            slot = cum - 1 - c0
            mine = (c1 > 0) & (slot >= 0) & (slot < CH)
            gx = tl.where(mine, tl.gather(fx, tl.minimum(tl.maximum(slot, 0), CH - 1), 0), 0)
            if G == 1:
                x = x ^ gx.to(x.dtype)
            else:
                x = x ^ (tl.reshape(gx, (CALLS, 4))[:, :, None] >> (elem * BITS)).to(x.dtype)
    tl.store(out_ptr + offs, x, mask=m)


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
    dev = torch.device(device)
    return t, _padded(t, dev), torch.tensor(positions, dtype=torch.int32, device=dev)


def _padded(t: list, device) -> torch.Tensor:
    """The thresholds as an int64 tensor padded to a power of two for the binary search."""
    size = 1 << (len(t) - 1).bit_length()
    return torch.tensor(t + [2**63 - 1] * (size - len(t)), dtype=torch.int64, device=device)


def chunk(q: float) -> int:
    """Candidates handled together in a tile (a loop takes more): the expected count per tile of
    groups hit with probability q plus 4 standard deviations, a power of two in [16, the tile]."""
    ng = 4 * CALLS
    mean = ng * q
    want = mean + 4 * math.sqrt(mean * (1 - q)) + 1
    return min(ng, max(16, 1 << math.ceil(math.log2(want))))


def claims(codes: torch.Tensor, p: float, positions=()) -> bool:
    """Whether the kernel takes this call: CUDA (or the interpreter), a supported integer dtype with
    every bit position inside the code, 0 < p <= 1/16 (the dense draw of arith.faults is better
    above), int32-indexable groups."""
    return ((codes.is_cuda or _INTERPRET) and codes.dtype in _DTYPES and 0 < p <= 1.0 / 16
            and all(0 <= b < 8 * codes.element_size() for b in positions)
            and codes.numel() // group_size(codes.dtype) < 2**31 - 4 * CALLS)


def flip_bits(codes: torch.Tensor, p: float, positions: tuple, per: str, seed: int,
              thresholds_: Optional[list] = None, chunk_: Optional[int] = None) -> torch.Tensor:
    """A copy of ``codes`` with the allowed bit ``positions`` flipped (law in the module doc); seed
    in [0, 2^63). For tests: ``thresholds_`` replaces those of p (to craft ties of the gate),
    ``chunk_`` the candidates per pass (to run the loop over passes)."""
    if not claims(codes, p, positions):
        raise ValueError("triton_faults.flip_bits: needs a CUDA tensor of uint8/int8/int16/int32/int64 codes, "
                         f"bit positions inside the code and 0 < p <= 1/16 (got {codes.dtype} on {codes.device}, "
                         f"positions {tuple(positions)}, p={p})")
    x = codes.contiguous().reshape(-1)
    n = x.numel()
    if n == 0:
        return x.clone().view(codes.shape)
    g = group_size(x.dtype)
    nb = len(positions)
    units = g * nb if per == "bit" else g
    t, tt, pos = _tables(float(p), units, tuple(positions), str(x.device))
    if thresholds_ is not None:
        t, tt = thresholds_, _padded(list(thresholds_), x.device)
    ngroups = -(-n // g)
    ch = chunk_ or chunk(t[-1] / 2.0**63)
    # 1- and 2-byte codes that fill whole 32-bit words go through the kernel as int32 words, one
    # group each (wide, aligned loads and stores); the group's XOR word is then applied as it is
    words = g > 1 and n % g == 0 and x.data_ptr() % 4 == 0
    xk = x.view(torch.int32) if words else x
    out = torch.empty_like(xk)
    grid = (triton.cdiv(ngroups, 4 * CALLS),)
    _faults_kernel[grid](xk, out, xk.numel(), ngroups, int(seed), t[-1] >> 31, tt, pos, NB=nb, U=units,
                         LOGU=(units - 1).bit_length(), G=1 if words else g, BITS=8 * x.element_size(),
                         PER_ELEMENT=per == "element", WIDE=x.dtype == torch.int64, CALLS=CALLS, CH=ch,
                         LOGNG=(4 * CALLS).bit_length() - 1, NR=N_ROUNDS, num_warps=WARPS)
    return out.view(x.dtype).view(codes.shape)
