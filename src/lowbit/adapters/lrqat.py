"""LR-QAT: the low-rank update lives inside the quantizer,

    W_q = s * (clamp(round(Phi + (alpha/r) * B A), qmin, qmax) - z)

with ``Phi = W0 / s0`` fixed and stored compactly (int8 fixed point: the integer codes of an
on-grid base, with extra fractional bits for a float one), the scales ``s`` and the adapter
``A``, ``B`` trained, and the rounding's straight-through gradient (zero outside the clamp). After
training :func:`fold` turns each layer into a plain ``QuantLinear`` holding ``s * (codes - z)``
and its packed codes: a lowbit checkpoint with no extra parameter or cost at inference.

Integer grids only (the formula needs a uniform grid); per-channel or group scales.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..formats import IntFormat
from ..models.blocks import replace_module
from ..quant.linear import QuantLinear, quantized_linear
from ..quant.packed import pack_weight
from ..quant.spec import QuantSpec
from ..quant.weight import GroupParams, WeightQuantizer
from .lora import TargetRule, linear_targets

SCALE_DTYPE = torch.float16


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _CastSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def frac_bits(grid: IntFormat) -> int:
    """Fractional bits of the int8 ``Phi``: as many as fit beside the grid's integer range (signed
    b-bit levels times 2^(8-b) fill int8; unsigned ones need one bit less)."""
    return max(0, 8 - grid.bits) if grid.is_signed else max(0, 7 - grid.bits)


class LRQATLinear(nn.Module):
    """One linear layer under LR-QAT (see the module docstring)."""

    def __init__(self, phi: torch.Tensor, frac: int, scale: torch.Tensor, zero: Optional[torch.Tensor],
                 spec: QuantSpec, rank: int, alpha: float, bias: Optional[torch.Tensor],
                 act_spec: Optional[QuantSpec] = None, input_transform: Optional[nn.Module] = None):
        super().__init__()
        self.out_features, self.in_features = phi.shape
        self.spec, self.act_spec = spec, act_spec
        self.quantizer = WeightQuantizer(spec, SCALE_DTYPE)
        self.grid = self.quantizer.grid
        self.group = self.quantizer.group_size(self.in_features) if spec.granularity != "tensor" else self.in_features
        self.register_buffer("phi", phi)                 # int8 (int16 for 8-bit grids): Phi * 2^frac
        self.frac = frac
        self.scale = nn.Parameter(scale.float().clone())     # (rows or 1, n_groups)
        self.register_buffer("zero", None if zero is None else zero.float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.rank, self.alpha = int(rank), float(alpha)
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=phi.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=phi.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.input_transform = input_transform
        self.act_clip: Optional[float] = None  # the base layer's learned input clipping ratio, kept as it is

    @classmethod
    def from_layer(cls, layer: nn.Module, spec: Optional[QuantSpec], rank: int, alpha: float,
                   scales: Optional[torch.Tensor] = None, zeros: Optional[torch.Tensor] = None) -> "LRQATLinear":
        """From a ``QuantLinear`` of an integer checkpoint (its weight is ``s * (codes - z)``; ``scales``
        and ``zeros`` are its stored ones) or from a float ``nn.Linear`` and ``spec`` (RTN start)."""
        spec = QuantSpec.parse(spec if spec is not None else getattr(layer, "weight_spec", None))
        q = WeightQuantizer(spec, SCALE_DTYPE)
        grid = q.grid
        if not isinstance(grid, IntFormat) or grid.frac != 0 or spec.is_block:
            raise ValueError(f"LR-QAT needs an integer weight format (int2..int8, sym or asym), got {spec}")
        W = layer.weight.detach().double()
        rows, cols = W.shape
        group = q.group_size(cols) if spec.granularity != "tensor" else cols
        n_groups = math.ceil(cols / group)
        if scales is None:
            _, params = q.rtn(W.float())
            scales = torch.cat([p.scale for p in params], 1).float()
            zeros = None if params[0].zero is None else torch.cat([p.zero for p in params], 1).float()
        scales = scales.to(W.device)
        zeros = None if zeros is None else zeros.to(W.device)
        if spec.granularity == "tensor":
            scales, zeros = scales[:1, :1], (None if zeros is None else zeros[:1, :1])
        s = scales.double().expand(rows, n_groups).repeat_interleave(group, 1)[:, :cols]
        z = None if zeros is None else zeros.double().expand(rows, n_groups).repeat_interleave(group, 1)[:, :cols]
        y = W / s + (z if z is not None else 0)
        f = frac_bits(grid)
        phi = torch.round(y * 2 ** f).clamp(grid.qmin * 2 ** f, grid.qmax * 2 ** f)
        dtype = torch.int8 if phi.abs().max() <= 127 and phi.min() >= -128 else torch.int16
        made = cls(phi.to(dtype), f, scales, zeros, spec, rank, alpha, layer.bias,
                   getattr(layer, "act_spec", None), getattr(layer, "input_transform", None))
        made.act_clip = getattr(layer, "act_clip", None)
        return made

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(self.out_features, t.shape[1])
        return t.repeat_interleave(self.group, 1)[:, :self.in_features]

    def codes(self) -> torch.Tensor:
        """The integer levels ``clamp(round(Phi + (alpha/r) B A))`` (float32; straight-through)."""
        phi = self.phi.float() / 2 ** self.frac
        upd = (self.lora_B @ self.lora_A) * self.scaling
        return torch.clamp(_RoundSTE.apply(phi + upd), self.grid.qmin, self.grid.qmax)

    def effective_scale(self) -> torch.Tensor:
        tiny = torch.finfo(SCALE_DTYPE).tiny
        return _CastSTE.apply(self.scale.clamp(min=tiny), SCALE_DTYPE)

    def quantized_weight(self) -> torch.Tensor:
        q = self.codes()
        if self.zero is not None:
            q = q - self._expand(self.zero)
        return q * self._expand(self.effective_scale())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.quantized_weight(), self.bias, self.input_transform, self.act_spec,
                                self.act_clip)

    @torch.no_grad()
    def fold(self):
        """(QuantLinear holding exactly the forward's weight, its packed tensors)."""
        W = self.quantized_weight().float()
        s = self.effective_scale().detach().expand(self.out_features, -1).to(SCALE_DTYPE)
        z = None if self.zero is None else self.zero.expand(self.out_features, -1)
        n_groups = s.shape[1]
        params = [GroupParams(s[:, j:j + 1], None if z is None else z[:, j:j + 1]) for j in range(n_groups)]
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=W.device)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        lin.input_transform = self.input_transform
        packed = {k: v.cpu() for k, v in pack_weight(W, self.quantizer, params).items()}
        frozen = QuantLinear.from_linear(lin, W, self.spec, self.act_spec)
        frozen.act_clip = self.act_clip
        return frozen, packed

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.spec}, rank={self.rank}, " \
               f"alpha={self.alpha:g}, phi={self.phi.dtype} (frac {self.frac})"


def prepare_lrqat(model: nn.Module, rules: Sequence[TargetRule], spec: Optional[QuantSpec] = None,
                  stored: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, seed: int = 0) -> Dict[str, LRQATLinear]:
    """Freeze ``model`` and turn each targeted linear into an :class:`LRQATLinear` (in place).
    ``QuantLinear`` layers keep their spec (``stored``: layer -> {'scales', 'zeros'} as float
    (rows, groups) from the checkpoint); float layers take ``spec``."""
    targets = linear_targets(model, rules)
    for p in model.parameters():
        p.requires_grad_(False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    made = {}
    try:
        for name, rule in targets.items():
            layer = model.get_submodule(name)
            lspec = getattr(layer, "weight_spec", None) or spec
            if lspec is None:
                continue  # a float layer with no spec to train towards: left as it is
            got = (stored or {}).get(name, {})
            new = LRQATLinear.from_layer(layer, lspec, rule.rank, rule.alpha, got.get("scales"), got.get("zeros"))
            replace_module(model, name, new)
            made[name] = new
    finally:
        torch.random.set_rng_state(state)
    if not made:
        raise ValueError("LR-QAT found no quantized linear among the adapter targets: start from a lowbit "
                         "checkpoint of an integer format, or give the spec to quantize to (e.g. --scheme w3g64)")
    return made


def layer_scales(model: nn.Module, packed: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Layer -> {'scales', 'zeros'} float (rows, groups) of a quantized model's packed tensors (a
    checkpoint's, or ``lowbit_result.packed`` of PTQ): the grid LR-QAT keeps (re-fitting it from
    the quantized weight would move an asymmetric grid)."""
    from ..train.qat import stored_scales

    out = {}
    for name, tensors in packed.items():
        mod = model.get_submodule(name)
        s, z = stored_scales(tensors, getattr(mod, "weight_spec", None), tuple(mod.weight.shape))
        if s is not None:
            out[name] = {"scales": s, "zeros": z}
    return out


def lrqat_layers(model: nn.Module) -> Dict[str, LRQATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LRQATLinear)}


def fold(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Replace every :class:`LRQATLinear` by its folded ``QuantLinear`` (in place); returns layer ->
    packed tensors for ``export.checkpoint.save_quantized``."""
    packed = {}
    for name, layer in lrqat_layers(model).items():
        frozen, tensors = layer.fold()
        frozen.packed = tensors
        replace_module(model, name, frozen)
        packed[name] = tensors
    return packed
