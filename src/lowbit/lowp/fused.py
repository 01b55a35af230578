"""The elementwise steps around the low-precision matmuls (scale-and-cast of an operand to hardware
codes, the INT8 dequantizing epilogue), each one pass over memory: compiled with torch.compile on
CUDA, eager elsewhere or where compilation fails (then once, with a warning)."""
from __future__ import annotations

import warnings

import torch

_COMPILED: dict = {}
COMPILE_ON = ("cuda",)   # device types whose calls are compiled (tests add "cpu")


def _cast_codes(y: torch.Tensor, fmax: float, is_int: bool, dtype: torch.dtype) -> torch.Tensor:
    if is_int:
        y = torch.round(y)                   # half to even, as lowbit's nearest_even
    return y.clamp_(-fmax, fmax).to(dtype)   # saturate; torch's float8 cast rounds to nearest even


def _int8_epilogue(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (acc.float() * sa * sb).to(dtype)


def _run(key: tuple, fn, *args):
    """``fn(*args)``, through torch.compile on CUDA: one compiled function per ``key`` (the
    constants baked into ``fn``), so the tensors' dtypes and ranks are all that vary per entry and
    dynamo's recompilation limit is never reached."""
    if args[0].device.type not in COMPILE_ON:
        return fn(*args)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = torch.compile(fn, dynamic=True)
    if compiled is not _EAGER:
        try:
            return compiled(*args)
        except Exception as e:  # an inductor/triton failure must not stop training: eager is exact too
            warnings.warn(f"lowbit.lowp: torch.compile of {key[0]} failed ({type(e).__name__}: {e}); running eager")
            _COMPILED[key] = _EAGER
    return fn(*args)


_EAGER = object()


def cast_codes(a: torch.Tensor, s: torch.Tensor, fmax: float, dtype: torch.dtype) -> torch.Tensor:
    """Hardware codes of ``a / s`` (correctly rounded float32 division; saturated; nearest-even):
    float8 or int8 ``dtype``."""
    is_int = dtype == torch.int8
    # The division stays eager: inductor's Triton code divides with the approximate ``div.full.f32``
    # on NVIDIA GPUs, which moves values across rounding boundaries (measured: INT8 codes on an
    # H100 differed from lowbit's); torch's own CUDA division is correctly rounded.
    y = a.float() / s
    return _run(("cast_codes", dtype, fmax), lambda y: _cast_codes(y, fmax, is_int, dtype), y)


def int8_epilogue(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``acc * sa * sb`` (int32 accumulators, float32 scales) in ``dtype``."""
    return _run(("int8_epilogue", dtype), lambda acc, sa, sb: _int8_epilogue(acc, sa, sb, dtype), acc, sa, sb)
