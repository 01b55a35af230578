"""Fault injection for CUDA: one Triton kernel copies the codes and XORs the flips into the copy.

The flips have the law of ``arith.faults.flip_bits`` (read its module docstring): per="bit", every
allowed bit flips independently with probability p; per="element", each element is hit with
probability p and then one allowed bit, uniformly chosen, flips. The cost is one pass: each program
copies a tile of TILE elements at memory speed and then walks the chunks of that tile, O(#chunks +
#flips) work that touches only the words it flips.

Construction (tests/_faults_ref.py recomputes it in torch and must agree bit for bit):

* *Units*: per="bit", unit e * nb + slot is allowed bit ``positions[slot]`` of element e (nb allowed
  bits); per="element", unit e is element e. Each unit fails independently with probability p.
* The units are cut into chunks of C consecutive units (C = ``chunk_units(p)``, a power of two in
  [2^8, 2^16] with about 16 expected failures per chunk; it depends on p only, never on the launch).
  One lane walks one chunk: with q = (first unit of the chunk) - 1, it repeats q = q + 1 + gap, and
  flips unit q while q is inside the chunk (and below the number of units). The gaps are independent
  geometric variables, P(gap >= j) = (1-p)^j: exactly the failures of independent units.
* Step s of chunk c draws Philox4x32 (N_ROUNDS rounds, the project's count from triton_quant; key =
  the 63-bit seed) at counter (c, s, 0, 0): words w0..w3. A uniform u in (0, 1) is built from w0, w1,
  w3: w = (m + (w3 + 1/2) 2^-32) 2^-64 with m the 63 low bits of (w0 << 32 | w1), and u = w if the
  top bit of w0 is 0, else u = 1 - w. Then E = -log(u) (exponential) and gap = floor(E * (1/lambda)),
  lambda = -log1p(-p) and 1/lambda rounded once on the host (float64), so P(gap >= j) =
  P(E >= j lambda) = (1-p)^j. For u = 1 - w, E = -log1p(-w) is computed as -(log(v) + d) with
  v = 1 - w and d = (1 - v) - w, both exact in float64: log(1 - w) = log(v) + log1p(d / v), and
  log1p(d / v) = d up to |d| (1 - v) / v, i.e. 2^-53 of E (|d| <= 2^-54): log1p's accuracy from
  ``log`` alone (Triton's interpreter has no log1p) and no division.
  per="element": the failing element flips bit ``positions[(w2 * nb) >> 32]``.
* Counters depend on (chunk, step) only, so the flips depend on the seed, p and the codes' length,
  not on the block size, the warps or the grid.

Precision of the law: w is uniform on a grid of step 2^-96 in (0, 1/2), rounded to float64 (relative
2^-53), and x = E / lambda is computed with a relative error delta of a few ulps, ~2^-51 (float64
``log``, the correction d, the rounded 1/lambda; every product but the last is by a power of two, so
contracting one into an FMA changes no bit). Moving x by x delta moves P(gap < j) = 1 - e^(-j lambda)
by at most j lambda e^(-j lambda) delta, so: every short-gap probability P(gap < j) (p itself among
them) is realised to ~2^-51 relative plus 2^-96 absolute (p = 1e-12: P(gap = 0) = p (1 +- 2^-50)),
and every tail P(gap >= j) = P to (1 + ln(1/P)) 2^-51 relative (2^-46 at P = 2^-45). The kernel and
tests/_faults_ref.py compute the same float64 operations and differ only where ``log`` differs by an
ulp. Gap overflow: x is at most ~67 / lambda (1/lambda is inf below p ~ 1e-308, and E > 0 as u < 1,
so x = inf there); x is clamped to C before the conversion to int64, and a gap of C already leaves
the chunk. p up to 1/16 (the dense path of arith.faults takes larger p).

Applying the flips: the copy is a buffer of int32 words (the codes' bytes, rounded up to whole words,
so the ragged tail of 1- and 2-byte codes has a word of its own). Program t copies the words of
elements [t TILE, (t + 1) TILE) (TILE a multiple of C, so its chunks' units are its elements' bits),
passes a barrier, then flips: its XORs land in words it has already written. Codes that are not
whole aligned words (a ragged tail, a strided view) are copied by torch first and the kernel only
flips. bit b of element e is bit B =
e * 8 * itemsize + b of the little-endian buffer, XORed with ``tl.atomic_xor`` into word B >> 5 at
bit B & 31 (int64 codes: their two halves are two words). Distinct units are distinct bits, so the
XORs commute and the result does not depend on their order.
"""
from __future__ import annotations

import math
import os
import struct
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_quant import N_ROUNDS

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (tests without a GPU)

_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MEAN_FLIPS = 16      # expected failures per chunk: fewer programs idle in the longest lane of a block
MIN_CHUNK, MAX_CHUNK = 2**8, 2**16
TILE = 2**16         # elements a program copies (a multiple of every chunk: chunks never cross tiles)
COPY_WORDS = 2048    # int32 words per step of a program's copy loop
BLOCK = 128          # chunks (lanes) walked at once by a program
WARPS = 4
ONE_PASS = True      # False: torch copies the codes and the kernel only flips (the two-pass design, to compare)
MAX_BITS = 2**40     # codes of up to 128 GiB: chunk indices fit the 32-bit counter word


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
def _draw(k0, k1, chunk, step, inv_lam, NR: tl.constexpr):
    """(E / lambda, w2) of step ``step`` of each chunk: the gap before its floor, and the word that
    chooses the bit of a per="element" failure (construction in the module doc)."""
    z = chunk * 0
    w0, w1, w2, w3 = _philox(k0, k1, chunk, z + step, z, z, NR)
    m = ((w0 & 0x7FFFFFFF).to(tl.int64) << 32) | w1.to(tl.int64)
    w = (m.to(tl.float64) + (w3.to(tl.float64) + 0.5) * 0.00000000023283064365386962890625) \
        * 5.421010862427522170037264004349708557128906250e-20                      # 2^-32, 2^-64
    upper = (w0 >> 31) != 0                     # u = 1 - w: E = -log1p(-w), see the module doc
    v = 1.0 - w
    d = (1.0 - v) - w
    e = -(tl.log(tl.where(upper, v, w)) + tl.where(upper, d, 0.0))
    return e * inv_lam, w2


@triton.jit(do_not_specialize=["nwords", "nunits", "nchunks", "seed", "inv_lam_bits"])
def _faults_kernel(src_ptr, words_ptr, nwords, nunits, nchunks, seed, inv_lam_bits, POS, NB: tl.constexpr,
                   BITS: tl.constexpr, PER_ELEMENT: tl.constexpr, C: tl.constexpr, LANES: tl.constexpr,
                   BLOCK: tl.constexpr, COPY: tl.constexpr, TILE_WORDS: tl.constexpr, COPY_WORDS: tl.constexpr,
                   NR: tl.constexpr):
    """One tile of TILE elements: its words copied from ``src_ptr`` (``COPY``), then its LANES chunks
    of C units, BLOCK lanes at a time, walked by geometric gaps until every lane has left its chunk;
    each failure XORs one bit into the int32 words of the copy."""
    tile = tl.program_id(0).to(tl.int64)
    if COPY:
        base = tile * TILE_WORDS
        if base + TILE_WORDS <= nwords:     # a whole tile: no mask, so 16-byte vector loads and stores
            for off in tl.range(0, TILE_WORDS, COPY_WORDS):
                w = base + off + tl.arange(0, COPY_WORDS)
                tl.store(words_ptr + w, tl.load(src_ptr + w))
        else:
            for off in tl.range(0, TILE_WORDS, COPY_WORDS):
                w = base + off + tl.arange(0, COPY_WORDS)
                m = w < nwords
                tl.store(words_ptr + w, tl.load(src_ptr + w, mask=m), mask=m)
        tl.debug_barrier()      # the tile's words are written before its flips XOR into them
    s64 = seed.to(tl.uint64)
    k0 = (s64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s64 >> 32) & 0xFFFFFFFF).to(tl.uint32)
    inv_lam = inv_lam_bits.to(tl.int64).to(tl.float64, bitcast=True)   # a float argument would be float32
    for lane0 in tl.range(0, LANES, BLOCK):
        lane = lane0 + tl.arange(0, BLOCK)
        chunk = tile * LANES + lane                                   # up to 2^32 chunks
        live = (chunk < nchunks) & (lane < LANES)
        start = chunk * C
        end = tl.minimum(start + C, nunits)
        c32 = chunk.to(tl.uint32)
        q = start - 1
        step = 0
        while tl.max(live.to(tl.int32), axis=0) > 0:
            x, wbit = _draw(k0, k1, c32, step, inv_lam, NR)
            q = q + 1 + tl.minimum(x, C * 1.0).to(tl.int64)      # x >= 0; a gap of C leaves the chunk
            live = live & (q < end)
            if PER_ELEMENT:
                e = q
                slot = tl.umulhi(wbit, NB).to(tl.int32)
            else:
                e = q // NB
                slot = (q % NB).to(tl.int32)
            b = e * BITS + tl.load(POS + slot, mask=live, other=0).to(tl.int64)
            bit = (tl.full(b.shape, 1, tl.uint32) << (b & 31).to(tl.uint32)).to(tl.int32, bitcast=True)
            tl.atomic_xor(words_ptr + (b >> 5), bit, mask=live, sem="relaxed")
            step += 1


def chunk_units(p: float) -> int:
    """Units per chunk for rate p: the largest power of two with at most MEAN_FLIPS expected
    failures, within [MIN_CHUNK, MAX_CHUNK] (few lanes for tiny p, short lanes for large p)."""
    if p * MAX_CHUNK <= MEAN_FLIPS:      # also where MEAN_FLIPS / p overflows
        return MAX_CHUNK
    return max(MIN_CHUNK, 1 << math.floor(math.log2(MEAN_FLIPS / p)))


def inverse_lambda(p: float) -> float:
    """1 / lambda, lambda = -log1p(-p): gap = floor(E * (1 / lambda)) for an exponential E (inf for
    p below ~1e-308, where every gap leaves its chunk)."""
    lam = -math.log1p(-p)
    return 1.0 / lam if lam > 2.0**-1022 else math.inf


@lru_cache(maxsize=64)
def _positions(positions: tuple, device: str) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.int32, device=torch.device(device))


def claims(codes: torch.Tensor, p: float, positions=()) -> bool:
    """Whether the kernel takes this call: CUDA (or the interpreter), a supported integer dtype with
    every bit position inside the code, 0 < p <= 1/16 (the dense draw of arith.faults is better
    above), at most 2^40 bits of codes."""
    return ((codes.is_cuda or _INTERPRET) and codes.dtype in _DTYPES and 0 < p <= 1.0 / 16
            and all(0 <= b < 8 * codes.element_size() for b in positions)
            and codes.numel() * 8 * codes.element_size() <= MAX_BITS)


def flip_bits(codes: torch.Tensor, p: float, positions: tuple, per: str, seed: int,
              chunk_: Optional[int] = None) -> torch.Tensor:
    """A copy of ``codes`` (contiguous, same shape) with the allowed bit ``positions`` flipped (law
    in the module doc); seed in [0, 2^63). ``chunk_`` replaces chunk_units(p) (tests: many chunks,
    ragged last chunk)."""
    if not claims(codes, p, positions):
        raise ValueError("triton_faults.flip_bits: needs a CUDA tensor of uint8/int8/int16/int32/int64 codes, "
                         f"bit positions inside the code and 0 < p <= 1/16 (got {codes.dtype} on {codes.device}, "
                         f"positions {tuple(positions)}, p={p})")
    n, size = codes.numel(), codes.element_size()
    nb = len(positions)
    per_elem_units = nb if per == "bit" else 1
    c = chunk_ or chunk_units(p)
    tile = max(TILE, c)
    # the kernel copies the codes while every chunk lies in one tile (always, but for odd ``chunk_``)
    fuse = (ONE_PASS and codes.is_contiguous() and n * size % 4 == 0 and codes.storage_offset() * size % 4 == 0
            and tile * per_elem_units % c == 0)
    if fuse:
        out = torch.empty_like(codes, memory_format=torch.contiguous_format)   # aligned whole words
        words, src = out.view(-1).view(torch.int32), codes.view(-1).view(torch.int32)
    else:           # a buffer of whole words (a ragged tail of its own), the codes copied to its head
        words = torch.empty(-(-n * size // 4), dtype=torch.int32, device=codes.device)
        out = words.view(torch.uint8)[:n * size].view(codes.dtype).view(codes.shape)
        out.copy_(codes)
        src = words
    if n == 0:
        return out
    nunits = n * per_elem_units
    lanes = -(-tile * per_elem_units // c)
    nchunks = -(-nunits // c)
    inv_lam_bits = struct.unpack("<q", struct.pack("<d", inverse_lambda(float(p))))[0]
    pos = _positions(tuple(positions), str(codes.device))
    tile_words = tile * size // 4
    _faults_kernel[(triton.cdiv(n, tile),)](
        src, words, words.numel(), nunits, nchunks, int(seed), inv_lam_bits, pos, NB=nb, BITS=8 * size,
        PER_ELEMENT=per == "element", C=c, LANES=lanes, BLOCK=min(BLOCK, triton.next_power_of_2(lanes)),
        COPY=fuse, TILE_WORDS=tile_words, COPY_WORDS=min(COPY_WORDS, tile_words), NR=N_ROUNDS, num_warps=WARPS)
    return out
