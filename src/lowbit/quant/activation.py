"""Dynamic quantization of activations (inputs of linear layers): a scale per token, per tensor, or
the format's own blocks, computed on the fly, with a straight-through gradient."""
from __future__ import annotations

import torch

from ..emulate import quantize
from ..kernels.scalar_div import div_scalar
from ..formats import BlockFormat
from .spec import QuantSpec


def quantize_activation(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize activations ``x`` (..., features) according to ``spec`` (symmetric only)."""
    fmt = spec.fmt
    if isinstance(fmt, BlockFormat):
        if spec.scale_method in ("4over6", "mse"):  # per-block scale choice, computed on the fly
            from .four_over_six import quantize_blocks_dynamic

            return quantize_blocks_dynamic(x, spec)
        return quantize(x, fmt, spec.rounding, axis=-1, ste=True)
    if not spec.symmetric:
        raise ValueError(f"activation spec {spec} must be symmetric")
    xf = x.float()
    if spec.granularity == "tensor":
        amax = xf.detach().abs().amax()
    elif spec.granularity in ("token", "channel"):
        amax = xf.detach().abs().amax(dim=-1, keepdim=True)
    else:  # groups along the features
        g = spec.group_size
        if x.shape[-1] % g:
            raise ValueError(f"activation groups of {g} do not divide {x.shape[-1]} features")
        xg = xf.reshape(*xf.shape[:-1], -1, g)
        amax = xg.detach().abs().amax(dim=-1, keepdim=True)
        s = torch.where(amax > 0, div_scalar(amax, fmt.max), torch.ones_like(amax))
        return quantize(xg, fmt, spec.rounding, scale=s, ste=True).reshape(x.shape).to(x.dtype)
    s = torch.where(amax > 0, div_scalar(amax, fmt.max), torch.ones_like(amax))
    return quantize(xf, fmt, spec.rounding, scale=s, ste=True).to(x.dtype)
