"""The fast path: rounding done on the bits of float32 numbers, vectorised in torch.

Every value is handled through its float32 bit pattern ``a`` (magnitude) and sign. Positive float32
patterns are ordered like their values and, inside one binade, linear in them, so rounding a
magnitude to a grid of spacing ``2**k`` is rounding its pattern at bit ``s`` (``s`` = k minus the
exponent of the pattern's unit): keep the bits above ``s``, decide from the ``s`` bits below whether
to add ``1 << s``; a carry into the exponent field is the step into the next binade. ``s`` is
``23 - man`` for normal values and grows by one per binade below the format's smallest normal
(``s = clamp(K - E, s_lo, s_hi)`` with ``E`` the float32 exponent field): that is the subnormal
range. Values below the format's smallest positive number (``min_sub``) can only become 0 or
``min_sub`` and are decided by comparing patterns. Overflow, nan and the sign come last.

The same arithmetic serves integers and fixed point (a grid of constant spacing ``2**-frac``: the
whole range is "subnormal"), the scale formats of block formats, and, through an exact power-of-two
rescaling per block, the OCP MX formats. Results are bit-identical to ``reference.py`` (the oracle)
for every deterministic rounding mode; ``tests/test_kernels_cpu.py`` checks that exhaustively.

Stochastic rounding adds random bits below the kept ones and truncates (probability of rounding up
= the distance from the lower neighbour, exactly, for every value at or above ``min_sub``; below it
with 24-bit resolution). The random bits come from a counter-based hash of (seed, element index),
the seed drawn from the caller's ``torch.Generator``: reproducible with a seed, independent of how
the work is split, and the same bits in eager and compiled execution.

``quantize_element`` / ``quantize_block`` return None for anything this path does not claim (the
dispatcher then uses the reference). Large tensors go through ``torch.compile`` (one fused C++ loop,
about 8x faster than torch's own float8 cast on a 2-core CPU) when a C++ compiler works; set
``LOWBIT_CPU_COMPILE=0`` to stay eager, ``=1`` to compile at any size.
"""
from __future__ import annotations

import math
import os
import struct
import threading
import types
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from ..formats import BlockFormat, Codebook, FloatFormat, IntFormat
from ..rounding import STOCHASTIC_MODES

SIGN = -(2**31)          # 0x80000000 as int32
ABS = 0x7FFFFFFF
INF_BITS = 0x7F800000
QNAN_BIT = 0x00400000
NAN_BITS = 0x7FC00000
FP32_MAX = 3.4028234663852886e38
MIN_FP32_SUB = 2.0**-149

_FLOAT_POLICIES = ("ieee", "fn", "finite", "fnuz", "p3109")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def f32_bits(v: float) -> int:
    """The float32 bit pattern of a Python float that float32 represents exactly (checked)."""
    b = struct.unpack("<i", struct.pack("<f", v))[0]
    if struct.unpack("<f", struct.pack("<i", b))[0] != v:
        raise ValueError(f"{v!r} is not a float32 value")
    return b


# --- what a format looks like to the bit arithmetic -----------------------------------------------

@dataclass(frozen=True)
class Spec:
    """Everything the bit kernels need about one (element format, rounding mode, overflow policy).

    Static part (decides the code path): mode, overflow, flags. Numeric part: the parameters of the
    grid, all int32 patterns of float32 values except ``k_tiny`` (random bits below ``min_sub``).
    """

    mode: str
    overflow: str          # saturate | inf | nan
    has_inf: bool
    neg_zero: bool         # the format has -0 (else a zero result is +0)
    man0: bool             # no mantissa bits: the parity of a code is that of its exponent field
    parity_c: int          # man0: code parity = (E + parity_c) & 1
    var_shift: bool        # s varies (subnormals, integers); else s == s_lo
    asym: bool             # largest magnitude depends on the sign (two's complement, unsigned)
    K: int
    s_lo: int
    s_hi: int
    min_sub: int           # pattern of the smallest positive value
    half: int              # pattern of min_sub / 2 (0 when that is not a float32)
    max_pos: int           # pattern of the largest value
    max_neg: int           # pattern of the largest magnitude of a negative value
    keep: int              # stochastic: mask on the 23 random bits (sr_bits)
    k_tiny: int            # stochastic: random bits used below min_sub
    tiny_f1: int           # patterns of two powers of two whose product is 2**k_tiny / min_sub
    tiny_f2: int

    @property
    def stochastic(self) -> bool:
        return self.mode in STOCHASTIC_MODES

    def static_key(self) -> tuple:
        return (self.mode, self.overflow, self.has_inf, self.neg_zero, self.man0, self.var_shift,
                self.asym, self.s_lo == 0)

    def numbers(self) -> list:
        return [self.K, self.s_lo, self.s_hi, self.min_sub, self.half, self.max_pos, self.max_neg,
                self.keep, self.k_tiny, self.parity_c, self.tiny_f1, self.tiny_f2]


def _grid_numbers(min_sub: float, k_tiny: int) -> tuple:
    """Patterns of min_sub and min_sub / 2, and of f1, f2 with f1 * f2 = 2**k_tiny / min_sub."""
    half = min_sub / 2
    d = k_tiny - int(math.log2(min_sub))   # min_sub is a power of two
    d1 = d // 2
    return (f32_bits(min_sub), (f32_bits(half) if half >= MIN_FP32_SUB else 0),
            f32_bits(2.0**d1), f32_bits(2.0**(d - d1)))


@lru_cache(maxsize=1024)
def element_spec(fmt, mode: str, overflow: str = "saturate", sr_bits: Optional[int] = None) -> Optional[Spec]:
    """The Spec of an element format, or None where the float32 bit path does not apply."""
    k_main = 23 if sr_bits is None else min(int(sr_bits), 23)
    keep = 0x7FFFFF & ~((1 << (23 - k_main)) - 1)
    k_tiny = 24 if sr_bits is None else min(int(sr_bits), 24)
    if isinstance(fmt, FloatFormat):
        if fmt.special not in _FLOAT_POLICIES or fmt.man > 23 or fmt.emin < -126:
            return None
        if fmt.min_subnormal < MIN_FP32_SUB or fmt.max > FP32_MAX:
            return None
        m = fmt.man
        s_lo = 23 - m
        K = 23 - m + fmt.emin + 127
        s_hi = min(23, K - 1) if fmt.subnormals else s_lo
        min_sub, half, f1, f2 = _grid_numbers(fmt.min_subnormal, k_tiny)
        maxb = f32_bits(fmt.max)
        return Spec(mode, overflow, fmt.has_inf, fmt.has_negative_zero, m == 0, (fmt.bias + 1) & 1,
                    s_hi > s_lo, False, K, s_lo, s_hi, min_sub, half, maxb, maxb, keep, k_tiny,
                    f1, f2)
    if isinstance(fmt, IntFormat):
        g = -fmt.frac
        if fmt.width > 24 or g < -149 or g + fmt.width > 126:
            return None
        K = 150 + g
        min_sub, half, f1, f2 = _grid_numbers(2.0**g, k_tiny)
        max_pos = f32_bits(float(fmt.qmax) * 2.0**g)
        max_neg = f32_bits(float(-fmt.qmin) * 2.0**g)
        return Spec(mode, "saturate", False, False, False, 0, True, max_pos != max_neg, K, 0,
                    min(23, K - 1), min_sub, half, max_pos, max_neg, keep, k_tiny, f1, f2)
    return None


# --- random bits: a counter-based hash --------------------------------------------------------------

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - 2**32   # as int32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, 'lowbias32' constants) on int32, wrapping."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _M1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _M2
    h = h ^ ((h >> 16) & 0xFFFF)
    return h


def random_bits(idx: torch.Tensor, seed_a, seed_b) -> torch.Tensor:
    """32 random bits (int32) per element from its index and two 32-bit seeds (int32 scalars)."""
    return _mix32(_mix32(idx + seed_a) ^ seed_b)


def _to_int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - 2**32 if v >= 2**31 else v


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def draw_seeds(generator, device) -> tuple:
    """Two signed 32-bit seeds from the caller's generator (or torch's global one for ``device``).

    CUDA generators keep their (seed, offset) state on the host: read it and step the offset as a
    draw would, without waiting for the device (a device-to-host read would stall the stream).
    Elsewhere, draw two numbers from the generator."""
    dev = torch.device(generator.device if generator is not None else device)
    if dev.type == "cuda":
        g = generator
        if g is None:
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            g = torch.cuda.default_generators[idx]
        st = g.get_state()
        if st.numel() == 16 and st.dtype == torch.uint8:
            seed, offset = struct.unpack("<QQ", bytes(st.tolist()))
            new = torch.tensor(list(struct.pack("<QQ", seed, offset + 4)), dtype=torch.uint8)
            g.set_state(new)
            z = _splitmix64(_splitmix64(seed) ^ offset)
            return _to_int32(z), _to_int32(z >> 32)
    s = torch.randint(-(2**31), 2**31 - 1, (2,), generator=generator, dtype=torch.int64, device=dev)
    a, b = s.tolist()
    return int(a), int(b)


# --- the kernel ---------------------------------------------------------------------------------------

def round_bits(x: torch.Tensor, st: tuple, P: torch.Tensor, rbits: Optional[torch.Tensor] = None,
               nonzero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round float32 ``x`` to the grid described by the static key ``st`` and numbers ``P``.

    ``P`` is an int32 tensor (Spec.numbers()) plus, for the stochastic modes, ``rbits`` (int32 random
    words, x's shape). ``nonzero`` overrides "x != 0" below min_sub (block formats pass the
    unscaled input, whose scaled copy may have underflowed). Returns float32.
    """
    mode, overflow, has_inf, neg_zero, man0, var_shift, asym, zero_shift = st
    K, s_lo, s_hi, min_sub, half, max_pos, max_neg, keep, k_tiny, parity_c, f1, f2 = \
        (P[i] for i in range(12))
    u = x.view(torch.int32)
    a = u & ABS
    neg = u < 0
    E = a >> 23
    if var_shift:
        s = torch.clamp(K - E, s_lo, s_hi)
    else:
        s = s_lo
    one = torch.bitwise_left_shift(torch.ones_like(a), s)
    mask = one - 1
    lo = a & ~mask
    if mode in ("nearest_even", "odd"):
        if man0:
            odd = (E + parity_c) & 1
        else:
            odd = ((a | 0x800000) >> s) & 1
    if mode == "nearest_even":
        bias = (one >> 1) - 1 + odd
        if zero_shift:
            bias = torch.clamp(bias, min=0)
        r = (a + bias) & ~mask
    elif mode == "nearest_away":
        r = (a + (one >> 1)) & ~mask
    elif mode == "nearest_zero":
        bias = (one >> 1) - 1
        if zero_shift:
            bias = torch.clamp(bias, min=0)
        r = (a + bias) & ~mask
    elif mode == "toward_zero":
        r = lo
    elif mode == "up":
        r = (a + torch.where(neg, 0, mask)) & ~mask
    elif mode == "down":
        r = (a + torch.where(neg, mask, 0)) & ~mask
    elif mode == "odd":
        r = lo + (((a & mask) != 0) & (odd == 0)).to(torch.int32) * one
    elif mode == "stochastic":
        r = (a + ((rbits & keep) >> (23 - s))) & ~mask
    elif mode == "stochastic_half":
        r = lo + (((a & mask) != 0) & (rbits < 0)).to(torch.int32) * one
    else:
        raise ValueError(f"unknown rounding mode {mode!r}")

    # below the smallest positive value: 0 or min_sub
    nz = (a > 0) if nonzero is None else nonzero
    if mode in ("nearest_even", "nearest_zero"):
        up = a > half
    elif mode == "nearest_away":
        up = (a >= half) & nz
    elif mode == "toward_zero":
        up = torch.zeros_like(nz)
    elif mode == "up":
        up = nz & ~neg
    elif mode == "down":
        up = nz & neg
    elif mode == "odd":
        up = nz
    elif mode == "stochastic":
        t = torch.floor((x.abs() * f1.view(torch.float32)) * f2.view(torch.float32)).to(torch.int32)
        rk = ((rbits >> 8) & 0xFFFFFF) >> (24 - k_tiny)
        up = ((t + rk) >> k_tiny) > 0
    else:  # stochastic_half
        up = nz & (rbits < 0)
    r = torch.where(a < min_sub, up.to(torch.int32) * min_sub, r)

    # overflow
    maxb = torch.where(neg, max_neg, max_pos) if asym else max_pos
    if overflow == "saturate":
        r = torch.minimum(r, maxb)
    else:
        over = r > maxb
        if overflow == "nan":
            big = NAN_BITS
        else:
            signal = INF_BITS if has_inf else NAN_BITS
            if mode == "toward_zero":
                rtz = a < INF_BITS
            elif mode == "up":
                rtz = neg & (a < INF_BITS)
            elif mode == "down":
                rtz = ~neg & (a < INF_BITS)
            else:
                rtz = None
            big = signal if rtz is None else torch.where(rtz, maxb, signal)
        r = torch.where(over, big, r)
    r = torch.where(a > INF_BITS, a | QNAN_BIT, r)
    if neg_zero:
        out = r | (u & SIGN)
    else:
        out = torch.where(r == 0, 0, r | (u & SIGN))
    return out.view(torch.float32)


# --- execution: eager, or one compiled loop ----------------------------------------------------------

_compiled: dict = {}
_compile_ok = [None]   # None: untried, True/False after the first attempt
_lock = threading.Lock()
COMPILE_MIN = 1 << 20
# compiled with every size dynamic (elementwise work, and the table decoders whose inputs have
# sizes tied to each other); the other kinds keep the block size static and the number of blocks
# dynamic
FLAT_KINDS = ("elem", "enc", "dec", "bdec", "cb", "cb_enc")


def _want_compile(n: int) -> bool:
    flag = os.environ.get("LOWBIT_CPU_COMPILE", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if _compile_ok[0] is False:
        return False
    if flag in ("1", "true", "yes", "on", "always"):
        return True
    return n >= COMPILE_MIN


def _fresh_function(fn, static: tuple, tag: int):
    """``fn`` with ``static`` bound, as a function with its own code object: torch.compile keeps
    its compiled variants per code object (at most torch._dynamo.config.recompile_limit of them),
    so every static configuration gets a code object of its own."""
    def bound(*a):
        return fn(*a, static=static)
    code = bound.__code__.replace(co_name=f"lowbit_{fn.__name__.strip('_')}_{tag}")
    return types.FunctionType(code, bound.__globals__, code.co_name, bound.__defaults__,
                              bound.__closure__)


def run_kernel(kind: str, fn, static: tuple, args: tuple, n: int):
    """Run ``fn(*args, static=...)`` compiled (cached per kind and static key) or eagerly."""
    if _want_compile(n):
        key = (kind, static)
        with _lock:
            cfn = _compiled.get(key)
            if cfn is None:
                # elements: any length (dynamic); blocks: any number of blocks, the block size
                # fixed (static: the reduction over it is unrolled and vectorised)
                cfn = torch.compile(_fresh_function(fn, static, len(_compiled)),
                                    dynamic=True if kind in FLAT_KINDS else None, fullgraph=True)
                _compiled[key] = cfn
        if kind not in FLAT_KINDS and args[0].shape[0] > 1:
            torch._dynamo.mark_dynamic(args[0], 0)
        try:
            out = cfn(*args)
            _compile_ok[0] = True
            return out
        except Exception:  # no working C++ toolchain, or an inductor limitation: stay eager
            if _compile_ok[0] is None:
                _compile_ok[0] = False
            _compiled.pop(key, None)
    return fn(*args, static=static)


def _elem_fn(x, P, seeds, *, static):
    st, stochastic = static
    rb = None
    if stochastic:
        idx = torch.arange(x.numel(), dtype=torch.int32, device=x.device).view(x.shape)
        rb = random_bits(idx, seeds[0], seeds[1])
    return round_bits(x, st, P, rb)


def seed_tensor(spec: Spec, generator, device) -> torch.Tensor:
    if spec.stochastic:
        return torch.tensor(draw_seeds(generator, device), dtype=torch.int32)
    return torch.zeros(2, dtype=torch.int32)


def quantize_element(x: torch.Tensor, fmt, mode: str, overflow: str, generator=None,
                     sr_bits: Optional[int] = None) -> Optional[torch.Tensor]:
    """Rounded copy of ``x`` (same dtype), or None where this path does not claim the work."""
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        return None
    if isinstance(fmt, Codebook):
        from . import codebook_fast
        return codebook_fast.quantize_element(x, fmt, mode)
    spec = element_spec(fmt, mode, overflow, sr_bits)
    if spec is None:
        return None
    if x.numel() >= 2**31:
        return None
    x32 = x.float().contiguous()
    if x32.numel() == 0:
        return x.clone()
    P = torch.tensor(spec.numbers(), dtype=torch.int32)
    seeds = seed_tensor(spec, generator, x.device)
    out = run_kernel("elem", _elem_fn, (spec.static_key(), spec.stochastic), (x32.view(-1), P, seeds), x32.numel())
    return out.view(x.shape).to(x.dtype)


# --- block formats -----------------------------------------------------------------------------------

def pow2(e: torch.Tensor) -> torch.Tensor:
    """2.0**e as float32 for int32 e in [-126, 127] (built from the bits)."""
    return ((e + 127) << 23).view(torch.float32)


def _block_pow2_fn(xb, P, seeds, emax_elem, sc_emin, sc_emax, *, static):
    """OCP MX: shared exponent from the block's largest magnitude, elements in the element domain."""
    st, stochastic = static
    ab = xb.view(torch.int32) & ABS
    # float max of |x| (inductor vectorises it; an int32 max reduction is ~10x slower): positive
    # floats order like their patterns; a nan propagates, possibly as x86's default nan, which has
    # the sign bit set: clear it
    amax = xb.abs().amax(dim=1, keepdim=True).view(torch.int32) & ABS
    bad = amax >= INF_BITS
    shared = torch.clamp((amax >> 23) - 127 - emax_elem, sc_emin, sc_emax)
    s1 = torch.div(shared, 2, rounding_mode="floor")
    s2 = shared - s1
    y = (xb * pow2(-s1)) * pow2(-s2)      # exact, except below 2**-126 (only 0/min_sub there)
    rb = None
    if stochastic:
        idx = torch.arange(xb.numel(), dtype=torch.int32, device=xb.device).view(xb.shape)
        rb = random_bits(idx, seeds[0], seeds[1])
    q = round_bits(y, st, P, rb, nonzero=ab > 0)
    out = (q * pow2(s2)) * pow2(s1)
    return torch.where(bad, float("nan"), out)


def amax_rule_round(xb, P, Ps, seeds, elem_max, ts_den, amax_given, st, st_scale, stochastic: bool,
                    has_ts: bool, given: bool):
    """Scales by the amax rule (NVFP4 and any non-power-of-two scale), float32 arithmetic as in the
    reference: s = amax / max_elem [/ ts], rounded to the scale format; elements of x / (s [* ts])
    rounded to the element format. ts (NVFP4's tensor scale) = largest finite |x| / ts_den, 1 where
    that is not a positive number; with ``given`` the caller's amax (``amax_given``, float32)
    replaces the tensor's own. Returns (rounded elements, scale, ts, divisor)."""
    a = xb.abs()
    ts = torch.ones((), dtype=torch.float32)
    if has_ts:
        t_amax = amax_given if given else torch.where(torch.isfinite(a), a, 0.0).amax()
        t = t_amax / ts_den
        ts = torch.where(torch.isfinite(t) & (t > 0), t, 1.0)
    amax = a.amax(dim=1, keepdim=True)
    s32 = amax / elem_max
    if has_ts:
        s32 = s32 / ts
    scale = round_bits(s32, st_scale, Ps)
    scale = torch.where(torch.isfinite(amax), scale, float("nan"))
    d = scale * ts if has_ts else scale
    y = torch.where(scale > 0, xb / d, 0.0)
    rb = None
    if stochastic:
        idx = torch.arange(xb.numel(), dtype=torch.int32, device=xb.device).view(xb.shape)
        rb = random_bits(idx, seeds[0], seeds[1])
    return round_bits(y, st, P, rb), scale, ts, d


def _block_amax_fn(xb, P, Ps, seeds, elem_max, ts_den, amax_given, *, static):
    """The amax-rule block quantize: ``amax_rule_round``'s elements times their divisor."""
    st, st_scale, stochastic, has_ts, given = static
    q, scale, _, d = amax_rule_round(xb, P, Ps, seeds, elem_max, ts_den, amax_given, st, st_scale,
                                     stochastic, has_ts, given)
    q = torch.where(torch.isnan(scale), float("nan"), q)
    return q * d


@lru_cache(maxsize=1024)
def block_claims(fmt: BlockFormat, mode: str, sr_bits=None) -> Optional[tuple]:
    """(element Spec, scale Spec or None) when the bit path handles this block format."""
    espec = element_spec(fmt.element, mode, "saturate", sr_bits)
    if espec is None:
        return None
    if fmt.pow2_scale:
        sc = fmt.scale
        if sc.emin < -127 or sc.emax > 127 or fmt.element.min_subnormal < 2.0**(-149 - sc.emin) \
                or fmt.element.max < 1 or fmt.tensor_scale:
            return None
        return espec, None
    sspec = element_spec(fmt.scale, "nearest_even", "saturate")
    if sspec is None or sspec.asym:
        return None
    return espec, sspec


def quantize_block(x: torch.Tensor, fmt: BlockFormat, mode: str, axis: int, generator=None,
                   sr_bits: Optional[int] = None, tensor_amax: Optional[float] = None
                   ) -> Optional[torch.Tensor]:
    """``tensor_amax``: a float32 number replacing the tensor's own amax in the tensor scale."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or x.numel() >= 2**31:
        return None
    claim = block_claims(fmt, mode, sr_bits)
    if claim is None:
        return None
    xt = x.movedim(axis, -1)
    if xt.shape[-1] % fmt.size:
        return None   # the reference raises the error users should see
    espec, sspec = claim
    if x.numel() == 0:
        return x.clone()
    xb = xt.float().contiguous().view(-1, fmt.size)
    P = torch.tensor(espec.numbers(), dtype=torch.int32)
    seeds = seed_tensor(espec, generator, x.device)
    if sspec is None:
        el = fmt.element
        args = (xb, P, seeds, int(el.emax), int(fmt.scale.emin), int(fmt.scale.emax))
        out = run_kernel("mx", _block_pow2_fn, (espec.static_key(), espec.stochastic), args, xb.numel())
    else:
        Ps = torch.tensor(sspec.numbers(), dtype=torch.int32)
        ts_den = torch.tensor(fmt.element.max * fmt.scale.max, dtype=torch.float32)
        elem_max = torch.tensor(fmt.element.max, dtype=torch.float32)
        given = bool(fmt.tensor_scale) and tensor_amax is not None
        amax_given = torch.tensor(tensor_amax if given else 0.0, dtype=torch.float32)
        args = (xb, P, Ps, seeds, elem_max, ts_den, amax_given)
        static = (espec.static_key(), sspec.static_key(), espec.stochastic, bool(fmt.tensor_scale), given)
        out = run_kernel("amax", _block_amax_fn, static, args, xb.numel())
    return out.view(xt.shape).movedim(-1, axis).to(x.dtype)
