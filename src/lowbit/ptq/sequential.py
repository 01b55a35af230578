"""One forward pass per block: each linear layer is quantized at the moment the block's forward first
reaches it, from the Hessian of the inputs it receives right then.

Run over all calibration tokens at once, this is GPTQ's "true sequential" order (o_proj sees the
outputs of the already quantized q/k/v, down_proj those of the quantized gate/up) and it costs one
forward per block instead of two: the unquantized forward that gathers Hessians and the quantized
forward that feeds the next block become the same pass.

Layers fed the very same tensor (q/k/v, gate/up) share one Hessian. Which layers those are is only
known once the forward has called them all, so each block passes what it saw to the next one
(``groups``): there, the first layer of a known group has the whole group quantized together (one
GPTQ loop over stacked rows), and a member that then receives another tensor than its group's is
quantized again, alone, from its own inputs, before it produces any output.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.blocks import BlockInput, replace_module, run_block
from ..quant.spec import QuantSpec
from .gptq import HessianAccumulator

# ([(name, linear, spec)], Hessian of their common inputs or None) -> {name: quantized module},
# each already installed in the model
QuantizeGroup = Callable[[List[Tuple[str, nn.Module, QuantSpec]], Optional[torch.Tensor]], Dict[str, nn.Module]]


class _Probe(nn.Module):
    """Stands in for a linear layer during the pass: on its first call it has the layer quantized
    from that call's inputs, then behaves as the quantized layer."""

    def __init__(self, name: str, rel: str, linear: nn.Module, spec: QuantSpec, run: "_Pass"):
        super().__init__()
        self.name, self.rel, self.linear, self.spec, self.run = name, rel, linear, spec, run
        self.quantized: Optional[nn.Module] = None
        self.expected: Optional[torch.Tensor] = None  # the input its group was quantized from
        self.called = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.called:
            self.called = True
            self.run.saw(self, x)
            if self.quantized is None or x is not self.expected:
                self.run.quantize(self, x)
            self.expected = None
        return self.quantized(x)


class _Pass:
    def __init__(self, block: nn.Module, quantize_group: QuantizeGroup, hint: Dict[str, Sequence[str]]):
        self.block, self.quantize_group, self.hint = block, quantize_group, hint
        self.probes: Dict[str, _Probe] = {}
        # input id -> (the tensor, kept alive so that its id cannot be reused; its Hessian; who read it)
        self.inputs: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor], List[str]]] = {}

    def saw(self, probe: _Probe, x: torch.Tensor) -> None:
        if id(x) not in self.inputs:
            self.inputs[id(x)] = (x, None, [])
        self.inputs[id(x)][2].append(probe.rel)

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        x_, H, readers = self.inputs[id(x)]
        if H is None:
            acc = HessianAccumulator(x.shape[-1], x.device)
            acc.add(x)
            H = acc.H
            self.inputs[id(x)] = (x_, H, readers)
        return H

    def quantize(self, probe: _Probe, x: torch.Tensor) -> None:
        if probe.quantized is None:  # first of its group: the members still to come share x
            group = [self.probes[r] for r in self.hint.get(probe.rel, (probe.rel,))
                     if r in self.probes and self.probes[r].quantized is None]
            if probe not in group:
                group = [probe]
        else:  # its group was quantized from another tensor: again, alone, from its own inputs
            group = [probe]
        modules = self.quantize_group([(p.name, p.linear, p.spec) for p in group], self.hessian(x))
        for p in group:
            p.quantized = modules[p.name]
            p.expected = x
            if not p.called:  # the quantizer installed it; the probe stays until the layer is reached
                replace_module(self.block, p.rel, p)

    def groups(self) -> Dict[str, Tuple[str, ...]]:
        """Layer (name within the block) -> the layers that read the same tensor, in call order."""
        return {r: tuple(readers) for _, _, readers in self.inputs.values() for r in readers}


def run_sequential(block: nn.Module, inp: BlockInput, todo: Dict[str, Tuple[nn.Module, QuantSpec]],
                   quantize_group: QuantizeGroup, prefix: str = "",
                   groups: Optional[Dict[str, Sequence[str]]] = None) -> Tuple[torch.Tensor, Dict[str, Tuple[str, ...]]]:
    """Run ``block`` once on ``inp`` with each layer of ``todo`` (full name -> (linear, spec))
    quantized on first use; returns the block's output and which of its layers read the same
    tensor (names within the block), to pass as ``groups`` to the next block of the same structure.
    ``prefix`` is the block's own full name (the names in ``todo`` start with it). A layer the
    forward never calls is quantized afterwards without data (Hessian None)."""
    run = _Pass(block, quantize_group, dict(groups or {}))
    cut = len(prefix) + 1 if prefix else 0
    for name, (lin, spec) in todo.items():
        run.probes[name[cut:]] = _Probe(name, name[cut:], lin, spec, run)
        replace_module(block, name[cut:], run.probes[name[cut:]])
    try:
        out = run_block(block, inp, inp.hidden)
    finally:
        for rel, probe in run.probes.items():
            # the quantizer installed each quantized layer in the model; a probe still in place
            # means the layer was never called (or the pass failed): restore the original for now
            if block.get_submodule(rel) is probe:
                replace_module(block, rel, probe.quantized if probe.called else probe.linear)
    for probe in run.probes.values():
        if not probe.called:
            quantize_group([(probe.name, probe.linear, probe.spec)], None)
    groups = run.groups()
    # probes and the pass refer to each other: free the block's activations now, not at the next
    # cyclic garbage collection
    run.inputs.clear()
    run.probes.clear()
    return out, groups
