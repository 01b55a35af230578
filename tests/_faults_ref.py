"""Pure-torch reference of kernels/triton_faults: the same Philox words, the same chunks and
geometric gaps, the flips applied element by element in int64 (not through the kernel's int32 words),
so the kernel's word/bit mapping is checked too."""
from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF


def philox4x32(key: int, c0: torch.Tensor, c1: int, c2: int, c3: int = 0, rounds: int = 7) -> list:
    """Philox4x32 in int64 torch arithmetic; c0 a tensor of counters, the other counter words ints."""
    k0, k1 = key & M32, (key >> 32) & M32
    x = [c0.to(torch.int64) & M32, torch.full_like(c0, c1, dtype=torch.int64),
         torch.full_like(c0, c2, dtype=torch.int64), torch.full_like(c0, c3, dtype=torch.int64)]
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(0xD2511F53, x[0])
        hi2, lo2 = _mulhilo(0xCD9E8D57, x[2])
        x = [hi2 ^ x[1] ^ k0, lo2, hi0 ^ x[3] ^ k1, lo0]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return x


def _mulhilo(a: int, b: torch.Tensor):
    """High and low 32 bits of the 64-bit product of constant a and uint32 values b (int64)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * b                       # < 2^48
    hi_part = a_hi * b                       # < 2^48
    low = (lo_part + ((hi_part & 0xFFFF) << 16))
    lo32 = low & M32
    hi32 = ((hi_part >> 16) + (low >> 32)) & M32
    return hi32, lo32


def draws(key: int, chunks: torch.Tensor, step: int, inv_lam: float, rounds: int = 7):
    """(E / lambda, w2) of step ``step`` of every chunk, as the kernel's _draw computes them."""
    w0, w1, w2, w3 = philox4x32(key, chunks, step, 0, 0, rounds)
    m = ((w0 & 0x7FFFFFFF) << 32) | w1
    w = (m.to(torch.float64) + (w3.to(torch.float64) + 0.5) * 2.0**-32) * 2.0**-64
    upper = (w0 >> 31) != 0
    v = 1.0 - w
    d = (1.0 - v) - w
    e = -(torch.log(torch.where(upper, v, w)) + torch.where(upper, d, torch.zeros_like(d)))
    return e * inv_lam, w2


def failures(key: int, nunits: int, p: float, chunk: int, rounds: int = 7):
    """(unit index, w2) of every failing unit: each chunk walked by its gaps until it leaves."""
    lam = -math.log1p(-p)
    inv_lam = 1.0 / lam if lam > 2.0**-1022 else math.inf
    nchunks = -(-nunits // chunk)
    chunks = torch.arange(nchunks, dtype=torch.int64)
    end = torch.clamp((chunks + 1) * chunk, max=nunits)
    q = chunks * chunk - 1
    live = torch.ones(nchunks, dtype=torch.bool)
    units, words = [], []
    s = 0
    while bool(live.any()):
        x, w2 = draws(key, chunks, s, inv_lam, rounds)
        q = q + 1 + torch.clamp(x, max=float(chunk)).to(torch.int64)
        live &= q < end
        units.append(q[live])
        words.append(w2[live])
        s += 1
    return torch.cat(units), torch.cat(words)


def flip_reference(codes: torch.Tensor, positions, per: str, key: int, p: float, chunk: int,
                   rounds: int = 7) -> torch.Tensor:
    """Codes with the flips of the kernel's construction (C = ``chunk`` units per chunk)."""
    flat = codes.reshape(-1).to(torch.int64)
    nb = len(positions)
    units, w2 = failures(key, flat.numel() * nb if per == "bit" else flat.numel(), p, chunk, rounds)
    if per == "element":
        elem, slot = units, (w2 * nb) >> 32
    else:
        elem, slot = units // nb, units % nb
    bits = torch.tensor([1 << b if b < 63 else -(1 << 63) for b in positions], dtype=torch.int64)
    xor = torch.zeros_like(flat).index_add_(0, elem, bits[slot])    # distinct bits: the sum is the XOR
    return (flat ^ xor).to(codes.dtype).reshape(codes.shape)
