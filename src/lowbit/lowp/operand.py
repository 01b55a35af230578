"""Matmul operands in a low-precision format: a 2-D tensor whose last dimension is the matmul's inner
(reduced) dimension, rotated by a block Hadamard matrix and rounded by lowbit's quantizers.

Pure tensor functions; no autograd (the linear layer's Function calls them)."""
from __future__ import annotations

from dataclasses import dataclass, replace
import math
from typing import Optional, Tuple

import torch

from .. import kernels
from ..emulate import quantize
from ..formats import BlockFormat
from ..kernels.scalar_div import div_scalar
from ..quant.spec import QuantSpec
from .fused import cast_codes
from ..transforms.hadamard import hadamard_matrix

# element formats the hardware multiplies natively, by name
NATIVE_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "int8": torch.int8}
FUSED_ON = ("cuda",)   # device types whose operands go to the fused Triton kernel (tests add "cpu" interpreted)
ROTATE_ON = ("cuda",)  # device types whose rotations alone (emulated formats) run as one Triton pass


def inner_block(n: int, block: int) -> int:
    """The Hadamard block used on an inner dimension of size ``n``: ``block``, or the largest power
    of two dividing ``n`` when ``block`` does not (a size with an odd factor mixes within its
    power-of-two runs)."""
    return min(int(block), n & -n)


_SIGN_MATRICES: dict = {}


def sign_hadamard(b: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``b`` with entries +-1 (exact in every float dtype)."""
    key = (b, dtype, str(device))
    if key not in _SIGN_MATRICES:
        H = hadamard_matrix(b, b, dtype=torch.float64) * math.sqrt(b)
        _SIGN_MATRICES[key] = H.round().to(device=device, dtype=dtype)
    return _SIGN_MATRICES[key]


def butterfly(a: torch.Tensor, b: int) -> torch.Tensor:
    """``a @ blockdiag(H_b)`` over the last dimension (``H_b`` the unnormalised Sylvester matrix, b a
    power of two dividing it) in float32 as log2(b) add/subtract stages of half-width 1, 2, ..., b/2
    (lower half ``a + c``, upper ``a - c``): a fixed order of float32 roundings, the one the fused
    kernel (``kernels/triton_operand.py``) performs, so both give the same bits."""
    y = a.detach().float().reshape(-1, b).contiguous()   # operands carry no autograd (see the module docstring)
    spare, h = None, 1
    while h < b:
        out = torch.empty_like(y) if spare is None else spare
        v, o = y.view(-1, b // (2 * h), 2, h), out.view(-1, b // (2 * h), 2, h)
        torch.add(v[:, :, 0], v[:, :, 1], out=o[:, :, 0])
        torch.sub(v[:, :, 0], v[:, :, 1], out=o[:, :, 1])
        spare = None if h == 1 else y   # two buffers in turn, never ``a``'s own storage
        y, h = out, 2 * h
    return y.reshape(a.shape)


def rotate(a: torch.Tensor, block: int) -> Tuple[torch.Tensor, int]:
    """``(a @ blockdiag(H_b), b)`` over the last dimension with ``H_b`` the +-1 Hadamard matrix of
    order ``b = inner_block(n, block)``, in float32 (``butterfly``, or the same stages in one Triton
    pass on the devices of ``ROTATE_ON``; ``a`` unchanged when b < 2).
    ``H_b H_b^T = b I``: rotating both operands of a matmul multiplies the product by ``b``, which
    the matmul divides out exactly (a power of two)."""
    b = inner_block(a.shape[-1], block)
    if b < 2:
        return a.contiguous(), 1
    if a.dim() == 2 and a.device.type in ROTATE_ON:
        mod = fused_kernels()
        if mod is not None and mod.supports(a, b):
            return mod.rotate(a, b), b   # the same stages in one Triton pass
    return butterfly(a, b), b


@dataclass
class Operand:
    """A quantized operand. ``values``: the element-grid values in units of ``scale`` (float32), or
    the hardware codes (float8 / int8 dtypes) of the same values; block formats keep their own block
    scales, so their ``values`` are the dequantized values and ``scale`` is None. ``scale``: ``()``
    per tensor, ``(rows, 1)`` per row, ``(rows, groups)`` per group of ``group`` inner elements."""

    values: torch.Tensor
    scale: Optional[torch.Tensor]
    spec: QuantSpec
    group: Optional[int] = None
    gain: int = 1   # the Hadamard block the operand was rotated with (its product carries this factor)

    def dequantize(self) -> torch.Tensor:
        """The represented values, float32 (``values * scale``)."""
        v = self.values.float()
        if self.scale is None:
            return v
        if self.group is not None:
            rows, n = v.shape
            return (v.reshape(rows, -1, self.group) * self.scale.unsqueeze(-1)).reshape(rows, n)
        return v * self.scale


def _amax_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """absmax / format max, 1 where the slice is all zero (so it stays zero)."""
    return torch.where(amax > 0, div_scalar(amax, fmax), torch.ones_like(amax))


def quantize_operand(a: torch.Tensor, spec: QuantSpec, codes: bool = False, gain: int = 1,
                     fast: bool = True, amax: Optional[torch.Tensor] = None) -> Operand:
    """Round ``a`` (rows, inner) to ``spec`` with scales along the inner dimension (float32 maths;
    ``gain``: the rotation's block, carried to the matmul).

    ``codes``: return hardware codes (the float8/int8 dtypes of ``NATIVE_DTYPES``) instead of float32
    grid values. ``fast``: formats of ``NATIVE_DTYPES`` in round-to-nearest-even are rounded by
    torch's own saturating cast, bit for bit lowbit's rounding (tests check it) at memory speed on
    every device; ``fast=False`` and every other format and rounding go through lowbit's quantizer.
    ``amax``: the absmax of a per-tensor scale when ``a`` is one shard of the tensor (HQ-FSDP)."""
    if a.dim() != 2:
        raise ValueError(f"a matmul operand is 2-D (rows, inner), got shape {tuple(a.shape)}")
    fmt = spec.fmt
    if isinstance(fmt, BlockFormat):
        return Operand(quantize(a.float(), fmt, spec.rounding, axis=-1), None, spec, gain=gain)
    rows, n = a.shape
    group = None
    # amax of the operand's own values (bf16 values are exact in float32: the same on every path)
    if spec.granularity == "tensor":
        s = _amax_scale((a.abs().amax() if amax is None else amax).float(), fmt.max)
    elif spec.granularity in ("channel", "token"):
        s = _amax_scale(a.abs().amax(dim=1, keepdim=True).float(), fmt.max)
    else:
        group = spec.group_size
        if n % group:
            raise ValueError(f"groups of {group} do not divide the inner dimension {n} of this operand; use a "
                             f"group size dividing {n}, per-row ('channel') or per-tensor scales")
        s = _amax_scale(a.reshape(rows, n // group, group).abs().amax(dim=-1).float(), fmt.max)
    dtype = NATIVE_DTYPES.get(str(fmt))
    if dtype is not None and fast and group is None and spec.rounding == "nearest_even":
        c = cast_codes(a, s, float(fmt.max), dtype)
        return Operand(c if codes else c.float(), s, spec, group, gain)
    a = a.float()
    y = a / s if group is None else (a.reshape(rows, -1, group) / s.unsqueeze(-1)).reshape(rows, n)
    q = quantize(y, fmt, spec.rounding)
    return Operand(q.to(dtype) if codes and dtype is not None else q, s, spec, group, gain)


def fused_kernels():
    """``kernels.triton_operand``, imported on first use; None where Triton does not import."""
    return kernels.optional("triton_operand")


def fusable(a: torch.Tensor, spec: QuantSpec, block: int) -> bool:
    """Whether ``prepare_operand`` sends this operand to the fused kernel: a device of ``FUSED_ON``
    with Triton, a format of ``NATIVE_DTYPES`` in nearest-even rounding, per-tensor or per-row scales."""
    if a.device.type not in FUSED_ON or str(spec.fmt) not in NATIVE_DTYPES or spec.rounding != "nearest_even":
        return False
    if spec.granularity not in ("tensor", "channel", "token"):
        return False
    mod = fused_kernels()
    return mod is not None and mod.supports(a, block)


def prepare_operand(a: torch.Tensor, spec: QuantSpec, block: int = 1, codes: bool = False,
                    fast: bool = True) -> Operand:
    """``quantize_operand(rotate(a, block))`` (``block`` 1: no rotation): on CUDA, for hardware
    codes of E4M3/E5M2/INT8 with per-tensor or per-row scales, one fused Triton kernel that reads
    ``a`` through its strides (a transposed view is not copied) and gives the same bits."""
    if a.dim() != 2:
        raise ValueError(f"a matmul operand is 2-D (rows, inner), got shape {tuple(a.shape)}")
    b = max(1, inner_block(a.shape[1], block))
    if codes and fast and fusable(a, spec, b):
        c, s, _, _ = fused_kernels().prepare_codes(a, float(spec.fmt.max), NATIVE_DTYPES[str(spec.fmt)], b,
                                                   per_row=spec.granularity != "tensor")
        return Operand(c, s, spec, None, b)
    if b > 1:
        a, b = rotate(a, b)
    return quantize_operand(a, spec, codes=codes, gain=b, fast=fast)


def prepare_pair(a: torch.Tensor, spec: QuantSpec, block: int = 1, fast: bool = True) -> Tuple[Operand, Operand]:
    """The two operands made from ``a`` (rows, inner) with per-tensor scales when it feeds two
    matmuls: ``prepare_operand(a, spec, block)`` (rotated along the inner dimension) and the
    unrotated ``a`` transposed (inner, rows), for the matmul reducing over the rows (X for Y and E_W,
    E_Y for E_X and E_W, at HALO-0/1; at block 1 the same codes, transposed). Hardware codes for
    E4M3/E5M2/INT8 (``fast``), float32 grid values otherwise. On CUDA one fused pass writes both."""
    if spec.granularity != "tensor":
        raise ValueError(f"an operand shared by two matmuls needs one scale for the whole tensor, got {spec}")
    codes = fast and str(spec.fmt) in NATIVE_DTYPES
    b = max(1, inner_block(a.shape[1], block))
    if codes and fusable(a, spec, b):
        c, s, ct, st = fused_kernels().prepare_codes(a, float(spec.fmt.max), NATIVE_DTYPES[str(spec.fmt)], b,
                                                     emit_plain_transposed=True)
        return Operand(c, s, spec, None, b), Operand(ct, st, spec)
    op = prepare_operand(a, spec, b, codes=codes, fast=fast)
    if b > 1:
        return op, prepare_operand(a.t(), spec, 1, codes=codes, fast=fast)
    return op, replace(op, values=op.values.t().contiguous())
