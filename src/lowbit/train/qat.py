"""Quantization-aware training at the model's edge: swap linears for ``QATLinear`` (fp32 master
weight + trainable weight quantizer + the input quantizer of the plan) and freeze them back into the
``QuantLinear`` + packed codes that ``lowbit quantize`` writes.

``prepare_qat(model, "w4g64")`` and ``convert(model)`` are the pair a user of any training stack
needs (Hugging Face Trainer, Lightning, a plain loop); ``lowbit train`` calls the same two.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, Optional, Union

import torch
from torch import nn

from ..quant.packed import pack_weight
from ..models.blocks import replace_module
from ..quant.linear import QuantLinear, quantized_linear
from ..quant.plan import Plan, as_plan
from ..quant.spec import QuantSpec
from .act_quant import ACT_SCALINGS, ActivationFakeQuant, learnable_clip
from .quantizers import WeightFakeQuant


class QATLinear(nn.Module):
    """A linear layer trained under quantization: ``F.linear(Qa(T(x)), Qw(W), b)`` with ``W`` the fp32
    master weight, ``Qw`` a ``WeightFakeQuant``, ``Qa`` the input's dynamic quantizer (per token,
    tensor or block, straight-through) and ``T`` an optional fixed input transform (a rotation or
    smoothing carried over from a PTQ result).

    ``act_scaling="learned"``: element-format inputs get an ``ActivationFakeQuant`` (the dynamic
    absmax times a learned clipping ratio, ``act_clip`` its start); block formats keep their own
    block-scale rule. ``"fixed"``: the dynamic absmax, times ``act_clip`` when one is given (a
    ratio learned earlier, kept as it is)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: Optional[QuantSpec],
                 act_spec: Optional[QuantSpec], scaling: str = "learned", gradient: str = "clipped",
                 device=None, act_scaling: str = "fixed", act_clip: Optional[float] = None):
        super().__init__()
        if act_scaling not in ACT_SCALINGS:
            raise ValueError(f"act_scaling must be one of {', '.join(ACT_SCALINGS)}, got {act_scaling!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.weight_quant = (WeightFakeQuant(weight_spec, (out_features, in_features), scaling, gradient).to(device)
                             if weight_spec is not None else None)
        self.input_transform: Optional[nn.Module] = None
        self.act_quant: Optional[ActivationFakeQuant] = None
        self.act_clip: Optional[float] = act_clip  # used as it is when no ratio is learned
        if act_scaling == "learned" and act_spec is not None and learnable_clip(act_spec):
            self.act_quant = ActivationFakeQuant(act_spec, in_features, 1.0 if act_clip is None else act_clip).to(device)
            self.act_clip = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: Optional[QuantSpec], act_spec: Optional[QuantSpec], *,
                    scaling: str = "learned", gradient: str = "clipped", scales: Optional[torch.Tensor] = None,
                    zeros: Optional[torch.Tensor] = None, act_scaling: str = "fixed") -> "QATLinear":
        """From an ``nn.Linear`` (scales fitted by the spec's rule) or a PTQ ``QuantLinear`` (its weight
        is already on the grid; ``scales``/``zeros`` from its packed checkpoint keep GPTQ's choice; its
        input clipping ratio, if it has one, is kept or starts the learned one)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, act_spec,
                scaling, gradient, device=linear.weight.device, act_scaling=act_scaling,
                act_clip=getattr(linear, "act_clip", None))
        with torch.no_grad():
            q.weight.copy_(linear.weight.float())
            if linear.bias is not None:
                q.bias.copy_(linear.bias.float())
            if q.weight_quant is not None:
                q.weight_quant.init_from(q.weight, scales, zeros)
        tf = getattr(linear, "input_transform", None)
        if tf is not None:
            tf.requires_grad_(False)  # a rotation/smoothing fixed by PTQ: its inverse is folded in the weight
            q.input_transform = tf
        return q

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight) if self.weight_quant is not None else self.weight

    def input_clip(self):
        """The clipping ratio of the input's amax the forward uses (a tensor when learned), or None."""
        return self.act_quant.clip() if self.act_quant is not None else self.act_clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.quantized_weight(), self.bias, self.input_transform, self.act_spec,
                                self.input_clip())

    @torch.no_grad()
    def freeze(self):
        """(QuantLinear holding exactly the values the forward used, packed tensors or None)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        lin.input_transform = self.input_transform
        clip = self.act_quant.value() if self.act_quant is not None else self.act_clip
        if self.weight_quant is None:
            frozen, packed = QuantLinear.from_linear(lin, self.weight, None, self.act_spec), None
        else:
            Q, params = self.weight_quant.freeze(self.weight)
            packed = {k: v.cpu() for k, v in pack_weight(Q, self.weight_quant.quantizer, params).items()}
            frozen = QuantLinear.from_linear(lin, Q, self.weight_spec, self.act_spec)
        frozen.act_clip = clip
        return frozen, packed

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight_spec}, act={self.act_spec}"


def _targets(model: nn.Module, plan: Plan, exclude: Iterable[str]) -> Dict[str, nn.Module]:
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if isinstance(mod, QuantLinear):
            if mod.retain:
                raise ValueError(f"{name} keeps high-impact weights beside its codes (retention); training a "
                                 "retained layer is not supported yet: start from a checkpoint made without --retain")
            out[name] = mod
        elif plan.weight_spec(name) is not None or plan.act_spec(name) is not None:
            out[name] = mod
    return out


def prepare_qat(model: nn.Module, scheme_or_plan: Union[str, Plan, dict, None] = None, *, scaling: str = "learned",
                gradient: str = "clipped", scales: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
                exclude: Iterable[str] = (), act_scaling: str = "fixed") -> nn.Module:
    """Swap the plan's linears for ``QATLinear`` in place and return the model.

    ``QuantLinear`` layers (a model loaded from a ``lowbit quantize`` checkpoint) keep their own
    specs and transforms; ``scales`` (layer name -> packed tensors with ``scales``/``zeros``) then
    start the learned scales at PTQ's values. Other ``nn.Linear`` layers take the plan's specs
    (``scheme_or_plan`` may be None when every target is a ``QuantLinear``). ``act_scaling``:
    ``"learned"`` gives element-format inputs a learned clipping ratio of their dynamic amax
    (``train.act_quant``; start it with ``calibrate_act_clips``), ``"fixed"`` keeps the plain
    dynamic absmax."""
    if act_scaling not in ACT_SCALINGS:
        raise ValueError(f"act_scaling must be one of {', '.join(ACT_SCALINGS)}, got {act_scaling!r}")
    plan = as_plan(scheme_or_plan) if scheme_or_plan is not None else Plan()
    targets = _targets(model, plan, exclude)
    if not targets:
        raise ValueError(f"no linear layer of this model matches the plan ({plan.describe() or 'empty'}); "
                         "nothing to train under quantization")
    for name, lin in targets.items():
        if isinstance(lin, QuantLinear):
            wspec, aspec = lin.weight_spec, lin.act_spec
        else:
            wspec, aspec = plan.weight_spec(name), plan.act_spec(name)
        s, z = stored_scales((scales or {}).get(name), wspec, tuple(lin.weight.shape))
        replace_module(model, name, QATLinear.from_linear(lin, wspec, aspec, scaling=scaling, gradient=gradient,
                                                          scales=s, zeros=z, act_scaling=act_scaling))
    return model


def stored_scales(packed: Optional[Dict[str, torch.Tensor]], spec: Optional[QuantSpec], shape):
    """(scales, zeros) float32 (rows, n_groups) of a layer's packed tensors, or (None, None) where
    there are none to start from (no checkpoint, block formats whose scales follow their rule)."""
    if not packed or spec is None or "scales" not in packed:
        return None, None
    scales = packed["scales"].float()
    zeros = None
    if "zeros" in packed:
        from ..quant.packed import unpack_bits
        from ..quant.weight import WeightQuantizer

        q = WeightQuantizer(spec)
        n = scales.shape[0] * scales.shape[1]
        zeros = unpack_bits(packed["zeros"], q.grid.bits, n).reshape(scales.shape).float()
    if spec.granularity == "tensor":
        scales = scales[:1]
        zeros = None if zeros is None else zeros[:1]
    return scales, zeros


def qat_layers(model: nn.Module) -> Dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


def convert(model: nn.Module) -> nn.Module:
    """Freeze every ``QATLinear`` into a ``QuantLinear`` (in place) holding the quantized values the
    training forward computed; each frozen layer keeps its packed codes in ``.packed`` for saving."""
    layers = qat_layers(model)
    if not layers:
        raise ValueError("this model has no QATLinear layer to convert (call prepare_qat first)")
    for name, layer in layers.items():
        frozen, packed = layer.freeze()
        frozen.packed = packed
        replace_module(model, name, frozen)
    return model


def packed_weights(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Layer name -> packed tensors of every converted layer (for ``export.checkpoint.save_quantized``)."""
    return {n: m.packed for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and getattr(m, "packed", None) is not None}


def trainable_groups(model: nn.Module) -> Dict[str, list]:
    """Parameters by role: 'weights' (master weights, biases and any other trainable tensor) and
    'scales' (learned step sizes, offsets and input clipping ratios), for separate learning rates."""
    scales = []
    for m in model.modules():
        if isinstance(m, (WeightFakeQuant, ActivationFakeQuant)):
            scales += [p for p in m.parameters(recurse=False) if p.requires_grad]
    ids = {id(p) for p in scales}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return {"weights": weights, "scales": scales}
