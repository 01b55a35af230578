"""Fused preparation of a low-precision matmul operand on CUDA: block Hadamard rotation, absmax
scale and scale-and-cast to FP8 (E4M3/E5M2) or INT8 codes, in one or two passes over the input.

The operand is a 2-D view ``a`` (rows, inner) with any strides (the backward's ``W^T``, ``E_Y^T``
and ``X^T`` are read through their transposed strides, never copied); the codes are written
row-major (rows, inner), the layout ``torch._scaled_mm`` / ``torch._int_mm`` take; optionally the
same pass also writes the unrotated operand's codes transposed (inner, rows), under their own
per-tensor scale, for the second matmul that operand feeds (X: forward and weight gradient).

Arithmetic (``lowp.operand.rotate`` / ``quantize_operand`` compute the same bits in torch):
  * rotation: the unnormalised Sylvester ``H_b`` on each block of ``b`` inner elements as log2(b)
    float32 add/subtract stages, half-width 1, 2, ..., b/2 (lower ``a + c``, upper ``a - c``);
  * scale ``s = amax / fmax`` correctly rounded (1 for an all-zero slice), per tensor or per row;
  * codes: ``v / s`` correctly rounded (``div_rn``, as torch divides), clamped to +-fmax, rounded
    to the nearest grid point, ties to even, by float32 bit arithmetic; the final cast to the code
    dtype is then exact (the interpreter's float8 casts truncate). NaN inputs are not handled.

Per tensor: pass 1 writes each tile's rotated absmax, torch reduces the partials, pass 2 recomputes
the rotation from the input and writes the codes (read 2 x 2 bytes + write 1 byte per bf16
element: fewer bytes than storing the rotated values; the transposed plain codes add one byte).
Per row: one program owns ``BR`` whole rows and loops over their inner dimension twice (absmax,
then codes; the second read mostly hits L2).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_hadamard import butterfly

CODE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
# (mantissa bits, smallest normal exponent) of each float8 code dtype
_FLOAT8 = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
TILE = 4096          # elements per tile
WARPS = 4            # warps per program (benchmarks/halo_breakdown.py: on an H200, 4096-element tiles
                     # at 4 warps beat 8 warps by 5-12% and 8192/16384-element tiles at either)
MAX_BLOCK = 1024     # largest Hadamard block held by one tile row


@triton.jit
def _load_tile(a_ptr, r, i, R, I, stride_r, stride_i):
    """The float32 tile ``a[r, i]`` (zero outside the operand) and its mask."""
    mask = (r < R)[:, None] & (i < I)[None, :]
    offs = r.to(tl.int64)[:, None] * stride_r + i.to(tl.int64)[None, :] * stride_i
    return tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _rotated_tile(a_ptr, r, i, R, I, stride_r, stride_i, BR: tl.constexpr, BI: tl.constexpr,
                  LOG_B: tl.constexpr):
    x, mask = _load_tile(a_ptr, r, i, R, I, stride_r, stride_i)
    return butterfly(x, BR, BI, LOG_B), mask


@triton.jit
def _scale(amax, fmax):
    return tl.where(amax > 0, tl.math.div_rn(amax, fmax + tl.zeros_like(amax)), 1.0)


@triton.jit
def _codes(v, s, fmax, IS_INT: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr):
    """``v / s`` clamped to +-fmax and rounded to the code grid (nearest, ties to even), float32."""
    y = tl.math.div_rn(v, s + tl.zeros_like(v))   # div_rn does not broadcast (Triton 3.6); s > 0, so s + 0 is s
    y = tl.minimum(tl.maximum(y, -fmax), fmax)
    # (t + 1.5 * 2^23) - 1.5 * 2^23 rounds |t| < 2^22 to an integer, ties to even (IEEE adds)
    if IS_INT:
        return (y + 12582912.0) - 12582912.0
    bits = y.to(tl.int32, bitcast=True)
    mag = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN) - MAN    # exponent of the grid spacing here
    up = ((127 - e) << 23).to(tl.float32, bitcast=True)         # 2^-e: exact scalings both ways
    down = ((127 + e) << 23).to(tl.float32, bitcast=True)
    r = ((mag * up + 12582912.0) - 12582912.0) * down
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)   # keep the sign (-0)


@triton.jit
def _tile_amax_kernel(a_ptr, part_ptr, R, I, stride_r, stride_i,
                      BR: tl.constexpr, BI: tl.constexpr, LOG_B: tl.constexpr, PLAIN: tl.constexpr):
    # PLAIN: also the absmax of the unrotated tile, after the rotated ones
    pr, pi = tl.program_id(0), tl.program_id(1)
    pid = pr * tl.num_programs(1) + pi
    r = pr * BR + tl.arange(0, BR)
    i = pi * BI + tl.arange(0, BI)
    x, _ = _load_tile(a_ptr, r, i, R, I, stride_r, stride_i)
    if PLAIN:
        tl.store(part_ptr + tl.num_programs(0) * tl.num_programs(1) + pid,
                 tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    x = butterfly(x, BR, BI, LOG_B)
    tl.store(part_ptr + pid, tl.max(tl.max(tl.abs(x), axis=1), axis=0))


@triton.jit
def _tensor_codes_kernel(a_ptr, amax_ptr, c_ptr, ct_ptr, s_ptr, st_ptr, R, I, stride_r, stride_i, fmax,
                         BR: tl.constexpr, BI: tl.constexpr, LOG_B: tl.constexpr, IS_INT: tl.constexpr,
                         MAN: tl.constexpr, EMIN: tl.constexpr, PLAIN: tl.constexpr):
    # PLAIN: also the codes of the unrotated tile under their own scale, written transposed
    pr, pi = tl.program_id(0), tl.program_id(1)
    r = pr * BR + tl.arange(0, BR)
    i = pi * BI + tl.arange(0, BI)
    x, mask = _load_tile(a_ptr, r, i, R, I, stride_r, stride_i)
    r64, i64 = r.to(tl.int64), i.to(tl.int64)
    first = (pr == 0) & (pi == 0)
    if PLAIN:
        s_t = _scale(tl.load(amax_ptr + 1), fmax)
        c_t = _codes(x, s_t, fmax, IS_INT, MAN, EMIN).to(ct_ptr.dtype.element_ty)
        tl.store(ct_ptr + i64[None, :] * R + r64[:, None], c_t, mask=mask)
        if first:
            tl.store(st_ptr, s_t)
    s = _scale(tl.load(amax_ptr), fmax)
    c = _codes(butterfly(x, BR, BI, LOG_B), s, fmax, IS_INT, MAN, EMIN).to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + r64[:, None] * I + i64[None, :], c, mask=mask)
    if first:
        tl.store(s_ptr, s)


@triton.jit
def _row_codes_kernel(a_ptr, c_ptr, s_ptr, R, I, stride_r, stride_i, fmax,
                      BR: tl.constexpr, BI: tl.constexpr, LOG_B: tl.constexpr, IS_INT: tl.constexpr,
                      MAN: tl.constexpr, EMIN: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BI)
    amax = tl.zeros((BR,), dtype=tl.float32)
    for j in range(0, I, BI):
        x, _ = _rotated_tile(a_ptr, r, j + cols, R, I, stride_r, stride_i, BR, BI, LOG_B)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    s = _scale(amax, fmax)
    r64 = r.to(tl.int64)
    for j in range(0, I, BI):
        i = j + cols
        x, mask = _rotated_tile(a_ptr, r, i, R, I, stride_r, stride_i, BR, BI, LOG_B)
        c = _codes(x, s[:, None], fmax, IS_INT, MAN, EMIN).to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + r64[:, None] * I + i.to(tl.int64)[None, :], c, mask=mask)
    tl.store(s_ptr + r, s, mask=r < R)


ROW_PROGRAMS = 512   # per-row scales: fewer rows per program until about this many programs run


@triton.jit
def _rotate_kernel(a_ptr, y_ptr, R, I, stride_r, stride_i, BR: tl.constexpr, BI: tl.constexpr, LOG_B: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    x, mask = _rotated_tile(a_ptr, r, i, R, I, stride_r, stride_i, BR, BI, LOG_B)
    tl.store(y_ptr + r.to(tl.int64)[:, None] * I + i.to(tl.int64)[None, :], x, mask=mask)


def _tile(rows: int, inner: int, block: int, contiguous_rows: bool, tile: int, per_row: bool,
          transposed_out: bool = False) -> Tuple[int, int]:
    """(BR, BI): a tile of about ``tile`` elements, ``BI`` a multiple of the Hadamard block; inputs
    read through transposed strides (rows contiguous) and codes written transposed get at least 32
    rows (16 per row-scaled program) for coalesced accesses. A row-scaled program owns whole rows:
    fewer of them per program when that leaves the GPU with too few programs."""
    bi = max(block, min(128, triton.next_power_of_2(inner)))
    br = max(1, tile // bi)
    low = (16 if per_row else 32) if contiguous_rows or transposed_out else 1
    low = min(low, max(1, 2 * TILE // bi))   # blocks of 512/1024: no more than 8192 elements in registers
    br = max(br, low)
    if per_row:
        while br > low and triton.cdiv(rows, br) < ROW_PROGRAMS:
            br //= 2
    return min(br, max(1, triton.next_power_of_2(rows))), bi


def supports(a: torch.Tensor, block: int) -> bool:
    """Whether ``prepare_codes`` takes this operand: a 2-D CUDA (or interpreted) float tensor with
    an inner dimension that the power-of-two Hadamard ``block`` (1: none, up to MAX_BLOCK) divides."""
    return (a.dim() == 2 and a.dtype in (torch.float32, torch.bfloat16, torch.float16) and a.numel() > 0
            and 1 <= block <= MAX_BLOCK and block & (block - 1) == 0 and a.shape[1] % block == 0)


def prepare_codes(a: torch.Tensor, fmax: float, dtype: torch.dtype, block: int = 1, per_row: bool = False,
                  emit_plain_transposed: bool = False, tile: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(codes, scale, codes_t, scale_t)`` of the operand ``a`` (rows, inner; any strides) rotated
    by ``blockdiag(H_block)`` along the inner dimension (unnormalised; ``block`` 1: no rotation) and
    scaled by its absmax over ``fmax``: ``codes`` (rows, inner) row-major in ``dtype`` (float8 or
    int8), ``scale`` float32, ``()`` per tensor or ``(rows, 1)`` per row. With
    ``emit_plain_transposed`` (per-tensor scales only) the same pass also writes the unrotated
    operand's codes transposed, ``codes_t`` (inner, rows) row-major, under their own per-tensor
    ``scale_t`` (the operand of a second matmul reducing over the rows: X and E_Y at HALO-0/1; at
    ``block`` 1 they are ``codes`` transposed); else both are None."""
    if dtype not in CODE_DTYPES:
        raise ValueError(f"code dtype must be one of {CODE_DTYPES}, got {dtype}")
    if not supports(a, block):
        raise ValueError(f"the fused operand kernel needs a non-empty 2-D float32/bfloat16/float16 tensor whose "
                         f"inner dimension a power-of-two block of 1..{MAX_BLOCK} divides; got {tuple(a.shape)} "
                         f"{a.dtype}, block {block}")
    if emit_plain_transposed and per_row:
        raise ValueError("emit_plain_transposed needs per-tensor scales (per-row scales differ along the other "
                         "dimension)")
    rows, inner = a.shape
    is_int = dtype == torch.int8
    man, emin = _FLOAT8.get(dtype, (0, 0))
    log_b = block.bit_length() - 1
    br, bi = _tile(rows, inner, block, a.stride(0) == 1 and inner > 1, tile or TILE, per_row, emit_plain_transposed)
    codes = torch.empty(rows, inner, dtype=dtype, device=a.device)
    warps = WARPS
    consts = dict(BR=br, BI=bi, LOG_B=log_b, IS_INT=is_int, MAN=man, EMIN=emin)
    if per_row:
        scale = torch.empty(rows, 1, dtype=torch.float32, device=a.device)
        _row_codes_kernel[(triton.cdiv(rows, br),)](a, codes, scale, rows, inner, a.stride(0), a.stride(1),
                                                     float(fmax), num_warps=warps, **consts)
        return codes, scale, None, None
    plain = bool(emit_plain_transposed)
    grid = (triton.cdiv(rows, br), triton.cdiv(inner, bi))
    partial = torch.empty(2 if plain else 1, grid[0] * grid[1], dtype=torch.float32, device=a.device)
    _tile_amax_kernel[grid](a, partial, rows, inner, a.stride(0), a.stride(1), BR=br, BI=bi, LOG_B=log_b,
                            PLAIN=plain, num_warps=warps)
    amax = partial.amax(dim=1)
    scale = torch.empty((), dtype=torch.float32, device=a.device)
    scale_t = torch.empty((), dtype=torch.float32, device=a.device) if plain else scale
    codes_t = torch.empty(inner, rows, dtype=dtype, device=a.device) if plain else codes
    _tensor_codes_kernel[grid](a, amax, codes, codes_t, scale, scale_t, rows, inner, a.stride(0), a.stride(1),
                               float(fmax), PLAIN=plain, num_warps=warps, **consts)
    return (codes, scale, codes_t, scale_t) if plain else (codes, scale, None, None)


def rotate(a: torch.Tensor, block: int, tile: int = TILE) -> torch.Tensor:
    """``a @ blockdiag(H_block)`` (unnormalised) along the inner dimension of ``a`` (rows, inner; any
    strides) in float32, row-major: the rotation ``prepare_codes`` applies, on its own (one read, one
    float32 write), for the paths that quantize in torch afterwards (emulated formats)."""
    if not supports(a, block):
        raise ValueError(f"the fused rotation needs a non-empty 2-D float32/bfloat16/float16 tensor whose inner "
                         f"dimension a power-of-two block of 1..{MAX_BLOCK} divides; got {tuple(a.shape)} {a.dtype}, "
                         f"block {block}")
    rows, inner = a.shape
    br, bi = _tile(rows, inner, block, a.stride(0) == 1 and inner > 1, tile, False)
    y = torch.empty(rows, inner, dtype=torch.float32, device=a.device)
    _rotate_kernel[(triton.cdiv(rows, br), triton.cdiv(inner, bi))](
        a, y, rows, inner, a.stride(0), a.stride(1), BR=br, BI=bi, LOG_B=block.bit_length() - 1,
        num_warps=8 if br * bi >= 8192 else 4)
    return y
