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

Full-width sizes that are not powers of two (``H_b = H_m ⊗ H_p``, ``H_m`` a Paley matrix of order
m = 12, 20, 28, 36, ..., see ``transforms/paley.py``) have their own fused kernels (``paley_fwht``):
each block of b = m·p features gets its signs, the same butterfly stages along each run of p
features, then ``H_m`` mixes the m runs, and is stored once (one read, one write). ``H_m`` has ±1
entries, so by default (m <= 40, p >= 16) the mixing is generated straight-line fp32 code: the runs are
separate tiles, grouped by three, every signed sum of a group is formed once and each output run adds
one per group (about m/3 + 1 adds per element: 13 for m = 36 instead of 36 multiply-adds). "adds"
loads each run as its own tile (short runs, p <= 64); "tree" loads the block as one tile, does the
butterfly on it and takes the runs apart with a tree of ``tl.split`` (long runs, p >= 128). On an
H200 that is 0.69-0.91 of a copy for b = 384..14336 (the tensor-core mixing before it: 0.38-0.83;
the two-pass route: 0.11-0.19). The tensor-core layouts ("left", "batched", "right": hi/lo-split
tf32 dots, ±1 entries exact) and "fma" stay selectable with ``mix`` and are the default for larger m
(measured by ``benchmarks/bench_hadamard.py --paley-variants``).

This module imports triton at the top; ``transforms.hadamard`` imports it lazily, only with CUDA.
"""
from __future__ import annotations

import hashlib
import linecache
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary
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
def _split_dot(a, H, PREC: tl.constexpr, H_LEFT: tl.constexpr):
    """``a @ H`` (or ``H @ a`` with ``H_LEFT``; 2-D or batched 3-D operands) for a ±1 matrix ``H`` at
    the requested precision (see the module docstring): only ``a`` is split, ``H`` is exact in tf32."""
    if PREC == 0:
        if H_LEFT:
            acc = tl.dot(H, a, input_precision="ieee")
        else:
            acc = tl.dot(a, H, input_precision="ieee")
    else:
        hi = _tf32_trunc(a)
        lo = a - hi
        if PREC == 3:
            lo_hi = _tf32_trunc(lo)
            acc = _dot_tf32(lo - lo_hi, H, H_LEFT)
            acc = _dot_tf32_acc(lo_hi, H, acc, H_LEFT)
        else:
            acc = _dot_tf32(lo, H, H_LEFT)
        acc = _dot_tf32_acc(hi, H, acc, H_LEFT)   # the small terms first, then the large
    return acc


@triton.jit
def _dot_tf32(a, H, H_LEFT: tl.constexpr):
    if H_LEFT:
        acc = tl.dot(H, a, input_precision="tf32")
    else:
        acc = tl.dot(a, H, input_precision="tf32")
    return acc


@triton.jit
def _dot_tf32_acc(a, H, acc, H_LEFT: tl.constexpr):
    if H_LEFT:
        acc = tl.dot(H, a, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, H, acc, input_precision="tf32")
    return acc


@triton.jit
def _dot_h(a, H, PREC: tl.constexpr):
    """``a @ H`` for a ±1 matrix ``H`` at the requested precision (see the module docstring)."""
    return _split_dot(a, H, PREC, False)


@triton.jit
def _butterfly_stage(x, ROWS: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    """One radix-2 stage on ``x`` viewed as ``(ROWS, G, 2, H)``: combine the two halves of axis 2."""
    y = tl.permute(tl.reshape(x, (ROWS, G, 2, H)), (0, 1, 3, 2))
    a, c = tl.split(y)
    y = tl.permute(tl.join(a + c, a - c), (0, 1, 3, 2))
    return tl.reshape(y, (ROWS, G * 2 * H))


@triton.jit
def butterfly(x, ROWS: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr):
    """``H_b`` (unnormalised, ``b = 2**LOG_B``) on each run of b columns of ``x`` (ROWS, B) as
    log2(b) add/subtract stages (b = B: the whole row)."""
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
        x = butterfly(x, ROWS, B, LOG_B)
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


# --- full-width rotations of sizes that are not powers of two: H_b = H_m ⊗ H_p ------------------------

PALEY_MAX_M = 128       # largest padded Paley factor (its ±1 matrix is one dot operand)
PALEY_MAX_TILE = 16384  # largest padded block (MP x p elements) one program holds in registers
PALEY_TILE = 4096       # elements per program when a block is smaller: several blocks per program
MIXES = ("adds", "tree", "fma", "left", "batched", "right")


def paley_pad(m: int) -> int:
    """The m-factor padded to a power of two of at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, 1 << (int(m) - 1).bit_length())


@triton.jit
def _paley_kernel(x_ptr, s_ptr, h_ptr, y_ptr, n_blocks, blocks_per_row, scale,
                  M: tl.constexpr, MP: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
                  ROWS: tl.constexpr, SIGNS: tl.constexpr, PREC: tl.constexpr, LEFT: tl.constexpr):
    # One program: ROWS blocks of b = M*P features, each held as an (MP, P) tile (feature i*P + j at
    # [i, j], rows i >= M masked to zero). SIGNS: 0 none, 1 before (rotate), 2 after (rotate_inverse).
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    i = tl.arange(0, MP)
    j = tl.arange(0, P)
    col = i[:, None] * P + j[None, :]                                    # (MP, P) feature index
    mask = (r < n_blocks)[:, None, None] & (i < M)[None, :, None]        # (ROWS, MP, 1)
    offs = r[:, None, None] * (M * P) + col[None, :, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if SIGNS != 0:
        s = tl.load(s_ptr + ((r % blocks_per_row)[:, None, None] * (M * P) + col[None, :, :]), mask=mask,
                    other=0.0)
    if SIGNS == 1:
        x = x * s
    # H_p on each run of P contiguous features: the same add/subtract stages as the block kernel
    x = butterfly(tl.reshape(x, (ROWS * MP, P)), ROWS * MP, P, LOG_P)
    # H_m mixing the M runs: out[a, j] = sum_i Hop[i, a] x[i, j], Hop = H_m (or H_m^T for the
    # transpose) padded with zeros to MP x MP; ±1 entries, so only x is split for the tensor cores
    ii = tl.arange(0, MP)
    if LEFT:   # batched (MP, MP) @ (MP, P) dots over the ROWS blocks, no transpose of the tile
        hop_t = tl.load(h_ptr + ii[None, :] * MP + ii[:, None])          # hop_t[a, i] = Hop[i, a]
        hop_t = tl.broadcast_to(hop_t[None, :, :], (ROWS, MP, MP))
        x = _split_dot(tl.reshape(x, (ROWS, MP, P)), hop_t, PREC, True)
    else:      # the tile transposed on chip to (ROWS*P, MP), one 2-D dot, and back
        hop = tl.load(h_ptr + ii[:, None] * MP + ii[None, :])
        x = tl.permute(tl.reshape(x, (ROWS, MP, P)), (0, 2, 1))
        x = _split_dot(tl.reshape(x, (ROWS * P, MP)), hop, PREC, False)
        x = tl.permute(tl.reshape(x, (ROWS, P, MP)), (0, 2, 1))
    x = x * scale
    if SIGNS == 2:
        x = x * s
    tl.store(y_ptr + offs, x, mask=mask)


@triton.jit
def _paley_load(x_ptr, base, valid, I0: tl.constexpr, MT: tl.constexpr, M: tl.constexpr, P: tl.constexpr):
    """Rows I0 .. I0+MT of one block viewed as (M, P), rows >= M masked to zero; with offsets and mask."""
    i = I0 + tl.arange(0, MT)
    col = i[:, None] * P + tl.arange(0, P)[None, :]
    mask = (i < M)[:, None] & valid
    return tl.load(x_ptr + base + col, mask=mask, other=0.0), col, mask


@triton.jit
def _paley_prep(x, s_ptr, sbase, col, mask, MT: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
                SIGNS: tl.constexpr):
    """Signs (SIGNS == 1: before) and H_p on each row of a loaded tile; returns it and the signs."""
    s = x
    if SIGNS != 0:
        s = tl.load(s_ptr + sbase + col, mask=mask, other=0.0)
    if SIGNS == 1:
        x = x * s
    return butterfly(x, MT, P, LOG_P), s


@triton.jit
def _hop_t(h_ptr, LD: tl.constexpr, A0: tl.constexpr, NA: tl.constexpr, I0: tl.constexpr, NI: tl.constexpr):
    """Rows A0.. of Hop^T against columns I0.. (Hop stored LD x LD, zero-padded): hop_t[a, i] = Hop[i, a]."""
    a = A0 + tl.arange(0, NA)
    i = I0 + tl.arange(0, NI)
    return tl.load(h_ptr + i[None, :] * LD + a[:, None])


@triton.jit
def _paley_left_block(x1, c1, m1, x2, c2, m2, s_ptr, y_ptr, base, sbase, scale, h11, h12, h21, h22,
                      MA: tl.constexpr, MB: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
                      SIGNS: tl.constexpr, PREC: tl.constexpr):
    """One loaded block: signs, H_p, the ±1 factor as left dots (one or two row tiles), store."""
    x1, s1 = _paley_prep(x1, s_ptr, sbase, c1, m1, MA, P, LOG_P, SIGNS)
    if MB > 0:
        x2, s2 = _paley_prep(x2, s_ptr, sbase, c2, m2, MB, P, LOG_P, SIGNS)
        o1 = _split_dot(x1, h11, PREC, True) + _split_dot(x2, h12, PREC, True)
        o2 = (_split_dot(x1, h21, PREC, True) + _split_dot(x2, h22, PREC, True)) * scale
        if SIGNS == 2:
            o2 = o2 * s2
        tl.store(y_ptr + base + c2, o2, mask=m2)
    else:
        o1 = _split_dot(x1, h11, PREC, True)
    o1 = o1 * scale
    if SIGNS == 2:
        o1 = o1 * s1
    tl.store(y_ptr + base + c1, o1, mask=m1)


@triton.jit
def _paley_left_kernel(x_ptr, s_ptr, h_ptr, y_ptr, n_blocks, blocks_per_row, scale,
                       M: tl.constexpr, LD: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, P: tl.constexpr,
                       LOG_P: tl.constexpr, LOOP: tl.constexpr, SIGNS: tl.constexpr, PREC: tl.constexpr,
                       PREFETCH: tl.constexpr):
    # One block at a time (LOOP of them per program), held as (M, P): out = Hop^T @ X as 2-D dots with
    # the ±1 factor on the left, no on-chip transpose. The M rows are one tile of MA (a power of two)
    # or, when that saves padding (36 -> 32 + 16 instead of 64), two tiles of MA and MB rows.
    # PREFETCH issues the next block's loads before this block's arithmetic (more bytes in flight).
    h11 = _hop_t(h_ptr, LD, 0, MA, 0, MA)
    h12 = h11
    h21 = h11
    h22 = h11
    if MB > 0:
        h12 = _hop_t(h_ptr, LD, 0, MA, MA, MB)
        h21 = _hop_t(h_ptr, LD, MA, MB, 0, MA)
        h22 = _hop_t(h_ptr, LD, MA, MB, MA, MB)
    first = tl.program_id(0).to(tl.int64) * LOOP
    if PREFETCH:
        x1, c1, m1 = _paley_load(x_ptr, first * (M * P), first < n_blocks, 0, MA, M, P)
        x2, c2, m2 = x1, c1, m1
        if MB > 0:
            x2, c2, m2 = _paley_load(x_ptr, first * (M * P), first < n_blocks, MA, MB, M, P)
        for k in range(LOOP):
            blk = first + k
            nxt = blk + 1
            nvalid = (k + 1 < LOOP) & (nxt < n_blocks)
            n1, c1, nm1 = _paley_load(x_ptr, nxt * (M * P), nvalid, 0, MA, M, P)
            n2 = n1
            nm2 = nm1
            if MB > 0:
                n2, c2, nm2 = _paley_load(x_ptr, nxt * (M * P), nvalid, MA, MB, M, P)
            _paley_left_block(x1, c1, m1, x2, c2, m2, s_ptr, y_ptr, blk * (M * P),
                              (blk % blocks_per_row) * (M * P), scale, h11, h12, h21, h22, MA, MB, P, LOG_P,
                              SIGNS, PREC)
            x1, m1, x2, m2 = n1, nm1, n2, nm2
    else:
        for k in range(LOOP):
            blk = first + k
            valid = blk < n_blocks
            x1, c1, m1 = _paley_load(x_ptr, blk * (M * P), valid, 0, MA, M, P)
            x2, c2, m2 = x1, c1, m1
            if MB > 0:
                x2, c2, m2 = _paley_load(x_ptr, blk * (M * P), valid, MA, MB, M, P)
            _paley_left_block(x1, c1, m1, x2, c2, m2, s_ptr, y_ptr, blk * (M * P),
                              (blk % blocks_per_row) * (M * P), scale, h11, h12, h21, h22, MA, MB, P, LOG_P,
                              SIGNS, PREC)


@triton.jit
def _paley_fma_step(x_ptr, s_ptr, h_ptr, acc1, acc2, i, r, srow, rmask, M: tl.constexpr, LD: tl.constexpr,
                    MA: tl.constexpr, MB: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, ROWS: tl.constexpr,
                    SIGNS: tl.constexpr):
    """Run i of each block (P features, straight from memory): signs, H_p, then added into every output
    run a with weight Hop[i, a] (exact fp32 multiply-adds by ±1)."""
    j = tl.arange(0, P)[None, :]
    xi = tl.load(x_ptr + (r[:, None] * (M * P) + i * P + j), mask=rmask, other=0.0)
    if SIGNS == 1:
        xi = xi * tl.load(s_ptr + (srow[:, None] * (M * P) + i * P + j), mask=rmask, other=0.0)
    xi = butterfly(xi, ROWS, P, LOG_P)[:, None, :]
    acc1 += tl.load(h_ptr + i * LD + tl.arange(0, MA))[None, :, None] * xi
    if MB > 0:
        acc2 += tl.load(h_ptr + i * LD + MA + tl.arange(0, MB))[None, :, None] * xi
    return acc1, acc2


@triton.jit
def _paley_fma_store(s_ptr, y_ptr, acc, r, srow, rmask, scale, A0: tl.constexpr, NA: tl.constexpr,
                     M: tl.constexpr, P: tl.constexpr, SIGNS: tl.constexpr):
    a = A0 + tl.arange(0, NA)[None, :, None]
    col = a * P + tl.arange(0, P)[None, None, :]
    mask = rmask[:, :, None] & (a < M)
    acc = acc * scale
    if SIGNS == 2:
        acc = acc * tl.load(s_ptr + (srow[:, None, None] * (M * P) + col), mask=mask, other=0.0)
    tl.store(y_ptr + (r[:, None, None] * (M * P) + col), acc, mask=mask)


@triton.jit
def _paley_fma_kernel(x_ptr, s_ptr, h_ptr, y_ptr, n_blocks, blocks_per_row, scale,
                      M: tl.constexpr, LD: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, P: tl.constexpr,
                      LOG_P: tl.constexpr, ROWS: tl.constexpr, SIGNS: tl.constexpr, UNROLL: tl.constexpr):
    # ROWS blocks per program; the M runs of P features are read one at a time (each exactly once),
    # transformed by H_p and accumulated into the output tile (ROWS, MA + MB, P) held in registers:
    # M fp32 multiply-adds per element, no tensor cores, no padding of the contraction; output runs
    # are two power-of-two tiles (36 = 32 + 4, 20 = 16 + 4, 12 = 8 + 4) so little of it is padding.
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    srow = r % blocks_per_row
    rmask = (r < n_blocks)[:, None]
    acc1 = tl.zeros((ROWS, MA, P), dtype=tl.float32)
    acc2 = tl.zeros((ROWS, MB if MB > 0 else 1, P), dtype=tl.float32)
    if UNROLL:
        for i in tl.static_range(M):
            acc1, acc2 = _paley_fma_step(x_ptr, s_ptr, h_ptr, acc1, acc2, i, r, srow, rmask, M, LD, MA, MB, P,
                                         LOG_P, ROWS, SIGNS)
    else:
        for i in range(M):
            acc1, acc2 = _paley_fma_step(x_ptr, s_ptr, h_ptr, acc1, acc2, i, r, srow, rmask, M, LD, MA, MB, P,
                                         LOG_P, ROWS, SIGNS)
    _paley_fma_store(s_ptr, y_ptr, acc1, r, srow, rmask, scale, 0, MA, M, P, SIGNS)
    if MB > 0:
        _paley_fma_store(s_ptr, y_ptr, acc2, r, srow, rmask, scale, MA, MB, M, P, SIGNS)


# --- the m-mixing as generated adds: no tensor cores, no padded products, plain fp32 --------------------
#
# ``y_a = sum_i Hop[i, a] x_i`` with every entry ±1 is a signed sum, so the kernel below is generated per
# ±1 matrix as straight-line fp32 adds and subtracts on m separate tiles, one per run of P features.
# The runs go in groups of ``group``: the 2^(group-1) signed sums of a group (leading sign +) that some
# output needs are formed once, then each output run adds one of them per group: about
# m/group + 2^group/group adds per element instead of m (m = 36: 18, 13, 11.5 for groups of 2, 3, 4),
# far below the GPU's fp32 throughput per byte moved. The separate run tiles come either from one load
# per run ("adds": no on-chip transpose, but each run gets its own butterfly, which costs for long runs)
# or from one (MP, P) tile per block, its butterfly, and a binary tree of ``tl.split`` ("tree").

PALEY_ADD_GROUP = 3     # runs per group of signed sums
ADDS_MAX_M = 40         # default route for m up to this (the generated code, and its compile time, grow as m^2)
ADDS_PER_THREAD = 2     # elements of each run tile per thread by default (2: 8-byte accesses)
_ADD_KERNELS: dict = {}


def _adds_source(name: str, A, group: int, tree: int = 0) -> str:
    """Triton source of a kernel applying ``y_a = sum_i A[i][a] x_i`` (A an m x m ±1 nested list) to each
    block, with signs, the P-point butterfly on the input runs, scaling and signs after. ``tree == 0``:
    ROWS blocks per program, each run loaded (and transformed) as its own (ROWS, P) tile. ``tree`` = the
    padded order MP (a power of two >= m): one block per program loaded as one (MP, P) tile, the butterfly
    on the whole tile (cheaper for long runs), then the runs taken apart by a binary tree of ``tl.split``
    (free once the run axis is held per thread) and stored one by one."""
    m = len(A)
    groups = [list(range(k, min(k + group, m))) for k in range(0, m, group)]
    lines = [f"def {name}(x_ptr, s_ptr, y_ptr, n_blocks, blocks_per_row, scale, ROWS: tl.constexpr,",
             "        P: tl.constexpr, LOG_P: tl.constexpr, SIGNS: tl.constexpr):"]
    if not tree:
        lines += ["    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)",
                  "    j = tl.arange(0, P)[None, :]",
                  "    rmask = (r < n_blocks)[:, None]",
                  f"    offs = r[:, None] * ({m} * P) + j",
                  f"    soffs = (r % blocks_per_row)[:, None] * ({m} * P) + j"]
        for i in range(m):
            lines.append(f"    x{i} = _adds_in(x_ptr, s_ptr, offs, soffs, rmask, {i} * P, ROWS, P, LOG_P, SIGNS)")
    else:
        lines += ["    blk = tl.program_id(0).to(tl.int64)",
                  "    jj = tl.arange(0, P)",
                  "    rmask = jj < P",
                  f"    offs = blk * ({m} * P) + jj",
                  f"    soffs = (blk % blocks_per_row) * ({m} * P) + jj",
                  f"    v = _tree_in(x_ptr, s_ptr, blk, blocks_per_row, {m}, {tree}, P, LOG_P, SIGNS)"]
        count = [0]

        def split(var: str, k: int, base: int, stride: int) -> None:
            # var: (P, k) holding runs base + stride * (0 .. k-1)
            if base >= m:
                return
            if k == 1:
                lines.append(f"    x{base} = tl.reshape({var}, (P,))")
                return
            a, b = f"v{count[0]}", f"v{count[0] + 1}"
            count[0] += 2
            lines.append(f"    {a}, {b} = tl.split(tl.reshape({var}, (P, {k // 2}, 2)))")
            split(a, k // 2, base, 2 * stride)
            split(b, k // 2, base + stride, 2 * stride)

        split("v", int(tree), 0, 1)
    # per group: the signed sums each output needs (patterns relative to the group's first run)
    terms = [[] for _ in range(m)]
    for k, idx in enumerate(groups):
        need = set()
        for a in range(m):
            lead = A[idx[0]][a]
            pat = tuple(int(A[i][a] * lead) for i in idx[1:])
            need.add(pat)
            terms[a].append((lead, f"c{k}_" + "".join("p" if s > 0 else "m" for s in pat)))
        made = {(): f"x{idx[0]}"}
        for pat in sorted(need, key=len):
            for t in range(1, len(pat) + 1):   # build every prefix once, each from the one before it
                pre = pat[:t]
                if pre in made:
                    continue
                var = f"c{k}_" + "".join("p" if s > 0 else "m" for s in pre)
                lines.append(f"    {var} = {made[pre[:-1]]} {'+' if pre[-1] > 0 else '-'} x{idx[t]}")
                made[pre] = var
        if len(idx) == 1:
            lines.append(f"    c{k}_ = x{idx[0]}")
    for a in range(m):
        pos = [v for s, v in terms[a] if s > 0]
        neg = [v for s, v in terms[a] if s < 0]
        if pos:
            expr = " + ".join(pos) + "".join(f" - {v}" for v in neg)
        else:
            expr = "-(" + " + ".join(neg) + ")"
        lines.append(f"    _adds_out(y_ptr, s_ptr, {expr}, offs, soffs, rmask, {a} * P, scale, SIGNS)")
    return "\n".join(lines) + "\n"


@triton.jit
def _adds_in(x_ptr, s_ptr, offs, soffs, rmask, off, ROWS: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
             SIGNS: tl.constexpr):
    """One run of P features of ROWS blocks: load, signs (SIGNS == 1), the P-point butterfly."""
    x = tl.load(x_ptr + offs + off, mask=rmask, other=0.0)
    if SIGNS == 1:
        x = x * tl.load(s_ptr + soffs + off, mask=rmask, other=0.0)
    return butterfly(x, ROWS, P, LOG_P)


@triton.jit
def _tree_in(x_ptr, s_ptr, blk, blocks_per_row, M: tl.constexpr, MP: tl.constexpr, P: tl.constexpr,
             LOG_P: tl.constexpr, SIGNS: tl.constexpr):
    """One block as an (MP, P) tile (rows >= M zero): signs (SIGNS == 1), the butterfly along P, and the
    tile transposed to (P, MP) for the split tree."""
    i = tl.arange(0, MP)[:, None]
    col = i * P + tl.arange(0, P)[None, :]
    x = tl.load(x_ptr + blk * (M * P) + col, mask=i < M, other=0.0)
    if SIGNS == 1:
        x = x * tl.load(s_ptr + (blk % blocks_per_row) * (M * P) + col, mask=i < M, other=0.0)
    return tl.permute(butterfly(x, MP, P, LOG_P), (1, 0))


@triton.jit
def _adds_out(y_ptr, s_ptr, y, offs, soffs, rmask, off, scale, SIGNS: tl.constexpr):
    """One output run: scale, signs (SIGNS == 2), store."""
    y = y * scale
    if SIGNS == 2:
        y = y * tl.load(s_ptr + soffs + off, mask=rmask, other=0.0)
    tl.store(y_ptr + offs + off, y, mask=rmask)


def _adds_kernel(A: tuple, group: int, tree: int = 0):
    """The generated kernel for the ±1 matrix ``A`` (tuple of row tuples), compiled by Triton on first
    launch and cached. Its source is registered with ``linecache`` so that Triton (which reads a kernel's
    source through ``inspect``) can parse it like any function defined in a file."""
    key = (A, int(group), int(tree))
    if key not in _ADD_KERNELS:
        # a name from the matrix itself, so that every process generates the same source (Triton's
        # on-disk cache is keyed by it)
        name = "_paley_adds_" + hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        src = _adds_source(name, A, int(group), int(tree))
        filename = f"<lowbit-generated {name} m={len(A)} group={group} tree={tree}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        scope = {"tl": tl, "triton": triton, "_adds_in": _adds_in, "_adds_out": _adds_out, "_tree_in": _tree_in,
                 "__name__": __name__}
        exec(compile(src, filename, "exec"), scope)
        # sizes not specialised: one compile serves every batch and row layout (big m compiles take seconds)
        _ADD_KERNELS[key] = triton.jit(scope[name], do_not_specialize=["n_blocks", "blocks_per_row"])
    return _ADD_KERNELS[key]


_HOST_PATTERNS = WeakIdKeyDictionary()


def _host_pattern(hop: torch.Tensor, m: int) -> tuple:
    """``hop[:m, :m]`` as a tuple of ±1 int rows, read from the device once per operand tensor."""
    if hop not in _HOST_PATTERNS:
        A = hop[:m, :m].detach().cpu()
        if not bool(((A == 1) | (A == -1)).all()):
            raise ValueError("mix='adds' needs a ±1 operand (paley_operand's matrix)")
        _HOST_PATTERNS[hop] = tuple(tuple(int(v) for v in row) for row in A.tolist())
    return _HOST_PATTERNS[hop]


def adds_rows(m: int, p: int, num_warps: int, per_thread: int = 1) -> int:
    """Blocks per program for mix="adds": ``per_thread`` elements of each run tile per thread (a power of
    two), i.e. ROWS·P = 32·num_warps·per_thread, at least one block."""
    return max(1, (32 * int(num_warps) * int(per_thread)) // int(p))


def paley_operand(hm: torch.Tensor, transpose: bool, device) -> torch.Tensor:
    """The kernel's m-factor operand: ``H_m`` (``H_m^T`` for the transpose) as float32, zero-padded to
    ``paley_pad(m)`` square, on ``device``. Callers cache it (it is the same for every call)."""
    m = hm.shape[0]
    mp = paley_pad(m)
    op = torch.zeros(mp, mp, dtype=torch.float32)
    op[:m, :m] = (hm.t() if transpose else hm).to(torch.float32)
    return op.to(device).contiguous()


def paley_supports(x: torch.Tensor, m: int, p: int) -> bool:
    """Whether the fused kernel takes a block of ``m * p`` features of this input as is: CUDA float32,
    contiguous, ``p`` a power of two, the padded tile ``paley_pad(m) * p`` at most PALEY_MAX_TILE."""
    mp = paley_pad(m)
    return (x.is_cuda and x.dtype == torch.float32 and x.is_contiguous() and x.numel() > 0 and m >= 2
            and p >= 1 and p & (p - 1) == 0 and mp <= PALEY_MAX_M and mp * p <= PALEY_MAX_TILE
            and x.shape[-1] % (m * p) == 0)


def paley_fma_runs(m: int) -> tuple:
    """The "fma" route's output tiles ``(MA, MB)``: MA the largest power of two <= m, MB the rest
    padded to a power of two (0 when m is a power of two): 36 -> 32 + 4, 28 -> 16 + 16."""
    ma = 1 << (int(m).bit_length() - 1)
    return ma, (0 if ma == m else 1 << (int(m - ma) - 1).bit_length())


def _paley_tiles(m: int) -> tuple:
    """Row tiles of the "left" route: ``(MA, MB)`` with MA a power of two >= 16 and MB the rest padded
    (>= 16) when two tiles pad less than one (36 -> 32 + 16 rather than 64), else ``(paley_pad(m), 0)``."""
    mp = paley_pad(m)
    ma = 1 << (int(m).bit_length() - 1)
    if ma >= 16 and ma < m:
        mb = paley_pad(m - ma)
        if ma + mb < mp:
            return ma, mb
    return mp, 0


def paley_route(m: int, p: int) -> str:
    """The ``mix`` that ``paley_fwht`` uses by default for a block of ``m * p`` features: the fastest
    setting measured per shape on an H200 (``benchmarks/bench_hadamard.py --paley-variants``)."""
    if 16 <= p <= 64 and m <= ADDS_MAX_M:
        return "adds"      # 384, 576, 2304: 0.87-0.89, 0.82-0.83, 0.81 of a copy (group 3, 4 warps)
    if p >= 128 and m <= ADDS_MAX_M:
        return "tree"      # 1536, 5120, 14336: 0.85, 0.67, 0.71-0.73 (group 3, 4 warps)
    if p >= 16 and paley_pad(m) * p <= 512:
        return "batched"   # larger m (tensor-core dots)
    if p <= 16:
        return "right"     # p = 1, 2 (12, 24, 40) and large m with short runs: 8192-element tiles
    return "left"

def paley_fwht(x: torch.Tensor, hop: torch.Tensor, m: int, p: int, signs: Optional[torch.Tensor] = None,
               signs_after: bool = False, precision: str = "split", mix: Optional[str] = None,
               rows: Optional[int] = None, num_warps: Optional[int] = None,
               two_tiles: Optional[bool] = None, unroll: bool = False, prefetch: bool = False,
               group: Optional[int] = None) -> torch.Tensor:
    """``x @ blockdiag(Hop ⊗ H_p) / sqrt(m p)`` over the last dim in one read and one write, with
    ``hop`` from ``paley_operand`` (``H_m``, or ``H_m^T`` for the transposed rotation) and ``x``
    multiplied by ``signs`` first (the result, with ``signs_after``). ``H_p`` runs as butterfly
    stages in fp32. ``mix`` says how ``H_m`` mixes the m runs: "left" (2-D tensor-core dots
    ``Hop^T @ X`` per block, ``rows`` blocks per program, the rows in two tiles when ``two_tiles``,
    by default when that pads less; ``prefetch`` loads the next block before this one's arithmetic),
    "batched" (one batched dot over ``rows`` blocks), "right" (the tile transposed on chip, one 2-D
    dot), "fma" (no tensor cores: each run read once and multiply-added into the output tile, exact
    fp32), "adds" (generated fp32 signed sums over runs in groups of ``group``, default 3, each run
    loaded as its own (rows, p) tile; ``rows`` blocks per program, by default 2 elements of a run per
    thread), "tree" (the same sums, one block per program loaded as one tile, butterfly on it, runs split
    apart on chip); None picks per size what measured fastest (``paley_route``). The dots run at
    ``precision`` ("split": hi/lo tf32, near fp32 rounding, as the block kernel; the sums are plain fp32
    and ignore it). ``num_warps`` overrides the default. The generated kernels compile on first use per
    matrix, group and sign mode (seconds for m = 36; Triton caches them on disk)."""
    if not paley_supports(x, m, p):
        raise ValueError(f"the fused Triton Paley kernel needs a non-empty contiguous CUDA float32 tensor whose "
                         f"last dim is a multiple of the block m*p={m * p} (p a power of two, padded tile "
                         f"{paley_pad(m)}x{p} <= {PALEY_MAX_TILE} elements, m padded <= {PALEY_MAX_M}); got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}, contiguous={x.is_contiguous()}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    if mix is not None and mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; accepted: {', '.join(MIXES)}")
    mp = paley_pad(m)
    if tuple(hop.shape) != (mp, mp) or hop.dtype != torch.float32 or hop.device != x.device:
        raise ValueError(f"hop must be paley_operand's float32 {mp}x{mp} matrix on {x.device}, got "
                         f"{tuple(hop.shape)} {hop.dtype} on {hop.device}")
    n, b = x.shape[-1], m * p
    if signs is not None:
        if signs.numel() != n:
            raise ValueError(f"signs must have one entry per feature ({n}), got {signs.numel()}")
        signs = signs.to(device=x.device, dtype=torch.float32).contiguous()
    tile = None
    if mix is None:
        mix = paley_route(m, p)
        tile = 8192 if mix == "right" else None
    if p < 16 and mix in ("left", "batched"):   # their dots need p >= 16 columns
        mix = "right"
    n_blocks = x.numel() // b
    y = torch.empty_like(x)
    sign_mode = 0 if signs is None else (2 if signs_after else 1)
    s_arg = signs if signs is not None else x
    if mix == "tree":
        warps = 4 if num_warps is None else int(num_warps)   # 4 measured best for 1536, 5120, 14336
        kernel = _adds_kernel(_host_pattern(hop, m), PALEY_ADD_GROUP if group is None else int(group), mp)
        kernel[(n_blocks,)](x, s_arg, y, n_blocks, n // b, 1.0 / b ** 0.5, ROWS=1, P=p, LOG_P=p.bit_length() - 1,
                            SIGNS=sign_mode, num_warps=warps)
        return y
    if mix == "adds":
        warps = min(16, max(4, p // 64)) if num_warps is None else int(num_warps)
        ROWS = adds_rows(m, p, warps, ADDS_PER_THREAD) if rows is None else int(rows)
        if ROWS < 1 or ROWS & (ROWS - 1):
            raise ValueError(f"rows must be a power of two, got {ROWS}")
        kernel = _adds_kernel(_host_pattern(hop, m), PALEY_ADD_GROUP if group is None else int(group))
        kernel[(triton.cdiv(n_blocks, ROWS),)](x, s_arg, y, n_blocks, n // b, 1.0 / b ** 0.5, ROWS=ROWS, P=p,
                                               LOG_P=p.bit_length() - 1, SIGNS=sign_mode, num_warps=warps)
        return y
    if mix == "fma":
        ma, mb = paley_fma_runs(m)
        ROWS = 1 << (max(1, PALEY_TILE // ((ma + mb) * p)).bit_length() - 1) if rows is None else int(rows)
        if ROWS < 1 or ROWS & (ROWS - 1):
            raise ValueError(f"rows must be a power of two, got {ROWS}")
        tile = ROWS * (ma + mb) * p
        warps = (4 if tile <= 4096 else 8 if tile <= 8192 else 16) if num_warps is None else int(num_warps)
        _paley_fma_kernel[(triton.cdiv(n_blocks, ROWS),)](
            x, s_arg, hop, y, n_blocks, n // b, 1.0 / b ** 0.5, M=m, LD=mp, MA=ma, MB=mb, P=p,
            LOG_P=p.bit_length() - 1, ROWS=ROWS, SIGNS=sign_mode, UNROLL=bool(unroll), num_warps=warps)
        return y
    if mix == "left":
        ma, mb = _paley_tiles(m)
        if two_tiles is False or (two_tiles is None and mb == 0):
            ma, mb = mp, 0
        elif two_tiles and mb == 0:
            raise ValueError(f"two_tiles: m={m} has no split into a power of two >= 16 and a smaller rest")
        loop = 1 if rows is None else int(rows)
        warps = 4 if num_warps is None else int(num_warps)   # 4 measured best for every size
        _paley_left_kernel[(triton.cdiv(n_blocks, loop),)](
            x, s_arg, hop, y, n_blocks, n // b, 1.0 / b ** 0.5, M=m, LD=mp, MA=ma, MB=mb, P=p,
            LOG_P=p.bit_length() - 1, LOOP=loop, SIGNS=sign_mode, PREC=PRECISIONS[precision],
            PREFETCH=bool(prefetch), num_warps=warps)
        return y
    ROWS = max(1, (tile or PALEY_TILE) // (mp * p)) if rows is None else int(rows)
    if ROWS < 1 or ROWS & (ROWS - 1):
        raise ValueError(f"rows must be a power of two for mix={mix!r}, got {ROWS}")
    while ROWS * p < 16:   # the 2-D dot needs at least 16 rows
        ROWS *= 2
    tile = ROWS * mp * p
    warps = (4 if tile <= 2048 else 8 if tile <= 8192 else 16) if num_warps is None else int(num_warps)
    _paley_kernel[(triton.cdiv(n_blocks, ROWS),)](
        x, s_arg, hop, y, n_blocks, n // b, 1.0 / b ** 0.5,
        M=m, MP=mp, P=p, LOG_P=p.bit_length() - 1, ROWS=ROWS, SIGNS=sign_mode, PREC=PRECISIONS[precision],
        LEFT=mix == "batched", num_warps=warps)
    return y
