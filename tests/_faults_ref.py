"""Pure-torch reference of kernels/triton_faults: the same Philox words, the same construction,
written directly (full 63-bit uniforms for every comparison, no binary search, no lazy draws)."""
from __future__ import annotations

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


def words(key: int, ngroups: int, stream: int, step: int, rounds: int = 7) -> torch.Tensor:
    """The word of every group: Philox(group // 4, stream, step) word group % 4."""
    calls = torch.arange((ngroups + 3) // 4, dtype=torch.int64)
    r = torch.stack(philox4x32(key, calls, stream, step, 0, rounds), 1).reshape(-1)
    return r[:ngroups]


def first_below(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """#{m : t[m] <= u} for every u."""
    return (t[None, :] <= u[:, None]).sum(1)


def flip_reference(codes: torch.Tensor, positions, per: str, key: int, t, group: int,
                   rounds: int = 7, chain: bool = True) -> torch.Tensor:
    """Codes with the flips of the kernel's construction; t: the 63-bit thresholds (len = units).
    chain=False stops after the first failure of each group (a wrong law, for the tests)."""
    t = torch.tensor(t, dtype=torch.int64)
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    ng = -(-n // group)
    nb = len(positions)
    units = group * nb if per == "bit" else group
    pos = torch.tensor(positions, dtype=torch.int64)
    padded = torch.zeros(ng * group, dtype=torch.int64)
    padded[:n] = flat

    def uniform(hi_stream, hi_step, lo_step):
        return (words(key, ng, hi_stream, hi_step, rounds) << 31) | (words(key, ng, 2, lo_step, rounds) >> 1)

    def flip(k, live, step):
        if per == "element":
            e, slot = k, (words(key, ng, 3, step, rounds) * nb) >> 32
        else:
            e, slot = k // nb, k % nb
        idx = torch.arange(ng)[live] * group + e[live]
        padded[idx] ^= 1 << pos[slot[live]]

    k = first_below(uniform(0, 0, 0), t)
    live = k < units
    flip(k, live, 0)
    s = 0
    while chain and bool(live.any()):
        k = k + 1 + first_below(uniform(1, s, s + 1), t)
        live &= k < units
        flip(k, live, s + 1)
        s += 1
    return padded[:n].to(codes.dtype).reshape(codes.shape)
