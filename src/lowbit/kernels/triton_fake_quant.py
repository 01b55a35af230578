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
def _fwd_kernel(W, S, Z, OUT, R, C, G, group, n_steps, n_gblocks, qmin, qmax, emin, emax, man, fmax,
                KIND: tl.constexpr, HAS_Z: tl.constexpr, NEG_ZERO: tl.constexpr,
                BR: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr):
    row0, col0, lane, sp, pm = _program_tile(R, C, G, group, n_gblocks, BR, NG, GP)
    s = tl.broadcast_to(tl.load(S + sp, mask=pm, other=1.0)[:, :, None], (BR, NG, GP))
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
        tl.store(OUT + offs, out, mask=m)


@triton.jit
def _bwd_kernel(GO, W, S, Z, GW, GS, GZ, R, C, G, group, n_steps, n_gblocks, qmin, qmax, emin, emax, man,
                fmax, lo, hi, grad_scale, KIND: tl.constexpr, HAS_Z: tl.constexpr, NEG_ZERO: tl.constexpr,
                BR: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr):
    row0, col0, lane, sp, pm = _program_tile(R, C, G, group, n_gblocks, BR, NG, GP)
    s = tl.broadcast_to(tl.load(S + sp, mask=pm, other=1.0)[:, :, None], (BR, NG, GP))
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
        g = tl.load(GO + offs, mask=m, other=0.0)
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
    tl.store(GS + sp, tl.sum(acc_s, axis=2) * grad_scale, mask=pm)
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


def _layout(rows: int, n_groups: int, group: int) -> dict:
    """Tile shape (BR rows, NG groups, GP columns a step) and the launch grid."""
    GP = min(triton.next_power_of_2(group), CHUNK)
    NG = max(1, min(CHUNK // GP, triton.next_power_of_2(n_groups)))
    BR = max(1, min(TILE // (NG * GP), triton.next_power_of_2(rows)))
    n_gblocks = triton.cdiv(n_groups, NG)
    return dict(BR=BR, NG=NG, GP=GP, n_steps=triton.cdiv(group, GP), n_gblocks=n_gblocks,
                grid=(triton.cdiv(rows, BR) * n_gblocks,))


def _grid_args(kind: str, params: Sequence) -> dict:
    if kind == "int":
        return dict(qmin=float(params[0]), qmax=float(params[1]), emin=0, emax=0, man=0, fmax=0.0, KIND=0)
    emin, emax, man, fmax = params
    return dict(qmin=0.0, qmax=0.0, emin=int(emin), emax=int(emax), man=int(man), fmax=float(fmax), KIND=1)


def fake_quant_forward(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group: int,
                       kind: str, params: Sequence, neg_zero: bool = False) -> torch.Tensor:
    """out = (round_to_grid(w / s + z) - z) * s in one pass; the bits of
    fake_quant_ref.fake_quant_forward. w (R, C), scale and zero (R, ceil(C / group)): float32,
    contiguous, on CUDA; zero may be None."""
    named = [("w", w), ("scale", scale)] + ([("zero", zero)] if zero is not None else [])
    rows, cols, n_groups = _check(named, w, scale, zero, group, kind, params)
    out = torch.empty_like(w)
    if w.numel() == 0:
        return out
    lay = _layout(rows, n_groups, group)
    grid = lay.pop("grid")
    _fwd_kernel[grid](w, scale, scale if zero is None else zero, out, rows, cols, n_groups, group,
                      HAS_Z=zero is not None, NEG_ZERO=bool(neg_zero), num_warps=NUM_WARPS,
                      **lay, **_grid_args(kind, params))
    return out


def fake_quant_backward(grad_out: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                        zero: Optional[torch.Tensor], group: int, kind: str, params: Sequence,
                        grad_scale: float, neg_zero: bool = False
                        ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(grad_w, grad_scale_t, grad_zero or None) in one pass over grad_out and w: the LSQ/LSQ+
    gradients of fake_quant_ref.fake_quant_backward (grad_w bit for bit, the group sums to float32
    summation error)."""
    named = [("grad_out", grad_out), ("w", w), ("scale", scale)] + ([("zero", zero)] if zero is not None else [])
    rows, cols, n_groups = _check(named, w, scale, zero, group, kind, params)
    if grad_out.shape != w.shape or grad_out.dtype != torch.float32 or grad_out.device != w.device:
        raise ValueError(f"grad_out must be float32 like w {tuple(w.shape)} on {w.device}, got "
                         f"{grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}")
    grad_w = torch.empty_like(w)
    grad_s = torch.zeros_like(scale)
    grad_z = None if zero is None else torch.zeros_like(zero)
    if w.numel() == 0:
        return grad_w, grad_s, grad_z
    lay = _layout(rows, n_groups, group)
    grid = lay.pop("grid")
    lo, hi = grid_range(kind, params)
    _bwd_kernel[grid](grad_out, w, scale, scale if zero is None else zero, grad_w, grad_s,
                      grad_s if grad_z is None else grad_z, rows, cols, n_groups, group, lo=lo, hi=hi,
                      grad_scale=float(grad_scale), HAS_Z=zero is not None, NEG_ZERO=bool(neg_zero),
                      num_warps=NUM_WARPS, **lay, **_grid_args(kind, params))
    return grad_w, grad_s, grad_z
