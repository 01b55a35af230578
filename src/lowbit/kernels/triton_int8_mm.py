"""INT8 GEMM with the dequantizing epilogue fused: ``(A B^T) * sa * sb`` from int8 codes, int32
accumulation, written once in the output dtype.

``torch._int_mm`` writes its int32 accumulators (4 bytes per output) and a second pass reads them
back to scale and cast: at training shapes (8192 x 14336 outputs) that round trip costs about as
much as the matmul's own memory traffic. Here the scales are applied to the accumulator tile in
registers, in the order ``(float(acc) * sa) * sb`` in float32 -- the order ``lowp.fused.int8_epilogue``
uses -- so both paths give the same bits: the int32 sums are exact in either, ``float(acc)`` rounds
to nearest even in both, and the two float32 products and the final cast are the same IEEE steps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# (BM, BN, BK, stages, warps): tiles for Hopper-sized GEMMs; ``config`` of int8_scaled_mm picks another.
# The default was the fastest in 5 of the 6 matmuls of a Llama-3-8B MLP training step on an H200
# (benchmarks/halo_breakdown.py: 1.31-1.40x bf16 torch.mm; torch._int_mm + the rescaling pass 0.76-1.03x).
CONFIGS = ((128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
           (64, 256, 128, 4, 8), (128, 64, 128, 4, 4))
DEFAULT_CONFIG = (128, 128, 64, 4, 4)
SMALL_CONFIG = (32, 32, 32, 1, 4)   # operands below a tile (and Triton's interpreter)


@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                    SA_ROWS: tl.constexpr, SB_COLS: tl.constexpr, BF16_OUT: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    # grouped launch order: GROUP row-blocks share their B column-blocks in L2
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    per_group = GROUP * grid_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(grid_m - first_m, GROUP)
    pm = first_m + (pid % per_group) % group_m
    pn = (pid % per_group) // group_m
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + rn.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in range(0, K, BK):
        kk = k + rk
        a = tl.load(a_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0)
        b = tl.load(b_rows + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    if SA_ROWS:
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=1.0)[:, None]
    else:
        sa = tl.load(sa_ptr)
    if SB_COLS:
        sb = tl.load(sb_ptr + rn, mask=rn < N, other=1.0)[None, :]
    else:
        sb = tl.load(sb_ptr)
    y = (acc.to(tl.float32) * sa) * sb
    if BF16_OUT:   # round to bfloat16's grid, nearest even, in float32 bits: the cast is then exact everywhere
        bits = y.to(tl.int32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


def supports(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``int8_scaled_mm`` takes these operands: 2-D int8, the same inner size, inner
    dimension contiguous (row-major codes, as the operand kernels write them)."""
    return (a.dim() == 2 and b.dim() == 2 and a.dtype == torch.int8 and b.dtype == torch.int8
            and a.shape[1] == b.shape[1] and a.stride(1) == 1 and b.stride(1) == 1 and a.device == b.device)


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, config=None) -> torch.Tensor:
    """``(a @ b.T) * sa * sb`` for int8 ``a`` (M, K) and ``b`` (N, K), both row-major: int32
    accumulation, float32 scales ``sa`` (one, or one per row of a: (M,) / (M, 1)) and ``sb`` (one,
    or one per row of b), output (M, N) in ``out_dtype``. ``config``: (BM, BN, BK, stages, warps),
    by default ``DEFAULT_CONFIG`` (``SMALL_CONFIG`` where a dimension is below 128)."""
    if not supports(a, b):
        raise ValueError(f"int8_scaled_mm needs 2-D int8 operands with the same inner size, inner dimension "
                         f"contiguous; got {tuple(a.shape)} {a.dtype} stride {a.stride()} and {tuple(b.shape)} "
                         f"{b.dtype} stride {b.stride()}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    (m, k), n = a.shape, b.shape[0]
    sa = sa.float().reshape(-1).contiguous()
    sb = sb.float().reshape(-1).contiguous()
    if sa.numel() not in (1, m) or sb.numel() not in (1, n):
        raise ValueError(f"scales: sa needs 1 or {m} values, sb 1 or {n}; got {sa.numel()} and {sb.numel()}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if config is None:
        config = SMALL_CONFIG if min(m, n, k) < 128 else DEFAULT_CONFIG
    bm, bn, bk, stages, warps = config
    _int8_mm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        a, b, sa, sb, c, m, n, k, a.stride(0), b.stride(0), c.stride(0), SA_ROWS=sa.numel() > 1,
        SB_COLS=sb.numel() > 1, BF16_OUT=out_dtype == torch.bfloat16, BM=bm, BN=bn, BK=bk, GROUP=8, num_stages=stages, num_warps=warps)
    return c
