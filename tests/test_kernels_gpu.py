"""The Triton kernels (kernels/triton_quant.py) against the reference oracle, bit for bit, on CUDA.

Same vectors as the CPU kernel tests (tests/test_kernels_common.py): every code point, midpoint,
float32 ulp neighbours, overflow, specials, random values; every claimed element format under every
deterministic mode and overflow policy; every block format (MX, NVFP4, BFP, user blocks) with the
block reduction fused. Stochastic rounding: statistics, reproducibility with a seed, independence.
Skipped, with the reason, where there is no CUDA device or no Triton.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.formats import FloatFormat
from test_kernels_common import (overflow_policies, BLOCK_FORMATS, DETERMINISTIC, ELEMENT_FORMATS, assert_same_bits,
                                 block_vectors, element_vectors, reference_block, reference_element)

_REASON = None
if not torch.cuda.is_available():
    _REASON = "needs a CUDA device (the Triton kernels run on NVIDIA GPUs only)"
elif importlib.util.find_spec("triton") is None:
    _REASON = "needs the triton package"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def tq():
    mod = kernels.triton_backend()
    assert mod is not None, kernels._triton_state["error"]
    return mod


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_element_formats_bit_exact(tq, name):
    fmt = lowbit.format(name)
    x = element_vectors(fmt)
    xc = x.cuda()
    for overflow in overflow_policies(fmt):
        for mode in DETERMINISTIC:
            got = tq.quantize_element(xc, fmt, mode, overflow)
            assert got is not None, f"{name} is not claimed by the Triton path"
            assert_same_bits(got, reference_element(x, fmt, mode, overflow), x, f"{name} {mode} {overflow}")


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_block_formats_bit_exact(tq, name):
    fmt = lowbit.format(name)
    x = block_vectors(fmt)
    xc = x.cuda()
    for mode in DETERMINISTIC:
        got = tq.quantize_block(xc, fmt, mode, -1)
        assert got is not None, f"{name} {mode} is not claimed by the Triton path"
        assert_same_bits(got, reference_block(x, fmt, mode), x, f"{name} {mode}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["e4m3fn", "e5m2", "e2m1fn", "int4", "mxfp4", "nvfp4"])
def test_half_precision_inputs(tq, name, dtype):
    fmt = lowbit.format(name)
    for mode in ("nearest_even", "toward_zero", "up"):
        if name in ("mxfp4", "nvfp4"):
            x = block_vectors(fmt, n_blocks=128).to(dtype)
            got = tq.quantize_block(x.cuda(), fmt, mode, -1)
            want = reference_block(x, fmt, mode)
        else:
            x = element_vectors(fmt, n_random=4000).to(dtype)
            got = tq.quantize_element(x.cuda(), fmt, mode, "saturate")
            want = reference_element(x, fmt, mode)
        assert got.dtype == dtype
        assert_same_bits(got, want, x, f"{name} {mode} {dtype}")


def test_blocks_along_another_axis(tq):
    fmt = lowbit.format("mxfp8_e4m3")
    x = block_vectors(fmt, n_blocks=64)
    xt = x[: (x.shape[0] // 4) * 4].reshape(-1, 4, fmt.size).permute(2, 0, 1)
    got = lowbit.quantize(xt.cuda(), fmt, axis=0)
    assert_same_bits(got, reference_block(xt, fmt, "nearest_even", 0), xt, "axis 0")


def test_large_tensors_match_the_cpu_fast_path(tq, monkeypatch):
    """Several launches' worth of random data (tails of the grid included): GPU == CPU bits."""
    monkeypatch.setenv("LOWBIT_CPU_COMPILE", "0")
    x = torch.randn(3 * 2**20 + 123) * 10
    for name in ("e4m3fn", "e2m1fn", "int8"):
        assert_same_bits(lowbit.quantize(x.cuda(), name), lowbit.quantize(x, name), x, name)
    xb = torch.randn(2**20 + 32 * 7) * 3
    for name in ("mxfp4", "mxfp8_e5m2", "nvfp4"):
        assert_same_bits(lowbit.quantize(xb.cuda(), name), lowbit.quantize(xb, name), xb, name)


def test_auto_dispatch_uses_triton_on_cuda(tq, monkeypatch):
    calls = []
    real = tq.quantize_element

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(tq, "quantize_element", spy)
    lowbit.quantize(torch.randn(100, device="cuda"), "e4m3")
    assert calls == [True]
    # unclaimed work (a codebook of float64 values, E8M0 elements) still runs, on the reference
    x = torch.randn(100, device="cuda").double()      # negatives: nan in E8M0
    for name in ("codebook(0.1,0.2,0.7)", "e8m0"):
        assert_same_bits(lowbit.quantize(x, name).cpu(), lowbit.quantize(x.cpu(), name), x, name)


# --- stochastic --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["e4m3fn", "e2m1fn", "int4", "e5m2"])
def test_stochastic_unbiased_and_proportional(tq, name):
    fmt = lowbit.format(name)
    g = torch.Generator(device="cuda").manual_seed(7)
    vals = fmt.values()
    pos = vals[vals > 0]
    a, b = float(pos[len(pos) // 2]), float(pos[len(pos) // 2 + 1])
    tiny = float(pos[0])
    pts = torch.tensor([a + 0.3 * (b - a), -(a + 0.9 * (b - a)), 0.25 * tiny, -0.7 * tiny,
                        a + 0.5 * (b - a)], dtype=torch.float32)
    n = 1_000_000
    x = pts.repeat_interleave(n)
    q = tq.quantize_element(x.cuda(), fmt, "stochastic", "saturate", g).cpu()
    lo = reference_element(x, fmt, "down")
    hi = reference_element(x, fmt, "up")
    assert bool(((q == lo) | (q == hi)).all())
    q = q.double().view(len(pts), n)
    lo, hi = lo.double().view(len(pts), n)[:, 0], hi.double().view(len(pts), n)[:, 0]
    p_hi = (pts.double() - lo) / (hi - lo)
    freq = (q == hi[:, None]).double().mean(1)
    sd = torch.sqrt(p_hi * (1 - p_hi) / n)
    assert bool(((freq - p_hi).abs() <= 5 * sd + 1e-7).all()), (freq, p_hi)


def test_stochastic_reproducible_and_independent(tq):
    x = torch.full((1_000_000,), 1.0 + 2**-5, device="cuda")   # e4m3fn: p(up) = 0.25
    q1 = lowbit.quantize(x, "e4m3fn", "stochastic", generator=123)
    q2 = lowbit.quantize(x, "e4m3fn", "stochastic", generator=123)
    q3 = lowbit.quantize(x, "e4m3fn", "stochastic", generator=124)
    assert torch.equal(q1, q2) and not torch.equal(q1, q3)
    g = torch.Generator(device="cuda").manual_seed(11)
    a1 = lowbit.quantize(x, "e4m3fn", "stochastic", generator=g)
    a2 = lowbit.quantize(x, "e4m3fn", "stochastic", generator=g)       # the generator advanced
    g.manual_seed(11)
    assert not torch.equal(a1, a2) and torch.equal(a1, lowbit.quantize(x, "e4m3fn", "stochastic", generator=g))
    torch.manual_seed(3)
    d1 = lowbit.quantize(x, "e4m3fn", "stochastic")                      # torch's global CUDA generator
    torch.manual_seed(3)
    assert torch.equal(d1, lowbit.quantize(x, "e4m3fn", "stochastic"))
    up = (q1 > 1).double().cpu()
    assert abs(up.mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / len(up))
    for lag in (1, 3, 1024, 4096):   # inside one Philox word group, across quarters, across programs
        c = torch.corrcoef(torch.stack([up[:-lag], up[lag:]]))[0, 1].item()
        assert abs(c) < 5 / math.sqrt(len(up)), (lag, c)
    xb = torch.full((2**16, 32), 1.0 + 2**-5, device="cuda")
    b1 = lowbit.quantize(xb, "mxfp8_e4m3", "stochastic", generator=5)
    assert torch.equal(b1, lowbit.quantize(xb, "mxfp8_e4m3", "stochastic", generator=5))
    assert abs((b1 > 1).double().mean().item() - 0.25) < 0.01


def test_sr_bits_and_stochastic_half(tq):
    n = 1_000_000
    x = torch.full((n,), 1 + 0.3 * 0.125, device="cuda")
    for k in (1, 2, 3):
        q = tq.quantize_element(x, lowbit.format("e4m3fn"), "stochastic", "saturate",
                                torch.Generator(device="cuda").manual_seed(k), sr_bits=k)
        p = math.floor(0.3 * 2**k) / 2**k
        assert abs((q > 1).double().mean().item() - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-3) / n)
    q = tq.quantize_element(x, lowbit.format("e4m3fn"), "stochastic_half", "saturate",
                            torch.Generator(device="cuda").manual_seed(1))
    assert abs((q > 1).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
    v = lowbit.format("e2m1fn").values().float().cuda().repeat(1000)
    assert torch.equal(tq.quantize_element(v, lowbit.format("e2m1fn"), "stochastic", "saturate"), v)


def test_nvfp4_with_a_given_tensor_amax_is_the_same(tq):
    x = torch.randn(2**16, device="cuda") * 5
    x[7] = float("nan")
    amax = torch.where(torch.isfinite(x), x.abs(), 0).amax().float()
    fmt = lowbit.format("nvfp4")
    assert_same_bits(tq.quantize_block(x, fmt, "nearest_even", -1, tensor_amax=amax),
                     tq.quantize_block(x, fmt, "nearest_even", -1), x, "nvfp4 given amax")


def test_nvfp4_tensor_amax_public_api(tq):
    """lowbit.quantize/encode(..., tensor_amax=) on CUDA: a number or a CUDA tensor, given =
    measured, and a different amax matches the reference bit for bit."""
    fmt = lowbit.format("nvfp4")
    x = block_vectors(fmt, n_blocks=256)
    xc = x.cuda()
    true_amax = float(torch.where(torch.isfinite(x), x.abs(), 0).amax())
    assert_same_bits(lowbit.quantize(xc, fmt, tensor_amax=torch.tensor(true_amax, device="cuda")),
                     lowbit.quantize(xc, fmt), x, "given = measured")
    for amax in (true_amax / 3, true_amax / 1e20, 0.0):
        for mode in ("nearest_even", "up"):
            want = lowbit.quantize(x, fmt, mode, tensor_amax=amax, backend="reference")
            assert_same_bits(lowbit.quantize(xc, fmt, mode, tensor_amax=amax), want, x, f"amax {amax} {mode}")
            enc = lowbit.encode(xc, fmt, mode, tensor_amax=amax)
            ref = lowbit.encode(x, fmt, mode, tensor_amax=amax, backend="reference")
            assert torch.equal(enc.codes.cpu(), ref.codes) and torch.equal(enc.scales.cpu(), ref.scales)
            assert torch.equal(enc.tensor_scale.cpu(), ref.tensor_scale)
            assert_same_bits(lowbit.decode(enc), want, x, f"decode amax {amax}")
    with pytest.raises(ValueError, match="finite number >= 0"):
        lowbit.quantize(xc, fmt, tensor_amax=torch.tensor(-1.0, device="cuda"))


# --- fused encode / decode ----------------------------------------------------------------------------

def _same_codes(got, want, what):
    assert got.codes.dtype == want.codes.dtype, what
    bad = got.codes.cpu() != want.codes
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} codes differ"
    if want.scales is not None:
        assert torch.equal(got.scales.cpu(), want.scales), what
    if want.tensor_scale is not None:
        assert torch.equal(got.tensor_scale.cpu(), want.tensor_scale.cpu()), what


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_element_encode_decode_bit_exact(tq, name):
    from lowbit.kernels import triton_codes
    fmt = lowbit.format(name)
    x = element_vectors(fmt)
    if not fmt.has_nan:
        x = x[~torch.isnan(x)]
    xc = x.cuda()
    for overflow in overflow_policies(fmt):
        for mode in DETERMINISTIC:
            assert triton_codes.encode_element(xc[:8], fmt, mode, overflow) is not None, f"{name} not claimed"
            want = lowbit.encode(x, fmt, mode, overflow, backend="reference")
            got = lowbit.encode(xc, fmt, mode, overflow)
            assert got.codes.is_cuda
            _same_codes(got, want, f"{name} {mode} {overflow}")
            assert_same_bits(lowbit.decode(got), lowbit.decode(want, backend="reference"), x, f"{name} decode")


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_block_encode_decode_bit_exact(tq, name):
    from lowbit.kernels import triton_codes
    fmt = lowbit.format(name)
    x = block_vectors(fmt)
    xc = x.cuda()
    for mode in DETERMINISTIC:
        assert triton_codes.encode_block(xc[:4], fmt, mode, -1) is not None, f"{name} not claimed"
        want = lowbit.encode(x, fmt, mode, backend="reference")
        got = lowbit.encode(xc, fmt, mode)
        _same_codes(got, want, f"{name} {mode}")
        assert_same_bits(lowbit.decode(got), lowbit.decode(want, backend="reference"), x, f"{name} decode")
    # another axis, half-precision input
    xt = x[: (x.shape[0] // 4) * 4].reshape(-1, 4, fmt.size).permute(2, 0, 1).to(torch.bfloat16)
    got = lowbit.encode(xt.cuda(), fmt, "nearest_even", axis=0)
    _same_codes(got, lowbit.encode(xt, fmt, "nearest_even", axis=0, backend="reference"), f"{name} axis 0 bf16")
    assert_same_bits(lowbit.decode(got), lowbit.quantize(xt, fmt, axis=0, backend="reference"), xt, "decode bf16")


def test_encode_stochastic_round_trip_and_nan(tq):
    x = torch.full((2**20,), 1.0 + 2**-5, device="cuda")
    for name, xx in (("e4m3fn", x), ("e2m1fn", x * 2), ("int8", x * 40), ("mxfp4", x.view(-1, 32)),
                     ("mxfp8_e4m3", x.view(-1, 32)), ("nvfp4", x.view(-1, 16) * 0.7)):
        for mode, kw in (("stochastic", {}), ("stochastic", {"sr_bits": 3}), ("stochastic_half", {})):
            g1 = torch.Generator(device="cuda").manual_seed(5)
            g2 = torch.Generator(device="cuda").manual_seed(5)
            enc = lowbit.encode(xx, name, mode, generator=g1, **kw)
            assert_same_bits(lowbit.decode(enc), lowbit.quantize(xx, name, mode, generator=g2, **kw), xx,
                             f"{name} {mode}")
    enc = lowbit.encode(x, "e4m3fn", "stochastic", generator=3)
    assert bool(((enc.codes == 0x38) | (enc.codes == 0x39)).all())
    up = (enc.codes == 0x39).double()
    assert abs(up.mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / len(up))
    xn = torch.randn(3 * 4096 + 5, device="cuda")
    xn[5000] = float("nan")
    for name in ("e2m1fn", "int4", "e3m2fn"):
        with pytest.raises(ValueError, match="has no nan code"):
            lowbit.encode(xn, name)
    assert int(lowbit.encode(xn, "e4m3fn").codes[5000]) == 0x7F


def test_encode_user_scale_codebooks_and_wide_formats_on_cuda(tq):
    """Work the fused kernels do not claim (codebooks, 19-bit tf32 decode) and a user scale: CUDA
    tensors in, the reference's codes and values out."""
    x = torch.randn(16, 64) * 3
    s = torch.rand(16, 1) + 0.1
    for fmt, kw in (("e4m3fn", {"scale": s}), ("int4", {"scale": 0.37}), ("nf4", {}), ("fp4_bnb", {}),
                    ("tf32", {}), ("block(nf4,e8m0,16)", {})):
        kwc = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        got = lowbit.encode(x.cuda(), fmt, **kwc)
        want = lowbit.encode(x, fmt, backend="reference", **kw)
        assert torch.equal(got.codes.cpu(), want.codes), fmt
        assert_same_bits(lowbit.decode(got), lowbit.quantize(x, fmt, backend="reference", **kw), x, fmt)


CODEBOOKS = ("nf4", "fp4_bnb", "codebook(-3,-1,-0.25,0,0.5,0.75,2,6)", "codebook(0.25,0.5,3)")


@pytest.mark.parametrize("name", CODEBOOKS)
def test_codebooks_bit_exact(tq, name):
    """The fused codebook kernel: quantize and encode give the reference's bits in every
    deterministic mode; nan stays nan (quantize) or is refused (encode)."""
    from lowbit.kernels import triton_codes
    fmt = lowbit.format(name)
    x = element_vectors(fmt)
    xc = x.cuda()
    xn = x[~torch.isnan(x)]
    for mode in DETERMINISTIC:
        got = tq.quantize_element(xc, fmt, mode, "saturate")
        assert got is not None, f"{name} is not claimed"
        assert_same_bits(got, reference_element(x, fmt, mode), x, f"{name} {mode}")
        enc = lowbit.encode(xn.cuda(), fmt, mode)
        assert torch.equal(enc.codes.cpu(), lowbit.encode(xn, fmt, mode, backend="reference").codes), mode
        assert_same_bits(lowbit.decode(enc), reference_element(xn, fmt, mode), xn, f"{name} {mode} decode")
    assert triton_codes.encode_element(xc, fmt, "nearest_even", "saturate")[1]   # x holds nan
    with pytest.raises(ValueError, match="has no nan code"):
        lowbit.encode(xc, fmt)
