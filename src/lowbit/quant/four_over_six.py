"""Four Over Six ("4/6") block scales for NVFP4-like formats (``nvfp4:4over6``), and the dynamic
block quantization of activations with a chosen scale rule.

The amax rule maps a block's largest magnitude onto E2M1's top value 6. The grid {0, .5, 1, 1.5, 2,
3, 4, 6} has its widest gap between 4 and 6, so a block whose values sit near its maximum (a
Hadamard-rotated block, which looks Gaussian, often does) loses much to that gap. Four Over Six
(Cook et al., 2025, "Four Over Six: More Accurate NVFP4 Quantization with Adaptive Block Scaling")
quantizes each block twice, once with the scale that maps its amax onto 6 and once with the scale
that maps it onto 4, and keeps whichever has the smaller squared error. The choice is just another
E4M3 scale value: storage, packing and decoding are plain NVFP4, and the two candidates cost two
quantizations per block, cheap enough for activations quantized on the fly.

Exact semantics (float32, as the amax rule in ``kernels.reference.block_scales``), per block of
``size`` elements with amax ``a`` (largest magnitude) and the tensor scale ``ts`` of the
plain format (NVFP4: tensor amax / (6 * 448), unchanged):

* ``s6 = E4M3(a / 6 / ts)``, the plain amax-rule scale;
* ``s4 = E4M3(a / 4 / ts)``, both rounded to nearest-even and saturating at E4M3's 448 (so the few
  blocks whose ``s6`` is above 448 / 1.5 get a 4-candidate between 1x and 1.5x, and the block that
  holds the tensor's amax has ``s4 == s6``; the paper instead lowers the tensor scale's top to 256
  so every block has a true 4-candidate, which would change every block's plain scale);
* the block keeps ``s4`` iff ``sum (fake(x, s4) - x)^2 < sum (fake(x, s6) - x)^2`` (optionally
  column-weighted), where fake quantize-dequantizes with the format's rounding mode (float32 values)
  and the squared differences are summed in float64; ties keep ``s6``. Blocks whose amax is zero,
  nan or inf keep ``s6``. Stochastic rounding is refused (the comparison would be between random
  draws).

So no block's error exceeds the plain format's (same tensor scale, same candidate ``s6``). Formats
with power-of-two block scales (MX: E8M0) have no scale 1.5x another and element grids without the
4..6 gap have nothing to gain: ``check_four_over_six`` refuses both with the reason.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..formats import BlockFormat
from ..kernels import reference
from ..rounding import STOCHASTIC_MODES
from .block_mse import block_error

TOP = 6.0      # E2M1's largest magnitude: the plain rule's target
LOWER = 4.0    # E2M1's second largest: the alternative target


def check_four_over_six(fmt, rounding: str = "nearest_even") -> Optional[str]:
    """Why ``fmt`` (with element rounding ``rounding``) cannot take 4over6 scales, or None if it can."""
    if rounding in STOCHASTIC_MODES:
        return (f"4over6 keeps the scale whose rounding of the block has the smaller error; under "
                f"{rounding!r} rounding that comparison would be between two random draws; use a "
                "deterministic rounding (nearest_even, ...)")
    if not isinstance(fmt, BlockFormat):
        return (f"4over6 chooses between two block scales of an NVFP4-like block format; {fmt} has no "
                "block scales (use a block format such as nvfp4, or :mse for a searched group scale)")
    if fmt.pow2_scale:
        return (f"4over6 needs a scale 1.5x the amax-rule one, and {fmt}'s scales are powers of two "
                f"({fmt.scale}); use {fmt}:mse (half, same or double the scale) instead")
    vals = fmt.element.values() if hasattr(fmt.element, "values") else None
    if fmt.element.max != TOP or vals is None or not bool((vals.double() == LOWER).any()):
        return (f"4over6 maps a block's amax onto 6 or 4 of the E2M1 element grid; {fmt}'s elements "
                f"({fmt.element}, max {fmt.element.max:g}) are not that grid")
    return None


def _rule_scales(amax: torch.Tensor, target: float, fmt: BlockFormat, ts: Optional[torch.Tensor]) -> torch.Tensor:
    """E4M3(amax / target / ts): float32 arithmetic, rounded to the scale format (nearest-even,
    saturating) exactly as the reference amax rule does with target = 6. (n, 1) float64."""
    s32 = amax.float() / torch.tensor(target, dtype=torch.float32, device=amax.device)
    if ts is not None:
        s32 = s32 / ts.to(device=amax.device, dtype=torch.float32)
    return reference.round_element(s32.double(), fmt.scale, "nearest_even", "saturate")


def four_over_six_scales(
    x: torch.Tensor,
    fmt: BlockFormat,
    ts: Optional[torch.Tensor],
    fake: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    col_weight: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-block 4/6 scales (n, 1) float64 of blocks ``x`` (n, size), one block per row.

    ``fake(x, s)`` quantize-dequantizes x under scales s (n, 1) (the caller's rounding); ``ts``: the
    tensor scale (None for formats without one); ``col_weight`` (size,) or (n, size): optional
    weights of the squared error; ``base``: the amax-rule scales if the caller has them (else
    computed here, the same values)."""
    reason = check_four_over_six(fmt)  # the caller's rounding was checked with its spec
    if reason:
        raise ValueError(reason)
    a = x.detach().abs().amax(dim=1, keepdim=True)
    good = torch.isfinite(a) & (a > 0)
    s6 = _rule_scales(a, TOP, fmt, ts) if base is None else base
    s4 = _rule_scales(a, LOWER, fmt, ts)
    # float64: the difference of two float32 values and its square are exact, so the choice does
    # not hinge on float32 summation order (a device's reduction tree)
    err = block_error(x, fake, col_weight, torch.float64)

    safe4 = torch.where(good, s4, s6)   # nan/inf/zero blocks: never evaluate a second candidate
    pick4 = good & (err(safe4) < err(s6))
    return torch.where(pick4, safe4, s6)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized tensor, exactly; backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx, x, q):  # noqa: D401
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def quantize_blocks_dynamic(x: torch.Tensor, spec, ste: bool = True) -> torch.Tensor:
    """Fake-quantize ``x`` (..., features) to a block spec whose scales are not the plain amax rule
    (``:4over6`` or ``:mse``), blocks along the last axis, the tensor scale from ``x`` itself (as
    the plain dynamic path does). Computed in float32 (``x`` is cast; float16/bfloat16/float32
    inputs lose nothing) through the weight quantizer's arithmetic, so a block gets exactly the
    values a weight block with the same scale gets. Returns x's dtype."""
    from .weight import WeightQuantizer

    fmt = spec.fmt
    if not isinstance(fmt, BlockFormat):
        raise ValueError(f"quantize_blocks_dynamic needs a block format, got {fmt}")
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or n % fmt.size:
        raise ValueError(f"{fmt} quantizes blocks of {fmt.size} along the last axis; it has length {n} "
                         f"(shape {tuple(x.shape)}); the features must be a multiple of {fmt.size}")
    xb = x.detach().float().reshape(-1, fmt.size)
    q = WeightQuantizer(spec)
    q.prepare(xb)
    out = q.fake(xb, q.params(xb)).reshape(x.shape).to(x.dtype)
    return _StraightThrough.apply(x, out) if ste and x.requires_grad else out
