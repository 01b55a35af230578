"""The elementwise steps around the low-precision matmuls (scale-and-cast of an operand to hardware
codes, the INT8 dequantizing epilogue), each one pass over memory: compiled with torch.compile on
CUDA, eager elsewhere or where compilation fails (then once, with a warning)."""
from __future__ import annotations

import warnings

import torch

_COMPILED: dict = {}


def _cast_codes(a: torch.Tensor, s: torch.Tensor, fmax: float, is_int: bool, dtype: torch.dtype) -> torch.Tensor:
    y = a.float() / s
    if is_int:
        return torch.round(y).clamp(-fmax, fmax).to(dtype)   # round half to even, as lowbit's nearest_even
    return y.clamp(-fmax, fmax).to(dtype)                    # torch's float8 cast rounds to nearest even


def _int8_epilogue(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (acc.float() * sa * sb).to(dtype)


def _run(name: str, fn, *args):
    """``fn(*args)``, through torch.compile on CUDA."""
    if not args[0].is_cuda:
        return fn(*args)
    compiled = _COMPILED.get(name)
    if compiled is None:
        compiled = _COMPILED[name] = torch.compile(fn, dynamic=False)
    if compiled is not fn:
        try:
            return compiled(*args)
        except Exception as e:  # an inductor/triton failure must not stop training: eager is exact too
            warnings.warn(f"lowbit.lowp: torch.compile of {name} failed ({type(e).__name__}: {e}); running eager")
            _COMPILED[name] = fn
    return fn(*args)


def cast_codes(a: torch.Tensor, s: torch.Tensor, fmax: float, dtype: torch.dtype) -> torch.Tensor:
    """Hardware codes of ``a / s`` (float32 division; saturated; nearest-even): float8 or int8 ``dtype``."""
    return _run("cast_codes", _cast_codes, a, s, fmax, dtype == torch.int8, dtype)


def int8_epilogue(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``acc * sa * sb`` (int32 accumulators, float32 scales) in ``dtype``."""
    return _run("int8_epilogue", _int8_epilogue, acc, sa, sb, dtype)
