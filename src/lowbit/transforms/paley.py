"""Hadamard matrices of orders that are not powers of two: Paley's constructions and Kronecker products.

A Hadamard matrix of order ``m`` has entries ±1 and ``H H^T = m I``. Sylvester's recursion gives
only powers of two; real models have widths such as 384 = 3·128, 576 = 9·64, 1536 = 3·512, so a
rotation of the full width needs more orders. This module builds them exactly (integer ±1
entries, float64):

* Paley I: ``q`` a prime power, ``q ≡ 3 (mod 4)`` gives order ``q + 1`` (12, 20, 24, 28, 32, 44, ...);
* Paley II: ``q`` a prime power, ``q ≡ 1 (mod 4)`` gives order ``2(q + 1)`` (12, 20, 28, 36, 52, ...);
* Kronecker products of any two constructible orders (``H_a ⊗ H_b`` has order ``a·b``), and
  Sylvester's powers of two.

``split_order(n)`` writes ``n = m · p`` with ``p`` a power of two (applied by the fast Walsh-Hadamard
transform) and ``m`` the smallest constructible order that makes up the rest (applied as a small
dense matmul): 384 = 12 · 32, 576 = 36 · 16, 1536 = 12 · 128, 2304 = 36 · 64. ``m`` is at most
``MAX_DENSE``. Widths without such a split (odd widths, 4·43 = 172 and its multiples, ...) are not
supported; ``check_order`` says so and names supported sizes nearby.

Finite fields GF(p^k) are built here from scratch (digits base p, multiplication modulo a monic
irreducible polynomial found by trial division); only the quadratic character is needed.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

import torch

MAX_DENSE = 1024  # largest order applied as one dense matmul (cost per element: m multiply-adds)


# --- small number theory ---------------------------------------------------------------------------

def _prime_power(q: int) -> Optional[Tuple[int, int]]:
    """``(p, k)`` with ``q == p**k`` for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, int(q ** 0.5) + 1) if q % d == 0), q)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# --- GF(p^k) ---------------------------------------------------------------------------------------

def _poly_mod(a: List[int], f: List[int], p: int) -> List[int]:
    """``a mod f`` over Z_p; polynomials as coefficient lists, lowest degree first, ``f`` monic."""
    a = a[:]
    k = len(f) - 1
    for i in range(len(a) - 1, k - 1, -1):
        c = a[i] % p
        if c:
            for j in range(k + 1):
                a[i - k + j] = (a[i - k + j] - c * f[j]) % p
    return [x % p for x in a[:k]] + [0] * max(0, k - len(a))


def _irreducible(p: int, k: int) -> List[int]:
    """The first monic polynomial of degree k over Z_p with no monic factor of degree 1..k//2."""
    def polys(d):  # all monic polynomials of degree d
        for code in range(p ** d):
            yield [(code // p ** i) % p for i in range(d)] + [1]

    for f in polys(k):
        if f[0] == 0 and k > 1:
            continue
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in polys(d)):
            return f
    raise RuntimeError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character(q: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elements of GF(q) as digit vectors (q, k) base p, and chi (length q): chi[0] = 0, +1 on the
    nonzero squares, -1 elsewhere (element index = sum digit_i p^i)."""
    p, k = _prime_power(q)
    digits = torch.tensor([[(e // p ** i) % p for i in range(k)] for e in range(q)], dtype=torch.long)
    f = _irreducible(p, k) if k > 1 else [0, 1]
    squares = set()
    for e in range(1, q):
        d = digits[e].tolist()
        sq = [0] * (2 * k - 1)
        for i in range(k):
            for j in range(k):
                sq[i + j] += d[i] * d[j]
        r = _poly_mod([c % p for c in sq], f, p) if k > 1 else [sq[0] % p]
        squares.add(sum(c * p ** i for i, c in enumerate(r)))
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[sorted(squares)] = 1.0
    chi[0] = 0.0
    return digits, chi


def jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(a_j - a_i)`` over GF(q) (q an odd prime power): symmetric for q ≡ 1 (mod 4),
    skew-symmetric for q ≡ 3 (mod 4); ``Q Q^T = q I - J`` and ``Q J = 0``."""
    pk = _prime_power(q)
    if pk is None or pk[0] == 2:
        raise ValueError(f"the Jacobsthal matrix needs an odd prime power, got {q}")
    p = pk[0]
    digits, chi = _quadratic_character(q)
    diff = (digits[None, :, :] - digits[:, None, :]) % p          # a_j - a_i, digit-wise
    index = (diff * (p ** torch.arange(digits.shape[1]))).sum(-1)
    return chi[index]


def paley1(q: int) -> torch.Tensor:
    """Paley I, order q + 1 (q ≡ 3 mod 4): ``I + S`` with ``S = [[0, 1^T], [-1, Q]]`` skew."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q ≡ 3 (mod 4), got {q}")
    Q = jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, Q
    return S + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """Paley II, order 2(q + 1) (q ≡ 1 mod 4): the symmetric conference matrix
    ``C = [[0, 1^T], [1, Q]]`` with each 0 replaced by ``[[1, -1], [-1, -1]]`` and each ±1 by
    ``±[[1, 1], [1, -1]]``."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q ≡ 1 (mod 4), got {q}")
    Q = jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, Q
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two), float64 ±1, symmetric."""
    if not _is_power_of_two(n):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


# --- which orders, and how -------------------------------------------------------------------------

@lru_cache(maxsize=None)
def construction(m: int) -> Optional[tuple]:
    """How to build a Hadamard matrix of order m: ``("sylvester",)``, ``("paley1", q)``,
    ``("paley2", q)``, ``("kron", a, b)``, or None when none of these gives order m.
    Direct constructions are preferred to Kronecker products."""
    if m < 1:
        return None
    if _is_power_of_two(m):
        return ("sylvester",)
    if m % 4:
        return None  # a Hadamard matrix of order > 2 has order divisible by 4
    pk = _prime_power(m - 1)
    if pk is not None and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    if m % 2 == 0:
        pk = _prime_power(m // 2 - 1)
        if pk is not None and (m // 2 - 1) % 4 == 1:
            return ("paley2", m // 2 - 1)
    for a in range(2, int(m ** 0.5) + 1):
        if m % a == 0 and construction(a) is not None and construction(m // a) is not None:
            return ("kron", a, m // a)
    return None


@lru_cache(maxsize=64)
def _matrix_cached(m: int) -> torch.Tensor:
    how = construction(m)
    if how is None:
        raise ValueError(f"no Hadamard construction of order {m} is known to lowbit")
    if how[0] == "sylvester":
        return sylvester(m)
    if how[0] == "paley1":
        return paley1(how[1])
    if how[0] == "paley2":
        return paley2(how[1])
    return torch.kron(_matrix_cached(how[1]), _matrix_cached(how[2]))


def hadamard_of_order(m: int) -> torch.Tensor:
    """An (unnormalised, ±1, float64) Hadamard matrix of order m; ``H H^T = m I`` exactly."""
    return _matrix_cached(int(m)).clone()


@lru_cache(maxsize=None)
def split_order(n: int) -> Optional[Tuple[int, int]]:
    """``(m, p)`` with ``n = m·p``, ``p`` a power of two and ``m`` the smallest constructible order
    (at most MAX_DENSE) with that property; ``(1, n)`` for a power of two; None if there is none."""
    if n < 1:
        return None
    if _is_power_of_two(n):
        return 1, n
    two = n & -n
    odd = n // two
    m = odd
    while m <= min(n, MAX_DENSE):
        if n % m == 0 and construction(m) is not None:
            return m, n // m
        m *= 2
    return None


def is_supported(n: int) -> bool:
    """Whether a full Hadamard rotation of size n is available (``split_order(n)`` exists)."""
    return split_order(int(n)) is not None


def supported_orders(limit: int) -> List[int]:
    """Every supported size up to ``limit``."""
    return [n for n in range(1, limit + 1) if is_supported(n)]


def check_order(n: int) -> Tuple[int, int]:
    """``split_order(n)``, or a ValueError naming what is supported and the nearest sizes that are."""
    s = split_order(int(n))
    if s is None:
        lower = next((k for k in range(n - 1, 0, -1) if is_supported(k)), None)
        upper = next(k for k in range(n + 1, 2 * n + 8) if is_supported(k))
        raise ValueError(
            f"no full Hadamard matrix of order {n} is available: supported sizes are n = m * 2^k with m a "
            f"power of two, a Paley order (q+1 for a prime power q ≡ 3 mod 4, 2(q+1) for q ≡ 1 mod 4) or a "
            f"Kronecker product of those, m <= {MAX_DENSE} (e.g. 12, 20, 24, 28, 36, 40, 44, 48, 52, 56, 60, "
            f"... times powers of two; nearest to {n}: {lower} and {upper}). Use a block rotation instead "
            f"(block = a power of two dividing {n}, e.g. {n & -n}).")
    return s
