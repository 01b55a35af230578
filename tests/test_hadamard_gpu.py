"""The fused Triton block Walsh-Hadamard kernel (kernels/triton_hadamard.py) against the torch
routes and the explicit matrix, on CUDA only."""
import math
import re

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


# --- the fused kernel for full widths that are not powers of two (H_m ⊗ H_p in one pass) ----------------

PALEY_WIDTHS = [384, 576, 1536, 2304, 5120, 14336]   # every full-width row of benchmarks/bench_hadamard.py


def _kron_ref(x: torch.Tensor, b: int, signs=None, signs_after=False, transpose=False) -> torch.Tensor:
    """float64 x @ blockdiag(H_m ⊗ H_p)/sqrt(b) (or its transpose) from the explicit ±1 factors
    (paley.hadamard_of_order, paley.sylvester), applied as two dense float64 products per block."""
    from lowbit.transforms import paley
    m, p = paley.split_order(b)
    Hm = paley.hadamard_of_order(m).to(x.device)
    Hp = paley.sylvester(p).to(x.device)
    y = x.double()
    if signs is not None and not signs_after:
        y = y * signs.double()
    Y = y.reshape(-1, m, p)
    # vec(X) @ (A ⊗ B) = vec(A^T X B) for row-major blocks X (m, p)
    Y = (Hm if transpose else Hm.t()) @ (Y @ Hp)
    y = Y.reshape(x.shape) / math.sqrt(b)
    if signs is not None and signs_after:
        y = y * signs.double()
    return y


@pytest.fixture
def no_two_pass(monkeypatch):
    """Fail if a call falls back to the torch route: the fused kernel must take these inputs."""
    def boom(*a, **k):
        raise AssertionError("fell back to _paley_two_pass")
    monkeypatch.setattr(hadamard, "_paley_two_pass", boom)


@pytest.mark.parametrize("n", PALEY_WIDTHS)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_fused_paley_matches_reference(n, rows, no_two_pass):
    g = torch.Generator(device="cuda").manual_seed(n + rows)
    x = torch.randn(rows, n, device="cuda", generator=g) * 3
    s = random_signs(n, 5, device="cuda")
    tol = _tol(x, n)
    y = rotate(x, n, s)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y.double() - _kron_ref(x, n, s)).abs().max().item() <= tol
    # rotate_inverse = x R^T: transposed factor, signs after; the round trip gives x back
    z = rotate_inverse(x, n, s)
    assert (z.double() - _kron_ref(x, n, s, signs_after=True, transpose=True)).abs().max().item() <= tol
    assert (rotate_inverse(y, n, s) - x).abs().max().item() <= 2 * tol
    # no signs, both orientations
    for t in (False, True):
        assert (block_fwht(x, n, transpose=t).double() - _kron_ref(x, n, transpose=t)).abs().max().item() <= tol


@pytest.mark.parametrize("n", [384, 576, 1536, 2304])
def test_fused_paley_matches_explicit_matrix_and_cpu(n):
    """Against hadamard_matrix (kron of the explicit matrices) and the unchanged CPU path."""
    x = torch.randn(2, 5, n, device="cuda")
    s = random_signs(n, 9, device="cuda")
    y = rotate(x, n, s)
    assert (y.double() - _exact(x, n, s)).abs().max().item() <= _tol(x, n)
    assert (y.cpu() - rotate(x.cpu(), n, s.cpu())).abs().max().item() <= _tol(x, n)
    z = rotate_inverse(x, n, s)
    assert (z.cpu() - rotate_inverse(x.cpu(), n, s.cpu())).abs().max().item() <= _tol(x, n)


@pytest.mark.parametrize("n,b", [(12, 12), (24, 24), (40, 40), (768, 384), (1152, 576), (10240, 5120)])
def test_fused_paley_small_orders_and_blocks(n, b, no_two_pass):
    """p = 1 and 2 (several blocks per program), and several Paley blocks per row (signs per feature)."""
    x = torch.randn(9, n, device="cuda")
    s = random_signs(n, 2, device="cuda")
    assert (rotate(x, b, s).double() - _kron_ref(x, b, s)).abs().max().item() <= _tol(x, b)
    z = rotate_inverse(x, b, s)
    assert (z.double() - _kron_ref(x, b, s, signs_after=True, transpose=True)).abs().max().item() <= _tol(x, b)


def test_fused_paley_layouts_and_dtypes(no_two_pass):
    n = 1536
    base = torch.randn(n, 11, device="cuda")
    xt = base.t()                        # non-contiguous: made contiguous, then the kernel
    assert not xt.is_contiguous()
    s = random_signs(n, 4, device="cuda")
    assert (rotate(xt, n, s).double() - _kron_ref(xt, n, s)).abs().max().item() <= _tol(xt, n)
    xs = torch.randn(6, 2 * n, device="cuda")[:, ::2]   # strided last dim
    assert (rotate(xs, n, s).double() - _kron_ref(xs, n, s)).abs().max().item() <= _tol(xs, n)
    xh = torch.randn(4, 3, n, device="cuda").half()      # upcast, kernel, cast back
    yh = rotate(xh, n, s)
    assert yh.dtype == torch.float16 and yh.shape == xh.shape
    assert (yh.double() - _kron_ref(xh.float(), n, s)).abs().max().item() <= 2e-3 * xh.float().abs().max().item()
    assert torch.equal(block_fwht(xs.contiguous(), n, method="triton", signs=s), rotate(xs, n, s))


@pytest.mark.parametrize("n", [576, 5120])
@pytest.mark.parametrize("kw", [{"mix": "fma", "rows": 2, "num_warps": 8}, {"mix": "fma", "unroll": True},
                                {"mix": "left"}, {"mix": "right"}, {"mix": "batched"},
                                {"mix": "right", "precision": "ieee"}, {"mix": "left", "precision": "split3"},
                                {"mix": "right", "rows": 2, "num_warps": 4},
                                {"mix": "left", "rows": 2}, {"mix": "left", "rows": 4, "num_warps": 8},
                                {"mix": "left", "rows": 4, "prefetch": True}, {"mix": "left", "rows": 1, "prefetch": True},
                                {"mix": "left", "two_tiles": False}, {"mix": "batched", "rows": 2}])
def test_fused_paley_settings(n, kw):
    """The kernel's other settings (benchmarks/bench_hadamard.py --paley-variants) give the same result."""
    from lowbit.kernels import triton_hadamard as th
    from lowbit.transforms import paley
    m, p = paley.split_order(n)
    x = torch.randn(13, n, device="cuda")
    s = random_signs(n, 6, device="cuda")
    for t, after in ((False, False), (True, True)):
        hop = th.paley_operand(paley.hadamard_of_order(m), t, x.device)
        y = th.paley_fwht(x, hop, m, p, s, signs_after=after, **kw)
        assert (y.double() - _kron_ref(x, n, s, signs_after=after, transpose=t)).abs().max().item() <= _tol(x, n)



@pytest.mark.parametrize("n,b,kw", [(384, 384, {"group": 1}), (384, 384, {"group": 2, "rows": 2, "num_warps": 2}),
                                    (384, 384, {"group": 4, "rows": 16}), (768, 384, {}),
                                    (12, 12, {}), (48, 48, {"group": 5}), (48, 48, {"group": 12}),
                                    (384, 384, {"mix": "tree", "group": 2, "num_warps": 2}),
                                    (768, 384, {"mix": "tree"}), (12, 12, {"mix": "tree"}),
                                    (48, 48, {"mix": "tree", "group": 5, "num_warps": 8})])
def test_fused_paley_adds_settings(n, b, kw):
    """The generated signed-sum kernels (mix="adds": runs loaded one by one; "tree": the block as one tile,
    split into runs after the butterfly): any group size (5 leaves a short last group of 12), several
    blocks per row and per program, p = 1 and 4; both orientations, signs before and after."""
    kw = {"mix": "adds", **kw}
    from lowbit.kernels import triton_hadamard as th
    from lowbit.transforms import paley
    m, p = paley.split_order(b)
    x = torch.randn(19, n, device="cuda") * 5
    s = random_signs(n, 8, device="cuda")
    for t, after in ((False, False), (True, True)):
        hop = th.paley_operand(paley.hadamard_of_order(m), t, x.device)
        y = th.paley_fwht(x, hop, m, p, s, signs_after=after, **kw)
        assert (y.double() - _kron_ref(x, b, s, signs_after=after, transpose=t)).abs().max().item() <= _tol(x, b)


def test_fused_paley_adds_source_is_the_matrix():
    """The generated source names every run once on input and output, and its signed sums reproduce the
    ±1 matrix (evaluated here in float64 with the runs as unit vectors)."""
    from lowbit.kernels import triton_hadamard as th
    from lowbit.transforms import paley
    m = 36
    H = paley.hadamard_of_order(m)
    A = tuple(tuple(int(v) for v in row) for row in H.tolist())
    src = th._adds_source("k", A, 3)
    env = {f"x{i}": torch.eye(m, dtype=torch.float64)[i] for i in range(m)}
    outs = {}
    for line in src.splitlines():
        line = line.strip()
        if re.match(r"^c\d+_\w* = ", line):
            var, expr = line.split(" = ", 1)
            env[var] = eval(expr, {}, env)
        elif line.startswith("_adds_out("):
            expr, off = re.match(r"_adds_out\(y_ptr, s_ptr, (.*), offs, soffs, rmask, (\d+) \* P", line).groups()
            outs[int(off)] = eval(expr, {}, env)
    assert sorted(outs) == list(range(m))
    got = torch.stack([outs[a] for a in range(m)], 1)   # got[i, a]: weight of run i in output a
    assert torch.equal(got, H)
    # about m/3 + 8/3 adds per element, against m for a plain signed sum
    adds = sum(line.count(" + ") + line.count(" - ") for line in src.splitlines()
               if line.strip().startswith(("c", "_adds_out")))
    assert adds / m < 14


def test_fused_paley_adds_errors():
    from lowbit.kernels import triton_hadamard as th
    hop = th.paley_operand(torch.full((12, 12), 0.5, dtype=torch.float64), False, "cuda")
    with pytest.raises(ValueError, match="±1 operand"):
        th.paley_fwht(torch.zeros(2, 384, device="cuda"), hop, 12, 32, mix="adds")
    hop = th.paley_operand(torch.ones(12, 12, dtype=torch.float64), False, "cuda")
    with pytest.raises(ValueError, match="power of two"):
        th.paley_fwht(torch.zeros(2, 384, device="cuda"), hop, 12, 32, mix="adds", rows=3)

def test_fused_paley_limits_and_errors():
    from lowbit.kernels import triton_hadamard as th
    from lowbit.transforms import paley
    # 28672 = 28 x 1024: the padded tile (32 x 1024) exceeds the kernel's limit -> two-pass route, still exact
    n = 28672
    x = torch.randn(3, n, device="cuda")
    assert not th.paley_supports(x, *paley.split_order(n))
    s = random_signs(n, 1, device="cuda")
    assert (rotate(x, n, s).double() - _kron_ref(x, n, s)).abs().max().item() <= _tol(x, n)
    hop = th.paley_operand(paley.hadamard_of_order(12), False, "cuda")
    with pytest.raises(ValueError, match="fused Triton Paley kernel needs"):
        th.paley_fwht(torch.zeros(2, 384), hop, 12, 32)
    with pytest.raises(ValueError, match="unknown mix"):
        th.paley_fwht(torch.zeros(2, 384, device="cuda"), hop, 12, 32, mix="diagonal")
    with pytest.raises(ValueError, match="power of two"):
        th.paley_fwht(torch.zeros(2, 384, device="cuda"), hop, 12, 32, rows=3)
    with pytest.raises(ValueError, match="two_tiles"):
        th.paley_fwht(torch.zeros(2, 384, device="cuda"), hop, 12, 32, mix="left", two_tiles=True)
    with pytest.raises(ValueError, match="hop must be"):
        th.paley_fwht(torch.zeros(2, 384, device="cuda"), hop[:12, :12], 12, 32)
