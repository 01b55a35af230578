"""Backends that do the arithmetic. ``reference`` is the oracle; faster backends must match its bits
for every deterministic rounding mode. Dispatch is by device and format; users never choose by hand
unless they pass ``backend=``.

backends:
  auto       CUDA tensors -> ``triton`` when Triton imports; CPU tensors -> ``cpu_fast``; each falls
             back to the reference for work it does not claim (float64 tensors, codebooks in the
             stochastic modes or inside blocks, fnu formats, formats whose values float32 cannot
             hold exactly).
  reference  the float64 oracle (kernels/reference.py), any device.
  cpu_fast   float32 bit arithmetic in torch (kernels/cpu_fast.py), compiled with torch.compile for
             large tensors; falls back to the reference for what it does not claim.
  triton     fused Triton kernels (kernels/triton_quant.py); CUDA tensors only, raises elsewhere.

encode / decode take the same backends: ``codes`` (CPU) and ``triton_codes`` (CUDA) write codes
straight from the rounding kernels and decode by table look-up; ``codebook_fast`` (and its Triton
kernel in triton_codes) handles codebooks in the deterministic modes.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from ..formats import BlockFormat, ElementFormat
from . import codes, cpu_fast, reference

BACKENDS = ("auto", "reference", "cpu_fast", "triton")

_triton_state = {"mod": None, "error": None}


@functools.lru_cache(maxsize=None)
def optional(name: str):
    """``lowbit.kernels.<name>``, imported on first use; None where it does not import (no Triton, a
    Triton without a backend for this machine, ...)."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except Exception:
        return None


def triton_backend():
    """The Triton module, imported on first use (never on machines without Triton and CUDA)."""
    if _triton_state["mod"] is None and _triton_state["error"] is None:
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            from . import triton_quant
            _triton_state["mod"] = triton_quant
        except Exception as e:  # ImportError, no driver, ...
            _triton_state["error"] = f"{type(e).__name__}: {e}"
    return _triton_state["mod"]


def _triton_or_raise():
    mod = triton_backend()
    if mod is None:
        raise RuntimeError(f"backend='triton' is not available here ({_triton_state['error']}); "
                           "it needs a CUDA device and the triton package. Use backend='auto'.")
    return mod


def _fast_backend(x: torch.Tensor, backend: str):
    """The module that should try first (triton_quant, cpu_fast) or None for the reference only."""
    _check_backend(backend)
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        if backend == "triton":
            mod = _triton_or_raise()
            if not x.is_cuda:
                raise RuntimeError("backend='triton' needs a CUDA tensor; move it with x.cuda() or use backend='auto'")
            return mod
        return triton_backend()
    if backend in ("auto", "cpu_fast"):
        return cpu_fast
    return None


def quantize_element(x: torch.Tensor, fmt: ElementFormat, mode: str, overflow: str, generator=None,
                     sr_bits: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Round every element of float tensor ``x`` to ``fmt``; same dtype out. A fast backend returns
    None for what it does not claim, and the reference answers instead."""
    mod = _fast_backend(x, backend)
    out = mod.quantize_element(x, fmt, mode, overflow, generator, sr_bits) if mod is not None else None
    if out is None:
        out = reference.round_element(x.double(), fmt, mode, overflow, generator, sr_bits).to(x.dtype)
    return out


def quantize_block(x: torch.Tensor, fmt: BlockFormat, mode: str, axis: int, generator=None,
                   sr_bits: Optional[int] = None, backend: str = "auto",
                   tensor_amax: Optional[float] = None) -> torch.Tensor:
    """Block-format quantize along ``axis``; same dtype out. ``tensor_amax`` (a float32 number,
    formats with a tensor scale): the amax of the tensor scale, given instead of measured."""
    mod = _fast_backend(x, backend)
    out = None
    if mod is not None:
        out = mod.quantize_block(x, fmt, mode, axis, generator, sr_bits, tensor_amax=tensor_amax)
    if out is None:
        out = reference.quantize_block(x, fmt, mode, axis, generator, sr_bits,
                                       tensor_amax=tensor_amax)[0].to(x.dtype)
    return out


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")


# --- packed path: encode / decode -------------------------------------------------------------------

def _codes_backend(x: torch.Tensor, backend: str):
    """The module whose fused encode/decode should try first (codes on the CPU, triton_codes on
    CUDA), or None for the reference."""
    mod = _fast_backend(x, backend)
    if mod is None:
        return None
    if mod is cpu_fast:
        return codes
    from . import triton_codes
    return triton_codes


def encode_element(x: torch.Tensor, fmt: ElementFormat, mode: str, overflow: str, generator=None,
                   sr_bits: Optional[int] = None, backend: str = "auto") -> Optional[tuple]:
    """(codes, whether x holds nan) from a fast backend, or None: the caller then uses the reference.
    The nan answer is only computed for formats without a nan code (else False)."""
    mod = _codes_backend(x, backend)
    return None if mod is None else mod.encode_element(x, fmt, mode, overflow, generator, sr_bits)


def encode_block(x: torch.Tensor, fmt: BlockFormat, mode: str, axis: int, generator=None,
                 sr_bits: Optional[int] = None, backend: str = "auto",
                 tensor_amax: Optional[float] = None) -> Optional[tuple]:
    """(element codes, scale codes, tensor scale or None) from a fast backend, or None."""
    mod = _codes_backend(x, backend)
    return None if mod is None else mod.encode_block(x, fmt, mode, axis, generator, sr_bits, tensor_amax)


def decode_element(c: torch.Tensor, fmt: ElementFormat, dtype: torch.dtype,
                   backend: str = "auto") -> Optional[torch.Tensor]:
    mod = _codes_backend(c, backend)
    return None if mod is None else mod.decode_element(c, fmt, dtype)


def decode_block(c: torch.Tensor, scodes: torch.Tensor, ts, fmt: BlockFormat, axis: int, dtype: torch.dtype,
                 backend: str = "auto") -> Optional[torch.Tensor]:
    mod = _codes_backend(c, backend)
    return None if mod is None else mod.decode_block(c, scodes, ts, fmt, axis, dtype)
