"""The fused operand kernel (kernels/triton_operand.py: block Hadamard rotation + absmax + FP8/INT8
codes in one or two passes): codes and scales bit for bit those of the unfused path
(``lowp.operand.rotate`` then ``quantize_operand``, torch's casts and lowbit's quantizers) for
E4M3/E5M2/INT8, per tensor and per row, rotated or not, transposed views and odd sizes; and the
low-precision linear gives the same bits with and without it. On CUDA the real kernel runs; without
CUDA, Triton's CPU interpreter (a subprocess turns it on when this process has it off)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.lowp import operand as op_mod
from lowbit.lowp.operand import NATIVE_DTYPES, butterfly, prepare_operand, quantize_operand, rotate
from lowbit.quant.spec import QuantSpec

from _interpreter import interpreter_rerun

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
SPECS = ["e4m3fn:tensor", "e5m2:tensor", "int8:tensor", "int8:channel", "e4m3fn:channel", "e5m2:channel"]


def _kernels():
    """kernels.triton_operand on CUDA, or under Triton's interpreter (which must be on before triton
    is imported: test_interpreter_run runs this file so when neither holds); else the test skips."""
    if not HAS_TRITON:
        pytest.skip("needs the triton package")
    if not (CUDA or INTERPRET):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (test_interpreter_run covers it)")
    import triton
    if INTERPRET and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip("the interpreter of Triton < 3.9 cannot run loops bounded by a kernel argument (the row kernel's)")
    from lowbit.kernels import triton_operand
    return triton_operand


@pytest.fixture
def tk():
    return _kernels()


test_interpreter_run = needs_triton(interpreter_rerun(__file__))


def _sylvester_recursive(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n`` by Sylvester's recursion H_2m = [[H_m, H_m], [H_m, -H_m]] in float32: the halves
    first, then their sum and difference (the rounding order the butterfly promises)."""
    n = x.shape[-1]
    if n == 1:
        return x
    u, v = _sylvester_recursive(x[..., : n // 2]), _sylvester_recursive(x[..., n // 2:])
    return torch.cat((u + v, u - v), dim=-1)


@pytest.mark.parametrize("b", [2, 16, 64, 256])
def test_butterfly_is_sylvester_in_a_fixed_float32_order(b):
    g = torch.Generator().manual_seed(b)
    a = (torch.randn(9, 2 * b, generator=g) * torch.logspace(-4, 4, 2 * b)).bfloat16()
    y = butterfly(a, b)
    want = _sylvester_recursive(a.float().reshape(9, 2, b)).reshape(9, 2 * b)
    assert y.dtype == torch.float32 and torch.equal(y, want)
    from lowbit.transforms.hadamard import hadamard_matrix
    exact = a.double() @ (hadamard_matrix(2 * b, b, dtype=torch.float64) * b ** 0.5)
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-9)


def _operand(rows: int, inner: int, dtype, transposed: bool, seed: int) -> torch.Tensor:
    """Channels spanning 6 decades, a few zero rows and a negative zero; ``transposed``: the same
    values read through a transposed view (rows contiguous), as the backward's W^T, E_Y^T, X^T."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, inner, generator=g) * torch.logspace(-3, 3, inner)[torch.randperm(inner, generator=g)]
    a[rows // 2] = 0.0
    a[0, 0] = -0.0
    a = a.to(DEV, dtype)
    return a.t().contiguous().t() if transposed else a


def _reference(a: torch.Tensor, spec: QuantSpec, block: int):
    ra, gain = rotate(a, block) if block > 1 else (a, 1)
    return quantize_operand(ra, spec, codes=True), quantize_operand(ra, spec, fast=False), gain


def _assert_same(codes, scale, ref, lowbit_ref):
    assert codes.dtype == ref.values.dtype and codes.shape == ref.values.shape and codes.is_contiguous()
    assert torch.equal(codes.view(torch.uint8), ref.values.view(torch.uint8)), \
        f"{int((codes.float() != ref.values.float()).sum())} codes differ"
    assert torch.equal(codes.float(), lowbit_ref.values)
    assert scale.shape == ref.scale.shape and torch.equal(scale, ref.scale)


SHAPES = [(24, 64, 16, False), (37, 48, 16, True), (5, 30, 1, False), (40, 32, 32, True), (3, 7, 1, True),
          (17, 96, 32, False), (1, 16, 16, False)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_codes_equal_unfused(tk, spec, dtype):
    s = QuantSpec.parse(spec)
    for i, (rows, inner, block, transposed) in enumerate(SHAPES):
        a = _operand(rows, inner, dtype, transposed, seed=i)
        codes, scale, none, none_s = tk.prepare_codes(a, float(s.fmt.max), NATIVE_DTYPES[str(s.fmt)], block,
                                                      per_row=s.granularity != "tensor", tile=256)
        ref, lowbit_ref, _ = _reference(a, s, block)
        assert none is None and none_s is None
        _assert_same(codes, scale, ref, lowbit_ref)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 40), blocks=st.integers(1, 4), log_b=st.integers(0, 5), spec=st.sampled_from(SPECS),
       transposed=st.booleans(), seed=st.integers(0, 2**31 - 1), mag=st.floats(-30, 30))
def test_fused_codes_property(rows, blocks, log_b, spec, transposed, seed, mag):
    """Any shape whose inner size the block divides, any magnitude (subnormal codes included)."""
    tk = _kernels()
    s, block = QuantSpec.parse(spec), 1 << log_b
    a = _operand(rows, blocks * block, torch.bfloat16, transposed, seed) * 2.0 ** mag
    codes, scale, _, _ = tk.prepare_codes(a, float(s.fmt.max), NATIVE_DTYPES[str(s.fmt)], block,
                                          per_row=s.granularity != "tensor", tile=256)
    ref, lowbit_ref, _ = _reference(a, s, block)
    _assert_same(codes, scale, ref, lowbit_ref)


@pytest.mark.parametrize("spec", ["e4m3fn:tensor", "e5m2:tensor", "int8:tensor"])
@pytest.mark.parametrize("block", [1, 16])
def test_plain_transposed_codes(tk, spec, block):
    """One pass also writes the unrotated operand's codes, transposed, under their own scale: those
    of the unfused path for the transposed view."""
    s = QuantSpec.parse(spec)
    a = _operand(24, 64, torch.bfloat16, False, seed=3)
    codes, scale, codes_t, scale_t = tk.prepare_codes(a, float(s.fmt.max), NATIVE_DTYPES[str(s.fmt)], block,
                                                      emit_plain_transposed=True, tile=256)
    ref, lowbit_ref, _ = _reference(a, s, block)
    _assert_same(codes, scale, ref, lowbit_ref)
    ref_t, lowbit_ref_t, _ = _reference(a.t(), s, 1)
    _assert_same(codes_t, scale_t, ref_t, lowbit_ref_t)
    if block == 1:
        assert torch.equal(codes_t.view(torch.uint8), codes.t().contiguous().view(torch.uint8))
    with pytest.raises(ValueError, match="per-tensor"):
        tk.prepare_codes(a, 448.0, torch.float8_e4m3fn, 1, per_row=True, emit_plain_transposed=True)


def test_rotation_pass_equals_butterfly(tk, monkeypatch):
    """The rotation on its own (emulated formats' path): the butterfly's bits, via lowp's rotate."""
    for i, (rows, inner, block, transposed) in enumerate(SHAPES):
        a = _operand(rows, inner, torch.bfloat16, transposed, seed=20 + i)
        assert torch.equal(tk.rotate(a, block, tile=256), butterfly(a, block))
    monkeypatch.setattr(op_mod, "ROTATE_ON", (DEV,))
    a = _operand(24, 64, torch.float32, True, seed=1)
    assert torch.equal(rotate(a, 32)[0], butterfly(a, 32))


def test_bad_input_is_named(tk):
    a = torch.zeros(4, 24, device=DEV)
    with pytest.raises(ValueError, match="block 16"):
        tk.prepare_codes(a, 448.0, torch.float8_e4m3fn, 16)
    with pytest.raises(ValueError, match="code dtype"):
        tk.prepare_codes(a, 448.0, torch.float16, 8)
    with pytest.raises(ValueError, match="2-D"):
        tk.prepare_codes(a.reshape(2, 2, 24), 448.0, torch.int8, 8)


@pytest.fixture
def fused_here(tk, monkeypatch):
    """Operands on this test's device go to the fused kernel; returns the list of its calls."""
    calls = []
    real = tk.prepare_codes
    monkeypatch.setattr(op_mod, "FUSED_ON", (DEV,))

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(tk, "prepare_codes", spy)
    return calls


def test_prepare_operand_dispatches_to_the_kernel(fused_here):
    a = _operand(32, 48, torch.bfloat16, True, seed=5)
    for spec in ("e4m3fn:tensor", "int8:channel"):
        s = QuantSpec.parse(spec)
        fused = prepare_operand(a, s, 64, codes=True)   # inner_block(48, 64) = 16
        ref, lowbit_ref, gain = _reference(a, s, 16)
        assert fused.gain == gain == 16
        _assert_same(fused.values, fused.scale, ref, lowbit_ref)
    assert fused_here == [(32, 48), (32, 48)]
    # formats, roundings and scales the kernel does not take go the unfused way
    prepare_operand(a, QuantSpec.parse("e3m2fn:channel"), 16, codes=True)
    prepare_operand(a, QuantSpec.parse("int8:g16"), 16, codes=True)
    prepare_operand(a, QuantSpec.parse("e4m3fn:tensor:stochastic"), 16, codes=True)
    prepare_operand(a, QuantSpec.parse("e4m3fn:tensor"), 16, codes=False)
    assert len(fused_here) == 2


@pytest.mark.parametrize("text", ["fp8:0", "fp8:1", "fp8:2", "int8:2"])
def test_linear_same_bits_fused_or_not(fused_here, monkeypatch, text):
    """The low-precision linear through the kernel backend: output and both gradients identical with
    the fused kernel and without it (same codes, same matmuls), and every operand went through it."""
    from lowbit.lowp import lowp_linear, parse_recipe

    if DEV == "cpu" and not hasattr(torch, "_scaled_mm"):
        pytest.skip("this torch has no CPU _scaled_mm")
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(40, 64, generator=g) * torch.logspace(-2, 2, 64)).to(DEV, torch.bfloat16)
    w = (torch.randn(48, 64, generator=g) * 0.05).to(DEV, torch.bfloat16)
    gy = (torch.randn(40, 48, generator=g) * 1e-3).to(DEV, torch.bfloat16)
    r = parse_recipe(text, block=16, backend="kernel")
    outs = []
    for fused_on in ((DEV,), ()):
        monkeypatch.setattr(op_mod, "FUSED_ON", fused_on)
        xv, wv = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = lowp_linear(xv, wv, None, r)
        y.backward(gy)
        outs.append((y, xv.grad, wv.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # forward X and W; backward E_Y and W^T (input gradient), E_Y^T and X^T (weight gradient); one
    # pass writes both of X's and both of E_Y's operands at HALO-0/1, both of W's at HALO-0
    assert len(fused_here) == {"fp8:0": 3, "fp8:1": 4}.get(text, 6)


@pytest.mark.parametrize("spec", ["e4m3fn:tensor", "e5m2:tensor", "int8:tensor"])
@pytest.mark.parametrize("block", [1, 64])
def test_prepare_pair_fused_or_not(fused_here, monkeypatch, spec, block):
    from lowbit.lowp.operand import prepare_pair

    a = _operand(40, 48, torch.bfloat16, False, seed=9)
    s = QuantSpec.parse(spec)
    fused, fused_t = prepare_pair(a, s, block)
    monkeypatch.setattr(op_mod, "FUSED_ON", ())
    ref, ref_t = prepare_pair(a, s, block)
    for f, r in ((fused, ref), (fused_t, ref_t)):
        assert torch.equal(f.values.view(torch.uint8), r.values.view(torch.uint8)) and torch.equal(f.scale, r.scale)
        assert f.gain == r.gain
    assert fused.gain == (16 if block > 1 else 1) and fused_t.gain == 1
    assert fused_t.values.shape == (48, 40) and len(fused_here) == 1
    with pytest.raises(ValueError, match="one scale"):
        prepare_pair(a, QuantSpec.parse("int8:channel"))


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("block", [1, 256])
def test_cuda_fused_codes_at_llm_sizes(spec, block):
    """On the GPU at layer-like sizes with the default tile: the same bits as the unfused path."""
    from lowbit.kernels import triton_operand as tk
    s = QuantSpec.parse(spec)
    for transposed in (False, True):
        a = _operand(1040, 2048, torch.bfloat16, transposed, seed=11)
        codes, scale, _, _ = tk.prepare_codes(a, float(s.fmt.max), NATIVE_DTYPES[str(s.fmt)], block,
                                              per_row=s.granularity != "tensor")
        ref, lowbit_ref, _ = _reference(a, s, block)
        _assert_same(codes, scale, ref, lowbit_ref)


def _hopper_compiler():
    """(triton, GPUTarget, ASTSource) where Triton's NVIDIA backend with its ptxas is installed: the
    kernels compile for sm_90 without a GPU. Not under the interpreter (its kernels are not JIT ones)."""
    if not HAS_TRITON or INTERPRET:
        pytest.skip("needs triton, not interpreted")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as e:  # no NVIDIA backend or no ptxas in this triton
        pytest.skip(f"Triton's NVIDIA backend is not usable here ({type(e).__name__})")
    return triton, GPUTarget, ASTSource


@pytest.mark.parametrize("kernel,dtype,is_int,man,emin", [("tensor", "fp8e4nv", False, 3, -6),
                                                         ("tensor", "fp8e5", False, 2, -14), ("row", "i8", True, 0, 0)])
def test_kernels_compile_for_hopper_with_exact_division(kernel, dtype, is_int, man, emin):
    """The codes kernels compile for an H100 (sm_90) and divide with ``div.rn.f32`` (correctly
    rounded), never an approximate division; every fused multiply-add is the exact power-of-two
    scaling plus the rounding constant (so contraction changes no bits)."""
    import re

    triton, GPUTarget, ASTSource = _hopper_compiler()
    from lowbit.kernels import triton_operand as tk

    ints = {"R": "i32", "I": "i32", "stride_r": "i32", "stride_i": "i32"}
    codes = {"BR": 16, "BI": 256, "LOG_B": 8, "IS_INT": is_int, "MAN": man, "EMIN": emin}
    if kernel == "tensor":
        fn, consts = tk._tensor_codes_kernel, {**codes, "PLAIN": True}
        sig = {"a_ptr": "*bf16", "amax_ptr": "*fp32", "c_ptr": "*" + dtype, "ct_ptr": "*" + dtype, "s_ptr": "*fp32",
               "st_ptr": "*fp32", **ints, "fmax": "fp32"}
    else:
        fn, consts = tk._row_codes_kernel, codes
        sig = {"a_ptr": "*bf16", "c_ptr": "*" + dtype, "s_ptr": "*fp32", **ints, "fmax": "fp32"}
    sig = {**sig, **{k: "constexpr" for k in consts}}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    ptx = k.asm["ptx"]
    divs = set(re.findall(r"\bdiv\.[a-z0-9.]+", ptx))
    assert divs == {"div.rn.f32"}, divs
    fmas = re.findall(r"fma\.rn\.f32[^;]*;", ptx)
    assert all("0f4B400000" in line for line in fmas), fmas   # 1.5 * 2^23: t * 2^-e + M, t * 2^-e exact
