"""Structure of a model for block-by-block calibration: the repeated blocks, the linear layers in
each, and how to capture a block's inputs and run it alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

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


def run_block(block: nn.Module, inp: BlockInput, hidden: torch.Tensor) -> torch.Tensor:
    kwargs = dict(inp.kwargs)
    kwargs.pop("use_cache", None)
    kwargs.pop("past_key_values", None)
    kwargs.pop("cache", None)  # transformers 5 names the KV cache `cache`: a captured one would grow on every re-run
    out = block(hidden, *inp.args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out
