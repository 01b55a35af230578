"""Fused Triton kernels for CUDA: one pass over the tensor for element formats, one pass with the
block reduction fused in for MX / BFP / user block formats, and an amax pass plus one fused pass
for NVFP4 (its per-tensor scale needs the whole tensor's amax first).

The arithmetic is the bit arithmetic of ``cpu_fast.round_bits`` (read that module's docstring),
written again in Triton; it uses the same ``Spec`` numbers, so both fast paths claim the same work
and match the reference bit for bit in every deterministic mode. Stochastic rounding draws its
random bits from Philox (``tl.randint``) keyed by a seed taken from the caller's generator and by
the element's index: reproducible with a seed, independent of launch configuration.

Float arithmetic that the reference does in float32 (NVFP4's scale computation) uses correctly
rounded division (``div_rn``): Triton's plain ``/`` is an approximate division on NVIDIA GPUs.

This module imports triton at the top: ``kernels.triton_backend()`` imports it lazily and only where
CUDA is available.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import BlockFormat, Codebook
from .cpu_fast import INF_BITS, NAN_BITS, QNAN_BIT, SIGN, block_claims, draw_seeds, element_spec

MODES = {"nearest_even": 0, "nearest_away": 1, "nearest_zero": 2, "toward_zero": 3, "up": 4,
         "down": 5, "odd": 6, "stochastic": 7, "stochastic_half": 8}
OVERFLOWS = {"saturate": 0, "inf": 1, "nan": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (tests without a GPU)


def on_device(x: torch.Tensor) -> bool:
    return x.is_cuda or _INTERPRET

# module constants used inside kernels must be tl.constexpr
C_SIGN = tl.constexpr(SIGN)
C_INF = tl.constexpr(INF_BITS)
C_NAN = tl.constexpr(NAN_BITS)
C_QNAN = tl.constexpr(QNAN_BIT)
C_INFF = tl.constexpr(float("inf"))     # (a nan constexpr would fail Triton's global check: nan != nan)

BLOCK = 4096        # elements per program (element kernels)
TILE = 4096         # elements per program (block kernels): TILE // block_size rows
N_ROUNDS = 7        # Philox4x32 rounds: 7 passes BigCrush (Salmon et al. 2011); 10 is Random123's margin
AMAX_ITERS = 8      # tiles per program in the per-tensor amax pass (one atomic per program)


@triton.jit
def round_bits(x, P, rb, nz, MODE: tl.constexpr, OVF: tl.constexpr, HAS_INF: tl.constexpr,
               NEG_ZERO: tl.constexpr, MAN0: tl.constexpr, VAR_SHIFT: tl.constexpr,
               ASYM: tl.constexpr, ZERO_SHIFT: tl.constexpr, USE_NZ: tl.constexpr):
    """Triton twin of cpu_fast.round_bits: float32 in, float32 out, P = Spec.numbers()."""
    K = tl.load(P + 0)
    s_lo = tl.load(P + 1)
    s_hi = tl.load(P + 2)
    min_sub = tl.load(P + 3)
    half = tl.load(P + 4)
    max_pos = tl.load(P + 5)
    max_neg = tl.load(P + 6)
    keep = tl.load(P + 7)
    k_tiny = tl.load(P + 8)
    parity_c = tl.load(P + 9)
    f1 = tl.load(P + 10).to(tl.float32, bitcast=True)
    f2 = tl.load(P + 11).to(tl.float32, bitcast=True)

    u = x.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    neg = u < 0
    E = a >> 23
    if VAR_SHIFT:
        s = tl.minimum(tl.maximum(K - E, s_lo), s_hi)
    else:
        s = tl.zeros_like(a) + s_lo
    one = tl.full(a.shape, 1, tl.int32) << s
    mask = one - 1
    lo = a & ~mask
    if MODE == 0 or MODE == 6:
        if MAN0:
            odd = (E + parity_c) & 1
        else:
            odd = ((a | 0x800000) >> s) & 1
    if MODE == 0:
        bias = (one >> 1) - 1 + odd
        if ZERO_SHIFT:
            bias = tl.maximum(bias, 0)
        r = (a + bias) & ~mask
    elif MODE == 1:
        r = (a + (one >> 1)) & ~mask
    elif MODE == 2:
        bias = (one >> 1) - 1
        if ZERO_SHIFT:
            bias = tl.maximum(bias, 0)
        r = (a + bias) & ~mask
    elif MODE == 3:
        r = lo
    elif MODE == 4:
        r = (a + tl.where(neg, 0, mask)) & ~mask
    elif MODE == 5:
        r = (a + tl.where(neg, mask, 0)) & ~mask
    elif MODE == 6:
        r = lo + tl.where(((a & mask) != 0) & (odd == 0), one, 0)
    elif MODE == 7:
        r = (a + ((rb & keep) >> (23 - s))) & ~mask
    else:
        r = lo + tl.where(((a & mask) != 0) & (rb < 0), one, 0)

    if USE_NZ:
        nonzero = nz
    else:
        nonzero = a > 0
    if MODE == 0 or MODE == 2:
        up = a > half
    elif MODE == 1:
        up = (a >= half) & nonzero
    elif MODE == 3:
        up = a < 0
    elif MODE == 4:
        up = nonzero & (u >= 0)
    elif MODE == 5:
        up = nonzero & neg
    elif MODE == 6:
        up = nonzero
    elif MODE == 7:
        t = tl.floor((tl.abs(x) * f1) * f2).to(tl.int32)
        rk = ((rb >> 8) & 0xFFFFFF) >> (24 - k_tiny)
        up = ((t + rk) >> k_tiny) > 0
    else:
        up = nonzero & (rb < 0)
    r = tl.where(a < min_sub, tl.where(up, min_sub, 0), r)

    if ASYM:
        maxb = tl.where(neg, max_neg, max_pos)
    else:
        maxb = tl.zeros_like(a) + max_pos
    if OVF == 0:
        r = tl.minimum(r, maxb)
    else:
        over = r > maxb
        if OVF == 2:
            big = tl.full(a.shape, C_NAN, tl.int32)
        else:
            if HAS_INF:
                big = tl.full(a.shape, C_INF, tl.int32)
            else:
                big = tl.full(a.shape, C_NAN, tl.int32)
            if MODE == 3:
                big = tl.where(a < C_INF, maxb, big)
            elif MODE == 4:
                big = tl.where(neg & (a < C_INF), maxb, big)
            elif MODE == 5:
                big = tl.where((u >= 0) & (a < C_INF), maxb, big)
        r = tl.where(over, big, r)
    r = tl.where(a > C_INF, a | C_QNAN, r)
    if NEG_ZERO:
        out = r | (u & C_SIGN)
    else:
        out = tl.where(r == 0, 0, r | (u & C_SIGN))
    return out.to(tl.float32, bitcast=True)


@triton.jit
def _pick4(r0, r1, r2, r3, lane):
    """Word ``lane`` (0..3, broadcast along the last axis) of four Philox outputs, as int32."""
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return r.to(tl.int32, bitcast=True)


@triton.jit
def elem_tile(pid, seed, STOCH: tl.constexpr, BLOCK: tl.constexpr, NR: tl.constexpr):
    """Offsets of program ``pid``'s tile and, when STOCH, each element's 32 random bits."""
    if STOCH:
        # the tile as (BLOCK/4, 4): one Philox call per row gives the four words of its four
        # elements, computed in the layout the loads use (no shuffles through shared memory)
        rows = tl.arange(0, BLOCK // 4)
        lane = tl.arange(0, 4)[None, :]
        offs = pid * BLOCK + rows[:, None] * 4 + lane
        r0, r1, r2, r3 = tl.randint4x(seed, pid * (BLOCK // 4) + rows, NR)
        rb = _pick4(r0[:, None], r1[:, None], r2[:, None], r3[:, None], lane)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        rb = 0
    return offs, rb


@triton.jit
def _elem_kernel(x_ptr, out_ptr, n, P, seed, MODE: tl.constexpr, OVF: tl.constexpr,
                 HAS_INF: tl.constexpr, NEG_ZERO: tl.constexpr, MAN0: tl.constexpr,
                 VAR_SHIFT: tl.constexpr, ASYM: tl.constexpr, ZERO_SHIFT: tl.constexpr,
                 STOCH: tl.constexpr, BLOCK: tl.constexpr, NR: tl.constexpr):
    offs, rb = elem_tile(tl.program_id(0), seed, STOCH, BLOCK, NR)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    q = round_bits(x, P, rb, 0, MODE, OVF, HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM, ZERO_SHIFT,
                   False)
    tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def pow2(e):
    """2.0**e (float32) for int32 e in [-126, 127]."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def nan_where(cond, v):
    return tl.where(cond, tl.full(v.shape, C_NAN, tl.int32).to(tl.float32, bitcast=True), v)


@triton.jit
def block_offsets(pid, nrows, size, ROWS: tl.constexpr, SIZE: tl.constexpr, LAYOUT: tl.constexpr):
    """Element offsets of this program's ROWS blocks and their mask, in one of three tile shapes:
    0: (ROWS, SIZE), the deterministic modes;
    1: (ROWS, SIZE/4, 4), stochastic modes, any block size (last axis: the four words of one
       Philox call);
    2: (ROWS*SIZE/4, 4), stochastic modes when the block size is SIZE: quads of consecutive
       elements, laid out like the element kernel's tile (coalesced loads, no shuffles)."""
    if LAYOUT == 2:
        q = tl.arange(0, ROWS * SIZE // 4)[:, None]
        lane = tl.arange(0, 4)[None, :]
        rows = pid * ROWS + q // (SIZE // 4)
        offs = pid * (ROWS * SIZE) + q * 4 + lane
        m = (rows < nrows) & (lane < 4)
    else:
        if LAYOUT == 1:
            rows = pid * ROWS + tl.arange(0, ROWS)[:, None, None]
            grp = tl.arange(0, SIZE // 4)[None, :, None]
            lane = tl.arange(0, 4)[None, None, :]
            cols = grp * 4 + lane
        else:
            rows = pid * ROWS + tl.arange(0, ROWS)[:, None]
            cols = tl.arange(0, SIZE)[None, :]
        m = (rows < nrows) & (cols < size)
        offs = rows * size + cols
    return offs, m


@triton.jit
def block_random(pid, seed, ROWS: tl.constexpr, SIZE: tl.constexpr, LAYOUT: tl.constexpr,
                 NR: tl.constexpr):
    if LAYOUT == 2:
        q = tl.arange(0, ROWS * SIZE // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, pid * (ROWS * SIZE // 4) + q, NR)
        lane = tl.arange(0, 4)[None, :]
        return _pick4(r0[:, None], r1[:, None], r2[:, None], r3[:, None], lane)
    elif LAYOUT == 1:
        rows = pid * ROWS + tl.arange(0, ROWS)[:, None]
        grp = tl.arange(0, SIZE // 4)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, rows * (SIZE // 4) + grp, NR)
        lane = tl.arange(0, 4)[None, None, :]
        return _pick4(r0[:, :, None], r1[:, :, None], r2[:, :, None], r3[:, :, None], lane)
    else:
        return 0


@triton.jit
def block_amax(ab, ROWS: tl.constexpr, SIZE: tl.constexpr, LAYOUT: tl.constexpr):
    """Largest pattern of each block, shaped to broadcast against the tile."""
    if LAYOUT == 2:
        aq = tl.max(ab, axis=1)                                       # per quad
        am = tl.max(tl.reshape(aq, (ROWS, SIZE // 4)), axis=1)        # per block
        back = tl.reshape(tl.broadcast_to(am[:, None], (ROWS, SIZE // 4)), (ROWS * SIZE // 4,))
        return back[:, None]
    elif LAYOUT == 1:
        return tl.max(tl.max(ab, axis=2), axis=1)[:, None, None]
    else:
        return tl.max(ab, axis=1)[:, None]


@triton.jit
def mx_block(x_ptr, offs, m, pid, seed, P, emax_elem, sc_emin, sc_emax, MODE: tl.constexpr,
             HAS_INF: tl.constexpr, NEG_ZERO: tl.constexpr, MAN0: tl.constexpr, VAR_SHIFT: tl.constexpr,
             ASYM: tl.constexpr, ZERO_SHIFT: tl.constexpr, ROWS: tl.constexpr, SIZE: tl.constexpr,
             NR: tl.constexpr, LAYOUT: tl.constexpr):
    """One tile of blocks with a power-of-two (E8M0-style) shared scale: amax reduction, exponent
    arithmetic, rounded elements. Returns (elements in the scaled domain, the scale exponents split
    in two halves s1 + s2, the amax bits); shared by the quantize and encode kernels."""
    rb = block_random(pid, seed, ROWS, SIZE, LAYOUT, NR)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ab = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    amax = block_amax(ab, ROWS, SIZE, LAYOUT)
    shared = tl.minimum(tl.maximum((amax >> 23) - 127 - emax_elem, sc_emin), sc_emax)
    s1 = shared >> 1                 # floor(shared / 2)
    s2 = shared - s1
    y = (x * pow2(-s1)) * pow2(-s2)
    q = round_bits(y, P, rb, ab > 0, MODE, 0, HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM,
                   ZERO_SHIFT, True)
    return q, s1, s2, shared, amax


@triton.jit
def _mx_kernel(x_ptr, out_ptr, nrows, size, P, seed, emax_elem, sc_emin, sc_emax,
               MODE: tl.constexpr, HAS_INF: tl.constexpr, NEG_ZERO: tl.constexpr,
               MAN0: tl.constexpr, VAR_SHIFT: tl.constexpr, ASYM: tl.constexpr,
               ZERO_SHIFT: tl.constexpr, STOCH: tl.constexpr, ROWS: tl.constexpr,
               SIZE: tl.constexpr, NR: tl.constexpr, LAYOUT: tl.constexpr):
    """Power-of-two (E8M0-style) shared scale: amax reduction, exponent arithmetic, elements."""
    pid = tl.program_id(0)
    offs, m = block_offsets(pid, nrows, size, ROWS, SIZE, LAYOUT)
    q, s1, s2, shared, amax = mx_block(x_ptr, offs, m, pid, seed, P, emax_elem, sc_emin, sc_emax, MODE,
                                       HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM, ZERO_SHIFT, ROWS, SIZE,
                                       NR, LAYOUT)
    out = (q * pow2(s2)) * pow2(s1)
    out = nan_where(amax >= C_INF, out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def amax_bits_kernel(x_ptr, amax_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Largest finite |x| as float32 bits (positive patterns are ordered like their values); nan
    and inf are left out, as in reference.tensor_scale. ITERS tiles per program, one atomic each."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        ab = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        acc = tl.maximum(acc, tl.where(ab >= C_INF, 0, ab))
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0))


@triton.jit
def amax_rule_block(x_ptr, offs, m, pid, seed, P, Ps, elem_max, ts_den, amax_t_ptr, amax_s,
                    MODE: tl.constexpr, HAS_INF: tl.constexpr, NEG_ZERO: tl.constexpr,
                    MAN0: tl.constexpr, VAR_SHIFT: tl.constexpr, ASYM: tl.constexpr,
                    ZERO_SHIFT: tl.constexpr, S_HAS_INF: tl.constexpr, S_NEG_ZERO: tl.constexpr,
                    S_MAN0: tl.constexpr, S_VAR_SHIFT: tl.constexpr, S_ZERO_SHIFT: tl.constexpr,
                    HAS_TS: tl.constexpr, AMAX_SCALAR: tl.constexpr, ROWS: tl.constexpr,
                    SIZE: tl.constexpr, NR: tl.constexpr, LAYOUT: tl.constexpr):
    """One tile of blocks with scale = amax / max_elem [/ tensor scale], rounded to the scale
    format (NVFP4: E4M3), in float32 with correctly rounded division as the reference does it.
    The tensor amax comes from ``amax_t_ptr`` (float32 bits: the amax pass, or a caller's tensor)
    or, with AMAX_SCALAR, from the float32 argument ``amax_s`` (a caller's number: no device memory
    read). Returns (rounded elements, the block scale, the full divisor); shared by the quantize and
    encode kernels."""
    rb = block_random(pid, seed, ROWS, SIZE, LAYOUT, NR)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ab = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    amax_bits = block_amax(ab, ROWS, SIZE, LAYOUT)
    amax = amax_bits.to(tl.float32, bitcast=True)
    s32 = tl.math.div_rn(amax, tl.zeros_like(amax) + elem_max)
    if HAS_TS:
        if AMAX_SCALAR:
            amax_t = amax_s
        else:
            amax_t = tl.load(amax_t_ptr).to(tl.float32, bitcast=True)
        ts = tl.math.div_rn(amax_t, ts_den)
        ts = tl.where((ts > 0) & (ts < C_INFF), ts, 1.0)
        s32 = tl.math.div_rn(s32, tl.zeros_like(s32) + ts)
    scale = round_bits(s32, Ps, 0, 0, 0, 0, S_HAS_INF, S_NEG_ZERO, S_MAN0, S_VAR_SHIFT, False,
                       S_ZERO_SHIFT, False)
    scale = nan_where(amax_bits >= C_INF, scale)
    if HAS_TS:
        d = scale * ts
    else:
        d = scale
    y = tl.math.div_rn(x, tl.broadcast_to(d, x.shape))
    y = tl.where(scale > 0, y, 0.0)
    q = round_bits(y, P, rb, 0, MODE, 0, HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM, ZERO_SHIFT,
                   False)
    return q, scale, d


@triton.jit
def _amax_rule_kernel(x_ptr, out_ptr, nrows, size, P, Ps, seed, elem_max, ts_den, amax_t_ptr, amax_s,
                      MODE: tl.constexpr, HAS_INF: tl.constexpr, NEG_ZERO: tl.constexpr,
                      MAN0: tl.constexpr, VAR_SHIFT: tl.constexpr, ASYM: tl.constexpr,
                      ZERO_SHIFT: tl.constexpr, S_HAS_INF: tl.constexpr, S_NEG_ZERO: tl.constexpr,
                      S_MAN0: tl.constexpr, S_VAR_SHIFT: tl.constexpr, S_ZERO_SHIFT: tl.constexpr,
                      STOCH: tl.constexpr, HAS_TS: tl.constexpr, AMAX_SCALAR: tl.constexpr,
                      ROWS: tl.constexpr, SIZE: tl.constexpr, NR: tl.constexpr, LAYOUT: tl.constexpr):
    """Blocks scaled by the amax rule (NVFP4), values out: see amax_rule_block."""
    pid = tl.program_id(0)
    offs, m = block_offsets(pid, nrows, size, ROWS, SIZE, LAYOUT)
    q, scale, d = amax_rule_block(x_ptr, offs, m, pid, seed, P, Ps, elem_max, ts_den, amax_t_ptr, amax_s,
                                  MODE, HAS_INF, NEG_ZERO, MAN0, VAR_SHIFT, ASYM, ZERO_SHIFT, S_HAS_INF,
                                  S_NEG_ZERO, S_MAN0, S_VAR_SHIFT, S_ZERO_SHIFT, HAS_TS, AMAX_SCALAR,
                                  ROWS, SIZE, NR, LAYOUT)
    q = tl.where(scale != scale, scale, q)
    out = q * d
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


# --- host side ----------------------------------------------------------------------------------------

_P_CACHE: dict = {}


def spec_params(spec, device) -> torch.Tensor:
    key = (spec, device)
    p = _P_CACHE.get(key)
    if p is None:
        p = torch.tensor(spec.numbers(), dtype=torch.int32, device=device)
        _P_CACHE[key] = p
    return p


def spec_flags(spec) -> dict:
    return dict(MODE=MODES[spec.mode], HAS_INF=spec.has_inf, NEG_ZERO=spec.neg_zero,
                MAN0=spec.man0, VAR_SHIFT=spec.var_shift, ASYM=spec.asym,
                ZERO_SHIFT=spec.s_lo == 0, STOCH=spec.stochastic)


def kernel_seed(spec, generator, device) -> int:
    if not spec.stochastic:
        return 0
    a, b = draw_seeds(generator, device)
    return ((a & 0xFFFFFFFF) << 31 | (b & 0x7FFFFFFF)) & (2**62 - 1)


def quantize_element(x: torch.Tensor, fmt, mode: str, overflow: str, generator=None,
                     sr_bits: Optional[int] = None, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    if not on_device(x) or x.dtype not in DTYPES or x.numel() >= 2**31 - BLOCK:
        return None
    if isinstance(fmt, Codebook):   # fused kernel in triton_codes (imported here: it imports this module)
        from .triton_codes import codebook
        got = codebook(x, fmt, mode, encode=False)
        return None if got is None else got[0]
    spec = element_spec(fmt, mode, overflow, sr_bits)
    if spec is None:
        return None
    xc = x.contiguous()
    if out is None:
        out = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    _elem_kernel[grid](xc, out, n, spec_params(spec, x.device), kernel_seed(spec, generator, x.device),
                       OVF=OVERFLOWS[spec.overflow], BLOCK=BLOCK, NR=N_ROUNDS, num_warps=8,
                       **spec_flags(spec))
    return out.view(x.shape)


def pow2ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def quantize_block(x: torch.Tensor, fmt: BlockFormat, mode: str, axis: int, generator=None,
                   sr_bits: Optional[int] = None, tensor_amax=None) -> Optional[torch.Tensor]:
    """``tensor_amax`` (NVFP4-style formats only): the tensor's largest finite magnitude when the
    caller already has it (delayed scaling), a float32 number or a one-element float32 tensor on
    x's device: the amax pass is skipped and the quantization is one pass over the tensor."""
    if not on_device(x) or x.dtype not in DTYPES or x.numel() >= 2**31 - TILE:
        return None
    claim = block_claims(fmt, mode, sr_bits)
    if claim is None:
        return None
    xt = x.movedim(axis, -1)
    size = fmt.size
    if xt.shape[-1] % size or size > 1024:
        return None
    espec, sspec = claim
    xb = xt.contiguous()
    out = torch.empty_like(xb)
    n = xb.numel()
    if n == 0:
        return out.movedim(-1, axis)
    nrows = n // size
    SIZE = max(4, pow2ceil(size))
    ROWS = max(1, TILE // SIZE)
    grid = (triton.cdiv(nrows, ROWS),)
    P = spec_params(espec, x.device)
    seed = kernel_seed(espec, generator, x.device)
    fl = spec_flags(espec)
    layout = 0 if not espec.stochastic else (2 if SIZE == size else 1)
    if sspec is None:
        el = fmt.element
        _mx_kernel[grid](xb, out, nrows, size, P, seed, int(el.emax), int(fmt.scale.emin),
                         int(fmt.scale.emax), ROWS=ROWS, SIZE=SIZE, NR=N_ROUNDS, LAYOUT=layout,
                         num_warps=8, **fl)
    else:
        scalar = fmt.tensor_scale and tensor_amax is not None and not isinstance(tensor_amax, torch.Tensor)
        if tensor_amax is not None and fmt.tensor_scale and not scalar:
            amax_t = tensor_amax.to(device=x.device, dtype=torch.float32).reshape(1).view(torch.int32)
        else:
            amax_t = torch.zeros(1, dtype=torch.int32, device=x.device)
        if fmt.tensor_scale and tensor_amax is None:
            amax_bits_kernel[(triton.cdiv(n, BLOCK * AMAX_ITERS),)](xb, amax_t, n, BLOCK=BLOCK,
                                                                    ITERS=AMAX_ITERS, num_warps=8)
        ts_den, elem_max = amax_rule_constants(fmt)
        _amax_rule_kernel[grid](
            xb, out, nrows, size, P, spec_params(sspec, x.device), seed, elem_max, ts_den, amax_t,
            float(tensor_amax) if scalar else 0.0, AMAX_SCALAR=scalar, S_HAS_INF=sspec.has_inf, S_NEG_ZERO=sspec.neg_zero, S_MAN0=sspec.man0,
            S_VAR_SHIFT=sspec.var_shift, S_ZERO_SHIFT=sspec.s_lo == 0, HAS_TS=bool(fmt.tensor_scale),
            ROWS=ROWS, SIZE=SIZE, NR=N_ROUNDS, LAYOUT=layout, num_warps=8, **fl)
    return out.movedim(-1, axis)


@lru_cache(maxsize=256)
def amax_rule_constants(fmt: BlockFormat) -> tuple:
    """float32 values of max_elem * max_scale (NVFP4's tensor-scale divisor) and of max_elem, as
    the reference builds them (torch.tensor(..., dtype=float32))."""
    ts_den = float(torch.tensor(fmt.element.max * fmt.scale.max, dtype=torch.float32))
    elem_max = float(torch.tensor(fmt.element.max, dtype=torch.float32))
    return ts_den, elem_max
