"""lowbit.arith on CUDA tensors: fault injection, elementary functions and chop agree with the CPU
rules (skipped without CUDA)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit import arith

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_flip_bits_on_cuda_rate_fields_and_seed():
    codes = torch.randint(0, 256, (1 << 22,), dtype=torch.uint8, device="cuda")
    for p in (1e-5, 0.3):
        out = arith.flip_bits(codes, p, 0x78, seed=5)
        diff = (out ^ codes).to(torch.int64)
        assert bool(((diff & ~0x78) == 0).all())
        n = sum(int(((diff >> b) & 1).sum()) for b in range(8))
        expected = p * codes.numel() * 4
        assert abs(n - expected) <= 6 * math.sqrt(expected) + 1
        assert torch.equal(out, arith.flip_bits(codes, p, 0x78, seed=5))


def test_inject_block_scales_on_cuda():
    x = torch.randn(256, 256, device="cuda")
    enc = lowbit.encode(x, "mxfp8")
    bad = arith.inject_encoded(enc, 0.01, ("scale",), seed=1)
    assert torch.equal(bad.codes, enc.codes) and not torch.equal(bad.scales, enc.scales)
    y = arith.inject_faults(x, "nvfp4", 1e-3, seed=0)
    assert y.is_cuda and y.shape == x.shape


def test_elementary_and_chop_match_cpu():
    x = torch.from_numpy(lowbit.quantize(np.random.default_rng(0).uniform(-5, 5, 5000), "bf16"))
    for name in ("exp", "sin", "tanh", "arctan", "floor"):
        for mode in ("nearest_even", "up"):
            cpu = getattr(arith, name)(x, "bf16", mode)
            gpu = getattr(arith, name)(x.cuda(), "bf16", mode).cpu()
            assert torch.equal(cpu, gpu), (name, mode)
    assert torch.equal(arith.chop(x, "q43", 3), arith.chop(x.cuda(), "q43", 3).cpu())
