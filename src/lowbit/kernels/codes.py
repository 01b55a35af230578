"""Codes from float32 bits, and the fast CPU ``encode`` / ``decode``.

A value that a format holds exactly is turned into its code from its float32 bit pattern ``a``
(magnitude) and sign, without float64 arithmetic:

* minifloats: a value in the format's normal range has the code ``(a >> (23 - man)) + ((bias - 127)
  << man)`` (the float32 exponent field re-biased, the top ``man`` mantissa bits kept); a subnormal
  one is its significand shifted to the format's smallest step, ``sig >> (K - E)`` (the same ``K``
  as the rounding in cpu_fast); then the sign bit, inf and nan codes.
* integers and fixed point: ``value * 2**frac`` (exact), two's complement, masked to the width.

``decode`` is a table look-up: the float32 value of every code (formats of at most 16 bits whose
values float32 holds), times the block scale (itself looked up) and NVFP4's tensor scale, in the
reference's float32 arithmetic. ``triton_codes`` is the CUDA twin of this module; both give the
reference's codes bit for bit (tests/test_codes_fast.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from ..formats import BlockFormat, Codebook, FloatFormat, IntFormat
from . import cpu_fast
from .cpu_fast import ABS, INF_BITS, element_spec, f32_bits

MAX_TABLE_BITS = 16


@dataclass(frozen=True)
class CodeSpec:
    """How to turn float32 values of one element format into codes."""

    is_float: bool
    neg_zero: bool
    has_inf: bool
    has_nan: bool
    bits: int
    nums: tuple    # float: (s_lo, K, bias_adj, sign_bit, nan_code, inf_mag, E_min_normal)
                   # int: (pattern of 2**f1, pattern of 2**f2, mask) with f1 + f2 = frac

    def static_key(self) -> tuple:
        return (self.is_float, self.neg_zero, self.has_inf, self.has_nan)

    def numbers(self) -> list:
        return list(self.nums) + [0] * (8 - len(self.nums))


@lru_cache(maxsize=256)
def code_spec(fmt) -> Optional[CodeSpec]:
    """The CodeSpec of an element format the float32 bit path rounds (cpu_fast.element_spec), of at
    most 31 bits; None otherwise."""
    if element_spec(fmt, "nearest_even") is None or fmt.bits > 31:
        return None
    if isinstance(fmt, FloatFormat):
        m = fmt.man
        K = 23 - m + fmt.emin + 127
        sign_bit = 1 << (fmt.exp + m)
        nan_code = fmt.nan_code if fmt.has_nan else 0
        if fmt.special == "ieee":
            inf_mag = ((1 << fmt.exp) - 1) << m
        else:
            inf_mag = sign_bit - 1
        nums = (23 - m, K, (fmt.bias - 127) << m, sign_bit, nan_code, inf_mag, fmt.emin + 127)
        return CodeSpec(True, fmt.has_negative_zero, fmt.has_inf, fmt.has_nan, fmt.bits, nums)
    if isinstance(fmt, IntFormat):
        f1 = fmt.frac // 2
        nums = (f32_bits(2.0**f1), f32_bits(2.0**(fmt.frac - f1)), (1 << fmt.width) - 1)
        return CodeSpec(False, False, False, False, fmt.bits, nums)
    return None


def code_dtype(bits: int) -> torch.dtype:
    if bits <= 8:
        return torch.uint8
    return torch.int32 if bits <= 31 else torch.int64


def codes_of_bits(q: torch.Tensor, C: torch.Tensor, static: tuple) -> torch.Tensor:
    """int32 codes of float32 ``q`` (values of the format, nan/inf where it has them); ``C`` is
    CodeSpec.numbers() as an int32 tensor, ``static`` its static_key()."""
    is_float, neg_zero, has_inf, has_nan = static
    if not is_float:
        k = ((q * C[0].view(torch.float32)) * C[1].view(torch.float32)).to(torch.int32)
        return k & C[2]
    s_lo, K, bias_adj, sign_bit, nan_code, inf_mag, e_norm = (C[i] for i in range(7))
    u = q.view(torch.int32)
    a = u & ABS
    neg = u < 0
    E = a >> 23
    sig = (a & 0x7FFFFF) | torch.where(E > 0, 0x800000, 0)
    sh = torch.clamp(K - torch.clamp(E, min=1), 0, 31)
    mag = torch.where(E >= e_norm, (a >> s_lo) + bias_adj, torch.bitwise_right_shift(sig, sh))
    sign = neg if neg_zero else (neg & (a > 0))
    code = mag | torch.where(sign, sign_bit, 0)
    if has_inf:
        code = torch.where(a == INF_BITS, inf_mag | torch.where(neg, sign_bit, 0), code)
    if has_nan:
        code = torch.where(a > INF_BITS, nan_code, code)
    return code


# --- CPU encode ---------------------------------------------------------------------------------------

def _elem_encode_fn(x, P, C, seeds, *, static):
    st, cst, stochastic, cdt = static
    rb = None
    if stochastic:
        idx = torch.arange(x.numel(), dtype=torch.int32, device=x.device).view(x.shape)
        rb = cpu_fast.random_bits(idx, seeds[0], seeds[1])
    q = cpu_fast.round_bits(x, st, P, rb)
    return codes_of_bits(q, C, cst).to(cdt), torch.isnan(x).any()


def encode_element(x: torch.Tensor, fmt, mode: str, overflow: str, generator=None,
                   sr_bits: Optional[int] = None) -> Optional[tuple]:
    """(codes in x's shape, whether x holds nan) on the CPU fast path, or None where it does not
    claim the work. The caller refuses nan for formats without a nan code."""
    if x.device.type != "cpu" or x.dtype not in cpu_fast.DTYPES or x.numel() >= 2**31:
        return None
    if isinstance(fmt, Codebook):
        from . import codebook_fast
        return codebook_fast.encode_element(x, fmt, mode)
    spec = element_spec(fmt, mode, overflow, sr_bits)
    cs = code_spec(fmt)
    if spec is None or cs is None:
        return None
    x32 = x.float().contiguous()
    if x32.numel() == 0:
        return torch.zeros(x.shape, dtype=code_dtype(cs.bits)), False
    P = torch.tensor(spec.numbers(), dtype=torch.int32)
    C = torch.tensor(cs.numbers(), dtype=torch.int32)
    seeds = cpu_fast.seed_tensor(spec, generator, x.device)
    static = (spec.static_key(), cs.static_key(), spec.stochastic, code_dtype(cs.bits))
    codes, has_nan = cpu_fast.run_kernel("enc", _elem_encode_fn, static, (x32.view(-1), P, C, seeds), x32.numel())
    return codes.view(x.shape), bool(has_nan)


def _block_pow2_encode_fn(xb, P, C, seeds, emax_elem, sc_emin, sc_emax, sc_bias, sc_nan, *, static):
    """OCP MX encode: cpu_fast._block_pow2_fn's arithmetic, element and scale codes out."""
    st, cst, stochastic, cdt = static
    ab = xb.view(torch.int32) & ABS
    amax = xb.abs().amax(dim=1, keepdim=True).view(torch.int32) & ABS
    bad = amax >= INF_BITS
    shared = torch.clamp((amax >> 23) - 127 - emax_elem, sc_emin, sc_emax)
    s1 = torch.div(shared, 2, rounding_mode="floor")
    s2 = shared - s1
    y = (xb * cpu_fast.pow2(-s1)) * cpu_fast.pow2(-s2)
    rb = None
    if stochastic:
        idx = torch.arange(xb.numel(), dtype=torch.int32, device=xb.device).view(xb.shape)
        rb = cpu_fast.random_bits(idx, seeds[0], seeds[1])
    q = cpu_fast.round_bits(y, st, P, rb, nonzero=ab > 0)
    codes = torch.where(bad, 0, codes_of_bits(q, C, cst))
    scodes = torch.where(bad, sc_nan, shared + sc_bias)
    return codes.to(cdt), scodes.view(-1).to(torch.uint8)


def _block_amax_encode_fn(xb, P, Ps, C, Cs, seeds, elem_max, ts_den, amax_given, *, static):
    """Amax-rule encode (NVFP4, ...): cpu_fast.amax_rule_round's arithmetic, codes out, and the
    tensor scale."""
    st, st_scale, cst, cst_scale, stochastic, has_ts, given, cdt = static
    q, scale, ts, _ = cpu_fast.amax_rule_round(xb, P, Ps, seeds, elem_max, ts_den, amax_given, st,
                                               st_scale, stochastic, has_ts, given)
    codes = torch.where(torch.isnan(scale), 0, codes_of_bits(q, C, cst))
    return codes.to(cdt), codes_of_bits(scale, Cs, cst_scale).view(-1).to(torch.uint8), ts


@lru_cache(maxsize=256)
def block_code_claims(fmt: BlockFormat, mode: str, sr_bits=None) -> Optional[tuple]:
    """(element Spec, scale Spec or None, element CodeSpec, scale CodeSpec or None) where the fast
    encode applies: the quantize claim, codes for the element format, and a scale format with a nan
    code (a block holding nan/inf stores it)."""
    claim = cpu_fast.block_claims(fmt, mode, sr_bits)
    cs = code_spec(fmt.element)
    if claim is None or cs is None or not fmt.scale.has_nan:
        return None
    espec, sspec = claim
    if sspec is None:
        if fmt.scale.bits > 8:
            return None
        return espec, None, cs, None
    css = code_spec(fmt.scale)
    if css is None or css.bits > 8:
        return None
    return espec, sspec, cs, css


def encode_block(x: torch.Tensor, fmt: BlockFormat, mode: str, axis: int, generator=None,
                 sr_bits: Optional[int] = None, tensor_amax: Optional[float] = None) -> Optional[tuple]:
    """(element codes in x's shape, scale codes, tensor scale or None) on the CPU fast path, or None."""
    if x.device.type != "cpu" or x.dtype not in cpu_fast.DTYPES or x.numel() >= 2**31 or not x.numel():
        return None
    claim = block_code_claims(fmt, mode, sr_bits)
    xt = x.movedim(axis, -1)
    if claim is None or xt.shape[-1] % fmt.size:
        return None
    espec, sspec, cs, css = claim
    xb = xt.float().contiguous().view(-1, fmt.size)
    P = torch.tensor(espec.numbers(), dtype=torch.int32)
    C = torch.tensor(cs.numbers(), dtype=torch.int32)
    seeds = cpu_fast.seed_tensor(espec, generator, x.device)
    ts = None
    if sspec is None:
        el, sc = fmt.element, fmt.scale
        args = (xb, P, C, seeds, int(el.emax), int(sc.emin), int(sc.emax), int(sc.bias), int(sc.nan_code))
        static = (espec.static_key(), cs.static_key(), espec.stochastic, code_dtype(cs.bits))
        codes, scodes = cpu_fast.run_kernel("mx_enc", _block_pow2_encode_fn, static, args, xb.numel())
    else:
        given = bool(fmt.tensor_scale) and tensor_amax is not None
        args = (xb, P, torch.tensor(sspec.numbers(), dtype=torch.int32), C,
                torch.tensor(css.numbers(), dtype=torch.int32), seeds,
                torch.tensor(fmt.element.max, dtype=torch.float32),
                torch.tensor(fmt.element.max * fmt.scale.max, dtype=torch.float32),
                torch.tensor(tensor_amax if given else 0.0, dtype=torch.float32))
        static = (espec.static_key(), sspec.static_key(), cs.static_key(), css.static_key(),
                  espec.stochastic, bool(fmt.tensor_scale), given, code_dtype(cs.bits))
        codes, scodes, ts = cpu_fast.run_kernel("amax_enc", _block_amax_encode_fn, static, args, xb.numel())
        ts = ts.reshape(()) if fmt.tensor_scale else None
    codes = codes.view(xt.shape).movedim(-1, axis)
    scodes = scodes.view(xt.shape[:-1] + (xt.shape[-1] // fmt.size,)).movedim(-1, axis)
    return codes, scodes, ts


# --- decode: table look-up ----------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _table_cpu(fmt) -> Optional[torch.Tensor]:
    """float32 value of every code, or None where the format has more than MAX_TABLE_BITS bits or
    values float32 does not hold exactly."""
    if fmt.bits > MAX_TABLE_BITS:
        return None
    v = fmt.code_values()      # nan where a code means nan (or is unused: int4n's -8)
    t = v.float()
    same = (t.double() == v) | (torch.isnan(v) & torch.isnan(t))
    return t if bool(same.all()) else None


_TABLES: dict = {}


def table(fmt, device) -> Optional[torch.Tensor]:
    key = (fmt, str(device))
    if key not in _TABLES:
        t = _table_cpu(fmt)
        _TABLES[key] = None if t is None else t.to(device)
    return _TABLES[key]


_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _decode_fn(c, tab, *, static):
    return tab[c.to(torch.int64)].to(static)


def decode_element(codes: torch.Tensor, fmt, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Values of element codes (CPU), or None where the table path does not apply."""
    if codes.device.type != "cpu" or dtype not in _OUT_DTYPES:
        return None
    tab = table(fmt, codes.device)
    if tab is None:
        return None
    if not codes.numel():
        return torch.empty(codes.shape, dtype=dtype)
    out = cpu_fast.run_kernel("dec", _decode_fn, dtype, (codes.reshape(-1), tab), codes.numel())
    return out.view(codes.shape)


def _block_decode_fn(c, sc, etab, stab, ts, *, static):
    has_ts, dtype = static
    d = stab[sc.to(torch.int64)]
    if has_ts:
        d = d * ts
    return (etab[c.to(torch.int64)] * d.unsqueeze(-1)).to(dtype)


def decode_block(codes: torch.Tensor, scodes: torch.Tensor, ts: Optional[torch.Tensor], fmt: BlockFormat,
                 axis: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Values of block codes (CPU): element value * scale value (* tensor scale) in float32, the
    reference's arithmetic; None where the table path does not apply."""
    if codes.device.type != "cpu" or dtype not in _OUT_DTYPES:
        return None
    et, st = table(fmt.element, codes.device), table(fmt.scale, codes.device)
    if et is None or st is None or (fmt.pow2_scale and fmt.tensor_scale):
        return None
    ct = codes.movedim(axis, -1)
    if not ct.numel():
        return torch.empty(codes.shape, dtype=dtype)
    c2 = ct.reshape(-1, fmt.size)
    sc = scodes.movedim(axis, -1).reshape(-1)
    has_ts = ts is not None and not fmt.pow2_scale
    tsv = ts.float().reshape(()) if has_ts else torch.ones(())
    out = cpu_fast.run_kernel("bdec", _block_decode_fn, (has_ts, dtype), (c2, sc, et, st, tsv), c2.numel())
    return out.view(ct.shape).movedim(-1, axis)
