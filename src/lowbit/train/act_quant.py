"""Trainable quantizer of a linear layer's input: the dynamic per-token (group, tensor) absmax step
that deployed W4A4 kernels compute, times a learned clipping ratio ``alpha`` in (0, 1].

``s = alpha * amax / fmt.max``; values beyond ``alpha * amax`` saturate. The input's gradient is the
clipped straight-through one (zero where a value saturates); ``alpha`` gets LSQ's gradient
(``quant.activation._ClippedStep``) scaled by ``1 / sqrt(n * qmax)``, ``n`` the features one step
covers. ``alpha`` is kept in [CLIP_MIN, 1] by a clamp whose gradient passes straight through, so a
ratio pushed past 1 comes back as soon as the loss asks for it. A ratio above 1 is not allowed: it
would leave the top levels of the grid unused for every token.

``calibrate_act_clips`` starts every ratio at the value that minimises the squared error of the
quantized inputs over a few batches (a grid search); the frozen ``QuantLinear`` applies the same
ratio (``act_clip``), and the checkpoint stores it, so inference computes what training computed.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

import torch
from torch import nn

from ..quant.activation import CLIP_MIN, check_clip, check_clip_spec, clip_grad_scale, clipped_activation
from ..quant.spec import QuantSpec

ACT_SCALINGS = ("fixed", "learned")
CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(13))  # 1.0 down to 0.4
CALIB_TOKENS = 256  # tokens of each batch a layer's error is measured on (evenly strided): the search
                    # quantizes them once per grid point in every layer, which dominates its cost


class _ClampStraight(torch.autograd.Function):
    """``alpha`` clamped to [CLIP_MIN, 1] forward (exactly the stored value), identity backward."""

    @staticmethod
    def forward(ctx, alpha):
        return alpha.clamp(CLIP_MIN, 1.0)

    @staticmethod
    def backward(ctx, g):
        return g


def learnable_clip(spec) -> bool:
    """Whether a clipping ratio applies to ``spec`` (symmetric element formats, deterministic
    rounding; block formats keep their own block-scale rule)."""
    try:
        check_clip_spec(QuantSpec.parse(spec))
    except ValueError:
        return False
    return True


class ActivationFakeQuant(nn.Module):
    """The input quantizer of one layer with a learned clipping ratio; see the module docstring."""

    def __init__(self, spec, features: int, clip: float = 1.0):
        super().__init__()
        self.spec = QuantSpec.parse(spec)
        check_clip_spec(self.spec)
        self.features = features
        self.grad_scale = clip_grad_scale(self.spec, features)
        self.alpha = nn.Parameter(torch.tensor(check_clip(clip), dtype=torch.float32))

    def clip(self) -> torch.Tensor:
        """The ratio the forward uses (a 0-d tensor with the parameter's gradient)."""
        return _ClampStraight.apply(self.alpha)

    def value(self) -> float:
        """The ratio as a number (what the frozen layer and the checkpoint keep)."""
        return float(self.alpha.detach().clamp(CLIP_MIN, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clipped_activation(x, self.spec, self.clip(), self.grad_scale)

    def extra_repr(self) -> str:
        return f"{self.spec}, clip={self.value():.4f}"


@torch.no_grad()
def calibrate_act_clips(model: nn.Module, batches: Iterable[Dict[str, torch.Tensor]],
                        grid: Sequence[float] = CLIP_GRID) -> Dict[str, float]:
    """Set every learned clipping ratio of ``model`` to the value of ``grid`` with the least squared
    error of its layer's quantized inputs over ``batches`` (model inputs; CALIB_TOKENS tokens of each);
    returns layer name -> ratio. Each layer sees the inputs the model gives it with every other
    quantizer as it is (its ratios unchanged during the pass)."""
    from .qat import qat_layers

    layers = {n: m for n, m in qat_layers(model).items() if m.act_quant is not None}
    if not layers:
        return {}
    grid = [check_clip(a) for a in grid]
    errors = {n: torch.zeros(len(grid), dtype=torch.float64) for n in layers}

    def hook_for(name, layer):
        def hook(_mod, args):
            x = args[0]
            if layer.input_transform is not None:
                x = layer.input_transform(x)
            x = x.float()
            if layer.act_spec.granularity != "tensor":  # steps of their own per token: a subset is a sample
                x = x.reshape(-1, x.shape[-1])
                x = x[:: max(1, x.shape[0] // CALIB_TOKENS)][:CALIB_TOKENS]
            for i, a in enumerate(grid):
                errors[name][i] += float((clipped_activation(x, layer.act_spec, a) - x).square().sum())
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(n, layer)) for n, layer in layers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    chosen = {}
    for name, layer in layers.items():
        best = grid[int(torch.argmin(errors[name]))]
        layer.act_quant.alpha.fill_(best)
        chosen[name] = best
    return chosen


def clip_summary(model: nn.Module) -> dict:
    """Count, min, mean and max of the clipping ratios of a model's layers (trained or frozen)."""
    values = []
    for m in model.modules():
        if isinstance(m, ActivationFakeQuant):
            values.append(m.value())
        elif getattr(m, "act_clip", None) is not None:  # a frozen layer, or one trained with its ratio fixed
            values.append(float(m.act_clip))
    if not values:
        return {"layers": 0}
    return {"layers": len(values), "min": min(values), "mean": sum(values) / len(values), "max": max(values)}
