"""The run-time input transform of one linear layer: ``x -> (x / s) R``.

A layer ``y = x W^T`` becomes ``y = ((x / s) R) (W diag(s) R)^T``: the same function, with the
weight ``W diag(s) R`` stored (and quantized) and the input divided by the smoothing scales ``s``
and rotated by ``R = diag(signs) blockdiag(H_b)`` at run time, before the input quantizer. Either
part is optional. ``to_dict``/``from_dict`` record it (the scales themselves live in the module's
state dict as the buffer ``scale``; the signs are regenerated from the seed).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .hadamard import default_block, random_signs, rotate, rotate_inverse


_HESSIAN_CACHE: dict = {}  # (id(H), signature) -> (weakref to H, T^T H T); at most 4 entries


class _LastOutput:
    """The last rotated input, for the next layer that reads the very same tensor through an equal
    transform (BERT's query/key/value, each rotating its input online): the rotation is computed
    once per input instead of once per layer. The input is held by a weak reference, so a new
    tensor at a reused address misses; the transform by a snapshot of its parameters, so a
    transform changed since does too. An input changed in place misses through its version counter;
    inference tensors (quantization and evaluation run under ``torch.inference_mode``) have none, so
    for them the sum and the sum of squares of the input are compared instead (one read of x,
    a few percent of a rotation); a change in place that keeps both exactly is not caught."""

    def __init__(self):
        self.entry = None  # (weakref to input, version or fingerprint, transform snapshot, output)

    @staticmethod
    def _snapshot(tf: "InputTransform") -> tuple:
        return (tf.features, tf.rotation, tf.block, tf.seed, None if tf.scale is None else tf.scale.clone())

    @staticmethod
    def _state(x: torch.Tensor):
        if x.is_inference():
            xf = x.detach().reshape(-1)
            return ("fingerprint", float(xf.sum()), float(xf.dot(xf)) if xf.is_floating_point() else None)
        return ("version", x._version)

    def get(self, tf: "InputTransform", x: torch.Tensor):
        e = self.entry
        if e is None or e[0]() is not x or x.requires_grad:
            return None
        snap = e[2]
        if snap[:4] != (tf.features, tf.rotation, tf.block, tf.seed):
            return None
        if (snap[4] is None) != (tf.scale is None) or (snap[4] is not None and not torch.equal(snap[4], tf.scale)):
            return None
        return e[3] if self._state(x) == e[1] else None

    def put(self, tf: "InputTransform", x: torch.Tensor, out: torch.Tensor) -> None:
        if x.requires_grad or out.requires_grad:
            self.entry = None
            return
        self.entry = (weakref.ref(x), self._state(x), self._snapshot(tf), out)


_LAST_OUTPUT = _LastOutput()


class InputTransform(nn.Module):
    def __init__(self, features: int, *, rotation: bool = False, block: Optional[int] = None,
                 seed: Optional[int] = None, scale: Optional[torch.Tensor] = None, smooth_scale: bool = False):
        super().__init__()
        self.features = int(features)
        self.rotation = bool(rotation)
        self.block = (default_block(features) if block is None else int(block)) if rotation else None
        self.seed = seed if rotation else None
        if rotation and features % self.block:
            raise ValueError(f"rotation block {self.block} does not divide {features} input features")
        signs = random_signs(features, seed) if rotation and seed is not None else None
        self.register_buffer("signs", signs, persistent=False)
        if scale is None and smooth_scale:
            scale = torch.ones(features)
        self.register_buffer("scale", None if scale is None else scale.detach().float().clone())

    # --- the maths -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = _LAST_OUTPUT.get(self, x)
        if hit is not None:
            return hit
        inp = x
        if self.scale is not None:
            x = x / self.scale.to(x.dtype)
        if self.rotation:
            x = rotate(x, self.block, self.signs)
            _LAST_OUTPUT.put(self, inp, x)
        return x

    def fold_into_weight(self, W: torch.Tensor) -> torch.Tensor:
        """``W diag(s) R``: the weight that, fed transformed inputs, gives the original outputs."""
        Wf = W.float()
        if self.scale is not None:
            Wf = Wf * self.scale.to(Wf.device)
        if self.rotation:
            Wf = rotate(Wf, self.block, None if self.signs is None else self.signs.to(Wf.device))
        return Wf.to(W.dtype)

    def transform_hessian(self, H: torch.Tensor) -> torch.Tensor:
        """``T^T H T`` for ``T = diag(1/s) R``: the Hessian of the transformed inputs from that of
        the raw inputs (GPTQ needs the statistics of what the stored weight actually multiplies).
        The last few results are remembered per (H, transform signature): layers reading one input
        through equal transforms (BERT q/k/v), and the per-layer error report, reuse them."""
        key = (id(H), self.signature())
        hit = _HESSIAN_CACHE.get(key)
        if hit is not None and hit[0]() is H:
            return hit[1].clone()
        out = self._transform_hessian(H)
        # a weak reference: an entry goes when its H does (then its id may be reused)
        _HESSIAN_CACHE[key] = (weakref.ref(H, lambda _, k=key: _HESSIAN_CACHE.pop(k, None)), out)
        while len(_HESSIAN_CACHE) > 4:
            _HESSIAN_CACHE.pop(next(iter(_HESSIAN_CACHE)))
        return out.clone()

    def _transform_hessian(self, H: torch.Tensor) -> torch.Tensor:
        H = H.float()
        if self.scale is not None:
            inv = 1.0 / self.scale.to(H.device)
            H = H * inv[:, None] * inv[None, :]
        if self.rotation:
            signs = None if self.signs is None else self.signs.to(H.device)
            H = rotate(rotate(H, self.block, signs).T.contiguous(), self.block, signs)
            H = 0.5 * (H + H.T)  # exact in exact arithmetic; keep it symmetric for Cholesky
        return H

    def add_rotation(self, block: Optional[int], seed: Optional[int]) -> None:
        if self.rotation:
            raise ValueError("this input transform already rotates")
        self.rotation = True
        self.block = default_block(self.features) if block is None else int(block)
        if self.features % self.block:
            raise ValueError(f"rotation block {self.block} does not divide {self.features} input features")
        self.seed = seed
        self.signs = random_signs(self.features, seed) if seed is not None else None

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation:
            x = rotate_inverse(x, self.block, self.signs)
        if self.scale is not None:
            x = x * self.scale.to(x.dtype)
        return x

    def signature(self) -> tuple:
        """Equal signatures mean the same transform T (so layers reading one input through equal
        transforms share the transformed Hessian T^T H T)."""
        scale = None if self.scale is None else tuple(self.scale.flatten().tolist())
        return (self.features, self.rotation, self.block, self.seed, scale)

    # --- record --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"features": self.features, "rotation": self.rotation, "block": self.block, "seed": self.seed,
                "smooth_scale": self.scale is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "InputTransform":
        unknown = set(d) - {"features", "rotation", "block", "seed", "smooth_scale"}
        if unknown:
            raise ValueError(f"unknown input-transform keys {sorted(unknown)}")
        return cls(d["features"], rotation=d.get("rotation", False), block=d.get("block"), seed=d.get("seed"),
                   smooth_scale=d.get("smooth_scale", False))

    def extra_repr(self) -> str:
        parts = []
        if self.scale is not None:
            parts.append("smooth")
        if self.rotation:
            parts.append(f"hadamard b{self.block}" + (f" seed {self.seed}" if self.seed is not None else ""))
        return ", ".join(parts) or "identity"


def input_transform_of(module: nn.Module) -> Optional[InputTransform]:
    return getattr(module, "input_transform", None)
