"""Emulated low-precision arithmetic for numerical methods, in the spirit of Higham's ``chop`` and Pychop.

Every operation here returns the **correctly rounded** result of the exact operation on its operands:
``add(x, y, "bf16")`` is what a bf16 adder with the chosen rounding mode would give for operands x, y.
The exact result is never formed as a rational number; instead it is rounded to float64 *to odd* (the
float64 neighbour with an odd last bit whenever the result is inexact, found with error-free
transformations: TwoSum, Dekker's TwoProduct, exact remainders for div and sqrt), and then rounded once
to the target format with :func:`lowbit.quantize`. Rounding to odd at 53 bits followed by rounding to a
format of at most 51 bits of precision equals rounding the exact value directly (Boldo & Melquiond,
2008), so there is no double-rounding error for float, integer and fixed-point formats (codebooks: up to
a tie lying within 2**-53 relative of a midpoint). Stochastic rounding sees the float64 round-to-odd
value, which moves its probabilities by at most 2**-52 relative.

Operands are taken as they are (promoted exactly to float64); they are not rounded to the format first:
in a simulation they are the results of earlier rounded operations. Use ``Chop(fmt)(x)`` or
:func:`lowbit.quantize` to bring data into the format.

``matmul`` models a hardware dot-product unit: inputs rounded to ``input_format``; products formed
exactly (optionally rounded to ``product_format``); the running sum rounded to ``accum_format`` after
every ``accum_every`` terms (1: every addition rounded, a naive low-precision dot product with fused
multiply-add; K: a single rounding at the end, like a wide accumulator).

Torch tensors and NumPy arrays are accepted (NumPy in -> NumPy out). The result's dtype is the operands'
floating dtype, widened to float32 or float64 where that dtype cannot hold every value of the result
format (a float16 input with ``fmt="bf16"`` gives float32), so the result is never rounded twice.
Results carry no gradient.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import numpy as np
import torch

from ..emulate import quantize
from ..formats import BlockFormat, Codebook, ElementFormat, FloatFormat, IntFormat, format as parse_format
from ..rounding import STOCHASTIC_MODES, check_rounding, make_generator
from .odd32 import round_float64

__all__ = ["add", "sub", "mul", "div", "sqrt", "fma", "matmul", "dot", "sum", "Chop", "resolve_overflow"]

_F64 = torch.float64
_MANT_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


# --- operands -------------------------------------------------------------------------------------

def _to_tensor(x, name: str) -> tuple:
    """(tensor, kind) with kind 'torch', 'numpy' or 'scalar'."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in _MANT_BITS:
            raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}; "
                            "convert with x.double()")
        return x.detach(), "torch"
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
            raise TypeError(f"{name}: expected a float16/32/64 array, got numpy {x.dtype}; convert with "
                            "x.astype(np.float64)")
        return torch.from_numpy(np.ascontiguousarray(x)), "numpy"
    if isinstance(x, (numbers.Real, np.floating, np.integer)) and not isinstance(x, bool):
        v = float(x)
        if isinstance(x, (numbers.Integral, np.integer)) and v != x:
            raise ValueError(f"{name}: the integer {x} is not exactly representable in float64")
        return torch.tensor(v, dtype=_F64), "scalar"
    if type(x).__module__.startswith("jax"):
        raise TypeError(f"{name}: lowbit.arith works on torch tensors and numpy arrays; convert with "
                        "numpy.asarray(x)")
    raise TypeError(f"{name}: expected a torch.Tensor, numpy.ndarray or real number, got {type(x).__name__}")


def operands(*named):
    """Convert operands; returns (float64 tensors on one device, output kind, output dtype before
    widening)."""
    ts, kinds = [], []
    for name, x in named:
        t, k = _to_tensor(x, name)
        ts.append(t)
        kinds.append(k)
    devices = {t.device for t, k in zip(ts, kinds) if k == "torch"}
    if len(devices) > 1:
        raise ValueError(f"operands are on different devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    real = [t for t, k in zip(ts, kinds) if k != "scalar"]
    dtype = real[0].dtype if real else _F64
    for t in real[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    kind = "torch" if "torch" in kinds else "numpy"
    return [t.to(device=device, dtype=_F64) for t in ts], kind, dtype


def _holds(dtype: torch.dtype, fmt: Optional[ElementFormat]) -> bool:
    """Whether ``dtype`` holds every value of ``fmt`` (None: float64 results)."""
    if fmt is None:
        return dtype == _F64
    if dtype == _F64:
        return True
    info = torch.finfo(dtype)
    man = _MANT_BITS[dtype]
    tiny = info.smallest_normal * info.eps  # the smallest subnormal of dtype
    if isinstance(fmt, FloatFormat):
        return fmt.man <= man and fmt.max <= info.max and fmt.min_subnormal >= tiny
    if isinstance(fmt, IntFormat):
        magnitude_bits = fmt.width - 1 if fmt.is_signed else fmt.width
        return magnitude_bits <= man + 1 and max(abs(fmt.max), abs(fmt.min)) <= info.max and fmt.step >= tiny
    vals = fmt.values()
    return bool(torch.equal(vals.to(dtype).double(), vals))


def finish(t: torch.Tensor, kind: str, dtype: torch.dtype, fmt: Optional[ElementFormat]):
    for d in (dtype, torch.float32, _F64):
        if torch.finfo(d).bits >= torch.finfo(dtype).bits and _holds(d, fmt):
            break
    out = t.to(d)
    return out.numpy() if kind == "numpy" else out


# --- formats, rounding, overflow ------------------------------------------------------------------

def element_format(fmt, what: str = "fmt") -> ElementFormat:
    f = parse_format(fmt)
    if isinstance(f, BlockFormat):
        raise ValueError(f"{what}={f} is a block format; arithmetic results need an element format "
                         f"(e.g. {f.element}); block formats can be used as matmul's input_format")
    return f


def resolve_overflow(fmt, overflow: Optional[str]) -> str:
    """The overflow policy used for ``fmt``: ``overflow`` itself, or for None the IEEE behaviour of an
    arithmetic unit: 'inf' for float formats with inf or nan (an overflow gives inf, or nan for
    finite-with-nan formats such as e4m3fn; directed modes that never round up give max), else
    'saturate' (integers, fixed point, codebooks, finite-only floats, block formats)."""
    if overflow is not None:
        return overflow
    f = parse_format(fmt)
    if isinstance(f, FloatFormat) and (f.has_inf or f.has_nan):
        return "inf"
    return "saturate"


def round_to(x: torch.Tensor, fmt: Optional[ElementFormat], rounding: str, overflow: str, gen, sr_bits):
    if fmt is None:
        return x
    return round_float64(x, fmt, rounding, overflow, gen, sr_bits)


def setup(fmt, rounding, overflow, generator, device, what="fmt"):
    f = element_format(fmt, what)
    mode = check_rounding(rounding)
    ov = resolve_overflow(f, overflow)
    gen = make_generator(generator, device) if mode in STOCHASTIC_MODES else None
    return f, mode, ov, gen


# --- error-free transformations and rounding to odd ------------------------------------------------

def finite(x: torch.Tensor) -> torch.Tensor:
    """torch.isfinite(x), written so that torch.compile's CPU code stays vectorised."""
    return x.abs() < float("inf")


def two_sum(a: torch.Tensor, b: torch.Tensor):
    """s = fl(a + b) and e with a + b = s + e exactly (Knuth's TwoSum; e = 0 where s is not finite)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, torch.where(finite(s), e, torch.zeros_like(e))


_SPLITTER = float(2**27 + 1)


def _split(a: torch.Tensor):
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a: torch.Tensor, b: torch.Tensor):
    """p = fl(a * b) and e with a * b = p + e exactly (Dekker; |a|, |b| < 2**995, no underflow)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, torch.where(finite(p), e, torch.zeros_like(e))


def to_odd(h: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Round-to-odd at float64 of the exact value h + tail, given h = RN(exact) and tail's sign: where
    inexact and h's last bit is even, step to the neighbour on tail's side (which is odd)."""
    even = (h.view(torch.int64) & 1) == 0
    step = (tail != 0) & even & finite(h)
    toward = torch.where(tail > 0, torch.full_like(h, float("inf")), torch.full_like(h, float("-inf")))
    return torch.where(step, torch.nextafter(h, toward), h)


def odd_add(a, b):
    s, e = two_sum(a, b)
    return to_odd(s, e)


def odd_mul(a, b):
    p, e = two_prod(a, b)
    return to_odd(p, e)


def odd_div(a, b):
    q = a / b
    ph, pl = two_prod(q, b)
    r = (a - ph) - pl  # the exact remainder a - q*b (representable), sign gives the direction
    tail = torch.where(torch.isfinite(q) & (b != 0), r * torch.sign(b), torch.zeros_like(q))
    return to_odd(q, tail)


def odd_sqrt(a):
    s = torch.sqrt(a)
    ph, pl = two_prod(s, s)
    r = (a - ph) - pl
    tail = torch.where(finite(s) & (s > 0), r, torch.zeros_like(s))
    return to_odd(s, tail)


def odd_fma(a, b, c):
    ph, pl = two_prod(a, b)
    s, e1 = two_sum(ph, c)
    t, e2 = two_sum(e1, pl)
    h, lo = two_sum(s, t)  # exact = h + lo + e2, with |e2| < |lo| wherever lo != 0
    tail = torch.where(lo != 0, lo, e2)
    return to_odd(h, tail)


# --- elementwise operations -----------------------------------------------------------------------

def _elementwise(op, names, args, fmt, rounding, overflow, generator, sr_bits):
    ts, kind, dtype = operands(*zip(names, args))
    f, mode, ov, gen = setup(fmt, rounding, overflow, generator, ts[0].device)
    ts = torch.broadcast_tensors(*ts)
    with torch.no_grad():
        y = round_to(op(*ts), f, mode, ov, gen, sr_bits)
    return finish(y, kind, dtype, f)


def add(a, b, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
        sr_bits: Optional[int] = None):
    """a + b, correctly rounded to ``fmt``."""
    return _elementwise(odd_add, ("a", "b"), (a, b), fmt, rounding, overflow, generator, sr_bits)


def sub(a, b, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
        sr_bits: Optional[int] = None):
    """a - b, correctly rounded to ``fmt``."""
    return _elementwise(lambda x, y: odd_add(x, -y), ("a", "b"), (a, b), fmt, rounding, overflow,
                        generator, sr_bits)


def mul(a, b, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
        sr_bits: Optional[int] = None):
    """a * b, correctly rounded to ``fmt``."""
    return _elementwise(odd_mul, ("a", "b"), (a, b), fmt, rounding, overflow, generator, sr_bits)


def div(a, b, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
        sr_bits: Optional[int] = None):
    """a / b, correctly rounded to ``fmt`` (x/0 is +-inf, 0/0 nan, then the overflow policy applies)."""
    return _elementwise(odd_div, ("a", "b"), (a, b), fmt, rounding, overflow, generator, sr_bits)


def sqrt(a, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
         sr_bits: Optional[int] = None):
    """sqrt(a), correctly rounded to ``fmt`` (nan for a < 0)."""
    return _elementwise(odd_sqrt, ("a",), (a,), fmt, rounding, overflow, generator, sr_bits)


def fma(a, b, c, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
        sr_bits: Optional[int] = None):
    """a * b + c with a single rounding to ``fmt`` (fused multiply-add)."""
    return _elementwise(odd_fma, ("a", "b", "c"), (a, b, c), fmt, rounding, overflow, generator, sr_bits)


# --- accumulation: matmul, dot, sum ---------------------------------------------------------------

def _check_every(accum_every, n: int) -> int:
    if accum_every is None:
        return max(n, 1)
    if isinstance(accum_every, bool) or not isinstance(accum_every, (int, np.integer)) or accum_every < 1:
        raise ValueError(f"accum_every must be a positive integer (or None: one rounding at the end), "
                         f"got {accum_every!r}")
    return int(min(accum_every, max(n, 1)))


def _accumulate(chunk_sums, start: torch.Tensor, acc: Optional[ElementFormat], mode, ov, gen, sr_bits):
    """Running sum from ``start`` over the chunks' float64 partial sums, rounded to ``acc`` after each
    chunk (an empty sum rounds ``start`` once)."""
    s, empty = start, True
    for part in chunk_sums:
        s = round_to(odd_add(s, part), acc, mode, ov, gen, sr_bits)
        empty = False
    return round_to(s, acc, mode, ov, gen, sr_bits) if empty else s


def matmul(a, b, input_format=None, accum_format=None, accum_every: Optional[int] = 1,
           rounding: str = "nearest_even", overflow: Optional[str] = None, *, c=None, product_format=None,
           input_rounding: Optional[str] = None, generator=None, sr_bits: Optional[int] = None):
    """``a @ b`` (``c + a @ b`` when ``c`` is given) as a low-precision dot-product unit computes it
    (torch.matmul shapes and broadcasting).

    input_format: a and b are first rounded to it (None: used as given). A block format (mxfp8, nvfp4,
        ...) takes its blocks along the reduction dimension: a's last axis, b's second-to-last.
    product_format: each product a_ik * b_kj rounded to it (None: products exact, as in an FMA unit).
    accum_format: the running sum is rounded to it after every ``accum_every`` terms (None: float64,
        no emulated rounding). Within a chunk the (exact) products are summed in float64.
    accum_every: 1 rounds every addition; None or >= K rounds once at the end.
    c: the accumulator's initial value, as in a GEMM D = C + A B (taken as given, broadcast to the
        result's shape; not rounded to input_format). An empty reduction (K = 0) returns c rounded.
    rounding: mode for every rounding (``input_rounding`` overrides it for the inputs); overflow: policy
        (None: see :func:`resolve_overflow`). generator: torch.Generator or seed for stochastic modes;
        one stream is used for the whole product, so a seed makes it reproducible.
    """
    named = (("a", a), ("b", b)) if c is None else (("a", a), ("b", b), ("c", c))
    ts, kind, dtype = operands(*named)
    ta, tb = ts[0], ts[1]
    if ta.dim() == 0 or tb.dim() == 0:
        raise ValueError("matmul needs operands of at least one dimension; use mul for scalars")
    mode = check_rounding(rounding)
    in_mode = check_rounding(input_rounding) if input_rounding is not None else mode
    needs_gen = mode in STOCHASTIC_MODES or in_mode in STOCHASTIC_MODES
    gen = make_generator(generator, ta.device) if needs_gen else None
    acc = None if accum_format is None else element_format(accum_format, "accum_format")
    prod = None if product_format is None else element_format(product_format, "product_format")
    acc_ov = resolve_overflow(acc, overflow) if acc is not None else None
    prod_ov = resolve_overflow(prod, overflow) if prod is not None else None

    squeeze_a, squeeze_b = ta.dim() == 1, tb.dim() == 1
    if squeeze_a:
        ta = ta.unsqueeze(0)
    if squeeze_b:
        tb = tb.unsqueeze(-1)
    k = ta.shape[-1]
    if tb.shape[-2] != k:
        raise ValueError(f"matmul: reduction dimensions differ: a {tuple(ta.shape)} and b {tuple(tb.shape)}")
    every = _check_every(accum_every, k)

    with torch.no_grad():
        if input_format is not None:
            fin = parse_format(input_format)
            in_ov = "saturate" if isinstance(fin, BlockFormat) else resolve_overflow(fin, overflow)
            ta = quantize(ta, fin, in_mode, in_ov, axis=-1, generator=gen, sr_bits=sr_bits)
            tb = quantize(tb, fin, in_mode, in_ov, axis=-2, generator=gen, sr_bits=sr_bits)
        out_shape = torch.broadcast_shapes(ta.shape[:-2], tb.shape[:-2]) + (ta.shape[-2], tb.shape[-1])

        def chunks():
            for c in range(0, k, every):
                ac, bc = ta[..., c:c + every], tb[..., c:c + every, :]
                if prod is None:
                    yield torch.matmul(ac, bc)
                else:
                    p = odd_mul(ac.unsqueeze(-1), bc.unsqueeze(-3))  # (..., M, chunk, N)
                    yield round_to(p, prod, mode, prod_ov, gen, sr_bits).sum(dim=-2)

        y_shape = out_shape[:-2] + out_shape[-2:][squeeze_a:(1 if squeeze_b else 2)]
        if c is None:
            start = torch.zeros(out_shape, dtype=_F64, device=ta.device)
        else:
            try:
                start = torch.broadcast_to(ts[2], y_shape)
            except RuntimeError:
                raise ValueError(f"matmul: c of shape {tuple(ts[2].shape)} does not broadcast to the "
                                 f"result's shape {tuple(y_shape)}") from None
            if squeeze_b:
                start = start.unsqueeze(-1)
            if squeeze_a:
                start = start.unsqueeze(-2)
            start = start.clone()
        y = _accumulate(chunks(), start, acc, mode, acc_ov, gen, sr_bits)
    if squeeze_a:
        y = y.squeeze(-2)
    if squeeze_b:
        y = y.squeeze(-1)
    return finish(y, kind, dtype, acc)


def dot(a, b, input_format=None, accum_format=None, accum_every: Optional[int] = 1,
        rounding: str = "nearest_even", overflow: Optional[str] = None, **kw):
    """Dot product of two 1-D operands (or along the last axis of broadcastable operands), with
    :func:`matmul`'s rounding model."""
    (ta, tb), _, _ = operands(("a", a), ("b", b))
    if ta.dim() == 1 and tb.dim() == 1:
        return matmul(a, b, input_format, accum_format, accum_every, rounding, overflow, **kw)
    a2 = a.unsqueeze(-2) if isinstance(a, torch.Tensor) else np.expand_dims(a, -2)
    b2 = b.unsqueeze(-1) if isinstance(b, torch.Tensor) else np.expand_dims(b, -1)
    y = matmul(a2, b2, input_format, accum_format, accum_every, rounding, overflow, **kw)
    return y[..., 0, 0]


def sum(x, accum_format, axis: int = -1, accum_every: Optional[int] = 1,  # noqa: A001
        rounding: str = "nearest_even", overflow: Optional[str] = None, *, generator=None,
        sr_bits: Optional[int] = None):
    """Recursive summation along ``axis`` (first element first), the running sum rounded to
    ``accum_format`` after every ``accum_every`` terms (1: each addition rounded)."""
    (t,), kind, dtype = operands(("x", x))
    if t.dim() == 0:
        t = t.reshape(1)
    if not -t.dim() <= axis < t.dim():
        raise ValueError(f"axis {axis} is out of range for shape {tuple(t.shape)}")
    f, mode, ov, gen = setup(accum_format, rounding, overflow, generator, t.device, "accum_format")
    t = t.movedim(axis, -1)
    n = t.shape[-1]
    every = _check_every(accum_every, n)
    with torch.no_grad():
        parts = (t[..., c:c + every].sum(dim=-1) for c in range(0, n, every))
        y = _accumulate(parts, torch.zeros(t.shape[:-1], dtype=_F64, device=t.device), f, mode, ov, gen,
                        sr_bits)
    return finish(y, kind, dtype, f)


# --- the wrapper ----------------------------------------------------------------------------------

class Chop:
    """Arithmetic in one format: every method returns results rounded to ``fmt``.

    >>> ch = Chop("bf16")                     # or Chop("e4m3", rounding="stochastic", generator=0)
    >>> x = ch(torch.randn(4))                # bring data into the format
    >>> y = ch.add(x, ch.mul(x, x))           # each operation rounded once
    >>> z = ch.matmul(A, x)                   # inputs in bf16, every addition rounded to bf16

    A seed or generator given here is turned into one torch.Generator that all methods draw from, so a
    sequence of stochastically rounded operations is reproducible from the seed.
    """

    def __init__(self, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *,
                 generator: Union[None, int, torch.Generator] = None, sr_bits: Optional[int] = None):
        self.fmt = element_format(fmt)
        self.rounding = check_rounding(rounding)
        self.overflow = resolve_overflow(self.fmt, overflow)
        quantize(torch.zeros(1, dtype=_F64), self.fmt, self.rounding, self.overflow,
                 generator=0 if self.rounding in STOCHASTIC_MODES else None, sr_bits=sr_bits)  # validate
        self.sr_bits = sr_bits
        self.generator = make_generator(generator, torch.device("cpu")) if generator is not None else None

    def __repr__(self) -> str:
        return f"Chop({str(self.fmt)!r}, rounding={self.rounding!r}, overflow={self.overflow!r})"

    def _kw(self):
        return dict(generator=self.generator, sr_bits=self.sr_bits)

    def __call__(self, x):
        """Round x to the format (what chop(x) does)."""
        if isinstance(x, (numbers.Real, np.floating)):
            x = np.float64(x).reshape(())
        return quantize(x, self.fmt, self.rounding, self.overflow, **self._kw())

    chop = __call__

    def add(self, a, b):
        return add(a, b, self.fmt, self.rounding, self.overflow, **self._kw())

    def sub(self, a, b):
        return sub(a, b, self.fmt, self.rounding, self.overflow, **self._kw())

    def mul(self, a, b):
        return mul(a, b, self.fmt, self.rounding, self.overflow, **self._kw())

    def div(self, a, b):
        return div(a, b, self.fmt, self.rounding, self.overflow, **self._kw())

    def sqrt(self, a):
        return sqrt(a, self.fmt, self.rounding, self.overflow, **self._kw())

    def fma(self, a, b, c):
        return fma(a, b, c, self.fmt, self.rounding, self.overflow, **self._kw())

    def matmul(self, a, b, accum_every: Optional[int] = 1, *, input_format="same", product_format=None):
        """a @ b with inputs rounded to the format (input_format=None: as given) and the running sum
        rounded to it every ``accum_every`` terms."""
        fin = self.fmt if input_format == "same" else input_format
        return matmul(a, b, fin, self.fmt, accum_every, self.rounding, self.overflow,
                      product_format=product_format, **self._kw())

    def dot(self, a, b, accum_every: Optional[int] = 1):
        return dot(a, b, self.fmt, self.fmt, accum_every, self.rounding, self.overflow, **self._kw())

    def sum(self, x, axis: int = -1, accum_every: Optional[int] = 1):
        return sum(x, self.fmt, axis, accum_every, self.rounding, self.overflow, **self._kw())
