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


def gate_words(key: int, ngroups: int, rounds: int = 7) -> torch.Tensor:
    """The gate word w0 of every group: word group % 4 of Philox(group // 4, 0, 0, 0)."""
    calls = torch.arange((ngroups + 3) // 4, dtype=torch.int64)
    return torch.stack(philox4x32(key, calls, 0, 0, 0, rounds), 1).reshape(-1)[:ngroups]


def group_words(key: int, ngroups: int, stream: int, step: int, rounds: int = 7) -> list:
    """The four words of Philox(group, stream, step, 0) of every group."""
    return philox4x32(key, torch.arange(ngroups, dtype=torch.int64), stream, step, 0, rounds)


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

    def flip(k, live, wbit):
        if per == "element":
            e, slot = k, (wbit * nb) >> 32
        else:
            e, slot = k // nb, k % nb
        idx = torch.arange(ng)[live] * group + e[live]
        padded[idx] ^= 1 << pos[slot[live]]

    first = group_words(key, ng, 1, 0, rounds)
    k = first_below((gate_words(key, ng, rounds) << 31) | (first[0] >> 1), t)
    live = k < units
    flip(k, live, first[1])
    s = 0
    while chain and bool(live.any()):
        r = group_words(key, ng, 2, s, rounds)
        k = k + 1 + first_below((r[0] << 31) | (r[1] >> 1), t)
        live &= k < units
        flip(k, live, r[2])
        s += 1
    return padded[:n].to(codes.dtype).reshape(codes.shape)
