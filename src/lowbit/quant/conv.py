"""Quantized convolutions: QuantConv1d / QuantConv2d, the analogues of QuantLinear.

A convolution is a matrix product on unfolded inputs: its weight (out, in/groups, *kernel) read as
a matrix (out, in/groups * prod(kernel)) multiplies the column of each output position's receptive
field (``F.unfold``, channel-major then kernel positions, the same order as the flattened weight).
So the weight is quantized as that matrix (per output channel, or groups of g along the flattened
in_channels x kernel axis), and GPTQ's Hessian is X^T X over the unfolded inputs, one per conv group.
Input activations are quantized along the channels at each position (``token`` = per position).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .activation import quantize_activation
from .spec import QuantSpec

CONV_TYPES = (nn.Conv1d, nn.Conv2d)


def conv_weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(out, in/groups, *kernel) -> (out, in/groups * prod(kernel))."""
    return weight.reshape(weight.shape[0], -1)


def unfold_conv_input(conv: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Rows of the unfolded input of ``conv`` (one matrix (positions, in/groups * prod(kernel)) per
    conv group), so that conv(x) == unfolded @ flattened_weight^T per group (plus bias)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"GPTQ of {conv}: padding {conv.padding!r} / padding_mode {conv.padding_mode!r} is not "
                         "supported; accepted: explicit integer padding with zeros")
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        k, d, p, s = (1, conv.kernel_size[0]), (1, conv.dilation[0]), (0, conv.padding[0]), (1, conv.stride[0])
    else:
        k, d, p, s = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    cols = F.unfold(x.float(), k, dilation=d, padding=p, stride=s)  # (B, C*k, L)
    B, CK, L = cols.shape
    cols = cols.reshape(B, conv.groups, CK // conv.groups, L)
    return [cols[:, g].transpose(1, 2).reshape(B * L, -1) for g in range(conv.groups)]


def quantize_channels(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize a (batch, channels, *spatial) input along its channels at each position."""
    return quantize_activation(x.movedim(1, -1), spec).movedim(-1, 1)


class _QuantConvMixin:
    weight_spec: Optional[QuantSpec]
    act_spec: Optional[QuantSpec]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            x = quantize_channels(x, self.act_spec)
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.weight_spec}, act={self.act_spec}"

    @classmethod
    def from_conv(cls, conv, weight: torch.Tensor, weight_spec: Optional[QuantSpec],
                  act_spec: Optional[QuantSpec]):
        """A copy of ``conv`` holding ``weight`` (any shape with the same elements, e.g. the
        flattened matrix) and the specs it emulates."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)
        q.weight_spec, q.act_spec = weight_spec, act_spec
        with torch.no_grad():
            q.weight.copy_(weight.reshape(conv.weight.shape).to(q.weight.dtype))
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        return q


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    """nn.Conv1d with quantized weight values and optional input quantization."""


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    """nn.Conv2d with quantized weight values and optional input quantization."""


def quant_conv_from(conv: nn.Module, weight: torch.Tensor, weight_spec: Optional[QuantSpec],
                    act_spec: Optional[QuantSpec]) -> nn.Module:
    cls = QuantConv1d if isinstance(conv, nn.Conv1d) else QuantConv2d
    return cls.from_conv(conv, weight, weight_spec, act_spec)
