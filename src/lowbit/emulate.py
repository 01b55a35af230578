"""The user-facing emulation API: ``quantize`` (values in, representable values out), and the packed
path ``encode`` (integer codes + scales) / ``decode``, bit-identical to ``quantize``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from . import kernels
from .formats import BlockFormat, Codebook, ElementFormat, FloatFormat, Format, FormatError, IntFormat, format
from .kernels import reference
from .rounding import STOCHASTIC_MODES, check_overflow, check_rounding, make_generator

ArrayLike = Union[torch.Tensor, np.ndarray]


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized tensor, exactly. Backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x, q):  # noqa: D401
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _check_overflow_for(fmt: Format, overflow: str) -> None:
    if overflow == "saturate":
        return
    if not isinstance(fmt, FloatFormat):
        kind = "block formats saturate their elements (OCP MX)" if isinstance(fmt, BlockFormat) \
            else f"{fmt} has no inf or nan"
        raise ValueError(f"overflow={overflow!r} is not possible for {fmt}: {kind}; use overflow='saturate'")
    if overflow == "inf" and not (fmt.has_inf or fmt.has_nan):
        raise ValueError(f"{fmt} has neither inf nor nan to signal overflow; use overflow='saturate'")
    if overflow == "nan" and not fmt.has_nan:
        raise ValueError(f"{fmt} has no nan; use overflow='saturate' or 'inf'")


def _check_fits(fmt: ElementFormat, dtype: torch.dtype) -> None:
    """Refuse formats whose values the tensor's dtype cannot hold (the result would be silently
    rounded a second time)."""
    info = torch.finfo(dtype)
    man = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}.get(dtype)
    too_precise = isinstance(fmt, FloatFormat) and man is not None and fmt.man > man
    if isinstance(fmt, IntFormat):
        too_precise = man is not None and fmt.width - 1 > man + 1
    if isinstance(fmt, Codebook):  # arbitrary table values: check each one
        vals = fmt.values()
        too_precise = not torch.equal(vals.to(dtype).double(), vals)
    if fmt.max > info.max or too_precise or (fmt.min_subnormal < info.smallest_normal * info.eps):
        wider = "float64 tensor (x.double())" if dtype in (torch.float32, torch.float64) \
            else "float32 or float64 tensor (x.float())"
        raise ValueError(f"the values of {fmt} do not all fit in {dtype}; quantize a {wider} instead")


def _as_torch(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return x, None
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
            raise TypeError(f"quantize expects a float16/32/64 array, got numpy {x.dtype}; convert with "
                            "x.astype(np.float32)")
        return torch.from_numpy(np.ascontiguousarray(x)), "numpy"
    if type(x).__module__.startswith("jax"):
        raise TypeError("for JAX arrays use lowbit.jax.quantize (jit- and grad-compatible)")
    raise TypeError(f"quantize expects a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_tensor(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}; convert with x.float()")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"quantize accepts float16, bfloat16, float32 and float64 tensors, got {x.dtype}")


def _check_axis(x: torch.Tensor, axis: int) -> int:
    if not -x.dim() <= axis < max(x.dim(), 1):
        raise ValueError(f"axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return axis % max(x.dim(), 1)


def _check_sr_bits(mode: str, sr_bits) -> None:
    if sr_bits is None:
        return
    if mode != "stochastic":
        raise ValueError(f"sr_bits (1..52) applies to rounding='stochastic' only, not {mode!r}")
    if isinstance(sr_bits, bool) or not isinstance(sr_bits, (int, np.integer)) or not 1 <= sr_bits <= 52:
        raise ValueError(f"sr_bits must be an integer 1..52 (random bits per rounding), got {sr_bits!r}")


def _as_scale(scale, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A user scale as a tensor that broadcasts to x, positive and finite."""
    try:
        s = torch.as_tensor(scale, dtype=dtype, device=t.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"scale must be a number or a tensor of numbers, got {type(scale).__name__}") from None
    try:
        shape = torch.broadcast_shapes(s.shape, t.shape)
    except RuntimeError:
        shape = None
    if shape != t.shape:
        raise ValueError(
            f"scale of shape {tuple(s.shape)} does not broadcast to x's shape {tuple(t.shape)}; for one "
            "scale per channel keep x's number of dimensions with size 1 along the others, e.g. (rows, 1)"
        )
    if s.numel() and not bool(((s > 0) & torch.isfinite(s)).all()):
        raise ValueError("scale must be positive and finite (give an all-zero group the scale 1, not 0)")
    return s


def _check_tensor_amax(tensor_amax, fmt: Format) -> Optional[float]:
    """The caller's per-tensor amax (delayed scaling) as a float32 number, or None; refuses it for
    formats without a tensor scale and for values that are not one finite number >= 0."""
    if tensor_amax is None:
        return None
    if not (isinstance(fmt, BlockFormat) and fmt.tensor_scale):
        raise ValueError(f"tensor_amax applies to formats with a per-tensor scale (nvfp4, "
                         f"block(...,tensor)); {fmt} has none")
    if isinstance(tensor_amax, (bool, np.bool_)) or not isinstance(
            tensor_amax, (int, float, np.integer, np.floating, np.ndarray, torch.Tensor)):
        raise TypeError(f"tensor_amax must be a number or a one-element tensor, got {type(tensor_amax).__name__}")
    if isinstance(tensor_amax, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(tensor_amax)
        if t.numel() != 1:
            raise ValueError(f"tensor_amax must hold one number (the whole tensor's amax), got shape "
                             f"{tuple(t.shape)}; for one scale per block use the block format alone")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"tensor_amax must be a real number, got a {t.dtype} tensor")
        tensor_amax = t.reshape(()).item()   # one small read where it lives on a device
    with np.errstate(over="ignore"):
        v = float(np.float32(tensor_amax))   # the recipe's amax is a float32 number
    if not (math.isfinite(v) and v >= 0):
        past = math.isfinite(float(tensor_amax)) and float(tensor_amax) >= 0
        raise ValueError(f"tensor_amax must be a finite number >= 0 (the largest finite |x|, e.g. of "
                         f"recent steps), got {tensor_amax!r}" + (" (past float32's range)" if past else ""))
    return v


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(x, fmt, rounding, overflow, generator, sr_bits):
    """Validate the arguments shared by quantize and encode: (tensor, kind, format, mode, generator)."""
    t, kind = _as_torch(x)
    _check_tensor(t)
    f = format(fmt)
    mode = check_rounding(rounding)
    check_overflow(overflow)
    _check_overflow_for(f, overflow)
    _check_sr_bits(mode, sr_bits)
    gen = make_generator(generator, t.device) if mode in STOCHASTIC_MODES else None
    return t, kind, f, mode, gen


def quantize(
    x: ArrayLike,
    fmt,
    rounding: str = "nearest_even",
    overflow: str = "saturate",
    *,
    scale=None,
    axis: int = -1,
    generator: Union[None, int, torch.Generator] = None,
    sr_bits: Optional[int] = None,
    tensor_amax=None,
    ste: bool = False,
    backend: str = "auto",
) -> ArrayLike:
    """Round ``x`` to the values of ``fmt``; same type, dtype and shape out.

    fmt: a format or its name (``"e4m3"``, ``"int4"``, ``"mxfp4"``, ``"nvfp4"``, ``"nf4"`` ...).
    rounding: nearest_even, nearest_away, nearest_zero, toward_zero, up, down, odd, stochastic,
        stochastic_half. overflow: saturate (default), inf, nan.
    scale: for element formats, quantize ``x / scale`` and multiply back (float32 arithmetic, float64
        for float64 inputs). Block formats compute their own scales per block along ``axis``.
    generator: torch.Generator or int seed for the stochastic modes (reproducible).
    sr_bits: stochastic rounding with this many random bits, as hardware does.
    tensor_amax: formats with a per-tensor scale (NVFP4): the amax that scale is built from, given
        instead of measured (delayed scaling: e.g. the largest amax of recent steps); a number or a
        one-element tensor, finite and >= 0, used as float32. Values above it saturate. One pass
        over the tensor instead of two on the fast paths.
    ste: straight-through gradient (identity) so the call can sit inside training.

    Special values. nan stays nan (also for formats without a nan code; ``encode`` refuses those).
    +-inf follows ``overflow``: saturate gives +-max, inf keeps +-inf (nan where the format has no
    inf), nan gives nan. With overflow="inf" finite values past max become +-inf (nan without inf),
    except that modes rounding the magnitude down (toward_zero; down for positives, up for
    negatives) give +-max, as IEEE 754 does. Integers, codebooks and block elements always saturate;
    a block holding nan or +-inf is all nan. E8M0 (unsigned, no zero): negatives are nan, 0 and tiny
    values give its smallest value 2**-127.
    """
    t, kind, f, mode, gen = _prepare(x, fmt, rounding, overflow, generator, sr_bits)
    amax = _check_tensor_amax(tensor_amax, f)
    if t.numel() and not t.dim():
        t_in = t.reshape(1)
    else:
        t_in = t
    with torch.no_grad():
        if isinstance(f, BlockFormat):
            if scale is not None:
                raise ValueError(f"{f} computes its own block scales; do not pass scale=")
            if not t.dim():
                raise ValueError(f"{f} quantizes blocks of {f.size} values along an axis; got a 0-d tensor")
            ax = _check_axis(t_in, axis)
            q = kernels.quantize_block(t_in.detach(), f, mode, ax, gen, sr_bits, backend, tensor_amax=amax)
        else:
            if scale is None:
                _check_fits(f, t.dtype)
                q = kernels.quantize_element(t_in.detach(), f, mode, overflow, gen, sr_bits, backend)
            else:
                cd = _compute_dtype(t)
                s = _as_scale(scale, t_in, cd)
                y = t_in.detach().to(cd) / s
                q = (kernels.quantize_element(y, f, mode, overflow, gen, sr_bits, backend) * s).to(t.dtype)
    q = q.reshape(t.shape)
    if ste:
        q = _StraightThrough.apply(t, q)
    return q.numpy() if kind == "numpy" else q


# --- packed path ----------------------------------------------------------------------------------

@dataclass
class Encoded:
    """Integer codes of a quantized tensor, with what is needed to decode it exactly.

    codes: one code per element, x's shape (uint8 up to 8 bits, int32 up to 31, int64 above).
    scales: block formats: scale-format codes, x's shape with ``axis`` divided by the block size;
        element formats with a user scale: that scale (float), else None.
    tensor_scale: NVFP4's per-tensor float32 scale, else None.
    """

    format: Format
    codes: torch.Tensor
    dtype: torch.dtype
    axis: int = -1
    scales: Optional[torch.Tensor] = None
    tensor_scale: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        """Storage of a bit-packed layout: codes at their bit width, plus scales."""
        f = self.format
        elem = f.element if isinstance(f, BlockFormat) else f
        n = (self.codes.numel() * elem.bits + 7) // 8
        if self.scales is not None:
            sbits = f.scale.bits if isinstance(f, BlockFormat) else 8 * self.scales.element_size()
            n += (self.scales.numel() * sbits + 7) // 8
        if self.tensor_scale is not None:
            n += 4
        return n


def _code_dtype(bits: int) -> torch.dtype:
    if bits <= 8:
        return torch.uint8
    return torch.int32 if bits <= 31 else torch.int64


def _no_nan_code(fmt: ElementFormat) -> ValueError:
    return ValueError(f"{fmt} has no nan code, but the tensor holds nan")


def _encode_element_values(v: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    if isinstance(fmt, (FloatFormat, IntFormat, Codebook)):
        if torch.isnan(v).any() and not getattr(fmt, "has_nan", False):
            raise _no_nan_code(fmt)
        return fmt.encode_values(v).to(_code_dtype(fmt.bits))
    raise FormatError(f"no encoder for {type(fmt).__name__}")


def encode(x: torch.Tensor, fmt, rounding: str = "nearest_even", overflow: str = "saturate", *,
           scale=None, axis: int = -1, generator=None, sr_bits: Optional[int] = None,
           tensor_amax=None, backend: str = "auto") -> Encoded:
    """Quantize ``x`` and return its integer codes (+ scales); ``decode`` gives back ``quantize``'s bits
    (same arguments as ``quantize``). The fast backends (fused Triton kernels on CUDA, compiled bit
    arithmetic on the CPU) give the reference's codes bit for bit."""
    t, _, f, mode, gen = _prepare(x, fmt, rounding, overflow, generator, sr_bits)
    amax = _check_tensor_amax(tensor_amax, f)
    kernels._check_backend(backend)
    t = t.detach()
    if isinstance(f, BlockFormat):
        if scale is not None:
            raise ValueError(f"{f} computes its own block scales; do not pass scale=")
        if not t.dim():
            raise ValueError(f"{f} encodes blocks of {f.size} values along an axis; got a 0-d tensor")
        ax = _check_axis(t, axis)
        fast = kernels.encode_block(t, f, mode, ax, gen, sr_bits, backend, tensor_amax=amax)
        if fast is not None:
            codes, scodes, ts = fast
            return Encoded(f, codes, t.dtype, ax, scodes, ts)
        if mode in STOCHASTIC_MODES:
            # the default backend draws its own random numbers: make the very call quantize makes,
            # then read the element values back under the block scales (which use no randomness),
            # so that decode(encode(x)) is quantize(x) bit for bit
            vals = kernels.quantize_block(t, f, mode, ax, gen, sr_bits, backend, tensor_amax=amax)
            xd = t.double()
            ts = None
            if f.tensor_scale:
                ts = reference.tensor_scale(xd, f) if amax is None else \
                    reference.tensor_scale_of_amax(amax, f).to(t.device)
            s = reference.block_scales(reference._blocks(xd, f.size, ax), f, ts)
            q = reference.block_elements_of_values(reference._blocks(vals.double(), f.size, ax), s, f, ts)
        else:
            _, q, s, ts = reference.quantize_block(t, f, mode, ax, gen, sr_bits, tensor_amax=amax)
        # a block holding nan/inf is nan through its scale; its element codes are 0 (the element
        # format may have no nan code)
        q = torch.where(torch.isnan(s).unsqueeze(-1), torch.zeros_like(q), q)
        xt_shape = t.movedim(ax, -1).shape
        codes = _encode_element_values(q.reshape(xt_shape), f.element).movedim(-1, ax)
        scodes = _encode_element_values(s, f.scale).movedim(-1, ax)
        return Encoded(f, codes, t.dtype, ax, scodes, ts)
    if scale is None:
        _check_fits(f, t.dtype)
        y, s = t, None
    else:
        cd = _compute_dtype(t)
        s = _as_scale(scale, t, cd)
        y = t.to(cd) / s
    fast = kernels.encode_element(y, f, mode, overflow, gen, sr_bits, backend)
    if fast is not None:
        codes, has_nan = fast
        if has_nan and not getattr(f, "has_nan", False):
            raise _no_nan_code(f)
        return Encoded(f, codes, t.dtype, scales=s)
    q = kernels.quantize_element(y, f, mode, overflow, gen, sr_bits, backend).double()
    return Encoded(f, _encode_element_values(q, f), t.dtype, scales=s)


def decode(enc: Encoded, *, backend: str = "auto") -> torch.Tensor:
    """Values of an ``Encoded`` tensor, in its original dtype; identical to ``quantize``'s output."""
    if not isinstance(enc, Encoded):
        raise TypeError(f"decode expects the Encoded that lowbit.encode returns, got {type(enc).__name__}")
    kernels._check_backend(backend)
    f = enc.format
    if isinstance(f, BlockFormat):
        fast = kernels.decode_block(enc.codes, enc.scales, enc.tensor_scale, f, enc.axis, enc.dtype, backend)
        if fast is not None:
            return fast
        q = f.element.decode_codes(enc.codes.to(torch.int64)).movedim(enc.axis, -1)
        q = q.reshape(*q.shape[:-1], q.shape[-1] // f.size, f.size)
        s = f.scale.decode_codes(enc.scales.to(torch.int64)).movedim(enc.axis, -1)
        vals = reference.block_values(q, s, f, enc.tensor_scale)
        out_shape = enc.codes.movedim(enc.axis, -1).shape
        return vals.reshape(out_shape).movedim(-1, enc.axis).to(enc.dtype)
    if enc.scales is not None:
        v = kernels.decode_element(enc.codes, f, enc.scales.dtype, backend) \
            if enc.scales.dtype == torch.float32 else None
        if v is None:
            v = f.decode_codes(enc.codes.to(torch.int64)).to(enc.scales.dtype)
        return (v * enc.scales).to(enc.dtype)
    v = kernels.decode_element(enc.codes, f, enc.dtype, backend)
    if v is None:
        v = f.decode_codes(enc.codes.to(torch.int64)).to(enc.dtype)
    return v
