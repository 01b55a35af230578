"""Fused fake quantization with learned per-group scales on CUDA: one pass forward, one pass
backward with the LSQ/LSQ+ scale (and zero-point) gradients reduced inside the program.

The arithmetic is kernels/fake_quant_ref.py's (read its docstring), step for step in float32:
``w / s`` is a correctly rounded division (``div_rn``: Triton's plain ``/`` is approximate on NVIDIA
GPUs), round-half-even is the ``2**23`` addition trick (exact in IEEE float32, no libdevice call,
so Triton's CPU interpreter runs it too), the minifloat step is built from bits and applied as a
product with its exact reciprocal. The forward and ``grad_w`` give the reference's bits (nan as
nan); ``grad_s`` / ``grad_z`` are sums taken in another order: they agree with the reference to
float32 summation error, within ``1e-5 * sum |terms|`` of a group (times |grad_scale|).

Tiling. A program owns BR rows x NG whole groups and walks the groups' columns in steps of GP
columns (GP = the group size rounded up to a power of two, at most CHUNK): small groups are many
per step (g = 64: 16 groups, 1024 contiguous columns of a row), long ones (per channel) take
several steps. Each program therefore sees all the columns of its groups: the scale gradient is
a register accumulation and one tree reduction, with no atomics and no second pass, and the
scales are loaded once per (row, group) rather than gathered per element. A ragged last group is
the column mask ``col < C``.

Measured (H100, W of 16384 x 16384 = 2^28 float32, benchmarks/bench_fake_quant.py; int3/int4 with
and without zero points, e2m1fn, e4m3fn; groups of 64 and per channel): forward 0.86-0.97 of a
copy's elements/s; backward 0.63-0.65 of its elements/s, which is 0.94-0.99 of its bytes/s (it
moves three tensors to the copy's two, so 2/3 is the elements/s bound). The tile constants below
were within noise (+-0.03) of the other sizes tried (2048-8192 elements, 512-4096 columns).

This module imports triton at the top: import it only where CUDA (or ``TRITON_INTERPRET=1``) is
available, as ``kernels.triton_backend()`` does for triton_quant.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .fake_quant_ref import check_args, grid_range

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (debugging only)

TILE = 4096     # elements per program and step: 16 a thread at 8 warps
CHUNK = 1024    # widest column extent of one step (4 KiB of a row)
NUM_WARPS = 8
C_SIGN = tl.constexpr(-(2**31))   # 0x80000000 as int32


@triton.jit
def _rne(a):
    """Round-half-even of float32 a >= 0 (or nan): below 2**23, adding 2**23 leaves no fraction
    bits, so the sum is rounded to the nearest integer with ties to even and the subtraction is
    exact; from 2**23 up every float32 is an integer already (inf and nan pass through)."""
    return tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)


@triton.jit
def _with_sign(mag, yb):
    """copysign(mag, y) for mag with a clear sign bit, y given by its bits yb."""
    return (mag.to(tl.int32, bitcast=True) | (yb & C_SIGN)).to(tl.float32, bitcast=True)


@triton.jit
def _round_grid(y, qmin, qmax, emin, emax, man, fmax, KIND: tl.constexpr, NEG_ZERO: tl.constexpr):
    """The grid of fake_quant_ref.round_to_grid: KIND 0 int (qmin, qmax), 1 exp (emin, emax, man,
    fmax). The sign of y is or-ed back into the rounded magnitude (whose sign bit is clear): Triton's
    unary minus is ``0 - x``, which would turn -0 into +0."""
    yb = y.to(tl.int32, bitcast=True)
    ab = yb & 0x7FFFFFFF
    a = ab.to(tl.float32, bitcast=True)
    if KIND == 0:
        r = _rne(a)
        t = _with_sign(r, yb)                        # torch.round keeps the sign: -0.3 -> -0
        t = tl.where(t < qmin, qmin, t)              # compares keep -0 and nan, like the reference
        q = tl.where(t > qmax, qmax, t)
    else:
        e = tl.minimum(tl.maximum((ab >> 23) - 127, emin), emax)
        step = ((e - man + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((man - e + 127) << 23).to(tl.float32, bitcast=True)   # 1 / step, exact
        m = _rne(a * inv) * step
        m = tl.where(m > fmax, fmax, m)
        q = _with_sign(m, yb)
        if not NEG_ZERO:
            q = tl.where(q == 0.0, 0.0, q)           # -0 -> +0
    return q


@triton.jit
def _round_bf16(x):
    """x rounded to the nearest bfloat16 with ties to even, as float32 (so any later cast to
    bfloat16 is exact): add 0x7FFF plus the kept lowest bit, then clear the 16 dropped bits. A
    carry into the exponent is the correct rounding up (to inf above bfloat16's max); nan stays."""
    b = x.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def _stored_scale(s, tiny, SCALE_ROUND: tl.constexpr):
    """The scale the forward uses: as given (SCALE_ROUND 0), or the parameter clamped to ``tiny``
    and rounded to float16 (1) or bfloat16 (2) with ties to even, as a trained scale is stored.
    ``s < tiny`` is false for nan, which passes as torch.clamp passes it."""
    if SCALE_ROUND == 1:
        s = tl.where(s < tiny, tiny, s).to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    elif SCALE_ROUND == 2:
        s = _round_bf16(tl.where(s < tiny, tiny, s))
    return s


@triton.jit
def _program_tile(R, C, G, group, n_gblocks, BR: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr):
    """This program's rows, groups and masks: (row offsets (BR,1,1) int64, first column of each
    group (1,NG,1), lane index (1,1,GP), (row, group) offsets into S (BR,NG), their mask)."""
    pid = tl.program_id(0)
    pid_r = pid // n_gblocks
    pid_j = pid - pid_r * n_gblocks
    r = pid_r * BR + tl.arange(0, BR)
    j = pid_j * NG + tl.arange(0, NG)
    pm = (r < R)[:, None] & (j < G)[None, :]
    sp = r.to(tl.int64)[:, None] * G + j[None, :]
    row0 = r.to(tl.int64)[:, None, None] * C
    col0 = j[None, :, None] * group
    lane = tl.arange(0, GP)[None, None, :]
    return row0, col0, lane, sp, pm


@triton.jit
def _fwd_kernel(W, S, Z, OUT, R, C, G, group, n_steps, n_gblocks, qmin, qmax, emin, emax, man, fmax, tiny,
                KIND: tl.constexpr, HAS_Z: tl.constexpr, NEG_ZERO: tl.constexpr, SCALE_ROUND: tl.constexpr,
                OUT_BF16: tl.constexpr, BR: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr):
    row0, col0, lane, sp, pm = _program_tile(R, C, G, group, n_gblocks, BR, NG, GP)
    s = _stored_scale(tl.load(S + sp, mask=pm, other=1.0), tiny, SCALE_ROUND)
    s = tl.broadcast_to(s[:, :, None], (BR, NG, GP))
    if HAS_Z:
        z = tl.broadcast_to(tl.load(Z + sp, mask=pm, other=0.0)[:, :, None], (BR, NG, GP))
    for step in range(n_steps):
        inner = step * GP + lane
        col = col0 + inner
        m = pm[:, :, None] & (inner < group) & (col < C)
        offs = row0 + col
        w = tl.load(W + offs, mask=m, other=0.0)
        y = tl.math.div_rn(w, s)
        if HAS_Z:
            y = y + z
        q = _round_grid(y, qmin, qmax, emin, emax, man, fmax, KIND, NEG_ZERO)
        if HAS_Z:
            out = (q - z) * s
        else:
            out = q * s
        if OUT_BF16:   # what autocast's cast of a float32 weight would give, without its extra pass
            out = _round_bf16(out).to(tl.bfloat16)
        tl.store(OUT + offs, out, mask=m)


@triton.jit
def _bwd_kernel(GO, W, S, Z, GW, GS, GZ, R, C, G, group, n_steps, n_gblocks, qmin, qmax, emin, emax, man,
                fmax, lo, hi, grad_scale, tiny, KIND: tl.constexpr, HAS_Z: tl.constexpr, NEG_ZERO: tl.constexpr,
                SCALE_ROUND: tl.constexpr, BR: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr):
    row0, col0, lane, sp, pm = _program_tile(R, C, G, group, n_gblocks, BR, NG, GP)
    raw = tl.load(S + sp, mask=pm, other=1.0)
    s = tl.broadcast_to(_stored_scale(raw, tiny, SCALE_ROUND)[:, :, None], (BR, NG, GP))
    if HAS_Z:
        z = tl.broadcast_to(tl.load(Z + sp, mask=pm, other=0.0)[:, :, None], (BR, NG, GP))
        acc_z = tl.zeros((BR, NG, GP), dtype=tl.float32)
    acc_s = tl.zeros((BR, NG, GP), dtype=tl.float32)
    for step in range(n_steps):
        inner = step * GP + lane
        col = col0 + inner
        m = pm[:, :, None] & (inner < group) & (col < C)
        offs = row0 + col
        w = tl.load(W + offs, mask=m, other=0.0)
        g = tl.load(GO + offs, mask=m, other=0.0).to(tl.float32)
        y = tl.math.div_rn(w, s)
        if HAS_Z:
            y = y + z
        q = _round_grid(y, qmin, qmax, emin, emax, man, fmax, KIND, NEG_ZERO)
        inside = (lo <= y) & (y <= hi)
        # a product, as the reference's g * mask: a nan/inf gradient outside the range stays nan
        tl.store(GW + offs, g * tl.where(inside, 1.0, 0.0), mask=m)
        if HAS_Z:
            off = q - z
        else:
            off = q
        acc_s += tl.where(m, g * tl.where(inside, q - y, off), 0.0)
        if HAS_Z:
            acc_z += tl.where(m, g * tl.where(inside, 0.0, -s), 0.0)
    gs = tl.sum(acc_s, axis=2) * grad_scale
    if SCALE_ROUND != 0:   # straight through the rounding, and clamp's gradient: none below tiny
        gs = tl.where(raw >= tiny, gs, 0.0)
    tl.store(GS + sp, gs, mask=pm)
    if HAS_Z:
        tl.store(GZ + sp, tl.sum(acc_z, axis=2) * grad_scale, mask=pm)


# --- host side ----------------------------------------------------------------------------------------

def _check(named, w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group: int, kind: str,
           params: Sequence) -> Tuple[int, int, int]:
    rows, cols, n_groups = check_args(w, scale, zero, group, kind, params)
    for name, t in named:
        if not (t.is_cuda or _INTERPRET):
            raise ValueError(f"{name} must be a CUDA tensor, got one on {t.device} "
                             "(use kernels/fake_quant_ref.py elsewhere)")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() first")
    if cols >= 2**31 - group:
        raise ValueError(f"at most 2**31 - group columns, got {cols}")
    return rows, cols, n_groups


SCALE_ROUNDS = {None: 0, torch.float16: 1, torch.bfloat16: 2}


def _scale_round(scale_dtype: Optional[torch.dtype]) -> Tuple[int, float]:
    if scale_dtype not in SCALE_ROUNDS:
        raise ValueError(f"scale_dtype must be None, torch.float16 or torch.bfloat16, got {scale_dtype}")
    return SCALE_ROUNDS[scale_dtype], (torch.finfo(scale_dtype).tiny if scale_dtype is not None else 0.0)


@functools.lru_cache(maxsize=None)
def _layout(rows: int, n_groups: int, group: int) -> dict:
    """Tile shape (BR rows, NG groups, GP columns a step) and the launch grid."""
    GP = min(triton.next_power_of_2(group), CHUNK)
    NG = max(1, min(CHUNK // GP, triton.next_power_of_2(n_groups)))
    BR = max(1, min(TILE // (NG * GP), triton.next_power_of_2(rows)))
    n_gblocks = triton.cdiv(n_groups, NG)
    return dict(BR=BR, NG=NG, GP=GP, n_steps=triton.cdiv(group, GP), n_gblocks=n_gblocks,
                grid=(triton.cdiv(rows, BR) * n_gblocks,))


@functools.lru_cache(maxsize=None)
def _grid_args(kind: str, params: Tuple) -> dict:
    if kind == "int":
        return dict(qmin=float(params[0]), qmax=float(params[1]), emin=0, emax=0, man=0, fmax=0.0, KIND=0)
    emin, emax, man, fmax = params
    return dict(qmin=0.0, qmax=0.0, emin=int(emin), emax=int(emax), man=int(man), fmax=float(fmax), KIND=1)


def fake_quant_forward(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group: int,
                       kind: str, params: Sequence, neg_zero: bool = False,
                       scale_dtype: Optional[torch.dtype] = None,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out = (round_to_grid(w / s + z) - z) * s in one pass; the bits of
    fake_quant_ref.fake_quant_forward. w (R, C), scale and zero (R, ceil(C / group)): float32,
    contiguous, on CUDA; zero may be None. ``scale_dtype`` (float16/bfloat16): ``s`` is
    ``scale`` clamped to the dtype's tiny and rounded to it first (a stored trained scale).
    ``out_dtype`` bfloat16 rounds the result to nearest-even bfloat16 (autocast's cast)."""
    named = [("w", w), ("scale", scale)] + ([("zero", zero)] if zero is not None else [])
    rows, cols, n_groups = _check(named, w, scale, zero, group, kind, params)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    rounding, tiny = _scale_round(scale_dtype)
    out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    if w.numel() == 0:
        return out
    lay = dict(_layout(rows, n_groups, group))
    grid = lay.pop("grid")
    _fwd_kernel[grid](w, scale, scale if zero is None else zero, out, rows, cols, n_groups, group, tiny=tiny,
                      HAS_Z=zero is not None, NEG_ZERO=bool(neg_zero), SCALE_ROUND=rounding,
                      OUT_BF16=out_dtype == torch.bfloat16, num_warps=NUM_WARPS, **lay,
                      **_grid_args(kind, tuple(params)))
    return out


def fake_quant_backward(grad_out: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                        zero: Optional[torch.Tensor], group: int, kind: str, params: Sequence,
                        grad_scale: float, neg_zero: bool = False, scale_dtype: Optional[torch.dtype] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(grad_w, grad_scale_t, grad_zero or None) in one pass over grad_out (float32 or bfloat16,
    read as float32) and w: the LSQ/LSQ+ gradients of fake_quant_ref.fake_quant_backward (grad_w
    bit for bit, the group sums to float32 summation error). With ``scale_dtype`` the scale's
    gradient passes straight through the rounding, and is 0 where ``scale`` < the dtype's tiny."""
    named = [("w", w), ("scale", scale)] + ([("zero", zero)] if zero is not None else [])
    rows, cols, n_groups = _check(named, w, scale, zero, group, kind, params)
    if (grad_out.shape != w.shape or grad_out.dtype not in (torch.float32, torch.bfloat16)
            or grad_out.device != w.device or not grad_out.is_contiguous()):
        raise ValueError(f"grad_out must be contiguous float32 or bfloat16 like w {tuple(w.shape)} on {w.device}, "
                         f"got {grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}")
    rounding, tiny = _scale_round(scale_dtype)
    grad_w = torch.empty_like(w)
    grad_s = torch.zeros_like(scale)
    grad_z = None if zero is None else torch.zeros_like(zero)
    if w.numel() == 0:
        return grad_w, grad_s, grad_z
    lay = dict(_layout(rows, n_groups, group))
    grid = lay.pop("grid")
    lo, hi = grid_range(kind, params)
    _bwd_kernel[grid](grad_out, w, scale, scale if zero is None else zero, grad_w, grad_s,
                      grad_s if grad_z is None else grad_z, rows, cols, n_groups, group, lo=lo, hi=hi,
                      grad_scale=float(grad_scale), tiny=tiny, HAS_Z=zero is not None, NEG_ZERO=bool(neg_zero),
                      SCALE_ROUND=rounding, num_warps=NUM_WARPS, **lay, **_grid_args(kind, tuple(params)))
    return grad_w, grad_s, grad_z
