"""``A B^T`` of two quantized operands (see ``operand.py``): emulated in float32 for any format, or on
the hardware's low-precision units: FP8 through ``torch._scaled_mm``, INT8 through lowbit's Triton GEMM
with the scales fused (``kernels/triton_int8_mm.py``; ``torch._int_mm`` and a rescaling pass where
Triton is missing or ``INT8_FUSED_ON`` leaves the device out: the same bits).

Emulation: per-tensor and per-row scales factor out of the sum, so the element-grid values are
multiplied and accumulated in float32 and the scales applied after, as the hardware does; group
scales are applied to each operand first (a group-scaled matmul is a sum of per-group products)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import kernels
from ..formats import FloatFormat, IntFormat
from .fused import int8_epilogue
from .operand import NATIVE_DTYPES, Operand

KERNELS = ("fp8", "fp8_row", "int8")
INT8_FUSED_ON = ("cuda",)   # devices whose INT8 matmuls run lowbit's Triton GEMM with the scales fused



def _factored_scale(op: Operand) -> Optional[torch.Tensor]:
    return None if op.scale is None or op.group is not None else op.scale


_BF16_TINY = 2.0 ** -133   # bf16's smallest subnormal


def bf16_exact(op: Operand) -> bool:
    """Whether the values ``emulated_mm`` multiplies (element-grid values under a per-tensor or
    per-row scale) are all exact in bfloat16: integers of at most 9 bits, minifloats with at most
    7 mantissa bits inside bf16's range (E4M3, E5M2, E3M2, E2M1 ...)."""
    if _factored_scale(op) is None:
        return False   # group or block scales: dequantized values, not grid values
    fmt = op.spec.fmt
    if isinstance(fmt, IntFormat):
        return fmt.width <= 9 and fmt.frac == 0
    if isinstance(fmt, FloatFormat):
        return fmt.man <= 7 and fmt.max < 2.0 ** 127 and fmt.min_subnormal >= _BF16_TINY
    return False


def _mm_float32(va: torch.Tensor, vb: torch.Tensor, exact_bf16: bool) -> torch.Tensor:
    """``va @ vb.T`` with float32 accumulation and output. On CUDA, operands exact in bf16 run as a
    bf16 GEMM with a float32 output (the products are exact either way, the sums float32): the
    emulation then costs what a bf16 matmul costs."""
    if exact_bf16 and va.is_cuda:
        try:
            return torch.mm(va.bfloat16(), vb.bfloat16().T, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):   # a torch without mm(out_dtype=)
            pass
    return va @ vb.T


def emulated_mm(a: Operand, b: Operand) -> torch.Tensor:
    """``A B^T`` in float32 (rows_a, rows_b) from the operands' exact values."""
    va = a.values.float() if _factored_scale(a) is not None or a.scale is None else a.dequantize()
    vb = b.values.float() if _factored_scale(b) is not None or b.scale is None else b.dequantize()
    y = _mm_float32(va, vb, bf16_exact(a) and bf16_exact(b))
    if a.gain * b.gain > 1:
        y = y * (1.0 / math.sqrt(a.gain * b.gain))   # both rotated by H_b: the product carries b
    sa, sb = _factored_scale(a), _factored_scale(b)
    if sa is not None:
        y = y * sa
    if sb is not None:
        y = y * sb.reshape(1, -1)
    return y


def kernel_for(a_spec, b_spec, rows_a: int, inner: int, rows_b: int, device: torch.device,
               out_dtype: torch.dtype) -> Optional[str]:
    """Which low-precision kernel computes this matmul (one of ``KERNELS``), or None where only
    emulation can: FP8 needs E4M3/E5M2 operands (not both E5M2), per-tensor scales (per-row for
    E4M3 x E4M3 on CUDA, whose kernel writes bf16: a float32 output is that bf16 result, upcast), round-to-nearest or stochastic rounding alike (the rounding
    happens before), every dimension a multiple of 16; INT8 needs int8 operands with per-tensor or
    per-row scales, more than 16 rows and the other dimensions multiples of 8."""
    fa, fb = str(a_spec.fmt), str(b_spec.fmt)
    if fa not in NATIVE_DTYPES or fb not in NATIVE_DTYPES:
        return None
    gran = {a_spec.granularity, b_spec.granularity}
    if fa == fb == "int8":
        if gran <= {"tensor", "channel", "token"} and rows_a > 16 and inner % 8 == 0 and rows_b % 8 == 0:
            return "int8"
        return None
    if "int8" in (fa, fb) or fa == fb == "e5m2" or rows_a % 16 or inner % 16 or rows_b % 16:
        return None
    if gran == {"tensor"}:
        return "fp8"
    if gran <= {"channel", "token"} and fa == fb == "e4m3fn" and device.type == "cuda":
        return "fp8_row"
    return None


def kernel_mm(a: Operand, b: Operand, kind: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``A B^T`` on the low-precision units; ``a`` and ``b`` hold hardware codes."""
    inv_gain = 1.0 / math.sqrt(a.gain * b.gain)   # exact: equal power-of-two blocks
    if kind == "int8":
        mod = kernels.optional("triton_int8_mm") if a.values.device.type in INT8_FUSED_ON else None
        if mod is not None:   # the same bits as _int_mm + int8_epilogue, without the int32 round trip
            return mod.int8_scaled_mm(a.values.contiguous(), b.values.contiguous(), a.scale * inv_gain, b.scale,
                                      out_dtype)
        acc = torch._int_mm(a.values.contiguous(), b.values.contiguous().t())   # exact int32 accumulation
        return int8_epilogue(acc, a.scale * inv_gain, b.scale.reshape(1, -1), out_dtype)
    if kind == "fp8":
        sa, sb = a.scale.float().reshape(()) * inv_gain, b.scale.float().reshape(())
    elif kind == "fp8_row":
        sa, sb = a.scale.float().reshape(-1, 1) * inv_gain, b.scale.float().reshape(1, -1)
    else:
        raise ValueError(f"unknown kernel {kind!r}; accepted: {', '.join(KERNELS)}")
    # the row-scaled FP8 GEMM writes bf16 only (Hopper's cuBLASLt/CUTLASS path)
    kernel_out = torch.bfloat16 if kind == "fp8_row" else out_dtype
    y = torch._scaled_mm(a.values.contiguous(), b.values.contiguous().t(), scale_a=sa, scale_b=sb,
                         out_dtype=kernel_out)
    return y.to(out_dtype)
