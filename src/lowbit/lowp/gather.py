"""HQ-FSDP: the weights of low-precision linears all-gathered by FSDP2 in FP8 or INT8, through the
tensor-subclass extension of ``fully_shard`` (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``).

Each rank quantizes its shard (rows of W: FSDP2 shards the output features) before the all-gather,
and the gathered codes and scales feed the HALO forward matmul directly. When the all-gather format
equals the recipe's weight operand (``--halo fp8:1 --gather fp8``), each rank prepares its rows
exactly as the forward would: cast to the compute dtype, the HALO-1/2 Hadamard rotation along the
input features, then quantization. Rows are local, so the rotation and per-row scales need no
communication; a per-tensor scale all-reduces the shards' absmax first. The gathered operand is
then the one the unsharded forward quantizes, bit for bit: the forward is unchanged. The backward's
input gradient needs W itself and gets the gathered weight, dequantized and rotated back (FSDP
gathers it again in low precision for the backward), as HQ-FSDP's backward has no bf16 weight.

Any other all-gather format is sent unrotated and dequantized after the gather (to the compute
dtype); the matmul then quantizes it to its own format as usual."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..quant.spec import QuantSpec
from .operand import NATIVE_DTYPES, Operand, quantize_operand, rotate, sign_hadamard
from .recipe import LowpRecipe, UNQUANTIZED

aten = torch.ops.aten

# name -> the all-gather's QuantSpec; the names are the presets whose weight operand they match
GATHER_FORMATS = {"fp8": "e4m3fn:tensor", "fp8row": "e4m3fn:channel", "int8": "int8:channel"}


def parse_gather(text) -> Optional[QuantSpec]:
    """The all-gather format: None for ``bf16`` (FSDP's own all-gather in the parameter dtype), a
    name of ``GATHER_FORMATS`` or a quant spec of E4M3 / E5M2 / INT8 with per-tensor or per-row
    scales, nearest-even rounding."""
    if isinstance(text, QuantSpec):
        spec = text
    elif not isinstance(text, str) or not text.strip():
        raise ValueError(f"an all-gather format is text like bf16, fp8, fp8row or int8, got {text!r}")
    elif text.strip().lower() in UNQUANTIZED:
        return None
    else:
        body = GATHER_FORMATS.get(text.strip().lower(), text.strip())
        try:
            spec = QuantSpec.parse(body)
        except ValueError as e:
            raise ValueError(f"all-gather format {text!r}: neither bf16, {', '.join(GATHER_FORMATS)} nor a quant "
                             f"spec ({e})") from None
    if str(spec.fmt) not in NATIVE_DTYPES or spec.granularity not in ("tensor", "channel", "token") \
            or spec.rounding != "nearest_even" or not spec.symmetric or spec.scale_method != "absmax":
        raise ValueError(f"all-gather format {spec}: accepted are e4m3fn, e5m2 or int8 with per-tensor or per-row "
                         f"(channel) absmax scales and nearest-even rounding ({', '.join(GATHER_FORMATS)}), or bf16")
    return spec


def matches_forward(spec: QuantSpec, recipe: Optional[LowpRecipe]) -> bool:
    """Whether ``spec`` is the recipe's weight operand format: the gathered weight then feeds the
    forward matmul as it is (never for a plain linear: ``recipe`` None)."""
    return recipe is not None and str(spec) == str(recipe.spec("w"))


def shard_operand(w: torch.Tensor, spec: QuantSpec, recipe: Optional[LowpRecipe],
                  tensor_amax: Callable[[torch.Tensor], torch.Tensor]) -> Operand:
    """The all-gather payload of one shard ``w`` (rows, in_features) in the compute dtype: rotated
    as the recipe's forward rotates W when ``spec`` is its weight format, then quantized with
    hardware codes. ``tensor_amax(local_amax)``: the whole tensor's absmax (an all-reduce across
    the shards) for a per-tensor scale."""
    gain = 1
    if matches_forward(spec, recipe) and recipe.level >= 1:
        w, gain = rotate(w, recipe.block)
    amax = tensor_amax(w.abs().amax().float()) if spec.granularity == "tensor" else None
    fast = recipe is None or recipe.backend != "emulate"   # emulate: lowbit's quantizer, as the forward
    return quantize_operand(w, spec, codes=True, gain=gain, fast=fast, amax=amax)


def _all_reduce_max(group) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch.distributed as dist

    def reduce(amax: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        return amax

    return reduce


class ShardedLowpWeight(torch.Tensor):
    """The master weight of a linear layer (FSDP2 makes it the local shard of a DTensor) whose
    FSDP2 all-gather sends ``gather``-format codes and per-row scales. Every other operation runs on
    the wrapped master tensor (the optimizer updates it in place); the few FSDP2 uses to shard and
    move it keep the wrapper."""

    _tensor: torch.Tensor
    _gather: QuantSpec
    _recipe: Optional[LowpRecipe]   # a LowpLinear's; None for a plain linear

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, gather: QuantSpec, recipe: Optional[LowpRecipe]):
        return torch.Tensor._make_wrapper_subclass(cls, tensor.size(), strides=tensor.stride(),
                                                   storage_offset=tensor.storage_offset(), dtype=tensor.dtype,
                                                   layout=tensor.layout, device=tensor.device,
                                                   requires_grad=tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor, gather: QuantSpec, recipe: Optional[LowpRecipe]):
        self._tensor, self._gather, self._recipe = tensor, gather, recipe
        self._payload: Optional[tuple] = None   # (key, codes, scales, gain) of the last all-gather

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"ShardedLowpWeight({self._tensor}, all-gather {self._gather})"

    def __tensor_flatten__(self):
        return ["_tensor"], (self._gather, self._recipe)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return ShardedLowpWeight(inner["_tensor"], *meta)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        seen = []

        def unwrap(t):
            if isinstance(t, cls):
                seen.append(t)
                return t._tensor
            return t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func._schema.is_mutable:
            # an optimizer step or a load: the next all-gather quantizes again (version counters
            # do not see in-place ops below a subclass's dispatch, so they cannot tell)
            for t in seen:
                t._payload = None
        if func not in _KEEP_SHARD_WRAPPER:
            return out
        return tree_map(lambda t: cls(t, seen[0]._gather, seen[0]._recipe) if isinstance(t, torch.Tensor) else t, out)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy) -> Tuple[tuple, tuple]:
        dtype = mp_policy.param_dtype or self._tensor.dtype
        # the weights change only at optimizer steps: the backward's all-gather reuses the forward's
        key = (dtype, self._tensor.data_ptr())
        if self._payload is None or self._payload[0] != key:
            op = shard_operand(self._tensor.to(dtype), self._gather, self._recipe, _all_reduce_max(mesh.get_group()))
            scales = op.scale.float().expand(op.values.shape[0], 1).contiguous()   # per tensor: repeated
            self._payload = (key, op.values, scales, op.gain)
        _, codes, scales, gain = self._payload
        return (codes, scales), (gain,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        codes, scales = all_gather_outputs
        if out is not None:
            # FSDP refilled the storage the first call's views look at: nothing to rebuild
            if out._codes.untyped_storage().data_ptr() != codes.untyped_storage().data_ptr():
                raise RuntimeError("HQ-FSDP: the all-gather buffers moved; the gathered weight cannot be refreshed")
            return
        (gain,) = metadata
        return GatheredLowpWeight(codes, scales, self._gather, gain, param_dtype), (codes, scales)


class GatheredLowpWeight(torch.Tensor):
    """An all-gathered weight (out_features, in_features) held as ``spec`` codes and per-row scales,
    rotated along the input features when ``gain`` > 1 (the Hadamard block). Its dtype is the
    parameter dtype the model sees; a ``LowpLinear`` takes the codes as its forward operand
    (``operand_for``), anything else sees the dequantized weight."""

    @staticmethod
    def __new__(cls, codes, scales, spec, gain, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, codes.size(), dtype=dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, gain: int, dtype: torch.dtype):
        self._codes, self._scales, self._spec, self._gain = codes, scales, spec, gain

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:   # a plain linear (or a LowpLinear switched off): dequantize, keep no copy
            x, weight, bias = (list(args) + [None, None])[:3]
            return _DequantizedLinear.apply(kwargs.get("input", x), kwargs.get("weight", weight),
                                            kwargs.get("bias", bias))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"GatheredLowpWeight({tuple(self.shape)}, {self._spec}, rotated={self._gain > 1})"

    def operand_for(self, recipe: LowpRecipe) -> Optional[Operand]:
        """The forward's weight operand under ``recipe`` (codes, scales, rotation gain) when this
        weight was gathered in the recipe's weight format; else None."""
        if not matches_forward(self._spec, recipe) or (self._gain > 1) != (recipe.level >= 1):
            return None
        scale = self._scales[0, 0] if self._spec.granularity == "tensor" else self._scales
        return Operand(self._codes, scale, self._spec, None, self._gain)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight the codes represent in ``dtype`` (default: this tensor's), rotated back to the
        input features' basis by a matmul in ``dtype``, as the forward rotates."""
        dtype = dtype or self.dtype
        v = (self._codes.float() * self._scales).to(dtype)
        if self._gain > 1:   # H H = b I for the +-1 Sylvester matrix, and /b is exact
            v = (v.reshape(-1, self._gain) @ sign_hadamard(self._gain, dtype, v.device)).reshape(v.shape)
            v = v / self._gain
        return v

    def _like(self, rows: int) -> "GatheredLowpWeight":
        return GatheredLowpWeight(self._codes[:rows], self._scales[:rows], self._spec, self._gain, self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        me = args[0] if args and isinstance(args[0], cls) else None
        if me is not None and func in (aten.detach.default, aten.alias.default):
            return me._like(me.shape[0])
        if me is not None and func is aten.as_strided.default:
            size, stride = list(args[1]), list(args[2])
            offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", 0)
            if len(size) == 2 and size[1] == me.shape[1] and stride == [me.shape[1], 1] and not offset:
                return me._like(size[0])   # FSDP trims the padded rows this way
        return func(*tree_map(lambda t: t.dequantize() if isinstance(t, cls) else t, args),
                    **tree_map(lambda t: t.dequantize() if isinstance(t, cls) else t, kwargs))


class _DequantizedLinear(torch.autograd.Function):
    """``F.linear`` with a gathered weight dequantized in the forward and again in the backward, in
    the compute dtype (autocast's where it is on): no dequantized copy lives from one to the other,
    so FSDP's freeing of the gathered codes after the forward saves the memory it should."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: GatheredLowpWeight, bias: Optional[torch.Tensor]):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            x = x.to(dtype)
            y = F.linear(x, weight.dequantize(dtype), None if bias is None else bias.to(dtype))
        ctx.weight, ctx.dtype, ctx.has_bias = weight, dtype, bias is not None
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (x,) = ctx.saved_tensors
        w = ctx.weight.dequantize(ctx.dtype)
        gy = gy.to(ctx.dtype)
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = (g2 @ w).reshape(*gy.shape[:-1], w.shape[1]) if ctx.needs_input_grad[0] else None
        gw = (g2.t() @ x.reshape(-1, x.shape[-1])).to(ctx.weight.dtype) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.weight = None
        return gx, gw, gb


# what FSDP2 does to a parameter while sharding it and making the DTensor of its shard; copies
# (state dicts, .cpu()) come out as plain tensors
_KEEP_SHARD_WRAPPER = {aten.detach.default, aten.alias.default, aten.empty_like.default, aten.new_zeros.default,
                       aten.slice.Tensor, aten.copy_.default, aten.view.default, aten.as_strided.default,
                       aten.split.Tensor}
