"""Structure of a model for block-by-block calibration: the repeated blocks, the linear layers in
each, and how to capture a block's inputs and run it alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .loader import UnsupportedArchitectureError

# Where known families keep their repeated blocks.
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "encoder.layer",
               "bert.encoder.layer", "layers")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks and its dotted name."""
    for path in BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if lists:
        name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
        return name, blocks
    raise UnsupportedArchitectureError(
        f"found no repeated blocks in {type(model).__name__}; supported: transformer models whose blocks "
        f"sit in an nn.ModuleList ({', '.join(BLOCK_PATHS)}), e.g. Llama/Mistral/Qwen2 decoders and BERT encoders"
    )


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule of dotted ``name`` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def linear_layers(module: nn.Module, prefix: str = "") -> Dict[str, nn.Linear]:
    """Every nn.Linear inside ``module`` by full dotted name."""
    return {f"{prefix}.{n}" if prefix else n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


class _Captured(Exception):
    pass


@dataclass
class BlockInput:
    hidden: torch.Tensor
    args: tuple
    kwargs: Dict[str, Any]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: List[dict]) -> List[BlockInput]:
    """Run the model on each batch up to the first block and keep what that block receives."""
    captured: List[BlockInput] = []

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInput(hidden.detach(), tuple(args[1:]), dict(kwargs)))
        raise _Captured

    h = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    model(**batch)
                except _Captured:
                    pass
    finally:
        h.remove()
    if len(captured) != len(batches):
        raise UnsupportedArchitectureError("the model did not call its first block on every batch")
    return captured


# A captured KV cache must not be passed back: it would grow on every re-run of the block
# (transformers 5 names it `cache`).
_DROPPED_KWARGS = ("use_cache", "past_key_values", "cache")


def run_block(block: nn.Module, inp: BlockInput, hidden: torch.Tensor) -> torch.Tensor:
    kwargs = {k: v for k, v in inp.kwargs.items() if k not in _DROPPED_KWARGS}
    out = block(hidden, *inp.args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


class _Unmergeable(Exception):
    pass


def _merge_value(values: list, batch_sizes: List[int]):
    """One argument for the concatenated batch: a value equal in every batch and broadcastable
    (not a tensor, or a tensor whose leading size is 1) is kept; tensors whose leading size is each
    batch's size are concatenated; tuples/lists merge element-wise."""
    first = values[0]
    if isinstance(first, (tuple, list)):
        if any(not isinstance(v, type(first)) or len(v) != len(first) for v in values):
            raise _Unmergeable
        return type(first)(_merge_value([v[i] for v in values], batch_sizes) for i in range(len(first)))
    if isinstance(first, torch.Tensor):
        if any(not isinstance(v, torch.Tensor) for v in values):
            raise _Unmergeable
        if first.dim() > 0 and first.shape[0] == 1 and all(v.shape == first.shape and torch.equal(v, first)
                                                           for v in values[1:]):
            return first
        if first.dim() > 0 and all(v.shape[0] == b and v.shape[1:] == first.shape[1:]
                                   for v, b in zip(values, batch_sizes)):
            return torch.cat(values)
        raise _Unmergeable
    if all(v is first or (type(v) is type(first) and v == first) for v in values[1:]):
        return first
    raise _Unmergeable


def merge_block_inputs(inputs: List[BlockInput], hidden: List[torch.Tensor]) -> Optional[BlockInput]:
    """The calibration batches as one batch (hidden states concatenated), so that a block can run
    once over all calibration tokens; None when they cannot be merged (different shapes, or
    arguments that differ between batches in a way that is not per-sample)."""
    if not inputs or any(h.shape[1:] != hidden[0].shape[1:] for h in hidden):
        return None
    sizes = [h.shape[0] for h in hidden]
    try:
        args = _merge_value([list(i.args) for i in inputs], sizes)
        keys = [k for k in inputs[0].kwargs if k not in _DROPPED_KWARGS]
        if any(set(k for k in i.kwargs if k not in _DROPPED_KWARGS) != set(keys) for i in inputs):
            return None
        kwargs = {k: _merge_value([i.kwargs[k] for i in inputs], sizes) for k in keys}
    except _Unmergeable:
        return None
    return BlockInput(torch.cat(hidden), tuple(args), kwargs)
