"""JAX front end: ``lowbit.jax.quantize`` takes and returns jax arrays, works under ``jax.jit`` and
``jax.vmap``, and has a straight-through gradient so ``jax.grad`` works through it.

The arithmetic is lowbit's own (the torch reference/dispatch of :func:`lowbit.quantize`), run on the host
through ``jax.pure_callback``; the results are therefore bit-identical to ``lowbit.quantize`` on the same
values. The callback moves the array to host memory and back, so this is for correctness experiments and
for small-to-medium tensors, not a fast device kernel.

This module is imported only on request (``import lowbit.jax``); ``import lowbit`` never imports JAX.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

try:
    import jax
    import jax.numpy as jnp
except ImportError as e:  # pragma: no cover - exercised only without jax
    raise ImportError("lowbit.jax needs JAX: pip install 'lowbit[jax]' (or pip install jax)") from e
import ml_dtypes
import numpy as np
import torch

from . import emulate
from .formats import BlockFormat, format as parse_format
from .rounding import STOCHASTIC_MODES, check_overflow, check_rounding

__all__ = ["quantize", "encode", "decode", "EncodedArray"]

_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
          np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


# --- host side: numpy <-> torch without changing a bit ----------------------------------------------

def _to_torch(x: np.ndarray) -> torch.Tensor:
    x = np.array(x, copy=True)  # writable, contiguous
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@contextlib.contextmanager
def _ieee_subnormals():
    """XLA runs host callbacks on CPU threads with flush-to-zero / denormals-are-zero set: float32
    subnormals (bf16's smallest values, say) would silently read and compute as 0. Turn IEEE
    behaviour back on for lowbit's work and restore the thread's mode afterwards."""
    tiny = np.array([2.0**-140], dtype=np.float32)
    flushed = bool((tiny * np.float32(1.0))[0] == 0)
    if flushed:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(True)


def _check_dtype(x) -> torch.dtype:
    dt = np.dtype(x.dtype)
    if dt not in _TORCH:
        raise TypeError(f"lowbit.jax.quantize accepts float16, bfloat16, float32 and float64 arrays, got "
                        f"{dt}; convert with x.astype(jnp.float32)")
    return _TORCH[dt]


def _seed(key, mode: str):
    """A uint32 seed drawn from ``key`` (stochastic modes), else a constant 0."""
    if mode not in STOCHASTIC_MODES:
        return jnp.zeros((), jnp.uint32)
    if key is None:
        raise ValueError(f"rounding={mode!r} under JAX needs key=jax.random.key(seed): JAX has no global "
                         "random state, and a fixed seed would round every call the same way")
    return jax.random.bits(key, (), jnp.uint32)


def _validate(x, f, mode, overflow, scale_shape, axis, sr_bits) -> int:
    """Run lowbit's own checks eagerly (at trace time) on a tiny stand-in for x, so that errors are
    raised as the usual ValueError/TypeError, not from inside the callback. Returns the axis >= 0."""
    tdt = _check_dtype(x)
    shape = tuple(x.shape)
    ax = axis
    if isinstance(f, BlockFormat):
        if not shape:
            raise ValueError(f"{f} needs an array of at least one dimension")
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis {axis} is out of range for an array of shape {shape}")
        ax = axis % len(shape)
        if shape[ax] % f.size:
            raise ValueError(f"block size {f.size} of {f} does not divide axis {axis} of length {shape[ax]} "
                             f"(shape {shape}); pad the axis to a multiple of {f.size} or choose another axis")
        stand_in = torch.zeros([1] * ax + [shape[ax]] + [1] * (len(shape) - ax - 1), dtype=tdt)
    else:
        stand_in = torch.zeros(1, dtype=tdt)
    if scale_shape is not None:
        try:
            out = np.broadcast_shapes(shape, scale_shape)
        except ValueError:
            out = None
        if out != shape:
            raise ValueError(f"scale of shape {scale_shape} does not broadcast to the array's shape {shape}")
    emulate.quantize(stand_in, f, mode, overflow, scale=None if scale_shape is None else 1.0, axis=ax,
                     generator=0 if mode in STOCHASTIC_MODES else None, sr_bits=sr_bits)
    return ax


# --- quantize ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _quantizer(f, mode: str, overflow: str, axis: int, sr_bits, has_scale: bool, ste: bool):
    def host(x, scale, seed):
        with _ieee_subnormals():
            q = emulate.quantize(_to_torch(x), f, mode, overflow,
                                 scale=torch.from_numpy(np.array(scale)) if has_scale else None, axis=axis,
                                 generator=int(seed) if mode in STOCHASTIC_MODES else None, sr_bits=sr_bits)
            return _to_numpy(q)

    def call(x, scale, seed):
        return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x, scale, seed,
                                 vmap_method="sequential")

    @jax.custom_vjp
    def q(x, scale, seed):
        return call(x, scale, seed)

    def fwd(x, scale, seed):
        return call(x, scale, seed), (scale, seed)

    def bwd(res, g):
        scale, seed = res
        gx = g if ste else jnp.zeros_like(g)
        return gx, jnp.zeros_like(scale), np.zeros(np.shape(seed), dtype=jax.dtypes.float0)

    q.defvjp(fwd, bwd)
    return q


def quantize(x, fmt, rounding: str = "nearest_even", overflow: str = "saturate", *, scale=None,
             axis: int = -1, key=None, sr_bits: Optional[int] = None, ste: bool = True):
    """Round a jax array to the values of ``fmt`` (same dtype and shape), bit-identical to
    :func:`lowbit.quantize`. Works under ``jax.jit``/``jax.vmap`` (vmap runs the batch sequentially, so
    block and per-tensor scales stay per example).

    key: a ``jax.random`` key, required for the stochastic modes (JAX has no global random state).
    scale: element formats only; quantize ``x / scale`` and multiply back (a float or an array that
        broadcasts to x; it gets a zero gradient).
    ste: the gradient with respect to x is the identity (straight-through, the default); with
        ``ste=False`` it is zero, as for ``jnp.round``.
    """
    x, f, mode, s, sdt, ax = _prepare(x, fmt, rounding, overflow, scale, axis, sr_bits)
    fn = _quantizer(f, mode, overflow, ax, sr_bits, scale is not None, bool(ste))
    return fn(x, s, _seed(key, mode))


# --- encode / decode --------------------------------------------------------------------------------

def _code_dtype(bits: int):
    if bits <= 8:
        return jnp.uint8
    if bits <= 31:
        return jnp.int32
    if bits == 32:
        return jnp.uint32  # JAX has no int64 without jax_enable_x64; 32-bit codes fit uint32
    raise ValueError(f"codes of {bits} bits do not fit 32 bits; use lowbit.encode on a numpy array")


@jax.tree_util.register_pytree_node_class
class EncodedArray:
    """``lowbit.jax.encode``'s result: integer codes (+ scale codes, + NVFP4's tensor scale) as jax
    arrays, with the format, axis and dtype as static metadata (a pytree, so it passes through jit)."""

    def __init__(self, codes, scales, tensor_scale, format, axis: int, dtype):  # noqa: A002
        self.codes, self.scales, self.tensor_scale = codes, scales, tensor_scale
        self.format, self.axis, self.dtype = format, axis, np.dtype(dtype)

    def tree_flatten(self):
        return (self.codes, self.scales, self.tensor_scale), (self.format, self.axis, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def __repr__(self) -> str:
        return (f"EncodedArray(format={self.format}, codes={getattr(self.codes, 'shape', None)}, "
                f"axis={self.axis}, dtype={self.dtype})")


class _Layout(NamedTuple):
    codes: jax.ShapeDtypeStruct
    scales: Optional[jax.ShapeDtypeStruct]
    tensor_scale: Optional[jax.ShapeDtypeStruct]


def _layout(shape, f, ax: int, scale_shape, sdt) -> _Layout:
    if isinstance(f, BlockFormat):
        sshape = list(shape)
        sshape[ax] //= f.size
        ts = jax.ShapeDtypeStruct((), jnp.float32) if f.tensor_scale else None
        return _Layout(jax.ShapeDtypeStruct(shape, _code_dtype(f.element.bits)),
                       jax.ShapeDtypeStruct(tuple(sshape), _code_dtype(f.scale.bits)), ts)
    sc = None if scale_shape is None else jax.ShapeDtypeStruct(scale_shape, sdt)
    return _Layout(jax.ShapeDtypeStruct(shape, _code_dtype(f.bits)), sc, None)


def _prepare(x, fmt, rounding, overflow, scale, axis, sr_bits):
    """Checks shared by quantize and encode: (x, format, mode, scale array, scale dtype, axis)."""
    x = jnp.asarray(x)
    f = parse_format(fmt)
    mode = check_rounding(rounding)
    check_overflow(overflow)
    if scale is not None and isinstance(f, BlockFormat):
        raise ValueError(f"{f} computes its own block scales; do not pass scale=")
    sdt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    s = jnp.ones((), sdt) if scale is None else jnp.asarray(scale, dtype=sdt)
    ax = _validate(x, f, mode, overflow, None if scale is None else tuple(s.shape), axis, sr_bits)
    return x, f, mode, s, sdt, ax


def encode(x, fmt, rounding: str = "nearest_even", overflow: str = "saturate", *, scale=None,
           axis: int = -1, key=None, sr_bits: Optional[int] = None) -> EncodedArray:
    """Integer codes of ``quantize(x, fmt, ...)`` (jit-compatible); ``decode`` gives back its bits."""
    x, f, mode, s, sdt, ax = _prepare(x, fmt, rounding, overflow, scale, axis, sr_bits)
    lay = _layout(tuple(x.shape), f, ax, None if scale is None else tuple(s.shape), sdt)
    has_scale = scale is not None

    def host(xh, sh, seed):
        with _ieee_subnormals():
            return _encode_host(xh, sh, seed)

    def _encode_host(xh, sh, seed):
        enc = emulate.encode(_to_torch(xh), f, mode, overflow,
                             scale=torch.from_numpy(np.array(sh)) if has_scale else None, axis=ax,
                             generator=int(seed) if mode in STOCHASTIC_MODES else None, sr_bits=sr_bits)
        out = [_to_numpy(enc.codes).astype(lay.codes.dtype)]
        if lay.scales is not None:
            out.append(_to_numpy(enc.scales).astype(lay.scales.dtype).reshape(lay.scales.shape))
        if lay.tensor_scale is not None:
            out.append(_to_numpy(enc.tensor_scale).astype(np.float32).reshape(()))
        return tuple(out)

    shapes = tuple(v for v in lay if v is not None)
    res = list(jax.pure_callback(host, shapes, x, s, _seed(key, mode), vmap_method="sequential"))
    codes = res.pop(0)
    scales = res.pop(0) if lay.scales is not None else None
    ts = res.pop(0) if lay.tensor_scale is not None else None
    return EncodedArray(codes, scales, ts, f, ax, x.dtype)


def decode(enc: EncodedArray):
    """Values of an :class:`EncodedArray`, in its original dtype (jit-compatible)."""
    f = enc.format
    tdt = _TORCH[np.dtype(enc.dtype)]

    def host(codes, scales, ts):
        with _ieee_subnormals():
            e = emulate.Encoded(f, torch.from_numpy(np.array(codes).astype(np.int64)), tdt, enc.axis,
                                None if scales is None else torch.from_numpy(np.array(scales)),
                                None if ts is None else torch.from_numpy(np.array(ts)))
            return _to_numpy(emulate.decode(e))

    out = jax.ShapeDtypeStruct(enc.codes.shape, enc.dtype)
    return jax.pure_callback(host, out, enc.codes, enc.scales, enc.tensor_scale, vmap_method="sequential")
