"""A frozen quantized base kept compact in memory while adapters train: each integer-format
``QuantLinear`` becomes a :class:`CompactQuantLinear` holding its levels as int8 (one byte a
weight instead of four) and its fp16 scales, and rebuilding exactly the same float weight,
``(levels - z) * s``, in each forward. Other formats (minifloats, codebooks, block formats) stay as
they are."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from ..formats import IntFormat
from ..models.blocks import replace_module
from ..quant.linear import QuantLinear, quantized_linear
from ..quant.weight import WeightQuantizer


class CompactQuantLinear(nn.Module):
    """A frozen integer-grid linear: int8 levels, per-group scales (and zero points)."""

    def __init__(self, layer: QuantLinear, scales: torch.Tensor, zeros: Optional[torch.Tensor]):
        super().__init__()
        spec = layer.weight_spec
        q = WeightQuantizer(spec)
        rows, cols = layer.weight.shape
        self.in_features, self.out_features = cols, rows
        self.weight_spec, self.act_spec = spec, layer.act_spec
        self.act_clip = layer.act_clip
        self.group = cols if spec.granularity == "tensor" else q.group_size(cols)
        n_groups = math.ceil(cols / self.group)
        w = layer.weight.detach().float()
        s = scales.float().to(w.device).expand(rows, n_groups)
        z = None if zeros is None else zeros.float().to(w.device).expand(rows, n_groups)
        levels = torch.round(w / self._expand(s) + (0 if z is None else self._expand(z)))
        self.register_buffer("levels", levels.to(torch.int8))
        self.register_buffer("scales", s.contiguous())
        self.register_buffer("zeros", None if z is None else z.contiguous())
        if not torch.equal(self.weight(), w):
            raise ValueError(f"layer weight is not s * (levels - z) on its {spec} grid; it cannot be kept compact")
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.input_transform = layer.input_transform

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group, 1)[:, :self.in_features]

    def weight(self) -> torch.Tensor:
        lv = self.levels.float()
        if self.zeros is not None:
            return (lv - self._expand(self.zeros)) * self._expand(self.scales)
        return lv * self._expand(self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight(), self.bias, self.input_transform, self.act_spec, self.act_clip)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight_spec} (int8 levels)"


def compact_base(model: nn.Module, scales: Dict[str, Dict[str, torch.Tensor]]) -> int:
    """Swap each integer-grid ``QuantLinear`` with stored ``scales`` (layer -> {'scales', 'zeros'},
    float (rows, groups)) for a :class:`CompactQuantLinear`, in place, also as the base of a LoRA
    layer (``NAME.base``); returns the bytes saved. A layer whose weight is not exactly on its grid
    is left as it is."""
    saved = 0
    for name, mod in list(model.named_modules()):
        key = name[: -len(".base")] if name.endswith(".base") else name
        if not isinstance(mod, QuantLinear) or mod.weight_spec is None or key not in scales or mod.retain:
            continue
        grid = WeightQuantizer(mod.weight_spec).grid
        if not isinstance(grid, IntFormat) or grid.frac != 0 or grid.qmin < -128 or grid.qmax > 127:
            continue
        try:
            new = CompactQuantLinear(mod, scales[key]["scales"], scales[key].get("zeros"))
        except ValueError:
            continue
        saved += mod.weight.numel() * (mod.weight.element_size() - 1)
        replace_module(model, name, new)
    return saved
