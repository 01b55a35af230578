"""Trainable fake quantizers of weights: the forward is lowbit's own rounding (the same bits
``WeightQuantizer.fake`` gives, so a trained layer freezes into exactly what it computed), the
backward is a straight-through or a learned-step-size (LSQ/LSQ+) gradient.

Two ways to scale, per weight:

- ``learned`` (LSQ, Esser et al. 2020; LSQ+ offsets for asymmetric integers, Bhalgat et al. 2020):
  one scale per row and group is a parameter. Forward ``out = (q - z) * s`` with
  ``q = round(w / s + z)`` on the format's grid (saturating). Backward:
  ``dout/dw = 1`` inside the grid's range, 0 outside (clipped straight-through);
  ``dout/ds = q - y`` inside, ``q - z`` outside, with ``y = w / s + z``;
  ``dout/dz = 0`` inside, ``-s`` outside; the scale and offset gradients are multiplied by
  ``1 / sqrt(n * qmax)`` (n weights per scale) as LSQ prescribes. The scale used in the forward is
  the parameter rounded to the storage dtype (fp16), so what is trained is what is stored.
- ``dynamic``: the spec's own rule (absmax, MSE search, percentile; a block format's amax rule)
  recomputes the scales from the current weights at every step, and the gradient passes straight
  through (``straight``) or only inside the grid's range (``clipped``). Block formats (MX, NVFP4)
  always scale this way: their block scales are a function of the block, by the format's definition.

Granularity is the spec's: per tensor, channel, or group of ``g`` input columns with a ragged last
group (576 = 4 x 128 + 64).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..formats import BlockFormat, IntFormat
from ..kernels.fake_quant_ref import expand_groups, scaled, sum_groups
from ..quant.spec import QuantSpec
from ..quant.weight import GroupParams, WeightQuantizer

SCALINGS = ("learned", "dynamic")
GRADIENTS = ("straight", "clipped")


def grid_range(quantizer: WeightQuantizer) -> Tuple[float, float]:
    """Smallest and largest value of the element grid the scaled weights are rounded to."""
    grid = quantizer.grid
    return float(grid.min), float(grid.max)


def _fused_backend(w: torch.Tensor, quantizer: WeightQuantizer):
    """(module, kind, params, neg_zero) of the fused CUDA kernels for this grid, or None."""
    if not w.is_cuda or quantizer.spec.rounding != "nearest_even":
        return None
    from ..kernels import triton_backend

    if triton_backend() is None:
        return None
    try:
        from ..kernels import triton_fake_quant
    except ImportError:
        return None
    grid = quantizer.grid
    if isinstance(grid, IntFormat) and grid.frac == 0:
        return triton_fake_quant, "int", (grid.qmin, grid.qmax), False
    from ..quant.exp_round import exp_params
    from ..quant.weight import float_table

    params = exp_params(grid, float_table(grid))
    if params is None:
        return None
    return triton_fake_quant, "exp", params, grid.has_negative_zero


class _LearnedStep(torch.autograd.Function):
    """Fake quantization with learned scales (and offsets): LSQ/LSQ+ gradients."""

    @staticmethod
    def forward(ctx, w, scale, zero, quantizer: WeightQuantizer, group: int, grad_scale: float):
        fused = _fused_backend(w, quantizer)
        ctx.quantizer, ctx.group, ctx.grad_scale, ctx.fused = quantizer, group, grad_scale, fused
        ctx.has_zero = zero is not None
        w32 = w.float().contiguous()
        if fused is not None:
            mod, kind, params, neg_zero = fused
            ctx.save_for_backward(w32, scale, zero)
            return mod.fake_quant_forward(w32, scale.contiguous(), None if zero is None else zero.contiguous(),
                                          group, kind, params, neg_zero)
        s, z, y = scaled(w32, scale, zero, group)
        q = quantizer.round_scaled(y)
        lo, hi = grid_range(quantizer)
        inside = (y >= lo) & (y <= hi)
        # what the backward needs, kept rather than recomputed (the CPU path is compute-bound)
        residual = torch.where(inside, q - y, q - z if z is not None else q)
        ctx.save_for_backward(inside, residual, s if zero is not None else None, scale, zero)
        return (q - z) * s if z is not None else q * s

    @staticmethod
    def backward(ctx, g):
        group = ctx.group
        if ctx.fused is not None:
            w32, scale, zero = ctx.saved_tensors
            mod, kind, params, neg_zero = ctx.fused
            gw, gs, gz = mod.fake_quant_backward(g.float().contiguous(), w32, scale.contiguous(),
                                                 None if zero is None else zero.contiguous(), group, kind, params,
                                                 ctx.grad_scale, neg_zero)
            return gw, gs, gz, None, None, None
        inside, residual, s, scale, zero = ctx.saved_tensors
        g = g.float()
        gw = g * inside
        gs = sum_groups(g * residual, group, scale.shape[1]) * ctx.grad_scale
        gz = None
        if zero is not None:
            gz = sum_groups(torch.where(inside, torch.zeros_like(g), -g * s), group, zero.shape[1]) * ctx.grad_scale
        return gw, gs, gz, None, None, None


class _FusedStoredStep(torch.autograd.Function):
    """_LearnedStep on CUDA for symmetric per-channel/group scales, from the scale *parameter*: the
    kernels clamp and round it to its storage dtype themselves (what effective_params does in three
    more ops a layer), and under bf16 autocast write the weight in bf16 (what autocast's cast would
    give) and read the gradient in bf16. The values are _LearnedStep's; only the launches are fewer,
    which is what a small model's training step is bound by."""

    @staticmethod
    def forward(ctx, w, scale, fused, scale_dtype, group: int, grad_scale: float, out_dtype):
        mod, kind, params, neg_zero = fused
        w32 = w.float().contiguous()
        ctx.fused, ctx.scale_dtype, ctx.group, ctx.grad_scale = fused, scale_dtype, group, grad_scale
        ctx.save_for_backward(w32, scale)
        return mod.fake_quant_forward(w32, scale.contiguous(), None, group, kind, params, neg_zero,
                                      scale_dtype=scale_dtype, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, g):
        w32, scale = ctx.saved_tensors
        mod, kind, params, neg_zero = ctx.fused
        if g.dtype not in (torch.float32, torch.bfloat16):
            g = g.float()
        gw, gs, _ = mod.fake_quant_backward(g.contiguous(), w32, scale.contiguous(), None, ctx.group, kind, params,
                                            ctx.grad_scale, neg_zero, scale_dtype=ctx.scale_dtype)
        return gw, gs, None, None, None, None, None


class _RoundStraight(torch.autograd.Function):
    """Rounds a tensor to a float dtype (or to integers) forward, identity backward."""

    @staticmethod
    def forward(ctx, x, dtype):
        return torch.round(x) if dtype is None else x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Straight(torch.autograd.Function):
    """``q`` forward; the gradient of ``w`` passes where ``mask`` (everywhere when None)."""

    @staticmethod
    def forward(ctx, w, q, mask):
        ctx.save_for_backward(mask)
        ctx.has_mask = mask is not None
        return q

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return (g * mask if ctx.has_mask else g), None, None


class WeightFakeQuant(nn.Module):
    """Fake quantization of one (rows, cols) weight to ``spec``; see the module docstring."""

    def __init__(self, spec: QuantSpec, shape: Tuple[int, int], scaling: str = "learned",
                 gradient: str = "clipped", scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        spec = QuantSpec.parse(spec)
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        self.spec, self.shape, self.scale_dtype = spec, tuple(shape), scale_dtype
        self.quantizer = WeightQuantizer(spec, scale_dtype)
        why = self.quantizer.check(self.shape)
        if why:
            raise ValueError(f"weight of shape {self.shape} cannot take {spec}: {why}")
        if isinstance(self.quantizer.fmt, BlockFormat) or spec.rounding == "stochastic":
            scaling = "dynamic"  # block scales follow the format's rule; stochastic rounding has no fixed grid point
        self.scaling, self.gradient = scaling, gradient
        rows, cols = self.shape
        self.group = cols if spec.granularity == "tensor" else self.quantizer.group_size(cols)
        self.n_groups = math.ceil(cols / self.group)
        if scaling == "learned":
            n_scales = 1 if spec.granularity == "tensor" else rows
            self.scale = nn.Parameter(torch.ones(n_scales, self.n_groups))
            self.zero = None if spec.symmetric else nn.Parameter(torch.zeros(n_scales, self.n_groups))
            per_scale = self.group * (rows if spec.granularity == "tensor" else 1)
            self.grad_scale = 1.0 / math.sqrt(per_scale * max(abs(self.quantizer.grid.max), 1.0))

    # --- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, scales: Optional[torch.Tensor] = None,
                  zeros: Optional[torch.Tensor] = None) -> None:
        """Scales from given ones (a PTQ result: (rows, n_groups)) or fitted to ``weight`` by the
        spec's rule (absmax, MSE, percentile)."""
        if self.scaling != "learned":
            return
        if scales is None:
            if self.spec.granularity == "tensor":
                self.quantizer.prepare(weight.float())
                p = self.quantizer.params(weight.float()[:1])
                scales, zeros = p.scale[:1], (None if p.zero is None else p.zero[:1])
            else:
                _, params = self.quantizer.rtn(weight.float())
                scales = torch.cat([p.scale for p in params], dim=1)
                zeros = None if params[0].zero is None else torch.cat([p.zero for p in params], dim=1)
        if tuple(scales.shape) != tuple(self.scale.shape):
            raise ValueError(f"scales of shape {tuple(scales.shape)} do not fit this quantizer, which has "
                             f"{tuple(self.scale.shape)} ({self.quantizer.describe_groups(self.shape[1])})")
        self.scale.copy_(scales.float())
        if self.zero is not None:
            if zeros is None:
                raise ValueError(f"{self.spec} is asymmetric: initial zero points are needed with the scales")
            self.zero.copy_(zeros.float())

    # --- forward -----------------------------------------------------------------------------
    def effective_params(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(scale, zero) as the forward uses them: the scale rounded to the storage dtype and kept
        positive, the zero point rounded to an integer of the grid; straight-through for both."""
        tiny = torch.finfo(self.scale_dtype).tiny
        s = _RoundStraight.apply(self.scale.clamp(min=tiny), self.scale_dtype)
        z = None
        if self.zero is not None:
            z = _RoundStraight.apply(self.zero.clamp(0, self.quantizer.grid.qmax), None)
        if self.spec.granularity == "tensor":
            s = s.expand(self.shape[0], self.n_groups)
            z = None if z is None else z.expand(self.shape[0], self.n_groups)
        return s, z

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if tuple(w.shape) != self.shape:
            raise ValueError(f"this quantizer was built for weights of shape {self.shape}, got {tuple(w.shape)}")
        if self.scaling == "learned":
            fused = self._fused_for(w)
            if fused is not None:
                out_dtype = torch.float32
                if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16:
                    out_dtype = torch.bfloat16
                return _FusedStoredStep.apply(w, self.scale, fused, self.scale_dtype, self.group, self.grad_scale,
                                              out_dtype)
            s, z = self.effective_params()
            return _LearnedStep.apply(w, s, z, self.quantizer, self.group, self.grad_scale)
        with torch.no_grad():
            q, params = self.quantizer.rtn(w.detach().float())
            mask = None
            if self.gradient == "clipped" and not isinstance(self.quantizer.fmt, BlockFormat):
                lo, hi = grid_range(self.quantizer)
                s = torch.cat([p.scale for p in params], dim=1)
                y = w.detach().float() / expand_groups(s, self.group, self.shape[1])
                if params[0].zero is not None:
                    y = y + expand_groups(torch.cat([p.zero for p in params], dim=1), self.group, self.shape[1])
                mask = ((y >= lo) & (y <= hi)).float()
        return _Straight.apply(w, q, mask)

    def _fused_for(self, w: torch.Tensor):
        """The fused kernels for a symmetric per-channel/group learned scale on CUDA, else None;
        looked up once per device kind (the lookup is host time on every step otherwise)."""
        if self.zero is not None or self.spec.granularity == "tensor" or not w.is_cuda \
                or self.scale_dtype not in (torch.float16, torch.bfloat16):
            return None
        if "_fused" not in self.__dict__:
            self._fused = _fused_backend(w, self.quantizer)
        return self._fused

    # --- freezing ----------------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self, w: torch.Tensor):
        """(quantized float32 weight, [GroupParams per group]) exactly as the forward computes it,
        ready for ``quant.packed.pack_weight``."""
        if self.scaling != "learned":
            return self.quantizer.rtn(w.detach().float())
        s, z = self.effective_params()
        s, z = s.detach(), (None if z is None else z.detach())
        q = _LearnedStep.apply(w.detach(), s, z, self.quantizer, self.group, 1.0)
        params = [GroupParams(s[:, j : j + 1], None if z is None else z[:, j : j + 1]) for j in range(self.n_groups)]
        return q, params

    def extra_repr(self) -> str:
        return f"{self.spec}, scaling={self.scaling}, gradient={self.gradient}"
