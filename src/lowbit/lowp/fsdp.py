"""FSDP2 for models prepared by ``prepare_lowp``: every decoder block and the root sharded with
``fully_shard``, bf16 parameters on the GPU (MixedPrecisionPolicy), and optionally HQ-FSDP: the
low-precision linears' weights all-gathered in FP8 or INT8 (``gather.py``)."""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
from torch import nn

from .gather import ShardedLowpWeight, parse_gather
from .linear import LowpLinear

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "none": None}


def decoder_blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks of ``model``: the elements of every ``nn.ModuleList`` whose elements are
    all one class (a Hugging Face model's ``model.layers``, GPT-2's ``h`` ...), outermost lists first."""
    blocks, inside = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1 \
                and not any(name.startswith(p + ".") for p in inside):
            inside.add(name)
            blocks.extend(m for m in mod if any(True for _ in m.parameters()))
    return blocks


def shard_model(model: nn.Module, *, gather="bf16", param_dtype="auto", reduce_dtype="auto",
                reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """Shard ``model`` (already on this rank's device, ``torch.distributed`` initialized) with FSDP2
    in place: each decoder block, then the root. ``gather``: the all-gather format of the weights
    of every LowpLinear and of the decoder blocks' other ``nn.Linear`` layers (``bf16``: FSDP's own,
    in the parameter dtype; ``fp8``, ``fp8row``, ``int8`` or a quant spec: HQ-FSDP; a plain linear
    computes with the dequantized weight; one process gathers nothing and ignores it). ``param_dtype``: the unsharded parameters' dtype (``auto``: bf16 on
    CUDA, the master dtype on the CPU); ``reduce_dtype``: the gradient reduction's (``auto``: the
    parameter dtype). Returns ``model``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("shard_model needs torch.distributed initialized (lowbit.train.distributed.init_distributed)")
    spec = parse_gather(gather)
    dev = next(model.parameters()).device
    pdt, rdt = (_dtype(v, name, dev) for v, name in ((param_dtype, "param_dtype"), (reduce_dtype, "reduce_dtype")))
    world = dist.get_world_size()
    mesh = mesh or init_device_mesh(dev.type, (world,))
    if spec is not None and mesh.size() == 1:
        # nothing is communicated, and FSDP2's one-process path takes one all-gather input only
        # (torch 2.13): the weights stay as they are, and the matmuls quantize them as without FSDP
        warnings.warn(f"HQ-FSDP: one process has no all-gather; gather={gather!r} is ignored")
        spec = None
    blocks = decoder_blocks(model)
    if spec is not None:
        layers = [m for m in model.modules() if isinstance(m, LowpLinear)]
        layers += [m for b in blocks for m in b.modules() if type(m) is nn.Linear]
        if not layers:
            raise ValueError(f"gather={gather!r} all-gathers the weights of linear layers, and the model has no "
                             "low-precision linear nor decoder blocks of linears; use gather='bf16'")
        for m in layers:
            if m.out_features % world:
                raise ValueError(f"HQ-FSDP shards whole rows: out_features={m.out_features} of a layer does not "
                                 f"split over {world} processes; use a world size dividing it or gather='bf16'")
            if not isinstance(m.weight, ShardedLowpWeight):
                m.weight = nn.Parameter(ShardedLowpWeight(m.weight.data, spec, getattr(m, "recipe", None)),
                                        requires_grad=m.weight.requires_grad)
    mp = MixedPrecisionPolicy(param_dtype=pdt, reduce_dtype=rdt)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def _dtype(value, name: str, dev: torch.device) -> Optional[torch.dtype]:
    if value == "auto":
        return torch.bfloat16 if dev.type == "cuda" else None
    if isinstance(value, torch.dtype) or value is None:
        return value
    if value not in DTYPES:
        raise ValueError(f"{name} must be auto, {', '.join(DTYPES)} or a torch dtype, got {value!r}")
    return DTYPES[value]
