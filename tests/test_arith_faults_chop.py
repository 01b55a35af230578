"""Fault injection (bit flips in codes) and the chop front door (MATLAB chop / Pychop options)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import arith


def _popcount(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.int64)
    c = torch.zeros_like(v)
    for b in range(32):
        c += (v >> b) & 1
    return c


def test_field_masks():
    assert arith.field_mask(lowbit.format("e4m3fn"), ["sign"]) == 0x80
    assert arith.field_mask(lowbit.format("e4m3fn"), ["exponent"]) == 0x78
    assert arith.field_mask(lowbit.format("e4m3fn"), ["mantissa"]) == 0x07
    assert arith.field_mask(lowbit.format("bf16"), ["exponent"]) == 0x7F80
    assert arith.field_mask(lowbit.format("int8"), ["sign", "mantissa"]) == 0xFF
    with pytest.raises(ValueError, match="unknown bit fields"):
        arith.field_mask(lowbit.format("int8"), ["exponant"])


@pytest.mark.parametrize("p", [0.0, 1e-3, 0.5, 1.0])
def test_flip_bits_rate_fields_and_seed(p):
    codes = torch.randint(0, 256, (200_000,), dtype=torch.uint8)
    mask = 0x78
    out = arith.flip_bits(codes, p, mask, seed=3)
    diff = (out ^ codes).to(torch.int64)
    assert bool(((diff & ~mask) == 0).all())  # only allowed bits
    n_flips = int(_popcount(diff).sum())
    expected = p * codes.numel() * 4
    assert abs(n_flips - expected) <= 6 * math.sqrt(expected * (1 - p) + 1)
    assert torch.equal(out, arith.flip_bits(codes, p, mask, seed=3))
    if 0 < p < 1:
        assert not torch.equal(out, arith.flip_bits(codes, p, mask, seed=4))


def test_flip_per_element_one_bit_each():
    codes = torch.randint(0, 2**16, (100_000,), dtype=torch.int32)
    for p in (1e-3, 0.3):
        out = arith.flip_bits(codes, p, 0xFFFF, per="element", seed=0)
        pc = _popcount(out ^ codes)
        assert bool((pc <= 1).all())
        hit = int((pc == 1).sum())
        assert abs(hit - p * codes.numel()) <= 6 * math.sqrt(p * codes.numel())


def test_inject_values_and_block_scales():
    x = torch.randn(64, 64)
    y = arith.inject_faults(x, "e4m3fn", 0.0)
    assert torch.equal(y, lowbit.quantize(x, "e4m3fn"))
    y = arith.inject_faults(x, "e4m3fn", 0.02, fields=("sign",), seed=1)
    q = lowbit.quantize(x, "e4m3fn")
    assert torch.equal(y.abs(), q.abs()) and not torch.equal(y, q)
    enc = lowbit.encode(x, "mxfp8")
    bad = arith.inject_encoded(enc, 0.05, ("scale",), seed=2)
    assert torch.equal(bad.codes, enc.codes) and not torch.equal(bad.scales, enc.scales)
    ratio = lowbit.decode(bad) / lowbit.decode(enc)
    r = ratio[torch.isfinite(ratio) & (ratio != 0)]
    assert bool((torch.log2(r) == torch.round(torch.log2(r))).all())  # blocks scaled by powers of two
    with pytest.raises(ValueError, match="no block scale"):
        arith.inject_faults(x, "e4m3fn", 0.1, fields=("scale",))
    xn = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    assert isinstance(arith.inject_faults(xn, "int8", 0.01, seed=0), np.ndarray)


def test_model_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    ref = model(x)
    w0 = model[0].weight.detach().clone()
    with arith.weight_faults(model, "int8", 0.05, seed=0, modules=["0"]):
        assert not torch.equal(model[0].weight, w0)
        faulty = model(x)
    assert torch.equal(model[0].weight, w0)
    assert not torch.allclose(faulty, ref)
    h = arith.activation_faults(model, "bf16", 0.0)
    assert torch.allclose(model(x), ref, rtol=1e-2, atol=1e-2)
    h.remove()
    h = arith.activation_faults(model, "bf16", 0.01, fields=("exponent",), seed=1)
    assert not torch.allclose(model(x), ref)
    h.remove()
    assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="no modules named"):
        with arith.weight_faults(model, "int8", 0.1, modules=["nope"]):
            pass


# --- chop --------------------------------------------------------------------------------------

def _exact_chop(v: float, t: int, emax: int, rmode: int, subnormal: bool) -> float:
    """Correct rounding of v to chop's (t, emax) format, by exact arithmetic."""
    if v == 0 or not math.isfinite(v):
        return v
    q, neg = abs(Fraction(v)), v < 0
    emin = 1 - emax
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    quantum = Fraction(2) ** (max(e, emin) - (t - 1))
    k = q / quantum
    lo = math.floor(k)
    up_mode = {2: not neg, 3: neg, 4: False}
    if rmode == 1:
        r = lo + (1 if (k - lo > Fraction(1, 2) or (k - lo == Fraction(1, 2) and lo % 2)) else 0)
    else:
        r = lo + (1 if (k != lo and up_mode[rmode]) else 0)
    val = r * quantum
    xmin = Fraction(2) ** emin
    if not subnormal and val < xmin:
        if rmode == 1:
            val = xmin if q >= xmin / 2 else Fraction(0)
        else:
            val = xmin if up_mode[rmode] else Fraction(0)
    xmax = Fraction(2) ** emax * (2 - Fraction(2) ** (1 - t))
    if val > xmax:
        val = math.inf if rmode == 1 or up_mode.get(rmode) else float(xmax)
    return -float(val) if neg else float(val)


@pytest.mark.parametrize("prec", ["q43", "h", "b", (5, 10)])
@pytest.mark.parametrize("rmode", [1, 2, 3, 4])
def test_chop_is_correct_rounding(prec, rmode):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(600) * 2.0 ** rng.integers(-140, 130, 600)
    opts = arith.ChopOptions(prec, rmode)
    t, emax = opts.params
    y = arith.chop(x, prec, rmode)
    want = [_exact_chop(v, t, emax, rmode, opts.keeps_subnormals) for v in x]
    assert np.array_equal(y, want)


def test_chop_options_explim_flip_and_errors():
    x = np.array([1e30, -3.3, 1e-30, 0.1])
    y = arith.chop(x, "h", explim=False)
    assert np.isfinite(y).all() and y[2] != 0
    for v, r in zip(x, y):
        m, _ = math.frexp(r)
        assert (Fraction(m) * 2**11).denominator == 1  # 11 significant bits
    z = np.random.default_rng(0).standard_normal(2000)
    c = arith.chop(z, "h")
    assert np.array_equal(arith.chop(z, "h", flip=True, p=0.0), c)
    f = arith.chop(z, "h", flip=True, p=1.0, generator=0)
    cb = lowbit.encode(torch.from_numpy(c).float(), "fp16").codes.to(torch.int64)
    fb = lowbit.encode(torch.from_numpy(f).float(), "fp16").codes.to(torch.int64)
    d = cb ^ fb
    assert bool((_popcount(d) == 1).all()) and bool((d < 2**10).all())
    assert arith.chop(np.array([2.0**-127]), "b")[0] == 2.0**-126  # chop's tie to xmin without subnormals
    s = arith.chop(np.full(4000, 1 + 2.0**-12), "h", rmode=5, generator=0)
    assert set(np.unique(s)) == {1.0, 1 + 2.0**-10} and abs((s > 1).mean() - 0.25) < 0.04
    assert isinstance(arith.chop(torch.ones(3, dtype=torch.float32), "b"), torch.Tensor)
    with pytest.raises(ValueError, match="rmode"):
        arith.chop(z, "h", rmode=11)
    with pytest.raises(ValueError, match="prec"):
        arith.chop(z, "x")
    with pytest.raises(ValueError, match="custom precision"):
        arith.chop(z, (30, 10))
    assert lowbit.chop is arith.chop
