"""The packed path: decode(encode(x)) is quantize(x) bit for bit, for every format family (element
formats, codebooks, integers, block formats, a user scale), and the codes are the right bit
patterns: decoded independently (ml_dtypes or the definitions) they give quantize's values."""
import numpy as np
import pytest
import torch

import lowbit
from _exact_refs import one_torch_thread  # noqa: F401  (autouse fixture)
from _exact_refs import (ML_FORMATS, assert_bits_equal, codebook_refs, exotic_refs, int_refs, ml_table,
                          py_int_table)

_CB = codebook_refs()
TABLES = {name: ml_table(name) for name in ML_FORMATS}
TABLES.update({name: ref.table for name, ref in exotic_refs().items()})
TABLES.update({name: ref.table for name, ref in int_refs().items()})
FORMATS = {name: name for name in TABLES}
FORMATS["user6"] = _CB["user6"][1]
for name in ("nf4", "fp4_bnb", "user6"):
    TABLES[name] = np.concatenate([_CB[name][0].table, [np.nan]])  # code n (unused) -> nan
FORMATS.update({"nf4": "nf4", "fp4_bnb": "fp4_bnb"})

# element formats of the blocks, decoded by the definitions (mxint8: 8-bit integers times 2**-6, narrow)
ELEMENT_TABLES = {"fixed8.6n": py_int_table(8, narrow=True, frac=6), "int8n": py_int_table(8, narrow=True),
                  **TABLES}

BLOCKS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "nvfp4", "bfp8_b16",
          "block(int4,e8m0,8)", "block(e2m1fn,e4m3,16)"]
MODES = [("nearest_even", {}), ("toward_zero", {}), ("up", {}), ("stochastic", {"generator": 3}),
         ("stochastic", {"generator": 5, "sr_bits": 3}), ("stochastic_half", {"generator": 7})]


def inputs(fmt, shape=(8, 64), seed=0, nan=True) -> torch.Tensor:
    """Random magnitudes over the format's whole range (and past it), both signs, plus specials."""
    rng = np.random.default_rng(seed)
    f = lowbit.format(fmt)
    top = f.max if isinstance(f, lowbit.BlockFormat) else max(abs(f.max), abs(f.min))
    lo = 1e-6 if isinstance(f, lowbit.BlockFormat) else f.min_subnormal / 4
    n = int(np.prod(shape))
    x = np.exp(rng.uniform(np.log(lo), np.log(top * 4), n)) * rng.choice([-1.0, 1.0], n)
    x[:6] = [0.0, -0.0, np.inf, -np.inf, top * 10, -top * 10]
    if nan:
        x[6] = np.nan
    return torch.from_numpy(x.reshape(shape)).float()


def _has_nan(fmt) -> bool:
    f = lowbit.format(fmt)
    return getattr(f, "has_nan", False)


def _check_codes(enc, bits):
    c = enc.codes.to(torch.int64)
    assert enc.codes.dtype == (torch.uint8 if bits <= 8 else torch.int32)
    assert int(c.min()) >= 0 and int(c.max()) < 2**bits


@pytest.mark.parametrize("name", list(FORMATS))
def test_element_round_trip_and_codes(name):
    fmt = FORMATS[name]
    f = lowbit.format(fmt)
    x = inputs(fmt, nan=_has_nan(fmt))
    for mode, kw in MODES:
        for overflow in ["saturate"] + (["inf"] if getattr(f, "has_inf", False) or _has_nan(fmt) else []):
            q = lowbit.quantize(x, fmt, mode, overflow, **kw)
            enc = lowbit.encode(x, fmt, mode, overflow, **kw)
            _check_codes(enc, f.bits)
            label = f"{name} {mode} {overflow}"
            assert_bits_equal(lowbit.decode(enc).numpy(), q.numpy(), x.numpy().ravel(), label)
            # the codes, decoded by the independent table, are quantize's values
            by_table = TABLES[name][enc.codes.to(torch.int64).numpy()]
            assert_bits_equal(by_table.astype(np.float32), q.numpy(), x.numpy(), label + " (table)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_round_trip(dtype):
    for fmt in ("e4m3fn", "e2m1fn", "int4", "nf4", "mxfp4", "nvfp4"):
        x = inputs("e4m3fn", nan=False).to(dtype)
        if fmt == "nf4" and dtype != torch.float64:
            x = x.float()  # nf4's float32 constants do not fit in 16-bit floats (test_bad_input)
        q = lowbit.quantize(x, fmt)
        d = lowbit.decode(lowbit.encode(x, fmt))
        assert d.dtype == x.dtype and d.shape == x.shape
        assert_bits_equal(d.double().numpy(), q.double().numpy(), x.double().numpy(), f"{fmt} {dtype}")


@pytest.mark.parametrize("name", BLOCKS)
def test_block_round_trip_and_codes(name):
    f = lowbit.format(name)
    x = inputs(name, shape=(4, 96, 3) if f.size != 8 else (4, 8, 3))  # the nan/inf land in a few blocks
    x = x.reshape(4, -1, 3)
    e8m0 = ml_table("e8m0")
    for mode, kw in MODES:
        for axis in (1, -2):
            q = lowbit.quantize(x, name, mode, axis=axis, **kw)
            enc = lowbit.encode(x, name, mode, axis=axis, **kw)
            _check_codes(enc, f.element.bits)
            assert enc.scales.shape == (4, x.shape[1] // f.size, 3)
            sc = enc.scales.to(torch.int64)
            assert int(sc.min()) >= 0 and int(sc.max()) < 2**f.scale.bits
            label = f"{name} {mode} axis={axis}"
            assert_bits_equal(lowbit.decode(enc).numpy(), q.numpy(), x.numpy().ravel(), label)
            if f.pow2_scale and not f.tensor_scale:
                # OCP MX: value = element (decoded by the definition) * 2**(scale code - 127)
                el = ELEMENT_TABLES[str(f.element)]
                elem = el[enc.codes.to(torch.int64).numpy()]
                scale = np.repeat(e8m0[sc.numpy()], f.size, axis=1)
                nan_block = np.isnan(scale)
                want = np.where(nan_block, np.nan, elem * scale).astype(np.float32)
                assert_bits_equal(want, q.numpy(), x.numpy().ravel(), label + " (tables)")
    # a block holding nan or inf: nan scale code, and decodes to nan
    assert torch.isnan(lowbit.decode(lowbit.encode(x, name, axis=1))).any()


def test_user_scale_round_trip():
    x = inputs("e4m3fn", nan=False)
    for fmt in ("e4m3fn", "int4", "e2m1fn", "nf4", "int8"):
        for scale in (0.37, torch.rand(8, 1) + 0.1, torch.tensor(2.0**-5)):
            for mode, kw in MODES[:4]:
                q = lowbit.quantize(x, fmt, mode, scale=scale, **kw)
                enc = lowbit.encode(x, fmt, mode, scale=scale, **kw)
                assert enc.scales is not None
                _check_codes(enc, lowbit.format(fmt).bits)
                assert_bits_equal(lowbit.decode(enc).numpy(), q.numpy(), x.numpy().ravel(), f"{fmt} scale")


def test_nan_without_nan_code_cannot_be_encoded():
    x = torch.tensor([1.0, float("nan")])
    for fmt in ("e2m1fn", "e3m2fn", "int4", "nf4", "fp4_bnb"):
        assert torch.isnan(lowbit.quantize(x, fmt))[1]  # quantize propagates nan
        with pytest.raises(ValueError, match="has no nan code"):
            lowbit.encode(x, fmt)


def test_sizes():
    x = torch.zeros(64)
    assert lowbit.encode(x, "mxfp4").nbytes == 64 * 4 // 8 + 2  # 4-bit codes + two 8-bit scales
    assert lowbit.encode(x, "nvfp4").nbytes == 32 + 4 + 4  # codes, four E4M3 scales, the fp32 scale
    assert lowbit.encode(x, "e3m2fn").nbytes == 64 * 6 // 8
    assert lowbit.encode(x, "int4").codes.dtype == torch.uint8
