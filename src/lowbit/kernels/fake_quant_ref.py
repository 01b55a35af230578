"""Fake quantization with learned per-group scales (LSQ / LSQ+) in plain torch: the readable oracle
of the fused CUDA kernels (kernels/triton_fake_quant.py) and the path on any other device.

A weight ``w`` (R, C) float32 is split along its columns into groups of ``group`` consecutive
columns (the last one may be shorter: C = n * group + r); group j of row r has the scale
``scale[r, j]`` and, for asymmetric integers, the zero point ``zero[r, j]`` (already an integer).
With s, z the group's values broadcast over its columns::

    y   = w / s + z                 float32, in this order (no z term without a zero point)
    q   = round_to_grid(y)          saturating
    out = (q - z) * s               (q * s without a zero point)

Grids (``kind``, ``params``):
  "int"  (qmin, qmax): q = clamp(round_half_even(y), qmin, qmax).
  "exp"  (emin, emax, man, fmax): a small minifloat by exponent arithmetic, the bits of
         quant/exp_round.round_by_exponent: the step at |y| is 2 ** (clamp(floor(log2|y|), emin,
         emax) - man), q = min(round_half_even(|y| / step) * step, fmax) with the sign of y, and
         -0 becomes +0 unless ``neg_zero``.
The gradient mask is ``lo <= y <= hi`` with (lo, hi) = (qmin, qmax) or (-fmax, fmax).

Backward (LSQ, Esser et al. 2020; LSQ+, Bhalgat et al. 2020), for the incoming gradient g::

    grad_w        = g * in_range
    grad_s[r, j]  = grad_scale * sum over the group of g * (q - y if in_range else q - z)
    grad_z[r, j]  = grad_scale * sum over the group of g * (0 if in_range else -s)

(z = 0 without a zero point.) nan stays nan: a nan weight gives a nan output and, being outside
every range, a zero weight gradient and a nan scale gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

KINDS = ("int", "exp")


def check_args(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group: int, kind: str,
               params: Sequence) -> Tuple[int, int, int]:
    """Validate the common arguments (shapes, dtypes, grid); (R, C, number of groups) back.
    Raises ValueError with what is wrong."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    want = 2 if kind == "int" else 4
    if len(params) != want:
        raise ValueError(f"kind {kind!r} takes {want} params, got {tuple(params)}")
    if kind == "int" and not float(params[0]) <= float(params[1]):
        raise ValueError(f"int grid needs qmin <= qmax, got {tuple(params)}")
    if kind == "exp":
        emin, emax, man, fmax = params
        if int(emin) > int(emax) or int(man) < 0 or not float(fmax) > 0:
            raise ValueError(f"exp grid needs emin <= emax, man >= 0 and fmax > 0, got {tuple(params)}")
        # the step and its reciprocal must be normal float32 powers of two (exact scaling)
        if int(emin) - int(man) < -126 or int(emax) - int(man) > 126:
            raise ValueError(f"exp grid {tuple(params)}: the step 2**(e - man) leaves float32's normal range")
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (rows, cols), got shape {tuple(w.shape)}")
    rows, cols = w.shape
    n_groups = -(-cols // group)
    named = [("w", w), ("scale", scale)] + ([("zero", zero)] if zero is not None else [])
    for name, t in named:
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
        if t.device != w.device:
            raise ValueError(f"{name} is on {t.device}, w on {w.device}")
    for name, t in named[1:]:
        if tuple(t.shape) != (rows, n_groups):
            raise ValueError(f"{name} must have shape (rows, ceil(cols / group)) = {(rows, n_groups)}, "
                             f"got {tuple(t.shape)}")
    return rows, cols, n_groups


def grid_range(kind: str, params: Sequence) -> Tuple[float, float]:
    """(lo, hi) of the grid: the gradient mask is lo <= y <= hi."""
    if kind == "int":
        return float(params[0]), float(params[1])
    return -float(params[3]), float(params[3])


def expand_groups(t: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """(R, G) -> (R, cols): each group's value over its columns (ragged last group)."""
    return t.repeat_interleave(group, dim=1)[:, :cols]


def sum_groups(t: torch.Tensor, group: int, n_groups: int) -> torch.Tensor:
    """(R, cols) -> (R, G): the sum over each group's columns (ragged last group)."""
    rows, cols = t.shape
    pad = n_groups * group - cols
    if pad:
        t = torch.cat([t, t.new_zeros(rows, pad)], dim=1)
    return t.reshape(rows, n_groups, group).sum(dim=2)


def round_int(y: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """clamp(round_half_even(y), qmin, qmax); nan stays nan."""
    q = torch.round(y)
    # compares rather than torch.clamp: the same bits on every device for -0 (kept) and nan (kept);
    # torch.clamp's CPU kernel gives these bits too
    q = torch.where(q < qmin, q.new_tensor(float(qmin)), q)
    return torch.where(q > qmax, q.new_tensor(float(qmax)), q)


def round_exp(y: torch.Tensor, params: Sequence, neg_zero: bool) -> torch.Tensor:
    """Round float32 y to the minifloat grid (emin, emax, man, fmax), half-even, saturating."""
    emin, emax, man, fmax = int(params[0]), int(params[1]), int(params[2]), float(params[3])
    a = y.abs()
    # floor(log2 a) from the exponent field; float32 subnormals read -127, below every emin used
    e = ((a.view(torch.int32) >> 23) - 127).clamp(emin, emax)
    step = ((e + (127 - man)) << 23).view(torch.float32)   # 2 ** (e - man), exact
    q = torch.round(a / step) * step                        # division by a power of two: exact
    q = torch.where(q > fmax, q.new_tensor(fmax), q)        # (a nan compares false and stays)
    out = torch.copysign(q, y)
    return out if neg_zero else out + 0.0                   # -0 + 0 = +0


def round_to_grid(y: torch.Tensor, kind: str, params: Sequence, neg_zero: bool = False) -> torch.Tensor:
    if kind == "int":
        return round_int(y, float(params[0]), float(params[1]))
    return round_exp(y, params, neg_zero)


def scaled(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group: int):
    """(s, z, y) broadcast over the columns; z is None without a zero point."""
    cols = w.shape[1]
    s = expand_groups(scale, group, cols)
    y = w / s
    z = None
    if zero is not None:
        z = expand_groups(zero, group, cols)
        y = y + z
    return s, z, y


def fake_quant_forward(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group: int,
                       kind: str, params: Sequence, neg_zero: bool = False) -> torch.Tensor:
    """out = (round_to_grid(w / s + z) - z) * s, float32 (R, C); see the module docstring."""
    check_args(w, scale, zero, group, kind, params)
    s, z, y = scaled(w, scale, zero, group)
    q = round_to_grid(y, kind, params, neg_zero)
    return (q - z) * s if z is not None else q * s


def fake_quant_backward(grad_out: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                        zero: Optional[torch.Tensor], group: int, kind: str, params: Sequence,
                        grad_scale: float, neg_zero: bool = False
                        ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(grad_w (R, C), grad_scale_t (R, G), grad_zero (R, G) or None): the LSQ/LSQ+ gradients of
    fake_quant_forward; see the module docstring."""
    _, _, n_groups = check_args(w, scale, zero, group, kind, params)
    if grad_out.shape != w.shape or grad_out.dtype != torch.float32 or grad_out.device != w.device:
        raise ValueError(f"grad_out must be float32 like w {tuple(w.shape)} on {w.device}, got "
                         f"{grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}")
    s, z, y = scaled(w, scale, zero, group)
    q = round_to_grid(y, kind, params, neg_zero)
    lo, hi = grid_range(kind, params)
    inside = (lo <= y) & (y <= hi)
    grad_w = grad_out * inside
    outside_term = q - z if z is not None else q
    grad_s = sum_groups(grad_out * torch.where(inside, q - y, outside_term), group, n_groups) * grad_scale
    grad_z = None
    if z is not None:
        dz = torch.where(inside, torch.zeros_like(s), -s)
        grad_z = sum_groups(grad_out * dz, group, n_groups) * grad_scale
    return grad_w, grad_s, grad_z
