"""Dynamic quantization of activations (inputs of linear layers): a scale per token, per tensor, or
the format's own blocks, computed on the fly, with a straight-through gradient.

Element formats may also take a clipping ratio ``clip`` in (0, 1] (learned in training, see
``lowbit.train.act_quant``): the step is then ``clip * amax / fmt.max``, so values beyond
``clip * amax`` saturate. The gradient of the input is then the clipped straight-through one (zero
where the value saturates) and the ratio, when a tensor that requires a gradient, gets LSQ's."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..emulate import quantize
from ..kernels.scalar_div import div_scalar
from ..formats import BlockFormat, IntFormat
from .spec import QuantSpec


def quantize_activation(x: torch.Tensor, spec: QuantSpec,
                        clip: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
    """Fake-quantize activations ``x`` (..., features) according to ``spec`` (symmetric only);
    ``clip``: the clipping ratio of the dynamic amax (element formats; None: no clipping)."""
    fmt = spec.fmt
    if clip is not None:
        return clipped_activation(x, spec, clip)
    if isinstance(fmt, BlockFormat):
        if spec.scale_method in ("4over6", "mse"):  # per-block scale choice, computed on the fly
            from .four_over_six import quantize_blocks_dynamic

            return quantize_blocks_dynamic(x, spec)
        return quantize(x, fmt, spec.rounding, axis=-1, ste=True)
    if not spec.symmetric:
        raise ValueError(f"activation spec {spec} must be symmetric")
    return _ClippedStep.apply(x, torch.ones((), device=x.device), spec, 0.0, False)


CLIP_MIN = 1e-3  # a clipping ratio below this is no quantizer anyone wants; it keeps the step normal


def check_clip_spec(spec: QuantSpec) -> None:
    """Raise unless ``spec`` is an activation spec a clipping ratio applies to."""
    if isinstance(spec.fmt, BlockFormat):
        raise ValueError(f"{spec} is a block format: its block scales follow the format's rule; a clipping ratio "
                         "applies to element formats (int4:token, e4m3fn:token, int8:g64, ...)")
    if not spec.symmetric:
        raise ValueError(f"activation spec {spec} must be symmetric")
    if spec.rounding == "stochastic" or spec.rounding.startswith("stochastic"):
        raise ValueError(f"a learned clipping ratio needs a deterministic rounding, got {spec.rounding}")


def check_clip(clip) -> float:
    """``clip`` as a float, or a ValueError unless it is a number in [CLIP_MIN, 1]."""
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not CLIP_MIN <= float(clip) <= 1.0:
        raise ValueError(f"a clipping ratio must be a number in [{CLIP_MIN}, 1], got {clip!r}")
    return float(clip)


def clip_grad_scale(spec: QuantSpec, features: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(n * qmax)`` for a clipping ratio, with ``n`` the elements one
    dynamic step covers in one example (a token's features, or a group): LSQ's N_F for activations;
    the loss averages over tokens, so the batch does not enter it."""
    n = spec.group_size if spec.granularity == "group" else features
    return 1.0 / math.sqrt(n * max(abs(float(spec.fmt.max)), 1.0))


def _amax_steps(xf: torch.Tensor, spec: QuantSpec):
    """(x viewed as (..., groups, size) or as it is, amax broadcastable to it) of the spec's granularity."""
    if spec.granularity == "tensor":
        return xf, xf.abs().amax()
    if spec.granularity in ("token", "channel"):
        return xf, xf.abs().amax(dim=-1, keepdim=True)
    g = spec.group_size
    if xf.shape[-1] % g:
        raise ValueError(f"activation groups of {g} do not divide {xf.shape[-1]} features")
    xg = xf.reshape(*xf.shape[:-1], -1, g)
    return xg, xg.abs().amax(dim=-1, keepdim=True)


def _round_to_grid(y: torch.Tensor, fmt, rounding: str) -> torch.Tensor:
    """``y`` rounded onto the format's (saturating) grid: ``emulate.quantize``, with integer grids
    under round-to-nearest-even as ``torch.round`` (half to even) and a clamp, the same values at a
    twentieth of the CPU time (an activation quantizer runs in every layer of every step)."""
    if isinstance(fmt, IntFormat) and fmt.frac == 0 and rounding == "nearest_even":
        return torch.round(y).clamp_(fmt.min, fmt.max)
    return quantize(y, fmt, rounding)


class _ClippedStep(torch.autograd.Function):
    """Dynamic absmax step times a clipping ratio; clipped straight-through for x, LSQ for the ratio.

    Forward ``out = Q(x / s) * s`` with ``s = alpha * amax / fmt.max`` (amax per token, group or
    tensor, treated as a constant) and ``Q`` rounding onto the format's saturating grid. Backward:
    ``dout/dx = 1`` where ``fmt.min <= x / s <= fmt.max``, 0 where it saturates;
    ``dout/dalpha = (Q(y) - y) * amax / fmt.max`` inside, ``Q(y) * amax / fmt.max`` outside
    (``y = x / s``), summed and times ``grad_scale``. ``clipped=False`` (the unclipped quantizer,
    alpha 1): the gradient of x passes everywhere (plain straight-through)."""

    @staticmethod
    def forward(ctx, x, alpha, spec: QuantSpec, grad_scale: float, clipped: bool = True):
        fmt = spec.fmt
        xf = x.float()
        xv, amax = _amax_steps(xf.detach(), spec)
        top = alpha.detach().float() * amax  # the clipping point
        s = torch.where(amax > 0, div_scalar(top, fmt.max), torch.ones_like(amax))
        y = xv / s
        q = _round_to_grid(y, fmt, spec.rounding)
        out = (q * s).reshape(x.shape).to(x.dtype)
        ctx.grad_scale, ctx.clipped = grad_scale, clipped
        ctx.alpha_grad = ctx.needs_input_grad[1]
        ctx.x_shape, ctx.x_dtype, ctx.alpha_shape = x.shape, x.dtype, alpha.shape
        if not clipped:
            return out
        inside = (y >= fmt.min) & (y <= fmt.max)
        if ctx.alpha_grad:
            # d s / d alpha = amax / fmt.max (0 where amax is 0: s is then 1 whatever alpha is)
            ds = torch.where(amax > 0, div_scalar(amax, fmt.max), torch.zeros_like(amax))
            ctx.save_for_backward(inside, torch.where(inside, q - y, q) * ds)
        else:
            ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, g):
        if not ctx.clipped:
            return g, None, None, None, None
        inside = ctx.saved_tensors[0]
        gv = g.float().reshape(inside.shape)
        gx = (gv * inside).reshape(ctx.x_shape).to(ctx.x_dtype)
        ga = None
        if ctx.alpha_grad:
            ga = ((gv * ctx.saved_tensors[1]).sum() * ctx.grad_scale).reshape(ctx.alpha_shape)
        return gx, ga, None, None, None


def clipped_activation(x: torch.Tensor, spec: QuantSpec, clip: Union[float, torch.Tensor],
                       grad_scale: Optional[float] = None) -> torch.Tensor:
    """``x`` fake-quantized with the step ``clip * amax / fmt.max`` (see ``_ClippedStep``); ``clip``
    a number or a one-element tensor in [CLIP_MIN, 1] (a tensor that requires a gradient gets LSQ's,
    scaled by ``grad_scale``, default ``clip_grad_scale``). ``clip=1`` is ``quantize_activation``'s
    unclipped result bit for bit."""
    check_clip_spec(spec)
    if isinstance(clip, torch.Tensor):  # a trained ratio: its module keeps it in range (no host sync here)
        if clip.numel() != 1:
            raise ValueError(f"clip must be one number, got a tensor of shape {tuple(clip.shape)}")
        alpha = clip
    else:
        check_clip(clip)
        alpha = torch.full((), float(clip), dtype=torch.float32, device=x.device)
    if grad_scale is None:
        grad_scale = clip_grad_scale(spec, x.shape[-1])
    return _ClippedStep.apply(x, alpha, spec, grad_scale)
