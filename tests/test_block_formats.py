"""Block formats against vectors worked out by hand from the OCP MX v1.0 spec and the NVFP4 recipe.

OCP MX: per block of 32, shared exponent = floor(log2(amax)) - emax_elem (emax_elem: e4m3 8, e5m2 15,
e3m2 4, e2m3 2, e2m1 2, int8 0), E8M0 scale 2**shared, elements = x / scale rounded to nearest even
and saturated at the element max; a block holding nan or inf is nan.
NVFP4: per-tensor float32 scale ts = amax / (6 * 448); per block of 16 an E4M3 scale
s = amax_b / 6 / ts rounded to nearest even; elements = x / (s * ts) in e2m1 (saturating).
Every expected number below is derived in the comment next to it.
"""
import numpy as np
import pytest
import torch

import lowbit
from _exact_refs import one_torch_thread  # noqa: F401  (autouse fixture)
from _exact_refs import backend_params

BACKENDS = backend_params()


def block_of(values, size):
    """A block: the given values followed by zeros up to ``size``."""
    return list(values) + [0.0] * (size - len(values))


def run(x, fmt, backend, **kw):
    b, dev = backend
    t = torch.tensor(x, dtype=torch.float32, device=dev)
    return lowbit.quantize(t, fmt, backend=b, **kw).cpu()


def check(x, fmt, expected, backend, **kw):
    got = run(x, fmt, backend, **kw)
    want = torch.tensor(expected, dtype=torch.float32)
    assert torch.equal(got, want), f"{fmt}:\n got {got.tolist()}\nwant {want.tolist()}"


# --- OCP MX ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_mxfp8_e4m3_by_hand(backend):
    # block A: amax 3 -> floor(log2 3) = 1 -> shared 1 - 8 = -7, scale 2^-7; x * 128:
    #   3 -> 384 (1.5 * 2^8, exact); 0.1 -> 12.8 -> ulp 1 in [8,16) -> 13 -> 13/128 = 0.1015625
    #   1 -> 128 exact; -0.0037 -> -0.4736, ulp 2^-5 in [0.25,0.5) -> 15.16 -> 15 * 2^-5 / 128
    #   = -0.003662109375; -2.5 -> -320 (ulp 32 in [256,512): exact)
    a = block_of([3.0, 0.1, 1.0, -0.0037, -2.5], 32)
    a_q = block_of([3.0, 0.1015625, 1.0, -0.003662109375, -2.5], 32)
    # block B: amax 7.5 -> floor(log2 7.5) = 2 -> shared -6, scale 2^-6; x * 64:
    #   7.5 -> 480 > 448 -> saturates to 448 -> 7.0; 7.2 -> 460.8 -> ulp 32 -> 14.4 -> 448 -> 7.0
    #   -7.4 -> -473.6 -> 14.8 -> 15 * 32 = 480 -> saturates -> -7.0; 0.5 -> 32 exact
    b = block_of([7.5, 7.2, -7.4, 0.5], 32)
    b_q = block_of([7.0, 7.0, -7.0, 0.5], 32)
    check(a + b, "mxfp8_e4m3", a_q + b_q, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mxfp4_by_hand(backend):
    # e2m1 values 0 0.5 1 1.5 2 3 4 6 (codes 0..7)
    # block C: amax 7.5 -> shared 2 - 2 = 0, scale 1: 7.5 -> 6 (saturated), 2.5 -> tie 2|3 -> 2 (even),
    #   0.25 -> tie 0|0.5 -> 0, 0.3 -> 0.5, 1.25 -> tie 1|1.5 -> 1, 1.75 -> tie 1.5|2 -> 2,
    #   5 -> tie 4|6 -> 4, -5 -> -4
    c = block_of([7.5, 2.5, 0.25, 0.3, 1.25, 1.75, 5.0, -5.0], 32)
    c_q = block_of([6.0, 2.0, 0.0, 0.5, 1.0, 2.0, 4.0, -4.0], 32)
    # block D: amax 0.1 -> floor(log2 0.1) = -4 -> shared -6, scale 1/64; x * 64:
    #   0.1 -> 6.4 -> 6 -> 0.09375; 0.05 -> 3.2 -> 3 -> 0.046875; 0.02 -> 1.28 -> 1.5 -> 0.0234375
    #   -0.07 -> -4.48 -> -4 -> -0.0625; 0.003 -> 0.192 -> 0
    d = block_of([0.1, 0.05, 0.02, -0.07, 0.003], 32)
    d_q = block_of([0.09375, 0.046875, 0.0234375, -0.0625, 0.0], 32)
    # block E: all zero (with -0): zeros, signs kept; scale is the smallest E8M0 value
    e = block_of([-0.0, 0.0, -0.0], 32)
    check(c + d + e, "mxfp4", c_q + d_q + e, backend)
    got = run(c + d + e, "mxfp4", backend)
    assert torch.signbit(got[64:67]).tolist() == [True, False, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mxfp6_and_mxfp8_e5m2_by_hand(backend):
    x = block_of([1.0, 0.9, -0.3], 32)
    # e3m2 (emax 4): shared 0 - 4 = -4, x * 16: 0.9 -> 14.4, ulp 2 in [8,16) -> 14 -> 0.875;
    #   -0.3 -> -4.8, ulp 1 in [4,8) -> -5 -> -0.3125
    # e2m3 (emax 2): shared -2, x * 4: 0.9 -> 3.6, ulp 0.25 -> 3.5 -> 0.875; -0.3 -> -1.2, ulp 0.125
    #   -> -1.25 -> -0.3125
    # e5m2 (emax 15): shared -15, x * 32768: 0.9 -> 29491.2, ulp 4096 -> 28672 -> 0.875;
    #   -0.3 -> -9830.4, ulp 2048 -> -10240 -> -0.3125
    want = block_of([1.0, 0.875, -0.3125], 32)
    for name in ("mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e5m2"):
        check(x, name, want, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mxint8_by_hand(backend):
    # elements: 8-bit integers times 2^-6 (range +-127/64, emax 0)
    # amax 3.99 -> floor(log2) = 1 -> shared 1, scale 2; x / 2 * 64 = x * 32:
    #   3 -> 96 -> 3; 1 -> 32 -> 1; 0.01 -> 0.32 -> 0; 0.05 -> 1.6 -> 2 -> 0.0625
    #   3.9 -> 124.8 -> 125 -> 3.90625; -3.99 -> -127.68 -> -128 -> saturates at -127 -> -3.96875
    x = block_of([3.0, 1.0, 0.01, 0.05, 3.9, -3.99], 32)
    check(x, "mxint8", block_of([3.0, 1.0, 0.0, 0.0625, 3.90625, -3.96875], 32), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfp_and_user_pow2_blocks_by_hand(backend):
    # bfp8_b16: int8 narrow elements (emax floor(log2 127) = 6), E8M0 scale, 16 per block
    # block 1: amax 1 -> shared -6, x * 64: 0.3 -> 19.2 -> 19 -> 0.296875; -0.7 -> -44.8 -> -45
    #   -> -0.703125; 0.001 -> 0.064 -> 0
    # block 2: amax 1.999 -> shared -6: 1.999 * 64 = 127.94 -> 128 -> saturates at 127 -> 1.984375
    x = block_of([1.0, 0.3, -0.7, 0.001], 16) + block_of([1.999, 0.5], 16)
    want = block_of([1.0, 0.296875, -0.703125, 0.0], 16) + block_of([1.984375, 0.5], 16)
    check(x, "bfp8_b16", want, backend)
    # int4 elements (emax 2), E8M0 scale, blocks of 8: amax 1 -> shared -2, x * 4: 0.3 -> 1.2 -> 1
    #   -> 0.25; -0.9 -> -3.6 -> -4 -> -1; block 2: 1.9 * 4 = 7.6 -> 8 -> saturates at 7 -> 1.75
    fmt = lowbit.block("int4", scale="e8m0", size=8)
    x = block_of([1.0, 0.3, -0.9], 8) + block_of([1.9], 8)
    check(x, fmt, block_of([1.0, 0.25, -1.0], 8) + block_of([1.75], 8), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_or_inf_makes_only_its_block_nan(backend):
    good = block_of([7.5, 2.5, 0.25, 0.3], 32)
    good_q = block_of([6.0, 2.0, 0.0, 0.5], 32)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = good + block_of([1.0, bad], 32) + good
        got = run(x, "mxfp4", backend)
        assert torch.isnan(got[32:64]).all(), bad
        assert got[:32].tolist() == good_q and got[64:].tolist() == good_q


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_exponent_clamps_to_e8m0_range(backend):
    # amax 2^-140 (a float32 subnormal): floor(log2) - 8 = -148 < -127 -> scale 2^-127; the elements
    # x / 2^-127 = 2^-13 and 2^-14 are below e4m3fn's smallest subnormal 2^-9 -> 0
    x = block_of([2.0**-140, -(2.0**-141)], 32)
    got = run(x, "mxfp8_e4m3", backend)
    assert got.tolist() == [0.0] * 32 and torch.signbit(got[1])
    # amax = float32 max (about 2^128): shared 127 - 8 = 119; x * 2^-119 = 1.99999988 * 2^8 -> 448
    # (saturated) -> 448 * 2^119 = 1.75 * 2^127
    big = float(np.finfo(np.float32).max)
    got = run(block_of([big, -big], 32), "mxfp8_e4m3", backend)
    assert got[:2].tolist() == [1.75 * 2.0**127, -1.75 * 2.0**127]


# --- NVFP4 ----------------------------------------------------------------------------------------

NV_X = (
    # tensor amax 168 -> ts = 168 / 2688 = 0.0625 (exact)
    # block 1: amax 168 -> 168/6 = 28 -> 28/ts = 448 -> E4M3 448 -> d = 448 * ts = 28; x / 28:
    #   168 -> 6; 100 -> 3.571 -> 4 -> 112; 50 -> 1.786 -> 2 -> 56; -30 -> -1.071 -> -1 -> -28;
    #   5 -> 0.179 -> 0
    block_of([168.0, 100.0, 50.0, -30.0, 5.0], 16)
    # block 2: amax 10 -> 10/6 = 1.6667 -> /ts = 26.667 -> E4M3 (ulp 2 in [16,32)) -> 26 -> d = 1.625;
    #   10 -> 6.154 > 6 -> saturates at 6 -> 9.75; 5 -> 3.077 -> 3 -> 4.875; 1 -> 0.615 -> 0.5
    #   -> 0.8125; -2.5 -> -1.538 -> -1.5 -> -2.4375; 0.4 -> 0.246 -> 0
    + block_of([10.0, 5.0, 1.0, -2.5, 0.4], 16)
    # block 3: all zero -> scale 0 -> zeros
    + block_of([], 16)
    # block 4: amax 0.75 -> 0.125 / ts = 2 -> E4M3 2 -> d = 0.125: 0.75 -> 6; 0.3 -> 2.4 -> 2 -> 0.25;
    #   0.1 -> 0.8 -> 1 -> 0.125; 0.19 -> 1.52 -> 1.5 -> 0.1875; -0.0625 -> -0.5 -> -0.0625
    + block_of([0.75, 0.3, 0.1, 0.19, -0.0625], 16)
    # block 5: amax 10.125 -> 1.6875 / ts = 27: the tie between E4M3 26 (mantissa 101, odd) and 28
    #   (110, even) -> 28 -> d = 1.75: 10.125 -> 5.786 -> 6 -> 10.5; 1 -> 0.571 -> 0.5 -> 0.875
    + block_of([10.125, 1.0], 16)
)
NV_Q = (
    block_of([168.0, 112.0, 56.0, -28.0, 0.0], 16)
    + block_of([9.75, 4.875, 0.8125, -2.4375, 0.0], 16)
    + block_of([], 16)
    + block_of([0.75, 0.25, 0.125, 0.1875, -0.0625], 16)
    + block_of([10.5, 0.875], 16)
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nvfp4_by_hand(backend):
    check(NV_X, "nvfp4", NV_Q, backend)
    enc = lowbit.encode(torch.tensor(NV_X), "nvfp4")
    assert enc.tensor_scale.item() == 0.0625
    # E4M3 codes: 448 = 0x7E; 26 = 1.625 * 2^4 -> field 11, mantissa 5 -> 0x5D; 0; 2 -> 0x40;
    # 28 = 1.75 * 2^4 -> 0x5E
    assert enc.scales.tolist() == [0x7E, 0x5D, 0x00, 0x40, 0x5E]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nvfp4_nan_block_leaves_the_others_alone(backend):
    # times 256 (ts = 16, every step scales exactly): the nan must not reach the tensor scale, else
    # ts falls back to 1 and block 1's scale 168*256/6 = 7168 saturates at 448
    x = [v * 256 for v in NV_X]
    x[16 * 2 + 3] = float("nan")  # into the all-zero block 3
    got = run(x, "nvfp4", backend)
    assert torch.isnan(got[32:48]).all()
    want = torch.tensor(NV_Q) * 256
    assert torch.equal(got[:32], want[:32]) and torch.equal(got[48:], want[48:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_block_with_e4m3_scale_by_hand(backend):
    # e2m1 elements, IEEE e4m3 scale (max 240), blocks of 16, no tensor scale: amax 10 -> 10/6 =
    # 1.6667 -> e4m3 (ulp 0.125 in [1,2)) -> 1.625: same element arithmetic as NVFP4 block 2
    fmt = lowbit.block("e2m1fn", scale="e4m3", size=16)
    check(block_of([10.0, 5.0, 1.0, -2.5, 0.4], 16), fmt, block_of([9.75, 4.875, 0.8125, -2.4375, 0.0], 16),
          backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_axis_and_shape(backend):
    b, dev = backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 3, generator=g) * torch.logspace(-3, 3, 3)
    for name in ("mxfp4", "nvfp4", "mxint8"):
        along1 = lowbit.quantize(x.to(dev), name, axis=1, backend=b).cpu()
        last = lowbit.quantize(x.movedim(1, -1).contiguous().to(dev), name, backend=b).cpu()
        assert along1.shape == x.shape
        assert torch.equal(along1, last.movedim(-1, 1))
        assert torch.equal(lowbit.quantize(x.to(dev), name, axis=-2, backend=b).cpu(), along1)


def test_all_zero_tensor():
    for name in ("mxfp8_e4m3", "mxfp4", "nvfp4", "mxint8", "bfp8_b16"):
        x = torch.zeros(2, 64)
        assert torch.equal(lowbit.quantize(x, name), x)
        enc = lowbit.encode(x, name)
        assert torch.equal(lowbit.decode(enc), x)
        if name != "nvfp4":  # E8M0: the smallest scale, code 0
            assert (enc.scales == 0).all()
        else:
            assert enc.tensor_scale.item() == 1.0
