"""Fused Triton kernel for the block Walsh-Hadamard rotation (``transforms.hadamard``) on CUDA.

One program loads a tile of ``ROWS`` blocks of ``b`` contiguous features (about 4096 elements),
multiplies by the random signs (optional), applies ``H_b / sqrt(b)`` on chip and writes the tile
once: one read and one write of the tensor, like a copy.

Two ways to apply ``H_b`` on chip, both measured (benchmarks/bench_hadamard.py --variants):

``method="butterfly"`` (default): log2(b) radix-2 stages, each a reshape of the tile to
``(ROWS, b/2h, 2, h)``, ``tl.split`` into the two halves, ``a + c`` / ``a - c``, ``tl.join`` back.
Plain fp32 adds and subtracts, so the result is the textbook transform to fp32 rounding; on an H200
it is also the faster route (0.82-0.93 of a copy's throughput for b = 16..4096, against 0.46-0.77
for "dot" at its best tile).

``method="dot"``: Sylvester's factorisation ``H_b = H_F1 ⊗ H_F2`` (one factor ``F2 = b`` up to 64,
else an even split: 128 = 8 x 16, 512 = 16 x 32, 4096 = 64 x 64): the inner factor is one ``tl.dot``
of the tile viewed as ``(ROWS*b/F2, F2)`` against ``H_F2``, the outer factor a second ``tl.dot``
after an on-chip transpose. Factors below 16 (the smallest dot operand) are applied as ``I ⊗ H_F``
padded to 16 x 16. The ±1 matrices are generated in registers from ``H[i, j] = (-1)^popcount(i & j)``.
Precision: ``H`` holds ±1, exact in tf32, so only ``x`` loses bits on the tensor cores. The default
``precision="split"`` writes ``x = hi + lo`` with ``hi`` the tf32 truncation of ``x`` (exact) and
``lo = x - hi`` (exact, at most 2^-10 |x|), and sums ``lo @ H + hi @ H`` in fp32: only ``lo``'s own
tf32 truncation is lost, a relative error near 2^-20 per term, close to fp32 rounding.
``precision="split3"`` splits ``lo`` once more (three dots); ``precision="ieee"`` asks Triton for
true fp32 products (no tensor cores).

This module imports triton at the top; ``transforms.hadamard`` imports it lazily, only with CUDA.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

PRECISIONS = {"ieee": 0, "split": 2, "split3": 3}
METHODS = ("dot", "butterfly")
MAX_BLOCK = 4096
TILE = 4096          # elements per program: ROWS = TILE // b blocks (at least one); measured best of 2048..16384


@triton.jit
def _factor(F: tl.constexpr, LOG_F: tl.constexpr, K: tl.constexpr):
    """``I_{K/F} ⊗ H_F`` (unnormalised Sylvester ``H_F`` repeated down the diagonal) as a K x K
    matrix, built in registers: ``H[i, j] = (-1)^popcount(i & j)``. ``K >= 16`` lets factors of 2..8
    use ``tl.dot`` too (it needs operands of at least 16)."""
    i = tl.arange(0, K)[:, None]
    j = tl.arange(0, K)[None, :]
    ij = i & j
    p = tl.zeros((K, K), dtype=tl.int32)
    for k in tl.static_range(LOG_F):
        p = p ^ ((ij >> k) & 1)
    return tl.where((i >> LOG_F) == (j >> LOG_F), (1 - 2 * p).to(tl.float32), 0.0)


@triton.jit
def _tf32_trunc(a):
    # clear the 13 mantissa bits that tf32 drops (-8192 == 0xFFFFE000): exact, and a - result is exact
    return (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _dot_h(a, H, PREC: tl.constexpr):
    """``a @ H`` for a ±1 matrix ``H`` at the requested precision (see the module docstring)."""
    if PREC == 0:
        acc = tl.dot(a, H, input_precision="ieee")
    else:
        hi = _tf32_trunc(a)
        lo = a - hi
        if PREC == 3:
            lo_hi = _tf32_trunc(lo)
            acc = tl.dot(lo - lo_hi, H, input_precision="tf32")
            acc = tl.dot(lo_hi, H, acc, input_precision="tf32")
        else:
            acc = tl.dot(lo, H, input_precision="tf32")
        acc = tl.dot(hi, H, acc, input_precision="tf32")   # the small terms first, then the large
    return acc


@triton.jit
def _butterfly_stage(x, ROWS: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    """One radix-2 stage on ``x`` viewed as ``(ROWS, G, 2, H)``: combine the two halves of axis 2."""
    y = tl.permute(tl.reshape(x, (ROWS, G, 2, H)), (0, 1, 3, 2))
    a, c = tl.split(y)
    y = tl.permute(tl.join(a + c, a - c), (0, 1, 3, 2))
    return tl.reshape(y, (ROWS, G * 2 * H))


@triton.jit
def _butterfly(x, ROWS: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr):
    """``H_B`` (unnormalised) on each row of ``x`` (ROWS, B) as log2(B) add/subtract stages."""
    for k in tl.static_range(LOG_B):
        x = _butterfly_stage(x, ROWS, B >> (k + 1), 1 << k)
    return x


@triton.jit
def _hadamard_kernel(x_ptr, s_ptr, y_ptr, n_blocks, blocks_per_row, scale,
                     B: tl.constexpr, LOG_B: tl.constexpr, F1: tl.constexpr, LOG_F1: tl.constexpr,
                     F2: tl.constexpr, LOG_F2: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                     ROWS: tl.constexpr,
                     SIGNS: tl.constexpr, PREC: tl.constexpr, BUTTERFLY: tl.constexpr):
    # SIGNS: 0 none, 1 multiply before the transform (rotate), 2 after it (rotate_inverse)
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, B)
    rmask = (r < n_blocks)[:, None]
    x = tl.load(x_ptr + (r[:, None] * B + c[None, :]), mask=rmask, other=0.0)
    if SIGNS != 0:
        s = tl.load(s_ptr + ((r % blocks_per_row)[:, None] * B + c[None, :]), mask=rmask, other=0.0)
    if SIGNS == 1:
        x = x * s
    if BUTTERFLY:
        x = _butterfly(x, ROWS, B, LOG_B)
    else:
        # inner factor over contiguous groups of F2 (K2 = max(F2, 16) columns per dot row)
        x = _dot_h(tl.reshape(x, (ROWS * B // K2, K2)), _factor(F2, LOG_F2, K2), PREC)
        if F1 > 1:   # outer factor: bring its axis innermost, same product, and back
            x = tl.permute(tl.reshape(x, (ROWS, F1, F2)), (0, 2, 1))
            x = _dot_h(tl.reshape(x, (ROWS * B // K1, K1)), _factor(F1, LOG_F1, K1), PREC)
            x = tl.permute(tl.reshape(x, (ROWS, F2, F1)), (0, 2, 1))
        x = tl.reshape(x, (ROWS, B))
    x = x * scale
    if SIGNS == 2:
        x = x * s
    tl.store(y_ptr + (r[:, None] * B + c[None, :]), x, mask=rmask)


def supports(x: torch.Tensor, block: int) -> bool:
    """Whether the kernel takes this input as is: CUDA float32, contiguous, a block of 2..4096."""
    return (x.is_cuda and x.dtype == torch.float32 and x.is_contiguous() and x.numel() > 0
            and 2 <= block <= MAX_BLOCK and block & (block - 1) == 0 and x.shape[-1] % block == 0)


def block_fwht(x: torch.Tensor, block: int, signs: Optional[torch.Tensor] = None, signs_after: bool = False,
               precision: str = "split", method: str = "butterfly", rows: Optional[int] = None,
               num_warps: Optional[int] = None) -> torch.Tensor:
    """``x @ blockdiag(H_b) / sqrt(b)`` over the last dim of a CUDA float32 contiguous tensor, with
    ``x`` multiplied by ``signs`` (length ``x.shape[-1]``) first, or the result multiplied by them
    when ``signs_after``. ``method`` "butterfly" (default, the faster on H200) or "dot";
    ``precision`` applies to "dot" only. ``rows`` / ``num_warps`` override the tile heuristics."""
    if not supports(x, block):
        raise ValueError(f"the Triton Hadamard kernel needs a non-empty contiguous CUDA float32 tensor whose "
                         f"last dim is a multiple of a power-of-two block in 2..{MAX_BLOCK}; got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}, contiguous={x.is_contiguous()}, "
                         f"block={block}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    if method not in METHODS:
        raise ValueError(f"unknown Triton Hadamard method {method!r}; accepted: {', '.join(METHODS)}")
    n = x.shape[-1]
    if signs is not None:
        if signs.numel() != n:
            raise ValueError(f"signs must have one entry per feature ({n}), got {signs.numel()}")
        signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
    b = int(block)
    log_b = b.bit_length() - 1
    butterfly = method == "butterfly"
    # H_b = H_F1 ⊗ H_F2 with F2 the inner (contiguous) factor: one factor up to 64, else an even split
    f1 = 1 if b <= 64 else 1 << (log_b // 2)
    f2 = b // f1
    ROWS = max(1, TILE // b) if rows is None else int(rows)
    while ROWS * b < 256:   # tl.dot needs at least 16 rows of 16
        ROWS *= 2
    n_blocks = x.numel() // b
    y = torch.empty_like(x)
    warps = (8 if ROWS * b >= 8192 else 4) if num_warps is None else int(num_warps)
    grid = (triton.cdiv(n_blocks, ROWS),)
    _hadamard_kernel[grid](x, signs if signs is not None else x, y, n_blocks, n // b, 1.0 / b ** 0.5,
                           B=b, LOG_B=log_b, F1=f1, LOG_F1=f1.bit_length() - 1, F2=f2,
                           LOG_F2=f2.bit_length() - 1, K1=max(f1, 16), K2=max(f2, 16), ROWS=ROWS,
                           SIGNS=0 if signs is None else (2 if signs_after else 1),
                           PREC=PRECISIONS[precision], BUTTERFLY=butterfly, num_warps=warps)
    return y
