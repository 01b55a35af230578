"""One forward pass per block: each linear layer is quantized at the moment the block's forward first
reaches it, from the Hessian of the inputs it receives right then.

Run over all calibration tokens at once, this is GPTQ's "true sequential" order (o_proj sees the
outputs of the already quantized q/k/v, down_proj those of the quantized gate/up) and it costs one
forward per block instead of two: the unquantized forward that gathers Hessians and the quantized
forward that feeds the next block become the same pass.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..models.blocks import BlockInput, run_block
from ..quant.spec import QuantSpec
from .gptq import HessianAccumulator

# (name, linear, spec, Hessian of its inputs or None) -> the quantized module, already installed
QuantizeOne = Callable[[str, nn.Module, QuantSpec, Optional[torch.Tensor]], nn.Module]


class _Probe(nn.Module):
    """Stands in for a linear layer during the pass: on its first call it has the layer quantized
    from that call's inputs, then behaves as the quantized layer."""

    def __init__(self, name: str, linear: nn.Module, spec: QuantSpec, run: "_Pass"):
        super().__init__()
        self.name, self.linear, self.spec, self.run = name, linear, spec, run
        self.quantized: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            self.quantized = self.run.quantize(self, x)
        return self.quantized(x)


class _Pass:
    def __init__(self, quantize_one: QuantizeOne, calibrated: bool):
        self.quantize_one, self.calibrated = quantize_one, calibrated
        # Layers fed the very same tensor (q/k/v, gate/up) share one Hessian; the tensor is kept
        # alive with it so that its id cannot be reused within the pass.
        self.hessians: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def quantize(self, probe: _Probe, x: torch.Tensor) -> nn.Module:
        H = None
        if self.calibrated:
            if id(x) not in self.hessians:
                acc = HessianAccumulator(x.shape[-1], x.device)
                acc.add(x)
                self.hessians[id(x)] = (x, acc.H)
            H = self.hessians[id(x)][1]
        return self.quantize_one(probe.name, probe.linear, probe.spec, H)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def run_sequential(block: nn.Module, inp: BlockInput, todo: Dict[str, Tuple[nn.Module, QuantSpec]],
                   quantize_one: QuantizeOne, prefix: str = "", calibrated: bool = True) -> torch.Tensor:
    """Run ``block`` once on ``inp`` with each layer of ``todo`` (full name -> (linear, spec))
    quantized on first use; returns the block's output. ``prefix`` is the block's own full name
    (the names in ``todo`` start with it). A layer the forward never calls is quantized afterwards
    without data (RTN)."""
    run = _Pass(quantize_one, calibrated)
    cut = len(prefix) + 1 if prefix else 0
    probes = {}
    for name, (lin, spec) in todo.items():
        probes[name] = _Probe(name, lin, spec, run)
        _set(block, name[cut:], probes[name])
    try:
        out = run_block(block, inp, inp.hidden)
    finally:
        for name, probe in probes.items():
            # quantize_one installed the quantized layer in the model; a probe still in place means
            # the layer was never called (or the pass failed): restore the original until handled
            if block.get_submodule(name[cut:]) is probe:
                _set(block, name[cut:], probe.quantized if probe.quantized is not None else probe.linear)
    for name, probe in probes.items():
        if probe.quantized is None:
            quantize_one(name, probe.linear, probe.spec, None)
    return out
