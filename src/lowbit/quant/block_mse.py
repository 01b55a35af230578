"""MSE-searched block scales for block formats (``nvfp4:mse``, ``mxfp4:mse``).

The amax rule maps each block's largest magnitude onto the top of the element grid. For a block
whose values look Gaussian (after a Hadamard rotation, say) that is rarely the scale that rounds the
block best: E2M1's grid {0, .5, 1, 1.5, 2, 3, 4, 6} has its widest gap at the top, so mapping the
largest value to 4 (a 1.5x larger scale) or clipping a lone large value (a smaller scale) often
costs less squared error. Any value of the scale format is a valid stored scale, so the search
runs over the scale format's own grid: every representable scale from ``MIN_RATIO`` to
``MAX_RATIO`` times the amax-rule scale (E4M3: about 14 candidates; E8M0: the power of two below,
the amax-rule one and the one above), keeping per block the one with the least (optionally
column-weighted) squared error. The amax-rule scale is always a candidate and wins ties, so the
error never exceeds absmax's. Pure functions on tensors.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional

import torch

from ..formats import BlockFormat

MIN_RATIO = 0.5    # smallest candidate relative to the amax-rule scale (clips the top half)
MAX_RATIO = 1.6    # largest: 1.5x maps the block's amax onto E2M1's 4 instead of 6 ("4 over 6")
POW2_MAX_RATIO = 2.0  # power-of-two scales: the next power up is the only larger candidate


@lru_cache(maxsize=16)
def scale_values(fmt: BlockFormat) -> torch.Tensor:
    """The scale format's positive finite values, increasing, float64 (CPU)."""
    sc = fmt.scale
    v = sc.decode_codes(torch.arange(2 ** sc.bits, dtype=torch.int64)).double()
    v = v[torch.isfinite(v) & (v > 0)]
    return torch.unique(v)  # sorted


def candidate_offsets(fmt: BlockFormat, lo: float = MIN_RATIO, hi: Optional[float] = None) -> range:
    """Offsets (in scale-grid steps) around the amax-rule scale that the search tries: every step
    whose ratio stays within [lo, hi] for a scale in the middle of the grid (the ratio between
    neighbours of a float format repeats every binade, so the offsets are the same for any scale
    away from the subnormals and the top)."""
    vals = scale_values(fmt)
    hi = (POW2_MAX_RATIO if fmt.pow2_scale else MAX_RATIO) if hi is None else hi
    mid = int(torch.searchsorted(vals, torch.tensor(1.0, dtype=torch.float64)))
    mid = min(max(mid, 0), vals.numel() - 1)
    ref = vals[mid]
    down = int(((vals[:mid] >= ref * lo - 1e-12)).sum())
    up = int(((vals[mid + 1:] <= ref * hi + 1e-12)).sum())
    return range(-down, up + 1)


def block_error(x: torch.Tensor, fake: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                col_weight: Optional[torch.Tensor] = None,
                dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor], torch.Tensor]:
    """``err(s)``: per block (n, 1), sum_j c_j (fake(x, s) - x)_j^2 of blocks ``x`` (n, size) in
    ``dtype``; ``col_weight`` c: (size,), (n, size) or None (all 1)."""
    xd = x.detach().float().to(dtype)
    w = None
    if col_weight is not None:
        w = col_weight.to(device=x.device, dtype=dtype)
        w = w.reshape(1, -1) if w.dim() == 1 else w

    def err(s: torch.Tensor) -> torch.Tensor:
        e = (fake(x, s).to(dtype) - xd).pow(2)
        return (e if w is None else e * w).sum(dim=1, keepdim=True)

    return err


def mse_block_scales(
    x: torch.Tensor,
    base: torch.Tensor,
    fmt: BlockFormat,
    fake: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    col_weight: Optional[torch.Tensor] = None,
    offsets: Optional[range] = None,
) -> torch.Tensor:
    """Per-block scale (n, 1) minimising sum_j c_j (fake(x, s) - x)_j^2 over the scale grid near
    ``base`` (the amax-rule scales, (n, 1) float64); ``x`` is (n, size), one block per row.

    ``fake(x, s)`` quantize-dequantizes x under scales s (n, 1). ``col_weight`` (size,), optional:
    per-column weights c_j (e.g. the diagonal of GPTQ's Hessian), or (n, size) per element; None
    weighs all equally. Blocks
    whose base scale is not positive and finite (all-zero blocks, nan/inf blocks) keep it."""
    vals = scale_values(fmt).to(base.device)
    offsets = candidate_offsets(fmt) if offsets is None else offsets
    good = torch.isfinite(base) & (base > 0)
    safe = torch.where(good, base, torch.ones_like(base))
    idx = torch.searchsorted(vals, safe.reshape(-1)).reshape(base.shape)
    # base is representable, so vals[idx] == base; guard anyway (a caller's rounding) by clamping
    idx = idx.clamp(0, vals.numel() - 1)
    err = block_error(x, fake, col_weight)
    best = base.clone()
    best_err = err(base)
    for k in offsets:
        if k == 0:
            continue
        cand = vals[(idx + k).clamp(0, vals.numel() - 1)]
        cand = torch.where(good, cand, base)
        e = err(cand)
        better = e < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, e, best_err)
    return best
