"""QuantLinear: a drop-in nn.Linear whose weight holds quantized values and whose input is
fake-quantized on the fly; the model stays an ordinary nn.Module."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .activation import quantize_activation
from .spec import QuantSpec


class QuantLinear(nn.Linear):
    """nn.Linear with quantized weight values (stored dequantized, float) and optional input
    quantization. ``weight_spec``/``act_spec`` record what the layer emulates."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_spec: Optional[QuantSpec] = None, act_spec: Optional[QuantSpec] = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        # retain format of high-impact weights kept beside the low-bit codes (None: none); the
        # weight already holds them at their positions, so forward needs nothing more
        self.retain: Optional[str] = None
        # optional run-time transform of the input (rotation/smoothing, see lowbit.transforms): the
        # stored weight is then the transformed one, so outputs are unchanged in exact arithmetic
        self.input_transform: Optional[nn.Module] = None
        # clipping ratio of the input's dynamic amax learned in training (lowbit.train.act_quant);
        # None: the plain absmax step. Saved in the checkpoint's manifest (act_clips).
        self.act_clip: Optional[float] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor, weight_spec: Optional[QuantSpec],
                    act_spec: Optional[QuantSpec]) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, act_spec,
                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(weight.to(q.weight.dtype))
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        q.input_transform = getattr(linear, "input_transform", None)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias, self.input_transform, self.act_spec, self.act_clip)

    def extra_repr(self) -> str:
        extra = f", retain={self.retain}" if self.retain else ""
        extra += f", act_clip={self.act_clip!r}" if self.act_clip is not None else ""
        return f"{super().extra_repr()}, weight={self.weight_spec}, act={self.act_spec}{extra}"


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     input_transform: Optional[nn.Module] = None, act_spec=None,
                     act_clip: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
    """What every quantized linear computes (PTQ's, QAT's, LR-QAT's, the compact adapter base's):
    the input through its transform (rotation/smoothing), then its quantizer (with the clipping
    ratio ``act_clip`` of its dynamic amax, when learned), times the weight.
    Outside autocast the weight and bias take the input's dtype: a weight computed in float32
    (fake-quantized, or rebuilt from codes) must meet a bf16 input."""
    if input_transform is not None:
        x = input_transform(x)
    if act_spec is not None:
        x = quantize_activation(x, act_spec, act_clip)
    if not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)
