"""Bit-exact against independent references (ml_dtypes, torch, a value-list oracle) over every code
point, every midpoint, one ulp either side of each, the overflow region, +-0, nan, +-inf, subnormals
and random values, for every format ml_dtypes or torch implement, on every backend lowbit has."""
import math

import numpy as np
import pytest
import torch

import lowbit
from _exact_refs import one_torch_thread  # noqa: F401  (autouse fixture)
from _exact_refs import (ML_FORMATS, ML_OVERFLOW, TORCH_FORMATS, assert_bits_equal, backend_params,
                         codebook_refs, exotic_refs, int_refs, make_points, ml_cast, ml_ref, oracle_round,
                         reference_mode, run_lowbit)

BACKENDS = backend_params()


def _bits_equal_tables(got: np.ndarray, want: np.ndarray, label: str) -> None:
    assert got.shape == want.shape, f"{label}: {got.shape} codes, expected {want.shape}"
    assert_bits_equal(got, want, np.arange(len(want)), label)


# --- code tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ML_FORMATS)
def test_code_table_matches_ml_dtypes(name):
    """Decoding every code gives ml_dtypes' value of the same bit pattern: nan positions, the sign of
    zero, subnormals, inf."""
    ref = ml_ref(name)
    _bits_equal_tables(lowbit.format(name).code_values().numpy(), ref.table, f"{name} code table")


def test_code_table_matches_torch():
    for name, (dt, _) in TORCH_FORMATS.items():
        bits = lowbit.format(name).bits
        raw = torch.arange(2**bits, dtype=torch.int64)
        raw = raw.to(torch.uint8) if bits == 8 else raw.to(torch.int16)
        want = raw.view(dt).double().numpy()
        if name == "e8m0":  # torch decodes 0xFF as nan too
            assert np.isnan(want[255])
        _bits_equal_tables(lowbit.format(name).code_values().numpy(), want, f"{name} code table vs torch")


ALL_DEFINED = {**exotic_refs(), **int_refs()}


@pytest.mark.parametrize("name", list(ALL_DEFINED))
def test_code_table_matches_definition(name):
    """Formats ml_dtypes lacks: every code against a decoder written from the definitions."""
    ref = ALL_DEFINED[name]
    _bits_equal_tables(lowbit.format(name).code_values().numpy(), ref.table, f"{name} code table")


@pytest.mark.parametrize("name", ["nf4", "fp4_bnb", "user6"])
def test_codebook_tables_are_the_published_ones(name):
    ref, fmt = codebook_refs()[name]
    fmt = lowbit.format(fmt)
    np.testing.assert_array_equal(fmt.values().numpy(), ref.table)
    codes = fmt.code_values().numpy()
    n = len(ref.table)
    assert fmt.bits == math.ceil(math.log2(n))
    np.testing.assert_array_equal(codes[:n], ref.table)
    assert np.isnan(codes[n:]).all()  # unused codes (fp4_bnb has 15 values in 4 bits)


@pytest.mark.parametrize("name", list(ML_FORMATS) + list(ALL_DEFINED))
def test_properties_match_the_table(name):
    ref = ml_ref(name) if name in ML_FORMATS else ALL_DEFINED[name]
    fmt = lowbit.format(name)
    vals = ref.values
    pos = vals[vals > 0]
    assert fmt.max == vals[-1]
    assert fmt.min == vals[0]
    if len(pos):
        assert fmt.min_subnormal == pos[0]
    assert fmt.has_inf == ref.has_inf
    # integers have no nan (the unused code of a narrow range decodes as nan but is never produced)
    assert fmt.has_nan == (ref.has_nan and ref.kind != "int")
    np.testing.assert_array_equal(fmt.values().numpy(), vals)
    if ref.kind in ("float", "unsigned"):
        # subnormals are spaced min_normal * 2**-man; a flushed format or E8M0 starts at min_normal
        assert fmt.min_normal == (pos[0] if ref.ftz or ref.kind == "unsigned" else pos[0] * 2.0**ref.man)
        if 1.0 in vals:
            assert fmt.epsilon == vals[np.searchsorted(vals, 1.0) + 1] - 1.0
    else:
        assert fmt.epsilon == vals[1] - vals[0]


# --- rounding against ml_dtypes and torch ---------------------------------------------------------

def _reference_inputs(name: str, x: np.ndarray) -> np.ndarray:
    """Inputs on which the references are defined: no nan for formats without nan (ml_dtypes gives
    garbage), E8M0: positive numbers only (ml_dtypes says nan for 0 and negatives, torch takes |x|)."""
    ref_has_nan = name not in ("e3m2fn", "e2m3fn", "e2m1fn")
    keep = np.ones(x.shape, bool)
    if not ref_has_nan:
        keep &= ~np.isnan(x)
    if name == "e8m0":
        keep &= (x > 0) | np.isnan(x)
        # measured: both round float32 subnormals in (2**-127, 1.5 * 2**-127) up to 2**-126, though
        # they are nearer 2**-127 (their rounding looks at the float32 mantissa's top bit, which for a
        # subnormal is not the half-way bit). The oracle checks this range (test_float64_inputs and
        # test_rounding_modes); test_e8m0_below_float32_normal pins it.
        keep &= ~((x > 2.0**-127) & (x < 2.0**-126))
    return x[keep]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ML_FORMATS)
def test_matches_ml_dtypes_float32(name, backend):
    ref = ml_ref(name)
    x = _reference_inputs(name, make_points(ref, np.float32))
    want = ml_cast(x, name)
    got = run_lowbit(x, name, reference_mode(name), ML_OVERFLOW[name], np.float32, backend)
    assert_bits_equal(got, want, x, f"{name} vs ml_dtypes ({reference_mode(name)}, {ML_OVERFLOW[name]})")


@pytest.mark.parametrize("name", ML_FORMATS)
def test_oracle_agrees_with_ml_dtypes(name):
    """The value-list oracle that test_rounding_modes uses for every mode, checked on ml_dtypes."""
    ref = ml_ref(name)
    x = _reference_inputs(name, make_points(ref, np.float32))
    want = ml_cast(x, name)
    got, defined = oracle_round(x, ref, reference_mode(name), ML_OVERFLOW[name])
    assert defined.all()
    assert_bits_equal(got, want, x, f"oracle for {name} vs ml_dtypes")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_matches_torch_float32(name, backend):
    ref = ml_ref(name)
    x = _reference_inputs(name, make_points(ref, np.float32))
    dt, overflow = TORCH_FORMATS[name]
    want = torch.from_numpy(x.astype(np.float32)).to(dt).double().numpy()
    got = run_lowbit(x, name, reference_mode(name), overflow, np.float32, backend)
    assert_bits_equal(got, want, x, f"{name} vs torch ({reference_mode(name)}, {overflow})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ML_FORMATS)
def test_float64_inputs(name, backend):
    """float64 inputs: one float64 ulp around every midpoint. ml_dtypes and torch round float64
    through float32 (double rounding), so the oracle is the reference here; numpy's float16 cast is
    direct and is checked too."""
    ref = ml_ref(name)
    x = make_points(ref, np.float64)
    mode, overflow = reference_mode(name), ML_OVERFLOW[name]
    want, defined = oracle_round(x, ref, mode, overflow)
    assert defined.all()
    got = run_lowbit(x, name, mode, overflow, np.float64, backend)
    assert_bits_equal(got, want, x, f"{name} float64 inputs vs oracle")
    if name == "fp16":
        with np.errstate(over="ignore"):
            want16 = x.astype(np.float16).astype(np.float64)
        assert_bits_equal(got, want16, x, "fp16 float64 vs numpy")


def test_float64_ties_are_not_double_rounded():
    """A float64 input one float64 ulp off a tie rounds by that ulp, though float32 cannot see it
    (ml_dtypes and torch, rounding through float32, get these wrong)."""
    # (format, tie, lower neighbour, upper neighbour); every tie here goes to the lower (even) one
    cases = [("e4m3fn", 1.0625, 1.0, 1.125), ("bf16", 1 + 2**-8, 1.0, 1 + 2**-7), ("e2m1fn", 2.5, 2.0, 3.0),
             ("fp16", 1 + 2**-11, 1.0, 1 + 2**-10), ("e5m2", 1.125, 1.0, 1.25), ("e4m3fn", 464.0, 448.0, 448.0)]
    for name, tie, lo, hi in cases:
        x = torch.tensor([np.nextafter(tie, np.inf), np.nextafter(tie, -np.inf), tie], dtype=torch.float64)
        assert lowbit.quantize(x, name).tolist() == [hi, lo, lo], name
        assert lowbit.quantize(-x, name).tolist() == [-hi, -lo, -lo], name
    # just above 464 (the e4m3fn overflow tie) is an overflow: nan when not saturating
    x = torch.tensor([np.nextafter(464.0, np.inf)], dtype=torch.float64)
    assert torch.isnan(lowbit.quantize(x, "e4m3fn", overflow="nan")).all()


def test_e8m0_ties():
    """E8M0 has one value per binade: the tie 1.5 * 2**k goes away from zero in ml_dtypes and torch
    (nearest_away); lowbit's nearest_even goes to the even code (code = k + 127)."""
    x = torch.tensor([1.5, 3.0, 6.0, 0.75, 1.5 * 2.0**-127, 1.5 * 2.0**126], dtype=torch.float32)
    away = lowbit.quantize(x, "e8m0", "nearest_away")
    even = lowbit.quantize(x, "e8m0", "nearest_even")
    assert away.tolist() == [2.0, 4.0, 8.0, 1.0, 2.0**-126, 2.0**127]
    # 1.5 between 1 (code 127) and 2 (code 128) -> 2; 3 between 2 (128) and 4 (129) -> 2; 6 -> 8 (130);
    # 0.75 between 0.5 (126) and 1 (127) -> 0.5; 1.5*2^-127 between codes 0 and 1 -> 2^-127; 1.5*2^126 -> 2^127
    assert even.tolist() == [2.0, 2.0, 8.0, 0.5, 2.0**-127, 2.0**127]


def test_e8m0_below_float32_normal():
    """Where ml_dtypes and torch disagree with the definition (float32 subnormal inputs): nearest."""
    x = torch.tensor([1.01, 1.25, 1.49, 1.5, 1.51, 0.6, 0.5, 0.49], dtype=torch.float32) * 2.0**-127
    q = lowbit.quantize(x, "e8m0", "nearest_away")
    # 2**-127 is the smallest E8M0 value: below it everything saturates to it; the tie 1.5 goes up
    lo, hi = 2.0**-127, 2.0**-126
    assert q.tolist() == [lo, lo, lo, hi, hi, lo, lo, lo]
