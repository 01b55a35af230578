"""Bad input gets a clear error that names what is accepted, or the documented result; never a silent
wrong answer and never a traceback from deep inside torch."""
import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit import FormatError

X = torch.linspace(-3, 3, 64).reshape(1, 64)
NAN, INF = math.nan, math.inf


# --- format names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["foo", "e4m3xx", "mxfp3", "", "int4.5", "fp8", "e4m", "nf5"])
def test_unknown_format_names(name):
    with pytest.raises(FormatError, match=r"unknown format .*Accepted: intN.*eXmY.*mxfp4.*nvfp4"):
        lowbit.format(name)


@pytest.mark.parametrize("name, match", [
    ("e0m0", r"exponent bits must be 1\.\.8, got e0m0"),
    ("e9m30", r"exponent bits must be 1\.\.8, got e9m30"),
    ("e4m24", r"mantissa bits must be 0\.\.23, got e4m24"),
    ("int0", r"integer width must be 1\.\.32 bits, got 0"),
    ("int40", r"integer width must be 1\.\.32 bits, got 40"),
    ("e1m0", r"e1m0 leaves no finite nonzero value"),
    ("uint4n", r"narrow .* only applies to signed"),
    ("int1n", r"int1n would hold only 0"),
    ("fixed8.100", r"fractional bits must be in -64\.\.64"),
    ("p3109_k8p8", r"P3109 needs 2 <= K <= 16 and 1 <= P < K, got K=8, P=8"),
    ("p3109_k20p3", r"P3109 needs .* got K=20"),
    ("e4m3_b5000", r"exponent bias must be within"),
    ("e8m23_b-1000", r"beyond float64"),
    ("codebook(1,a)", r"codebook values must be numbers"),
    ("codebook(1)", r"at least two values"),
    ("block(e2m1,e8m0,0)", r"block size must be 1\.\.65536, got 0"),
    ("block(mxfp4,e8m0,32)", r"cannot be nested"),
    ("block(e2m1,e8m0)", r"expected block\(ELEMENT,SCALE,SIZE\[,tensor\]\)"),
])
def test_impossible_formats(name, match):
    with pytest.raises(FormatError, match=match):
        lowbit.format(name)


def test_format_errors_are_value_errors_and_other_constructors():
    assert issubclass(FormatError, ValueError)
    for bad in (None, 4, 2.5):
        with pytest.raises(FormatError, match="a format is a name"):
            lowbit.format(bad)
    with pytest.raises(FormatError, match="finite"):
        lowbit.codebook([1.0, NAN])
    with pytest.raises(FormatError, match="built-in codebook name"):
        lowbit.codebook([1.0, 2.0], name="nf4")
    with pytest.raises(FormatError, match="block size must be an integer, got 'a'"):
        lowbit.block("e2m1", "e8m0", "a")
    with pytest.raises(FormatError, match="cannot be nested"):
        lowbit.block("mxfp4", "e8m0", 32)


# --- tensors --------------------------------------------------------------------------------------

def test_block_size_not_dividing_the_axis():
    with pytest.raises(ValueError, match=r"block size 32 does not divide axis 1 of length 60 .*pad"):
        lowbit.quantize(torch.randn(4, 60), "mxfp4")
    with pytest.raises(ValueError, match=r"block size 16 does not divide axis 0 of length 4"):
        lowbit.quantize(torch.randn(4, 64), "nvfp4", axis=0)
    with pytest.raises(ValueError, match=r"block size 32 does not divide"):
        lowbit.encode(torch.randn(4, 60), "mxfp8_e4m3")
    with pytest.raises(ValueError, match=r"blocks of 32 values along an axis; got a 0-d tensor"):
        lowbit.quantize(torch.tensor(1.0), "mxfp4")
    with pytest.raises(ValueError, match=r"axis 5 is out of range for a tensor of shape \(4, 64\)"):
        lowbit.quantize(torch.randn(4, 64), "mxfp4", axis=5)


@pytest.mark.parametrize("x, match", [
    (torch.arange(4), r"floating-point tensor, got torch\.int64; convert with x\.float\(\)"),
    (torch.ones(4, dtype=torch.bool), r"floating-point tensor, got torch\.bool"),
    (torch.ones(4, dtype=torch.complex64), r"floating-point tensor, got torch\.complex64"),
    (torch.ones(4).to(torch.float8_e4m3fn), r"accepts float16, bfloat16, float32 and float64 tensors"),
    (np.arange(4), r"float16/32/64 array, got numpy int64"),
    ([1.0, 2.0], r"torch\.Tensor or numpy\.ndarray, got list"),
    (1.5, r"torch\.Tensor or numpy\.ndarray, got float"),
])
def test_unsupported_inputs(x, match):
    with pytest.raises(TypeError, match=match):
        lowbit.quantize(x, "e4m3fn")
    with pytest.raises(TypeError, match=match):
        lowbit.encode(x, "e4m3fn")


def test_jax_arrays_point_to_the_jax_front_end():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match=r"lowbit\.jax\.quantize"):
        lowbit.quantize(jnp.ones(3), "e4m3fn")


@pytest.mark.parametrize("dtype, fmt, wider", [
    (torch.float16, "e8m0", r"float32 or float64 tensor \(x\.float\(\)\)"),
    (torch.bfloat16, "fp16", r"float32 or float64"),
    (torch.float16, "bf16", r"float32 or float64"),
    (torch.bfloat16, "nf4", r"float32 or float64"),  # nf4's float32 constants are not bfloat16 numbers
    (torch.float32, "int32", r"float64 tensor \(x\.double\(\)\)"),
    (torch.float32, "e5m23_b-100", r"float64 tensor"),
])
def test_formats_the_dtype_cannot_hold(dtype, fmt, wider):
    with pytest.raises(ValueError, match=rf"values of .* do not all fit in {dtype}; quantize a {wider}"):
        lowbit.quantize(torch.ones(4, dtype=dtype), fmt)


def test_empty_tensors():
    for fmt, shape in [("e4m3fn", (0,)), ("int4", (3, 0)), ("nf4", (0,)), ("mxfp4", (0, 32)), ("nvfp4", (2, 0))]:
        x = torch.empty(shape)
        q = lowbit.quantize(x, fmt)
        assert q.shape == x.shape and q.dtype == x.dtype
        assert lowbit.decode(lowbit.encode(x, fmt)).shape == x.shape


# --- modes, policies, options ---------------------------------------------------------------------

def test_rounding_names():
    with pytest.raises(ValueError, match=r"unknown rounding mode 'nearest_evn'; accepted: nearest_even, "
                                         r"nearest_away, nearest_zero, toward_zero, up, down, odd, stochastic"):
        lowbit.quantize(X, "e4m3fn", "nearest_evn")
    with pytest.raises(ValueError, match="rounding must be a string, got NoneType"):
        lowbit.quantize(X, "e4m3fn", None)
    # aliases name the same modes
    for alias, mode in [("rne", "nearest_even"), ("RNE", "nearest_even"), ("floor", "down"), ("ceil", "up"),
                        ("rtz", "toward_zero"), ("rna", "nearest_away")]:
        assert torch.equal(lowbit.quantize(X, "e2m1fn", alias), lowbit.quantize(X, "e2m1fn", mode))


@pytest.mark.parametrize("fmt, overflow, match", [
    ("e4m3fn", "clamp", r"unknown overflow policy 'clamp'; accepted: saturate, inf, nan"),
    ("e4m3fn", None, r"unknown overflow policy None"),
    ("e2m1fn", "inf", r"e2m1fn has neither inf nor nan to signal overflow; use overflow='saturate'"),
    ("e3m2fn", "nan", r"e3m2fn has no nan"),
    ("e2m3fn", "inf", r"has neither inf nor nan"),
    ("e5m0", "nan", r"e5m0 has no nan; use overflow='saturate' or 'inf'"),
    ("int4", "inf", r"overflow='inf' is not possible for int4: int4 has no inf or nan"),
    ("nf4", "nan", r"not possible for nf4"),
    ("mxfp4", "inf", r"block formats saturate their elements"),
])
def test_overflow_policies_a_format_cannot_have(fmt, overflow, match):
    with pytest.raises(ValueError, match=match):
        lowbit.quantize(X, fmt, overflow=overflow)
    with pytest.raises(ValueError, match=match):
        lowbit.encode(X, fmt, overflow=overflow)


def test_options():
    with pytest.raises(ValueError, match=r"sr_bits \(1\.\.52\) applies to rounding='stochastic' only"):
        lowbit.quantize(X, "e4m3fn", sr_bits=3)
    for bad in (0, 53, "a", 2.5):
        with pytest.raises(ValueError, match=r"sr_bits must be an integer 1\.\.52"):
            lowbit.quantize(X, "e4m3fn", "stochastic", sr_bits=bad)
        with pytest.raises(ValueError, match=r"sr_bits must be an integer 1\.\.52"):
            lowbit.encode(X, "mxfp4", "stochastic", sr_bits=bad)
    with pytest.raises(ValueError, match="generator must be a torch.Generator, an int seed or None, got str"):
        lowbit.quantize(X, "e4m3fn", "stochastic", generator="a")
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; accepted: auto, reference"):
        lowbit.quantize(X, "e4m3fn", backend="gpu")
    with pytest.raises(ValueError, match="computes its own block scales; do not pass scale="):
        lowbit.quantize(X, "mxfp4", scale=2.0)
    with pytest.raises(TypeError, match="decode expects the Encoded that lowbit.encode returns, got str"):
        lowbit.decode("abc")


@pytest.mark.parametrize("scale, err, match", [
    (0.0, ValueError, "scale must be positive and finite"),
    (-1.0, ValueError, "scale must be positive and finite"),
    (INF, ValueError, "scale must be positive and finite"),
    (torch.tensor([[1.0], [NAN]]), ValueError, "scale must be positive and finite"),
    (torch.ones(3), ValueError, r"scale of shape \(3,\) does not broadcast to x's shape \(2, 64\)"),
    (torch.ones(2, 2, 64), ValueError, r"does not broadcast"),
    ("a", TypeError, "scale must be a number or a tensor of numbers, got str"),
])
def test_bad_scales(scale, err, match):
    x = torch.randn(2, 64)
    with pytest.raises(err, match=match):
        lowbit.quantize(x, "int4", scale=scale)
    with pytest.raises(err, match=match):
        lowbit.encode(x, "int4", scale=scale)


# --- nan and inf under each policy: the documented results ----------------------------------------

E8 = 2.0**127


@pytest.mark.parametrize("fmt, overflow, expected", [
    # input:               nan  +inf   -inf    3e38 (a finite overflow, also for E8M0)
    ("e4m3fn", "saturate", [NAN, 448.0, -448.0, 448.0]),
    ("e4m3fn", "inf", [NAN, NAN, NAN, NAN]),  # no inf: overflow signals nan
    ("e4m3fn", "nan", [NAN, NAN, NAN, NAN]),
    ("e5m2", "saturate", [NAN, 57344.0, -57344.0, 57344.0]),
    ("e5m2", "inf", [NAN, INF, -INF, INF]),
    ("e5m2", "nan", [NAN, NAN, NAN, NAN]),
    ("e4m3fnuz", "saturate", [NAN, 240.0, -240.0, 240.0]),
    ("e4m3fnuz", "inf", [NAN, NAN, NAN, NAN]),
    ("e2m1fn", "saturate", [NAN, 6.0, -6.0, 6.0]),  # no nan code, but quantize propagates nan
    ("e8m0", "saturate", [NAN, E8, NAN, E8]),  # unsigned: -inf is negative -> nan
    ("e8m0", "inf", [NAN, NAN, NAN, NAN]),
    ("p3109_k8p3", "inf", [NAN, INF, -INF, INF]),
    ("int4", "saturate", [NAN, 7.0, -8.0, 7.0]),
    ("uint4", "saturate", [NAN, 15.0, 0.0, 15.0]),
    ("nf4", "saturate", [NAN, 1.0, -1.0, 1.0]),
])
def test_nan_and_inf_inputs(fmt, overflow, expected):
    x = torch.tensor([NAN, INF, -INF, 3e38])
    for mode in ("nearest_even", "toward_zero", "stochastic"):
        got = lowbit.quantize(x, fmt, mode, overflow, generator=0).tolist()
        want = list(expected)
        if mode == "toward_zero" and overflow == "inf":
            want[3] = lowbit.format(fmt).max  # IEEE: rounding toward zero never overflows to inf;
            # an infinite input is exact and stays infinite where the format has inf
        if mode == "stochastic" and fmt == "e8m0":  # 3e38 lies below 2**128: may round down to max
            assert got[3] == E8 or got[3] == want[3] or (math.isnan(got[3]) and math.isnan(want[3]))
            got, want = got[:3], want[:3]
        np.testing.assert_array_equal(got, want, err_msg=f"{fmt} {mode} {overflow}")


def test_nan_and_inf_in_the_packed_path():
    x = torch.tensor([NAN, INF, -INF, 1.0])
    enc = lowbit.encode(x, "e4m3fn")  # saturate: +-inf -> +-448 (0x7E, 0xFE); nan -> 0x7F; 1 -> 0x38
    assert enc.codes.tolist() == [0x7F, 0x7E, 0xFE, 0x38]
    enc = lowbit.encode(x, "e5m2", overflow="inf")  # inf 0x7C, -inf 0xFC, nan 0x7F (sign 0), 1 -> 0x3C
    assert enc.codes.tolist() == [0x7F, 0x7C, 0xFC, 0x3C]
    for fmt in ("e2m1fn", "int4", "nf4", "e3m2fn"):
        with pytest.raises(ValueError, match=f"{fmt} has no nan code, but the tensor holds nan"):
            lowbit.encode(x, fmt)
    # block formats: the nan lives in the scale (E8M0 0xFF), whatever the element format holds
    xb = torch.cat([torch.ones(32), torch.tensor([NAN]), torch.ones(31), torch.tensor([INF]), torch.ones(31)])
    enc = lowbit.encode(xb, "mxfp4")
    assert enc.scales.tolist() == [127 - 2, 0xFF, 0xFF]  # amax 1: shared 0 - 2 = -2 -> code 125
    d = lowbit.decode(enc)
    assert not torch.isnan(d[:32]).any() and torch.isnan(d[32:]).all()


def test_e8m0_outside_its_values():
    # unsigned without zero: 0 and tiny values give 2**-127; negative values are nan
    q = lowbit.quantize(torch.tensor([0.0, -0.0, 1e-45, -1.0, -1e-45]), "e8m0")
    assert q[:3].tolist() == [2.0**-127] * 3 and torch.isnan(q[3:]).all()


def test_percentile_scales_on_a_block_format_are_refused():
    from lowbit.quant.spec import QuantSpec

    with pytest.raises(ValueError, match="block format.*absmax.*mse"):
        QuantSpec.parse("nvfp4:p99.9")
    assert QuantSpec.parse("mxfp4:mse").scale_method == "mse"
