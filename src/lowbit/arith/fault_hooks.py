"""Soft errors in a model: weights stored in a format with bit flips, or activations hit on the fly.

    with weight_faults(model, "int8", 1e-4, seed=0):          # chosen weights, restored on exit
        out = model(x)
    handle = activation_faults(model, "bf16", 1e-5, modules=lambda name, m: isinstance(m, nn.Linear))
    ...; handle.remove()

``modules`` picks the modules: None (every nn.Linear), a list of module names, or a predicate
(name, module) -> bool. Weights of integer formats get a per-output-channel absmax scale (the stored
codes are the integers, the scale is kept exact); floating formats store the weights as they are.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..formats import IntFormat, format as parse_format
from .faults import inject_faults

Selector = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]


def _selected(model: nn.Module, modules: Selector):
    if modules is None:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if callable(modules):
        return [(n, m) for n, m in model.named_modules() if modules(n, m)]
    names = dict(model.named_modules())
    missing = [n for n in modules if n not in names]
    if missing:
        raise ValueError(f"no modules named {missing[:5]} in the model")
    return [(n, names[n]) for n in modules]


def faulty_weight(w: torch.Tensor, fmt, p: float, fields, per: str, seed) -> torch.Tensor:
    """``w`` stored in ``fmt`` (per-row absmax scale for integer formats) with bit flips, as float."""
    f = parse_format(fmt)
    x = w.detach().float()
    if isinstance(f, IntFormat):
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        scale = amax / f.max
        return (inject_faults(x / scale, f, p, fields, per=per, seed=seed) * scale).to(w.dtype)
    return inject_faults(x, f, p, fields, per=per, seed=seed).to(w.dtype)


@contextlib.contextmanager
def weight_faults(model: nn.Module, fmt, p: float, fields=("sign", "exponent", "mantissa"), *,
                  per: str = "bit", seed: Optional[int] = 0, modules: Selector = None):
    """Replace the weights of the chosen modules by their faulty stored copies; restore on exit."""
    chosen = _selected(model, modules)
    saved = []
    try:
        with torch.no_grad():
            for i, (name, m) in enumerate(chosen):
                w = getattr(m, "weight", None)
                if not isinstance(w, torch.Tensor):
                    raise ValueError(f"module {name!r} has no weight tensor")
                saved.append((m, w.detach().clone()))
                w.copy_(faulty_weight(w, fmt, p, fields, per, None if seed is None else seed + i))
        yield model
    finally:
        with torch.no_grad():
            for m, w in saved:
                m.weight.copy_(w)


def activation_faults(model: nn.Module, fmt, p: float, fields=("sign", "exponent", "mantissa"), *,
                      per: str = "bit", seed: Optional[int] = 0, modules: Selector = None):
    """Forward hooks storing each chosen module's output in ``fmt`` with bit flips (a new draw per
    call, from one generator seeded once). Returns a handle; ``handle.remove()`` takes them off."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    f = parse_format(fmt)

    def hook(_module, _inputs, out):
        if not isinstance(out, torch.Tensor):
            return out
        s = int(torch.randint(0, 2**62, (1,), generator=gen))
        return inject_faults(out.detach().float(), f, p, fields, per=per, seed=s).to(out.dtype)

    handles = [m.register_forward_hook(hook) for _, m in _selected(model, modules)]
    return _Handles(handles)


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


__all__ = ["weight_faults", "activation_faults", "faulty_weight"]
