"""The low-precision linear layer: an autograd Function whose forward, input-gradient and
weight-gradient matmuls each take their operands in the recipe's formats, with HALO's Hadamard
rotations by level (``recipe.py`` names the three matmuls), and ``LowpLinear``, a drop-in
``nn.Linear`` that runs it.

Tokens are padded with zero rows to a multiple of 16 (the FP8 kernels' alignment) and, at HALO-2, of
the Hadamard block (the weight gradient is rotated along the tokens); zero rows change no product
and no absmax."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .gather import GatheredLowpWeight
from .matmul import emulated_mm, kernel_for, kernel_mm
from .operand import NATIVE_DTYPES, Operand, prepare_operand, prepare_pair
from .recipe import LowpRecipe, parse_recipe

ALIGN = 16


def choose_kernel(recipe: LowpRecipe, a_role: str, b_role: str, a: torch.Tensor, b_shape,
                  out_dtype: torch.dtype) -> Optional[str]:
    """The kernel (``matmul.KERNELS``) this matmul runs on under the recipe's backend, or None to emulate."""
    if recipe.backend == "emulate":
        return None
    sa, sb = recipe.spec(a_role), recipe.spec(b_role)
    kind = kernel_for(sa, sb, a.shape[0], a.shape[1], b_shape[0], a.device, out_dtype)
    if recipe.backend == "kernel":
        if kind is None:
            raise ValueError(f"backend='kernel': no low-precision kernel takes {sa} x {sb} at shape "
                             f"{tuple(a.shape)} x {tuple(b_shape)}; FP8 (e4m3fn/e5m2, per tensor, dims multiple "
                             "of 16) and INT8 (per tensor/row) are supported; use backend='auto' to emulate the rest")
        return kind
    return kind if a.is_cuda else None   # auto: the CPU emulates


def _as_codes(op: Operand, codes: bool) -> Operand:
    """The same operand holding hardware codes (``codes``) or float32 values: an exact conversion."""
    is_codes = op.values.dtype in NATIVE_DTYPES.values()
    if codes == is_codes:
        return op
    dtype = NATIVE_DTYPES[str(op.spec.fmt)]
    return replace(op, values=op.values.to(dtype) if codes else op.values.float())


def lowp_mm(a: Union[torch.Tensor, Operand], b: Union[torch.Tensor, Operand], recipe: LowpRecipe, a_role: str,
            b_role: str, level: int, out_dtype: torch.dtype) -> Tuple[torch.Tensor, Operand, Operand]:
    """``(Q(a R) Q(b R)^T / b, Q(a R), Q(b R))`` for operands (rows, inner) sharing the inner
    dimension, ``a`` in the format of ``a_role`` ('x', 'w' or 'g') and ``b`` in that of ``b_role``;
    ``R`` the +-1 block Hadamard matrix of the inner dimension when the recipe's level is at least
    ``level``. Either may be an operand quantized before (reused as it is)."""
    block = recipe.block if recipe.level >= level else 1
    a_t = a.values if isinstance(a, Operand) else a
    b_shape = b.values.shape if isinstance(b, Operand) else b.shape
    kind = choose_kernel(recipe, a_role, b_role, a_t, b_shape, out_dtype)
    fast = recipe.backend != "emulate"   # emulate: lowbit's quantizers for every format
    qa, qb = (_as_codes(t, kind is not None) if isinstance(t, Operand)
              else prepare_operand(t, recipe.spec(role), block, codes=kind is not None, fast=fast)
              for t, role in ((a, a_role), (b, b_role)))
    y = emulated_mm(qa, qb).to(out_dtype) if kind is None else kernel_mm(qa, qb, kind, out_dtype)
    return y, qa, qb


def paired(recipe: LowpRecipe, role: str) -> bool:
    """Whether X, W or E_Y is quantized once for both matmuls it feeds (``operand.prepare_pair``):
    one deterministic scale for the whole tensor, and the second matmul takes it unrotated (X and
    E_Y at HALO-0/1: the weight gradient rotates only at HALO-2; W at HALO-0: HALO-1 rotates the
    input gradient's W along the other dimension)."""
    spec = recipe.spec(role)
    top = 0 if role == "w" else 1
    return recipe.level <= top and spec.granularity == "tensor" and "stochastic" not in spec.rounding


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else F.pad(t, (0, 0, 0, rows - t.shape[0]))


def padded_tokens(tokens: int, recipe: LowpRecipe) -> int:
    """Tokens padded to the kernels' alignment, the weight gradient's group/block size and, at
    HALO-2, the Hadamard block."""
    m = math.lcm(ALIGN, recipe.inner_multiple(("g", "x")), recipe.block if recipe.level == 2 else 1)
    return -(-tokens // m) * m


class LowpMatmuls(torch.autograd.Function):
    """``Y = X W^T`` with the three matmuls in low precision; X is (tokens, in_features). The operands
    are rotated and quantized from ``compute_dtype`` (bf16 under autocast, as nn.Linear would cast
    them; float32 otherwise)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: LowpRecipe, compute_dtype: torch.dtype):
        x = x.to(compute_dtype)
        ctx.recipe, ctx.tokens, ctx.weight_dtype, ctx.dtype = recipe, x.shape[0], weight.dtype, compute_dtype
        ctx.gathered = None
        if isinstance(weight, GatheredLowpWeight):   # HQ-FSDP: the all-gather delivered codes
            gathered = weight.operand_for(recipe)
            w = weight.dequantize(compute_dtype) if gathered is None else gathered
        else:
            w = weight.to(compute_dtype)
        rows = padded_tokens(x.shape[0], recipe)
        fast, block = recipe.backend != "emulate", recipe.block if recipe.level >= 1 else 1
        # X (and W at HALO-0) quantized for the backward in the same pass as for the forward
        # (``paired``); the codes are kept instead of the tensor (smaller, too)
        a, ctx.qx = _pad_rows(x, rows), None
        if paired(recipe, "x") and ctx.needs_input_grad[1]:
            a, ctx.qx = prepare_pair(a, recipe.spec("x"), block, fast)
        b, ctx.qw = w, None
        if paired(recipe, "w") and ctx.needs_input_grad[0] and not isinstance(w, Operand):
            b, ctx.qw = prepare_pair(w, recipe.spec("w"), 1, fast)
        y, _, qw = lowp_mm(a, b, recipe, "x", "w", 1, compute_dtype)
        if isinstance(w, Operand) and paired(recipe, "w"):   # the all-gathered codes, transposed
            ctx.qw = replace(qw, values=qw.values.t().contiguous())
        if isinstance(weight, GatheredLowpWeight) and ctx.qw is None:
            # FSDP frees the gathered codes after the forward and gathers them again for the backward
            ctx.gathered, w = weight, None
        ctx.save_for_backward(None if ctx.qx is not None else x, None if ctx.qw is not None else w)
        return y[: x.shape[0]]

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, w = ctx.saved_tensors
        if ctx.gathered is not None:
            w = ctx.gathered.dequantize(ctx.dtype)
        recipe = ctx.recipe
        gy = _pad_rows(gy.to(ctx.dtype), padded_tokens(ctx.tokens, recipe))
        gx = gw = None
        g, g_t = gy, gy.t()
        if all(ctx.needs_input_grad[:2]) and paired(recipe, "g"):   # E_Y for both gradients in one pass
            g, g_t = prepare_pair(gy, recipe.spec("g"), recipe.block if recipe.level >= 1 else 1,
                                  recipe.backend != "emulate")
        if ctx.needs_input_grad[0]:
            # E_X = E_Y W: inner dimension = the output features
            b = ctx.qw if ctx.qw is not None else w.t()
            gx = lowp_mm(g, b, recipe, "g", "w", 1, ctx.dtype)[0][: ctx.tokens]
        if ctx.needs_input_grad[1]:
            # E_W = E_Y^T X: inner dimension = the tokens
            b = ctx.qx if ctx.qx is not None else _pad_rows(x, gy.shape[0]).t()
            # written in the weight's dtype where the kernels write it (no float32 round trip)
            out = ctx.weight_dtype if ctx.weight_dtype in (torch.bfloat16, torch.float16) else torch.float32
            gw = lowp_mm(g_t, b, recipe, "g", "x", 2, out)[0].to(ctx.weight_dtype)
        ctx.qx = ctx.qw = ctx.gathered = None
        return gx, gw, None, None


def lowp_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: LowpRecipe
                ) -> torch.Tensor:
    """``F.linear`` with its three matmuls in ``recipe``'s formats. The output dtype is autocast's
    where autocast is on (bf16 on CUDA in training), else ``x``'s."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    recipe.check_layer(weight.shape[1], weight.shape[0])
    dev = x.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    lead = x.shape[:-1]
    with torch.autocast(dev, enabled=False):
        y = LowpMatmuls.apply(x.reshape(-1, x.shape[-1]), weight, recipe, compute)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y.reshape(*lead, weight.shape[0])


class LowpLinear(nn.Linear):
    """``nn.Linear`` whose matmuls (forward and both gradients) run in ``recipe``'s formats; the same
    parameters (``weight``, ``bias``) and state-dict keys as the layer it replaces."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recipe,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = parse_recipe(recipe)
        if self.recipe is None:
            raise ValueError("LowpLinear needs a low-precision recipe; leave the layer an nn.Linear for bf16")
        self.recipe.check_layer(in_features, out_features)
        self.lowp = True   # False: plain F.linear (evaluating the trained master weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe) -> "LowpLinear":
        """A LowpLinear sharing ``linear``'s parameter tensors (the optimizer and any tying see no change)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe=recipe, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lowp:
            return F.linear(x, self.weight, self.bias)
        return lowp_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.recipe.describe()}"
