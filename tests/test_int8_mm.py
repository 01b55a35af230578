"""The fused INT8 GEMM (kernels/triton_int8_mm.py) gives the bits of ``_int_mm`` + ``int8_epilogue``
(exact int32 sums, then ``(float(acc) * sa) * sb`` rounded once to the output dtype), for per-tensor
and per-row scales, every tile configuration, ragged shapes; and the INT8 matmul of lowbit.lowp
gives the same bits through either path. On CUDA the real kernel runs; without CUDA, Triton's
interpreter."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from lowbit.lowp.fused import _int8_epilogue

from _interpreter import interpreter_rerun, kernel_module

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
test_interpreter_run = interpreter_rerun(__file__)


@pytest.fixture
def mm():
    return kernel_module("triton_int8_mm")


def _reference(a, b, sa, sb, dtype):
    acc = a.cpu().int() @ b.cpu().int().T   # exact: |sum| < 2^31 at these sizes
    return _int8_epilogue(acc, sa.cpu().float().reshape(-1, 1) if sa.numel() > 1 else sa.cpu().float(),
                          sb.cpu().float().reshape(1, -1) if sb.numel() > 1 else sb.cpu().float(), dtype)


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(40, 24, 64), (300, 136, 200), (17, 8, 8)])
@pytest.mark.parametrize("per_row", [False, True])
def test_same_bits_as_int_mm_and_epilogue(mm, shape, per_row, dtype):
    m, n, k = shape
    g = torch.Generator().manual_seed(m * n + k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    # scales spanning many binades: the products land on every rounding case of the output dtype
    sa = (torch.rand(m, 1, generator=g) * 2.0 ** torch.randint(-12, 0, (m, 1), generator=g)) if per_row \
        else torch.tensor(0.37)
    sb = (torch.rand(n, generator=g) * 2.0 ** -6) if per_row else torch.tensor(1.3e-3)
    y = mm.int8_scaled_mm(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(_bits(y.cpu()), _bits(_reference(a, b, sa, sb, dtype)))


@pytest.mark.parametrize("config", ["default", "all"])
def test_every_tile_configuration(mm, config):
    """Each tile shape the module offers, on a shape that is ragged against all of them."""
    m, n, k = (264, 280, 384) if CUDA or config == "default" else (136, 136, 160)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    sa, sb = torch.rand(m, generator=g) + 0.5, torch.tensor(2.0 ** -14)
    ref = _reference(a, b, sa, sb, torch.bfloat16)
    configs = [mm.DEFAULT_CONFIG] if config == "default" else list(mm.CONFIGS) + [mm.SMALL_CONFIG]
    for cfg in configs:
        y = mm.int8_scaled_mm(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), torch.bfloat16, config=cfg)
        assert torch.equal(_bits(y.cpu()), _bits(ref)), cfg


def test_extreme_sums(mm):
    """-128 * -128 over the whole inner dimension: the largest int32 sums, float(acc) rounding."""
    m, n, k = 32, 48, 4096
    a = torch.full((m, k), -128, dtype=torch.int8)
    b = torch.full((n, k), -128, dtype=torch.int8)
    a[1::2] = 127
    b[:, ::3] = 1
    y = mm.int8_scaled_mm(a.to(DEV), b.to(DEV), torch.tensor(1.0, device=DEV), torch.tensor(1.0, device=DEV),
                          torch.float32)
    assert torch.equal(y.cpu(), _reference(a, b, torch.tensor(1.0), torch.tensor(1.0), torch.float32))


def test_bad_input_is_named(mm):
    a = torch.zeros(4, 8, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError, match="int8 operands"):
        mm.int8_scaled_mm(a.float(), a, torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="inner dimension contiguous"):
        mm.int8_scaled_mm(torch.zeros(8, 4, dtype=torch.int8, device=DEV).t(), a, torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="out_dtype"):
        mm.int8_scaled_mm(a, a, torch.tensor(1.0), torch.tensor(1.0), torch.int32)
    with pytest.raises(ValueError, match="scales"):
        mm.int8_scaled_mm(a, a, torch.ones(3), torch.tensor(1.0))


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the lowp kernel path)")
@pytest.mark.parametrize("spec", ["int8:tensor", "int8:channel"])
def test_lowp_int8_matmul_same_bits_either_path(spec):
    from lowbit.lowp import matmul
    from lowbit.lowp.operand import quantize_operand
    from lowbit.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(0)
    s = QuantSpec.parse(spec)
    a = quantize_operand(torch.randn(200, 256, generator=g).cuda(), s, codes=True)
    b = quantize_operand(torch.randn(384, 256, generator=g).cuda(), s, codes=True)
    fused = matmul.kernel_mm(a, b, "int8", torch.bfloat16)
    try:
        matmul.INT8_FUSED_ON = ()
        plain = matmul.kernel_mm(a, b, "int8", torch.bfloat16)
    finally:
        matmul.INT8_FUSED_ON = ("cuda",)
    assert torch.equal(_bits(fused), _bits(plain))
