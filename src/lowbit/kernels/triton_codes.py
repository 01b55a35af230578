"""Fused Triton ``encode`` / ``decode`` for CUDA: the quantize kernels of triton_quant with codes
written instead of values (one pass: read x, write 1-byte codes and one scale code per block), and
table look-up decoders (read codes, write values).

The rounding is triton_quant's (same seeds, same Philox words per element, so the codes decode to
``quantize``'s bits also for the stochastic modes); codes come from the float32 bits of the rounded
values as in ``codes.codes_of_bits`` (read that module's docstring). Imported lazily, on CUDA only,
like triton_quant.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import BlockFormat, Codebook
from . import reference
from .codes import block_code_claims, code_dtype, code_spec, table
from .cpu_fast import element_spec
from .triton_quant import (AMAX_ITERS, BLOCK, C_INF, N_ROUNDS, TILE, DTYPES, OVERFLOWS, amax_bits_kernel,
                           amax_rule_block, amax_rule_constants, block_offsets, spec_flags, elem_tile, mx_block,
                           on_device, spec_params, pow2ceil, round_bits, kernel_seed)


@triton.jit
def _codes(q, C, IS_FLOAT: tl.constexpr, NEG_ZERO: tl.constexpr, HAS_INF: tl.constexpr,
           HAS_NAN: tl.constexpr):
    """Triton twin of codes.codes_of_bits: int32 codes of float32 values of the format."""
    if IS_FLOAT:
        s_lo = tl.load(C + 0)
        K = tl.load(C + 1)
        bias_adj = tl.load(C + 2)
        sign_bit = tl.load(C + 3)
        nan_code = tl.load(C + 4)
        inf_mag = tl.load(C + 5)
        e_norm = tl.load(C + 6)
        u = q.to(tl.int32, bitcast=True)
        a = u & 0x7FFFFFFF
        neg = u < 0
        E = a >> 23
        sig = (a & 0x7FFFFF) | tl.where(E > 0, 0x800000, 0)
        sh = tl.minimum(tl.maximum(K - tl.maximum(E, 1), 0), 31)
        mag = tl.where(E >= e_norm, (a >> s_lo) + bias_adj, sig >> sh)
        if NEG_ZERO:
            sign = neg
        else:
            sign = neg & (a > 0)
        code = mag | tl.where(sign, sign_bit, 0)
        if HAS_INF:
            code = tl.where(a == C_INF, inf_mag | tl.where(neg, sign_bit, 0), code)
        if HAS_NAN:
            code = tl.where(a > C_INF, nan_code, code)
    else:
        p1 = tl.load(C + 0).to(tl.float32, bitcast=True)
        p2 = tl.load(C + 1).to(tl.float32, bitcast=True)
        code = ((q * p1) * p2).to(tl.int32) & tl.load(C + 2)
    return code


@triton.jit
def _elem_encode_kernel(x_ptr, code_ptr, flag_ptr, n, P, C, seed, MODE: tl.constexpr, OVF: tl.constexpr,
                        HAS_INF: tl.constexpr, NEG_ZERO: tl.constexpr, MAN0: tl.constexpr,
                        VAR_SHIFT: tl.constexpr, ASYM: tl.constexpr, ZERO_SHIFT: tl.constexpr,
                        STOCH: tl.constexpr, C_FLOAT: tl.constexpr, C_NEG_ZERO: tl.constexpr,
                        C_HAS_INF: tl.constexpr, C_HAS_NAN: tl.constexpr, CHECK_NAN: tl.constexpr,
                        BLOCK: tl.constexpr, NR: tl.constexpr):
    """triton_quant._elem_kernel with codes out; CHECK_NAN: flag a nan input (formats without a
    nan code refuse it) with one atomic per program that saw one."""
    offs, rb = elem_tile(tl.program_id(0), seed, STOCH, BLOCK, NR)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    q = round_bits(x, P, rb, 0, MODE, OVF, HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM, ZERO_SHIFT, False)
    code = _codes(q, C, C_FLOAT, C_NEG_ZERO, C_HAS_INF, C_HAS_NAN)
    tl.store(code_ptr + offs, code.to(code_ptr.dtype.element_ty), mask=m)
    if CHECK_NAN:
        isn = (x != x).to(tl.int32)
        if STOCH:
            any_nan = tl.max(tl.max(isn, axis=1), axis=0)
        else:
            any_nan = tl.max(isn, axis=0)
        tl.atomic_max(flag_ptr, any_nan, mask=any_nan > 0)


@triton.jit
def _block_rows(pid, nrows, ROWS: tl.constexpr, SIZE: tl.constexpr, LAYOUT: tl.constexpr):
    """Block index of each position of the amax shape (block_amax) and a mask that keeps one
    position per block, for storing one scale code per block."""
    if LAYOUT == 2:
        q = tl.arange(0, ROWS * SIZE // 4)[:, None]
        rows = pid * ROWS + q // (SIZE // 4)
        keep = (q % (SIZE // 4)) == 0
    elif LAYOUT == 1:
        rows = pid * ROWS + tl.arange(0, ROWS)[:, None, None]
        keep = rows >= 0
    else:
        rows = pid * ROWS + tl.arange(0, ROWS)[:, None]
        keep = rows >= 0
    return rows, keep & (rows < nrows)


@triton.jit
def _mx_encode_kernel(x_ptr, code_ptr, sc_ptr, nrows, size, P, C, seed, emax_elem, sc_emin, sc_emax,
                      sc_bias, sc_nan, MODE: tl.constexpr, HAS_INF: tl.constexpr, NEG_ZERO: tl.constexpr,
                      MAN0: tl.constexpr, VAR_SHIFT: tl.constexpr, ASYM: tl.constexpr,
                      ZERO_SHIFT: tl.constexpr, STOCH: tl.constexpr, C_FLOAT: tl.constexpr,
                      C_NEG_ZERO: tl.constexpr, C_HAS_INF: tl.constexpr, C_HAS_NAN: tl.constexpr,
                      ROWS: tl.constexpr, SIZE: tl.constexpr, NR: tl.constexpr, LAYOUT: tl.constexpr):
    """triton_quant._mx_kernel with element codes and scale codes (exponent + bias) out."""
    pid = tl.program_id(0)
    offs, m = block_offsets(pid, nrows, size, ROWS, SIZE, LAYOUT)
    q, s1, s2, shared, amax = mx_block(x_ptr, offs, m, pid, seed, P, emax_elem, sc_emin, sc_emax, MODE,
                                       HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM, ZERO_SHIFT, ROWS, SIZE,
                                       NR, LAYOUT)
    bad = amax >= C_INF
    code = tl.where(bad, 0, _codes(q, C, C_FLOAT, C_NEG_ZERO, C_HAS_INF, C_HAS_NAN))
    tl.store(code_ptr + offs, code.to(code_ptr.dtype.element_ty), mask=m)
    rows, keep = _block_rows(pid, nrows, ROWS, SIZE, LAYOUT)
    scode = tl.where(bad, sc_nan, shared + sc_bias)
    tl.store(sc_ptr + rows, scode.to(sc_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _amax_rule_encode_kernel(x_ptr, code_ptr, sc_ptr, nrows, size, P, Ps, C, Cs, seed, elem_max, ts_den,
                             amax_t_ptr, amax_s, MODE: tl.constexpr, HAS_INF: tl.constexpr,
                             NEG_ZERO: tl.constexpr, MAN0: tl.constexpr, VAR_SHIFT: tl.constexpr,
                             ASYM: tl.constexpr, ZERO_SHIFT: tl.constexpr, S_HAS_INF: tl.constexpr,
                             S_NEG_ZERO: tl.constexpr, S_MAN0: tl.constexpr, S_VAR_SHIFT: tl.constexpr,
                             S_ZERO_SHIFT: tl.constexpr, STOCH: tl.constexpr, HAS_TS: tl.constexpr,
                             AMAX_SCALAR: tl.constexpr, C_FLOAT: tl.constexpr, C_NEG_ZERO: tl.constexpr,
                             C_HAS_INF: tl.constexpr, C_HAS_NAN: tl.constexpr, CS_FLOAT: tl.constexpr,
                             CS_NEG_ZERO: tl.constexpr, CS_HAS_INF: tl.constexpr,
                             CS_HAS_NAN: tl.constexpr, ROWS: tl.constexpr, SIZE: tl.constexpr,
                             NR: tl.constexpr, LAYOUT: tl.constexpr):
    """triton_quant._amax_rule_kernel with element codes and scale codes out."""
    pid = tl.program_id(0)
    offs, m = block_offsets(pid, nrows, size, ROWS, SIZE, LAYOUT)
    q, scale, d = amax_rule_block(x_ptr, offs, m, pid, seed, P, Ps, elem_max, ts_den, amax_t_ptr, amax_s,
                                  MODE, HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM, ZERO_SHIFT, S_HAS_INF,
                                  S_NEG_ZERO, S_MAN0, S_VAR_SHIFT, S_ZERO_SHIFT, HAS_TS, AMAX_SCALAR,
                                  ROWS, SIZE, NR, LAYOUT)
    code = tl.where(scale != scale, 0, _codes(q, C, C_FLOAT, C_NEG_ZERO, C_HAS_INF, C_HAS_NAN))
    tl.store(code_ptr + offs, code.to(code_ptr.dtype.element_ty), mask=m)
    rows, keep = _block_rows(pid, nrows, ROWS, SIZE, LAYOUT)
    scode = _codes(scale, Cs, CS_FLOAT, CS_NEG_ZERO, CS_HAS_INF, CS_HAS_NAN)
    tl.store(sc_ptr + rows, scode.to(sc_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _elem_decode_kernel(code_ptr, out_ptr, tab_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = tl.load(code_ptr + offs, mask=m, other=0).to(tl.int32)
    v = tl.load(tab_ptr + c, mask=m, other=0.0)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _block_decode_kernel(code_ptr, sc_ptr, out_ptr, etab, stab, ts_ptr, nrows, size, HAS_TS: tl.constexpr,
                         ROWS: tl.constexpr, SIZE: tl.constexpr):
    """value = element table[code] * scale table[scale code] (* tensor scale), float32 products."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, SIZE)[None, :]
    rm = rows < nrows
    m = rm & (cols < size)
    offs = rows * size + cols
    c = tl.load(code_ptr + offs, mask=m, other=0).to(tl.int32)
    q = tl.load(etab + c, mask=m, other=0.0)
    sc = tl.load(sc_ptr + rows, mask=rm, other=0).to(tl.int32)
    d = tl.load(stab + sc, mask=rm, other=0.0)
    if HAS_TS:
        d = d * tl.load(ts_ptr)
    v = q * d
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _codebook_kernel(x_ptr, out_ptr, flag_ptr, tab, n, N: tl.constexpr, MODE: tl.constexpr,
                     ENCODE: tl.constexpr, CHECK_NAN: tl.constexpr, BLOCK: tl.constexpr):
    """codebook_fast.pick in Triton: values out, or (ENCODE) the indices as codes."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    t_first = tl.load(tab)
    t_last = tl.load(tab + N - 1)
    xc = tl.minimum(tl.maximum(x, t_first), t_last)
    lo_i = tl.zeros_like(offs)
    for k in tl.static_range(1, N - 1):
        lo_i += (xc >= tl.load(tab + k)).to(tl.int32)
    lo = tl.load(tab + lo_i)
    hi = tl.load(tab + lo_i + 1)
    s = lo + hi
    bb = s - lo
    err = (lo - (s - bb)) + (hi - bb)
    d = (xc + xc) - s
    nearer_hi = d > err
    tie = d == err
    inexact = xc > lo
    odd = (lo_i & 1) == 1
    if MODE == 0:
        up = nearer_hi | (tie & odd)
    elif MODE == 1:
        up = nearer_hi | (tie & (xc > 0))
    elif MODE == 2:
        up = nearer_hi | (tie & (xc <= 0))
    elif MODE == 3:
        up = inexact & (xc < 0)
    elif MODE == 4:
        up = inexact
    elif MODE == 5:
        up = xc != xc
    else:
        up = inexact & (odd == 0)
    up = up | (xc == t_last)
    if ENCODE:
        code = lo_i + up.to(tl.int32)
        tl.store(out_ptr + offs, code.to(out_ptr.dtype.element_ty), mask=m)
        if CHECK_NAN:
            any_nan = tl.max((x != x).to(tl.int32), axis=0)
            tl.atomic_max(flag_ptr, any_nan, mask=any_nan > 0)
    else:
        q = tl.where(up, hi, lo)
        q = tl.where(x != x, x, q)
        tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=m)


_TAB_CACHE: dict = {}


def _codebook_table(fmt, device):
    from .codebook_fast import table_f32
    key = (fmt, str(device))
    if key not in _TAB_CACHE:
        t = table_f32(fmt)
        _TAB_CACHE[key] = None if t is None else t.to(device)
    return _TAB_CACHE[key]


def codebook(x: torch.Tensor, fmt, mode: str, encode: bool) -> Optional[tuple]:
    """Codebook quantize (values) or encode (codes, nan seen) on CUDA; None where not claimed."""
    from .codebook_fast import MODES
    if not on_device(x) or x.dtype not in DTYPES or x.numel() >= 2**31 - BLOCK or mode not in MODES \
            or len(fmt.table) > 64:
        return None
    tab = _codebook_table(fmt, x.device)
    if tab is None:
        return None
    xc = x.contiguous()
    out = torch.empty(xc.shape, dtype=code_dtype(fmt.bits) if encode else xc.dtype, device=x.device)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device) if encode else out
    n = xc.numel()
    if n:
        _codebook_kernel[(triton.cdiv(n, BLOCK),)](xc, out, flag, tab, n, N=len(fmt.table), MODE=MODES[mode],
                                                   ENCODE=encode, CHECK_NAN=encode, BLOCK=BLOCK, num_warps=8)
    if encode:
        return out, bool(flag.item()) if n else False
    return (out.view(x.shape),)


# --- host side ----------------------------------------------------------------------------------------

_C_CACHE: dict = {}


def _cparams(cs, device) -> torch.Tensor:
    key = (cs, device)
    p = _C_CACHE.get(key)
    if p is None:
        p = torch.tensor(cs.numbers(), dtype=torch.int32, device=device)
        _C_CACHE[key] = p
    return p


def _cflags(cs, prefix: str = "C") -> dict:
    return {f"{prefix}_FLOAT": cs.is_float, f"{prefix}_NEG_ZERO": cs.neg_zero,
            f"{prefix}_HAS_INF": cs.has_inf, f"{prefix}_HAS_NAN": cs.has_nan}


def encode_element(x: torch.Tensor, fmt, mode: str, overflow: str, generator=None,
                   sr_bits: Optional[int] = None) -> Optional[tuple]:
    """(codes in x's shape, whether x holds nan: checked only for formats without a nan code)."""
    if not on_device(x) or x.dtype not in DTYPES or x.numel() >= 2**31 - BLOCK:
        return None
    if isinstance(fmt, Codebook):
        return codebook(x, fmt, mode, encode=True)
    spec = element_spec(fmt, mode, overflow, sr_bits)
    cs = code_spec(fmt)
    if spec is None or cs is None:
        return None
    xc = x.contiguous()
    codes = torch.empty(xc.shape, dtype=code_dtype(cs.bits), device=x.device)
    n = xc.numel()
    if n == 0:
        return codes, False
    check = not cs.has_nan
    flag = torch.zeros(1, dtype=torch.int32, device=x.device) if check else codes
    _elem_encode_kernel[(triton.cdiv(n, BLOCK),)](
        xc, codes, flag, n, spec_params(spec, x.device), _cparams(cs, x.device), kernel_seed(spec, generator, x.device),
        OVF=OVERFLOWS[spec.overflow], CHECK_NAN=check, BLOCK=BLOCK, NR=N_ROUNDS, num_warps=8,
        **spec_flags(spec), **_cflags(cs))
    return codes, (bool(flag.item()) if check else False)


def encode_block(x: torch.Tensor, fmt: BlockFormat, mode: str, axis: int, generator=None,
                 sr_bits: Optional[int] = None, tensor_amax=None) -> Optional[tuple]:
    """(element codes in x's shape, scale codes, tensor scale or None), or None where not claimed."""
    if not on_device(x) or x.dtype not in DTYPES or x.numel() >= 2**31 - TILE or not x.numel():
        return None
    claim = block_code_claims(fmt, mode, sr_bits)
    xt = x.movedim(axis, -1)
    size = fmt.size
    if claim is None or xt.shape[-1] % size or size > 1024:
        return None
    espec, sspec, cs, css = claim
    xb = xt.contiguous()
    n = xb.numel()
    nrows = n // size
    codes = torch.empty(xb.shape, dtype=code_dtype(cs.bits), device=x.device)
    scodes = torch.empty(nrows, dtype=torch.uint8, device=x.device)
    SIZE = max(4, pow2ceil(size))
    ROWS = max(1, TILE // SIZE)
    grid = (triton.cdiv(nrows, ROWS),)
    P = spec_params(espec, x.device)
    seed = kernel_seed(espec, generator, x.device)
    layout = 0 if not espec.stochastic else (2 if SIZE == size else 1)
    common = dict(ROWS=ROWS, SIZE=SIZE, NR=N_ROUNDS, LAYOUT=layout, num_warps=8, **spec_flags(espec), **_cflags(cs))
    ts = None
    if sspec is None:
        el, sc = fmt.element, fmt.scale
        _mx_encode_kernel[grid](xb, codes, scodes, nrows, size, P, _cparams(cs, x.device), seed, int(el.emax),
                                int(sc.emin), int(sc.emax), int(sc.bias), int(sc.nan_code), **common)
    else:
        scalar = bool(fmt.tensor_scale) and tensor_amax is not None and not isinstance(tensor_amax, torch.Tensor)
        if tensor_amax is not None and fmt.tensor_scale and not scalar:
            amax_t = tensor_amax.to(device=x.device, dtype=torch.float32).reshape(1).view(torch.int32)
        else:
            amax_t = torch.zeros(1, dtype=torch.int32, device=x.device)
        if fmt.tensor_scale and tensor_amax is None:
            amax_bits_kernel[(triton.cdiv(n, BLOCK * AMAX_ITERS),)](xb, amax_t, n, BLOCK=BLOCK,
                                                                    ITERS=AMAX_ITERS, num_warps=8)
        ts_den, elem_max = amax_rule_constants(fmt)
        _amax_rule_encode_kernel[grid](
            xb, codes, scodes, nrows, size, P, spec_params(sspec, x.device), _cparams(cs, x.device),
            _cparams(css, x.device), seed, elem_max, ts_den, amax_t, float(tensor_amax) if scalar else 0.0,
            S_HAS_INF=sspec.has_inf, S_NEG_ZERO=sspec.neg_zero, S_MAN0=sspec.man0,
            S_VAR_SHIFT=sspec.var_shift, S_ZERO_SHIFT=sspec.s_lo == 0, HAS_TS=bool(fmt.tensor_scale),
            AMAX_SCALAR=scalar, **_cflags(css, "CS"), **common)
        if fmt.tensor_scale:
            amax = tensor_amax if scalar else amax_t.view(torch.float32)[0]
            ts = reference.tensor_scale_of_amax(amax, fmt).to(x.device)
    codes = codes.movedim(-1, axis)
    scodes = scodes.view(xt.shape[:-1] + (xt.shape[-1] // size,)).movedim(-1, axis)
    return codes, scodes, ts


def decode_element(codes: torch.Tensor, fmt, dtype: torch.dtype) -> Optional[torch.Tensor]:
    if not on_device(codes) or dtype not in DTYPES or codes.numel() >= 2**31 - BLOCK:
        return None
    tab = table(fmt, codes.device)
    if tab is None:
        return None
    cc = codes.contiguous()
    out = torch.empty(cc.shape, dtype=dtype, device=codes.device)
    n = cc.numel()
    if n:
        _elem_decode_kernel[(triton.cdiv(n, BLOCK),)](cc, out, tab, n, BLOCK=BLOCK, num_warps=8)
    return out


def decode_block(codes: torch.Tensor, scodes: torch.Tensor, ts: Optional[torch.Tensor], fmt: BlockFormat,
                 axis: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    if not on_device(codes) or dtype not in DTYPES or codes.numel() >= 2**31 - TILE or fmt.size > 1024:
        return None
    et, st = table(fmt.element, codes.device), table(fmt.scale, codes.device)
    if et is None or st is None or (fmt.pow2_scale and fmt.tensor_scale):
        return None
    ct = codes.movedim(axis, -1).contiguous()
    sc = scodes.movedim(axis, -1).contiguous()
    out = torch.empty(ct.shape, dtype=dtype, device=codes.device)
    n = ct.numel()
    if n:
        size = fmt.size
        nrows = n // size
        SIZE = max(4, pow2ceil(size))
        ROWS = max(1, TILE // SIZE)
        has_ts = ts is not None and not fmt.pow2_scale
        tsv = ts.to(device=codes.device, dtype=torch.float32).reshape(1) if has_ts else st
        _block_decode_kernel[(triton.cdiv(nrows, ROWS),)](ct, sc, out, et, st, tsv, nrows, size, HAS_TS=has_ts,
                                                          ROWS=ROWS, SIZE=SIZE, num_warps=8)
    return out.movedim(-1, axis)
