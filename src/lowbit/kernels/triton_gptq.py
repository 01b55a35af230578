"""GPTQ's inner column loop as one Triton kernel per block of columns.

Inside a block, row r of the weights evolves on its own: quantizing column i changes row r's later
columns by ``-err[r] * Hinv[i, i:]`` and nothing else. So each program takes a tile of rows, keeps
the block's columns of those rows in registers and runs the whole loop over the block's columns:
extract column i, quantize it with its per-row divisor d and zero z (``q = (round(w / d + z) - z)
* d``, the element rounding being the bit arithmetic of ``triton_quant.round_bits``), write q and
the scaled error, and update the tile. The caller does the trailing update of the columns after the
block (one matmul) and, for groups fitted as the loop reaches them, launches the kernel once per
group segment, fitting the next group's (d, z) in between.

The arithmetic follows the torch loop of ``ptq.gptq`` step by step with correctly rounded
division, so the two give the same grid points except where a fused multiply-add in the update
moves a value across a rounding boundary (rare ties).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .cpu_fast import element_spec
from .triton_quant import spec_flags, spec_params, round_bits

BLOCK_COLS = 128    # widest block one launch holds (the tile's column extent)


@triton.jit
def _gptq_block_kernel(W, Q, E, Hinv, D, Z, K, P, rows, ncols, c0, c1, ldw, lde, ldh,
                       MODE: tl.constexpr, HAS_INF: tl.constexpr, NEG_ZERO: tl.constexpr,
                       MAN0: tl.constexpr, VAR_SHIFT: tl.constexpr, ASYM: tl.constexpr,
                       ZERO_SHIFT: tl.constexpr, HAS_Z: tl.constexpr, HAS_K: tl.constexpr,
                       BR: tl.constexpr, BC: tl.constexpr):
    """W, Q, D, Z, K: (rows, >= ncols) views starting at the block's first column, row stride
    ldw; E: (rows, >= ncols), row stride lde; Hinv: the block's (ncols, ncols) corner, row stride
    ldh. Runs columns c0..c1-1 and writes the updated tile back to W."""
    pid = tl.program_id(0)
    r = pid * BR + tl.arange(0, BR)
    c = tl.arange(0, BC)
    rm = r < rows
    cm = c < ncols
    offs = r[:, None] * ldw + c[None, :]
    tmask = rm[:, None] & cm[None, :]
    tile = tl.load(W + offs, mask=tmask, other=0.0)
    for i in range(c0, c1):
        w = tl.sum(tl.where(c[None, :] == i, tile, 0.0), axis=1)
        d = tl.load(D + r * ldw + i, mask=rm, other=1.0)
        y = tl.where(d > 0, tl.math.div_rn(w, d), 0.0)
        if HAS_Z:
            z = tl.load(Z + r * ldw + i, mask=rm, other=0.0)
            y = y + z
        q = round_bits(y, P, 0, 0, MODE, 0, HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM, ZERO_SHIFT,
                       False)
        if HAS_Z:
            q = (q - z) * d
        else:
            q = q * d
        if HAS_K:
            k = tl.load(K + r * ldw + i, mask=rm, other=0)
            q = tl.where(k != 0, w, q)
        hd = tl.load(Hinv + i * ldh + i)
        err = tl.math.div_rn(w - q, tl.zeros_like(w) + hd)
        h = tl.load(Hinv + i * ldh + c, mask=(c >= i) & cm, other=0.0)
        tile = tile - err[:, None] * h[None, :]
        tl.store(Q + r * ldw + i, q, mask=rm)
        tl.store(E + r * lde + i, err, mask=rm)
    tl.store(W + offs, tile, mask=tmask)


def claims(grid, mode: str) -> bool:
    """Whether the kernel rounds to this element grid in this mode (deterministic bit path)."""
    spec = element_spec(grid, mode, "saturate")
    return spec is not None and not spec.stochastic


def _row_tile(rows: int) -> int:
    """Rows per program. Each program runs the whole column loop, so the launch takes as long as
    one program's 128 steps: few rows per program keep each step short and fill the GPU (measured
    on an H200, 128 columns: about 100 us per launch with 2-4 rows and 4 warps for 576 to 3072
    rows, 500 us with 16-32 rows)."""
    return 4


def block_loop(W1: torch.Tensor, Q1: torch.Tensor, E1: torch.Tensor, Hinv1: torch.Tensor,
               D1: torch.Tensor, Z1: Optional[torch.Tensor], K1: Optional[torch.Tensor], grid,
               mode: str, c0: int, c1: int, rows_per_program: Optional[int] = None,
               num_warps: int = 4) -> None:
    """Run columns c0..c1-1 of one block in place. W1, Q1, D1, Z1 (float32) and K1 (int8) are
    (rows, ncols) views sharing one row stride (columns contiguous); E1 (rows, ncols) float32;
    Hinv1 (ncols, ncols) float32 with contiguous columns."""
    rows, ncols = W1.shape
    if ncols > BLOCK_COLS:
        raise ValueError(f"a fused GPTQ block holds at most {BLOCK_COLS} columns, got {ncols}")
    spec = element_spec(grid, mode, "saturate")
    ld = W1.stride(0)
    for t in (Q1, D1) + tuple(x for x in (Z1, K1) if x is not None):
        assert t.stride(0) == ld and t.stride(1) == 1
    assert W1.stride(1) == 1 and E1.stride(1) == 1 and Hinv1.stride(1) == 1
    fl = spec_flags(spec)
    fl.pop("STOCH")
    BR = rows_per_program or _row_tile(rows)
    BC = max(16, triton.next_power_of_2(ncols))
    _gptq_block_kernel[(triton.cdiv(rows, BR),)](
        W1, Q1, E1, Hinv1, D1, D1 if Z1 is None else Z1, D1 if K1 is None else K1,
        spec_params(spec, W1.device), rows, ncols, c0, c1, ld, E1.stride(0), Hinv1.stride(0),
        HAS_Z=Z1 is not None, HAS_K=K1 is not None, BR=BR, BC=BC, num_warps=num_warps, **fl)
