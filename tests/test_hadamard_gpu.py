"""The fused Triton block Walsh-Hadamard kernel (kernels/triton_hadamard.py) against the torch
routes and the explicit matrix, on CUDA only."""
import math

import pytest
import torch

from lowbit.transforms import hadamard
from lowbit.transforms.hadamard import block_fwht, hadamard_matrix, random_signs, rotate, rotate_inverse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BLOCKS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def _tol(x: torch.Tensor, b: int) -> float:
    """fp32 rounding of a length-b sum, as the brief's bound: 1e-5 * sqrt(b) * max|x|."""
    return 1e-5 * math.sqrt(b) * x.abs().max().item()


def _exact(x: torch.Tensor, b: int, signs=None) -> torch.Tensor:
    """x R in float64 with R the explicit matrix (Sylvester's recursion, not a fast transform)."""
    R = hadamard_matrix(x.shape[-1], b, signs.cpu() if signs is not None else None).double().to(x.device)
    return x.double() @ R


@pytest.mark.parametrize("b", BLOCKS)
def test_kernel_matches_matrix_and_torch(b):
    g = torch.Generator(device="cuda").manual_seed(b)
    # leading batch dims, two blocks per row, a block count that is not a multiple of the tile
    x = torch.randn(3, 7, 2 * b, device="cuda", generator=g) * 3
    s = random_signs(2 * b, b, device="cuda")
    assert hadamard._use_triton(x, b, "auto")
    y = rotate(x, b, s)
    assert (y.double() - _exact(x, b, s)).abs().max().item() <= _tol(x, b)
    y0 = block_fwht(x, b)
    ref = block_fwht(x, b, method="kron")
    assert (y0 - ref).abs().max().item() <= _tol(x, b)
    assert (y0.double() - _exact(x, b)).abs().max().item() <= _tol(x, b)
    assert y0.shape == x.shape and y0.dtype == torch.float32


@pytest.mark.parametrize("n,b", [(576, 64), (1536, 512), (384, 128), (4096, 4096), (8192, 4096)])
def test_model_widths_and_inverse(n, b):
    x = torch.randn(2, 33, n, device="cuda")
    s = random_signs(n, 7, device="cuda")
    y = rotate(x, b, s)
    assert (y.double() - _exact(x, b, s)).abs().max().item() <= _tol(x, b)
    # x R^T = fwht(x) * s, fused in the kernel too; the round trip gives x back
    z = rotate_inverse(x, b, s)
    z_ref = (x.double() @ hadamard_matrix(n, b).double().cuda()) * s.double()
    assert (z.double() - z_ref).abs().max().item() <= _tol(x, b)
    assert (rotate_inverse(y, b, s) - x).abs().max().item() <= 2 * _tol(x, b)


@pytest.mark.parametrize("precision", ["split", "split3", "ieee"])
@pytest.mark.parametrize("b", [8, 64, 128, 512, 4096])
def test_dot_method(precision, b):
    from lowbit.kernels import triton_hadamard as th
    x = torch.randn(40, 2 * b, device="cuda")
    y = th.block_fwht(x, b, method="dot", precision=precision)
    assert (y.double() - _exact(x, b)).abs().max().item() <= _tol(x, b)


@pytest.mark.parametrize("b", [16, 1024])
def test_tile_overrides(b):
    from lowbit.kernels import triton_hadamard as th
    x = torch.randn(40, 2 * b, device="cuda")
    for rows, warps in [(1, 4), (64, 8)]:
        y = th.block_fwht(x, b, rows=rows, num_warps=warps)
        assert (y.double() - _exact(x, b)).abs().max().item() <= _tol(x, b)


@pytest.mark.parametrize("method", ["butterfly", "dot"])
def test_error_near_fp32_rounding(method):
    """Both routes stay far below one tf32 product's error (about 2^-11 relative)."""
    from lowbit.kernels import triton_hadamard as th
    x = torch.randn(64, 4096, device="cuda")
    err = (th.block_fwht(x, 4096, method=method).double() - _exact(x, 4096)).abs().max().item()
    assert err < 1e-5 * x.abs().max().item()


def test_dispatch_and_fallbacks():
    x = torch.randn(8, 256, device="cuda")
    # non-contiguous and half inputs still give the right answer (kron fallback / upcast)
    xt = torch.randn(256, 8, device="cuda").t()
    assert not hadamard._use_triton(xt, 64, "auto")
    assert (block_fwht(xt, 64) - block_fwht(xt.contiguous(), 64, method="kron")).abs().max() <= _tol(xt, 64)
    yh = block_fwht(x.half(), 256)
    assert yh.dtype == torch.float16
    assert torch.allclose(yh.float(), block_fwht(x, 256), atol=1e-2)
    assert torch.equal(block_fwht(x, 256, method="triton"), block_fwht(x, 256))
    with pytest.raises(ValueError, match="method='triton' needs"):
        block_fwht(x.cpu(), 256, method="triton")
    with pytest.raises(ValueError, match="method='triton' needs"):
        block_fwht(torch.zeros(2, 8192, device="cuda"), 8192, method="triton")
    # blocks above the kernel's limit fall back to torch under auto
    big = torch.randn(2, 8192, device="cuda")
    assert (block_fwht(big, 8192) - _exact(big, 8192)).abs().max().item() <= _tol(big, 8192)


@pytest.mark.parametrize("n", [384, 576, 1536, 5120])
def test_full_width_paley_rotation_on_cuda(n):
    """Sizes that are not powers of two (H_m ⊗ H_p): the kernel applies H_p, a matmul H_m."""
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(3, 7, n, device="cuda", generator=g)
    s = random_signs(n, 1, device="cuda")
    ref = _exact(x, n, s)
    y = rotate(x, n, s)
    assert (y.double() - ref).abs().max().item() < _tol(x, n)
    assert (rotate_inverse(y, n, s).double() - x.double()).abs().max().item() < 2 * _tol(x, n)
