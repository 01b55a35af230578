"""Independent references for the correctness tests of issue 2.

Nothing here calls lowbit's rounding or encoding: code tables come from ml_dtypes (the bit patterns
viewed as its dtypes) or from a small pure-Python decoder written from the format definitions, and
rounding is done by ``oracle_round``, a search over the sorted list of values with exact float64
comparisons. The tests compare lowbit's kernels against these.
"""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass, field

import ml_dtypes as md
import numpy as np
import pytest
import torch

import lowbit
import lowbit.kernels

DETERMINISTIC_MODES = ("nearest_even", "nearest_away", "nearest_zero", "toward_zero", "up", "down", "odd")
NEAREST_MODES = ("nearest_even", "nearest_away", "nearest_zero")
DIRECTED_MODES = ("toward_zero", "up", "down")

@pytest.fixture(autouse=True)
def one_torch_thread():
    """Import into a test module to run its tests on one torch thread: under ``pytest -n 2`` on two
    cores, torch's intra-op threads oversubscribe the machine and run these vectorised tests ~10x
    slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- the formats ml_dtypes implements --------------------------------------------------------------
# lowbit name -> (ml_dtypes / numpy scalar type, bits)
ML_FORMATS = {
    "e4m3fn": (md.float8_e4m3fn, 8),
    "e5m2": (md.float8_e5m2, 8),
    "e4m3fnuz": (md.float8_e4m3fnuz, 8),
    "e5m2fnuz": (md.float8_e5m2fnuz, 8),
    "e3m4": (md.float8_e3m4, 8),
    "e4m3": (md.float8_e4m3, 8),
    "e4m3fnuz_b11": (md.float8_e4m3b11fnuz, 8),
    "e3m2fn": (md.float6_e3m2fn, 6),
    "e2m3fn": (md.float6_e2m3fn, 6),
    "e2m1fn": (md.float4_e2m1fn, 4),
    "e8m0": (md.float8_e8m0fnu, 8),
    "bf16": (md.bfloat16, 16),
    "fp16": (np.float16, 16),
}
# Overflow policy under which lowbit must reproduce ml_dtypes' cast (measured): formats with inf give
# inf, formats with only a nan give nan (lowbit's overflow="inf" yields nan where there is no inf),
# the fp6/fp4 formats (no inf, no nan) saturate.
ML_OVERFLOW = {name: "inf" for name in ML_FORMATS}
ML_OVERFLOW.update({"e3m2fn": "saturate", "e2m3fn": "saturate", "e2m1fn": "saturate"})

def _torch_e4m3fn_overflow() -> str:
    """torch's CPU cast to float8_e4m3fn saturates (+-inf and finite overflow -> +-448) in torch 2.13
    but gives nan in torch 2.11: measure it rather than assume a version."""
    big = torch.tensor([1e6]).to(torch.float8_e4m3fn).float()
    return "inf" if torch.isnan(big).all() else "saturate"


# The formats torch implements, with the overflow behaviour of its CPU cast (the others give inf or
# nan in every version seen).
TORCH_FORMATS = {
    "e4m3fn": (torch.float8_e4m3fn, _torch_e4m3fn_overflow()),
    "e5m2": (torch.float8_e5m2, "inf"),
    "e4m3fnuz": (torch.float8_e4m3fnuz, "inf"),
    "e5m2fnuz": (torch.float8_e5m2fnuz, "inf"),
    "e8m0": (torch.float8_e8m0fnu, "inf"),
    "bf16": (torch.bfloat16, "inf"),
    "fp16": (torch.float16, "inf"),
}

# ml_dtypes and torch round E8M0 ties away from zero; every other cast rounds ties to even.
def reference_mode(name: str) -> str:
    return "nearest_away" if name == "e8m0" else "nearest_even"


def ml_table(name: str) -> np.ndarray:
    """float64 value of every code, decoded by ml_dtypes from the bit pattern."""
    dt, bits = ML_FORMATS[name]
    codes = np.arange(2**bits)
    raw = codes.astype(np.uint16 if bits == 16 else np.uint8)
    with np.errstate(invalid="ignore"):
        return raw.view(dt).astype(np.float64)


def ml_cast(x64: np.ndarray, name: str) -> np.ndarray:
    """ml_dtypes' cast of float32 inputs (given as float64 numbers that float32 holds)."""
    dt, _ = ML_FORMATS[name]
    with np.errstate(over="ignore", invalid="ignore"):
        return x64.astype(np.float32).astype(dt).astype(np.float64)


# --- an independent decoder written from the definitions (for formats ml_dtypes lacks) -------------

def py_float_value(code: int, E: int, M: int, special: str, bias=None, subnormals=True) -> float:
    """Value of one code of a minifloat, straight from the definitions in the module docstring of
    lowbit.formats.minifloat (and OCP / IEEE P3109 for the named ones)."""
    signed = special != "fnu"
    if bias is None:
        bias = 2 ** (E - 1) if special in ("fnuz", "p3109") else 2 ** (E - 1) - 1
    negative = signed and bool((code >> (E + M)) & 1)
    fld = (code >> M) & (2**E - 1)
    mant = code & (2**M - 1)
    sign = -1.0 if negative else 1.0
    top = 2**E - 1
    if special == "ieee" and fld == top:
        return sign * math.inf if mant == 0 else math.nan
    if special in ("fn", "fnu") and fld == top and mant == 2**M - 1:
        return math.nan
    if special in ("fnuz", "p3109") and code == 1 << (E + M):
        return math.nan
    if special == "p3109" and (code & (2 ** (E + M) - 1)) == 2 ** (E + M) - 1:
        return sign * math.inf
    if special == "fnu":
        return math.ldexp(1 + mant / 2**M, fld - bias)
    if fld == 0:
        mag = math.ldexp(mant / 2**M, 1 - bias) if subnormals else 0.0
    else:
        mag = math.ldexp(1 + mant / 2**M, fld - bias)
    return sign * mag


def py_float_table(E, M, special, bias=None, subnormals=True) -> np.ndarray:
    bits = E + M + (0 if special == "fnu" else 1)
    return np.array([py_float_value(c, E, M, special, bias, subnormals) for c in range(2**bits)])


def py_int_table(width, signed=True, narrow=False, frac=0) -> np.ndarray:
    """Two's complement (or unsigned) codes times 2**-frac; the dropped code of a narrow range is nan."""
    out = []
    for c in range(2**width):
        k = c - 2**width if signed and c >= 2 ** (width - 1) else c
        out.append(math.nan if narrow and k == -(2 ** (width - 1)) else math.ldexp(k, -frac))
    return np.array(out)


# The published tables: bitsandbytes' NF4 constants, and its FP4 dequantization table (float32 literals
# 0.005208333333f, 0.16666667f, 0.25f, 0.33333333f, 0.5f, 0.66666667f, 1.0f with a sign bit, one zero
# kept). Codebook codes are indices in ascending order.
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
_BNB = [float(np.float32(v)) for v in ("0.005208333333", "0.16666667", "0.25", "0.33333333", "0.5", "0.66666667", "1.0")]
FP4_BNB_PUBLISHED = sorted([-m for m in _BNB] + [0.0] + _BNB)
# a user table without zero and not symmetric (directions and ties act in value order)
USER_TABLE = [-2.0, -0.75, 0.5, 1.0, 3.25, 10.0]


@dataclass
class Ref:
    """A format as the tests see it: its lowbit name and an independent code table."""

    name: str
    table: np.ndarray  # value of every code, float64, nan where the code is nan
    kind: str  # "float" (sign-magnitude), "unsigned" (E8M0: no zero, no sign), "int", "codebook"
    man: int = 0
    ftz: bool = False
    values: np.ndarray = field(init=False)
    parity: np.ndarray = field(init=False)

    def __post_init__(self):
        t = self.table
        fin = np.isfinite(t)
        codes = np.flatnonzero(fin)
        vals = t[fin] + 0.0  # -0 -> +0: one zero
        # first occurrence = smallest code of each value (+0 before -0, code 0 for flushed zeros)
        self.values, first = np.unique(vals, return_index=True)
        self.parity = codes[first] % 2

    @property
    def max(self) -> float:
        return float(self.values[-1])

    @property
    def min(self) -> float:
        return float(self.values[0])

    @property
    def has_inf(self) -> bool:
        return bool(np.isinf(self.table).any())

    @property
    def has_nan(self) -> bool:
        return bool(np.isnan(self.table).any())

    @property
    def neg_zero(self) -> bool:
        return bool(((self.table == 0) & np.signbit(self.table)).any())

    @property
    def min_pos(self) -> float:
        """Smallest nonzero magnitude."""
        mags = np.abs(self.values)
        return float(mags[mags > 0].min())

    @property
    def top_ulp(self) -> float:
        """Spacing of the top binade (the next value after max if the exponent range went on)."""
        return math.ldexp(1.0, math.floor(math.log2(self.max)) - self.man)


def ml_ref(name: str) -> Ref:
    man = {"bf16": 7, "fp16": 10}.get(name)
    if man is None:
        man = int(name.split("m")[1][0])
    return Ref(name, ml_table(name), "unsigned" if name == "e8m0" else "float", man)


def exotic_refs() -> dict:
    return {
        "e2m1": Ref("e2m1", py_float_table(2, 1, "ieee"), "float", 1),
        "e3m2fnan": Ref("e3m2fnan", py_float_table(3, 2, "fn"), "float", 2),
        "e4m3f": Ref("e4m3f", py_float_table(4, 3, "finite"), "float", 3),
        "e5m2_ftz": Ref("e5m2_ftz", py_float_table(5, 2, "ieee", subnormals=False), "float", 2, ftz=True),
        "p3109_k8p3": Ref("p3109_k8p3", py_float_table(5, 2, "p3109"), "float", 2),
        "p3109_k8p4": Ref("p3109_k8p4", py_float_table(4, 3, "p3109"), "float", 3),
        "e1m2fn": Ref("e1m2fn", py_float_table(1, 2, "finite"), "float", 2),
        "e5m0": Ref("e5m0", py_float_table(5, 0, "ieee"), "float", 0),
        "e2m0": Ref("e2m0", py_float_table(2, 0, "ieee"), "float", 0),
        "e3m0fnan": Ref("e3m0fnan", py_float_table(3, 0, "fn"), "float", 0),
        "e3m2_b-2": Ref("e3m2_b-2", py_float_table(3, 2, "ieee", bias=-2), "float", 2),
        "e4m3fn_b10": Ref("e4m3fn_b10", py_float_table(4, 3, "fn", bias=10), "float", 3),
        "e2m1fn_ftz": Ref("e2m1fn_ftz", py_float_table(2, 1, "finite", subnormals=False), "float", 1, ftz=True),
    }


def int_refs() -> dict:
    return {
        "int2": Ref("int2", py_int_table(2), "int"),
        "int4": Ref("int4", py_int_table(4), "int"),
        "int4n": Ref("int4n", py_int_table(4, narrow=True), "int"),
        "uint4": Ref("uint4", py_int_table(4, signed=False), "int"),
        "int8": Ref("int8", py_int_table(8), "int"),
        "fixed8.4": Ref("fixed8.4", py_int_table(8, frac=4), "int"),
        "fixed8.-3": Ref("fixed8.-3", py_int_table(8, frac=-3), "int"),
        "ufixed6.2": Ref("ufixed6.2", py_int_table(6, signed=False, frac=2), "int"),
        "int1": Ref("int1", py_int_table(1), "int"),
    }


def codebook_refs() -> dict:
    user = lowbit.codebook(USER_TABLE, name="user6")
    return {
        "nf4": (Ref("nf4", np.array(NF4_PUBLISHED), "codebook"), "nf4"),
        "fp4_bnb": (Ref("fp4_bnb", np.array(FP4_BNB_PUBLISHED), "codebook"), "fp4_bnb"),
        "user6": (Ref("user6", np.array(USER_TABLE), "codebook"), user),
    }


# --- the oracle ------------------------------------------------------------------------------------

def _midpoints(V: np.ndarray):
    """Midpoint of every gap of sorted ``V`` as (m, exact): where the real midpoint is a float64,
    m is it and exact is True; otherwise m is the largest float64 below it (a float x is then above
    the midpoint iff x > m, and never on it). Exactness by TwoSum, the rest with Fractions."""
    lo, hi = V[:-1], V[1:]
    s = lo + hi
    bb = s - lo
    err = (lo - (s - bb)) + (hi - bb)
    m = s / 2
    exact = (err == 0) & (m * 2 == s)
    for k in np.flatnonzero(~exact):  # codebooks with non-dyadic values (fp4_bnb's 1/192, 1/6)
        true_mid = (Fraction(float(lo[k])) + Fraction(float(hi[k]))) / 2
        f = float(true_mid)
        if Fraction(f) == true_mid:
            m[k], exact[k] = f, True
        else:
            m[k] = f if Fraction(f) < true_mid else np.nextafter(f, -np.inf)
    return m, exact


class Oracle:
    """Rounds float64 ``x`` to ``ref``'s values by search over the sorted value list; the search is
    done once, ``round(mode)`` then only picks a neighbour.

    ``round`` returns (result float64, defined bool mask). ``defined`` is False where the oracle
    declines to define a result: round-to-odd between the two even-coded neighbours 0 and
    min_normal of a format that flushes subnormals, and toward_zero at 0 for a table without zero.
    """

    def __init__(self, x, ref: Ref, overflow: str = "saturate"):
        self.x = x = np.asarray(x, dtype=np.float64)
        self.ref, self.overflow = ref, overflow
        V, P = ref.values, ref.parity
        self.ovf_val = None
        if ref.kind in ("float", "unsigned") and overflow != "saturate":
            # continue the top binade by one virtual value; reaching it (or beyond) is an overflow
            vmax = ref.max + ref.top_ulp
            vpar = 1 - P[-1]
            if ref.kind == "float":
                V = np.concatenate([[-vmax], V, [vmax]])
                P = np.concatenate([[vpar], P, [vpar]])
            else:
                V = np.concatenate([V, [vmax]])
                P = np.concatenate([P, [vpar]])
            self.ovf_val = vmax
        n = len(V)
        self.xc = xc = np.clip(np.nan_to_num(x, nan=0.0), V[0], V[-1])  # beyond the ends: the end
        i = np.clip(np.searchsorted(V, xc, side="right"), 1, n - 1)
        self.lo, self.hi = V[i - 1], V[i]
        self.plo, self.phi = P[i - 1], P[i]
        mids, mid_exact = _midpoints(V)
        self.mid, self.mid_ok = mids[i - 1], mid_exact[i - 1]
        self.exact = (xc == self.lo) | (xc == self.hi)
        self.exact_val = np.where(xc == self.hi, self.hi, self.lo)

    def round(self, mode: str):
        x, xc, ref = self.x, self.xc, self.ref
        lo, hi, plo, phi = self.lo, self.hi, self.plo, self.phi
        pos = xc > 0
        defined = np.ones(x.shape, bool)
        if mode in NEAREST_MODES:
            tie = (xc == self.mid) & self.mid_ok
            pick_hi = xc > self.mid
            if mode == "nearest_even":
                # the neighbour whose code is even; both even only happens between 0 and min_normal
                # of a flushed format: the tie goes to zero (with subnormals it would flush to 0)
                tie_hi = (phi == 0) & ((plo == 1) | (np.abs(hi) < np.abs(lo)))
            elif mode == "nearest_away":
                tie_hi = pos
            else:
                tie_hi = ~pos
            pick_hi = np.where(tie, tie_hi, pick_hi)
        elif mode == "toward_zero":
            pick_hi = ~pos
            defined = xc != 0
        elif mode == "up":
            pick_hi = np.ones(x.shape, bool)
        elif mode == "down":
            pick_hi = np.zeros(x.shape, bool)
        elif mode == "odd":
            pick_hi = phi == 1
            defined = plo != phi
        else:
            raise ValueError(mode)
        out = np.where(self.exact, self.exact_val, np.where(pick_hi, hi, lo))
        defined |= self.exact

        if self.ovf_val is not None:
            # the unbounded result reached the virtual value past max (or x is beyond it): overflow
            overflowed = (np.abs(out) >= self.ovf_val) | (np.abs(x) > self.ovf_val) | np.isinf(x)
            if self.overflow == "nan":
                out = np.where(overflowed, np.nan, out)
            else:  # IEEE 754 7.4: modes that round the magnitude down give +-max, the others inf
                toward0 = {"toward_zero": np.ones(x.shape, bool), "up": x < 0, "down": x > 0}.get(
                    mode, np.zeros(x.shape, bool))
                toward0 &= np.isfinite(x)
                signal = np.where(x < 0, -np.inf, np.inf) if ref.has_inf else np.nan
                big = np.where(toward0, np.where(x < 0, -ref.max, ref.max), signal)
                out = np.where(overflowed, big, out)
            defined |= overflowed
        else:  # saturate (always for integers and codebooks)
            out = np.where(x > ref.max, ref.max, out)
            out = np.where(x < ref.min, ref.min, out)
            defined |= (x > ref.max) | (x < ref.min)

        if ref.kind == "unsigned":  # E8M0: no zero, no sign: negatives are nan, zero and tiny -> min
            out = np.where(x < 0, np.nan, out)
            out = np.where(x == 0, ref.min, out)
        elif ref.neg_zero:
            out = np.where((out == 0) & np.signbit(x), -0.0, out)
        out = np.where(np.isnan(x), np.nan, out)
        return out, defined


def oracle_round(x, ref: Ref, mode: str, overflow: str = "saturate"):
    """``Oracle(x, ref, overflow).round(mode)``."""
    return Oracle(x, ref, overflow).round(mode)


# --- test points -----------------------------------------------------------------------------------

def _next(a: np.ndarray, dtype, direction: float) -> np.ndarray:
    a = a.astype(dtype)
    with np.errstate(over="ignore"):
        return np.nextafter(a, np.array(direction, dtype=dtype))


def make_points(ref: Ref, dtype=np.float32, n_random: int = 20000, seed: int = 0) -> np.ndarray:
    """Every value, every midpoint between neighbours, one ulp (of ``dtype``) either side of each,
    the overflow region, +-0, +-inf, nan, values below the smallest magnitude and random values across
    the range; returned as float64 numbers exactly representable in ``dtype``."""
    V = ref.values
    mids = (V[:-1] + V[1:]) / 2
    pts = [V, mids]
    step = ref.top_ulp if ref.kind in ("float", "unsigned") else float(V[-1] - V[-2])
    hi_end = [ref.max + step * f for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)]
    span = float(V[-1] - V[0]) or 1.0
    hi_end += [ref.max * 2, ref.max * 1e3, ref.max + span, 1e30, 3.0e38]
    lo_end = [ref.min - span, ref.min * 2 if ref.min < 0 else -1.0]
    mp = ref.min_pos
    tiny = [mp / 2, mp / 4, mp * 0.75, mp * 0.25, 1e-45, 1e-30, 2.0**-149]
    pts += [np.array(hi_end), -np.array(hi_end), np.array(lo_end), np.array(tiny), -np.array(tiny)]
    rng = np.random.default_rng(seed)
    lo_mag, hi_mag = math.log(mp / 4), math.log(max(abs(ref.max), abs(ref.min)) * 4)
    mags = np.exp(rng.uniform(lo_mag, hi_mag, n_random))
    pts += [mags * rng.choice([-1.0, 1.0], n_random)]
    if ref.kind in ("int", "codebook"):
        pts += [rng.uniform(ref.min - 1, ref.max + 1, n_random)]
    base = np.concatenate(pts)
    with np.errstate(over="ignore"):
        base = base.astype(dtype)
    with np.errstate(over="ignore"):
        edges = np.concatenate([V, mids, np.array(hi_end), -np.array(hi_end), np.array(tiny)]).astype(dtype)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype=dtype)
    allp = np.concatenate([base, _next(edges, dtype, np.inf), _next(edges, dtype, -np.inf), specials])
    return allp.astype(np.float64)


# --- running lowbit and comparing bits ------------------------------------------------------------

def backend_device(backend: str) -> str:
    """The device a backend runs on: GPU backends (names mentioning triton/cuda/gpu) need CUDA."""
    return "cuda" if any(k in backend for k in ("triton", "cuda", "gpu")) else "cpu"


def backend_params():
    """pytest params over every backend lowbit has (new backends are picked up automatically), plus
    'auto' on CUDA where a GPU is present; GPU ones skip cleanly without a GPU."""
    params = []
    for b in lowbit.kernels.BACKENDS:
        dev = backend_device(b)
        marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")] if dev == "cuda" else []
        params.append(pytest.param((b, dev), id=f"{b}-{dev}", marks=marks))
    if torch.cuda.is_available():  # dispatch by device, and the oracle itself on the GPU
        params.append(pytest.param(("auto", "cuda"), id="auto-cuda"))
        params.append(pytest.param(("reference", "cuda"), id="reference-cuda"))
    return params


def run_lowbit(x64: np.ndarray, fmt, mode: str, overflow: str, dtype, backend=("auto", "cpu"), **kw) -> np.ndarray:
    b, dev = backend
    t = torch.from_numpy(x64.astype(dtype)).to(dev)
    q = lowbit.quantize(t, fmt, mode, overflow, backend=b, **kw)
    assert q.dtype == t.dtype and q.shape == t.shape
    return q.double().cpu().numpy()


def assert_bits_equal(actual, expected, x, label: str, mask=None) -> None:
    """Bit-identical float64 arrays (any nan equals any nan; the sign of zero counts)."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    x = np.asarray(x).ravel()
    same = (a.view(np.int64) == e.view(np.int64)) | (np.isnan(a) & np.isnan(e))
    if mask is not None:
        same |= ~np.asarray(mask).ravel()
    if not same.all():
        bad = np.flatnonzero(~same)
        shown = ", ".join(f"x={x[k]!r}: got {a[k]!r} want {e[k]!r}" for k in bad[:8])
        raise AssertionError(f"{label}: {bad.size} of {a.size} differ; {shown}")
