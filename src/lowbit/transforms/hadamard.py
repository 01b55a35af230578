"""Fast Walsh-Hadamard transforms on the last dimension, orthonormal, in plain torch.

``fwht(x)`` computes ``x @ H_n`` with ``H_n`` the Sylvester Hadamard matrix scaled by ``1/sqrt(n)``
(symmetric and orthogonal, so it is its own inverse) as a few small matmuls over Sylvester's
Kronecker factors (or, with ``method="butterfly"``, ``log2(n)`` vectorised radix-2 stages, O(n log n)
work per row). ``n`` must be a power of two. On CUDA, float32 inputs go to a fused Triton kernel
(``kernels/triton_hadamard.py``: signs, transform and scaling in one read and one write) when
Triton imports; the torch routes stay the fallback and the CPU path.

``block_fwht(x, b)`` applies ``H_b`` to each consecutive block of ``b`` features (a block-diagonal
orthogonal matrix). ``b`` may also be a size that is not a power of two but has a full Hadamard
matrix (``paley.py``: ``b = m·p`` with ``H_b = H_m ⊗ H_p``, ``H_m`` from Paley's constructions,
e.g. 384 = 12·32, 576 = 36·16, 1536 = 12·128): the power-of-two factor goes through the fast
transform above (each run of ``p`` features), the ``m``-factor is one small dense matmul mixing the
``m`` runs; on CUDA one fused Triton kernel does both in a single pass (``triton_hadamard.paley_fwht``). ``full_block(n)`` is ``n`` when such a matrix exists (``hadamard_block(n)`` falls back to
the largest power of two dividing ``n``, ``default_block(n)``, which mixes within blocks only).
Paley I matrices are not symmetric, so the inverse is ``transpose=True``, not the same call.

Random signs: ``R = diag(s) H`` with ``s`` in {-1, +1}^n drawn from a seeded generator, so
``x R = fwht(x * s)`` and ``x R^T = fwht(x) * s``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import paley


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def default_block(n: int) -> int:
    """The largest power of two dividing ``n`` (the whole of ``n`` when it is a power of two)."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    return n & -n


def full_block(n: int) -> int:
    """``n`` itself when a full Hadamard matrix of order n is available (``paley.split_order``);
    otherwise a ValueError naming the supported sizes near ``n``."""
    paley.check_order(int(n))
    return int(n)


def hadamard_block(n: int) -> int:
    """The widest rotation available for ``n`` features: the full width when supported, else the
    largest power of two dividing ``n`` (a block rotation)."""
    return int(n) if paley.is_supported(int(n)) else default_block(n)


def _check_block(n: int, block: int) -> None:
    if not is_power_of_two(block):
        paley.check_order(block)  # raises, naming the supported sizes
    if n % block:
        raise ValueError(f"Hadamard block {block} does not divide the dimension {n}; "
                         f"use a power of two dividing it, e.g. {default_block(n)}"
                         + (f", or the full width {n}" if paley.is_supported(n) else ""))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform ``x @ H_n`` over the last dim (n a power of two)."""
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}; use block_fwht for other sizes")
    return block_fwht(x, n)


FACTOR = 64  # largest Hadamard factor applied as one small matmul


def _factors(b: int) -> list:
    """``b`` as a product of powers of two no larger than FACTOR, as even as possible
    (H_b = H_f1 ⊗ H_f2 ⊗ ...; tiny factors make inefficient matmuls)."""
    k = b.bit_length() - 1
    parts = max(1, -(-k // (FACTOR.bit_length() - 1)))
    exps = [k // parts + (1 if i < k % parts else 0) for i in range(parts)]
    return [1 << e for e in exps]


_H_CACHE: dict = {}


def _sylvester(f: int, dtype, device) -> torch.Tensor:
    key = (f, dtype, str(device))
    if key not in _H_CACHE:
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < f:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        _H_CACHE[key] = H.to(device=device, dtype=dtype)
    return _H_CACHE[key]


METHODS = ("kron", "butterfly", "triton", "auto")

_triton_state: dict = {}


def _triton_kernels():
    """``kernels.triton_hadamard``, imported on first use; None without CUDA or Triton."""
    if "mod" not in _triton_state:
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            from ..kernels import triton_hadamard
            _triton_state["mod"], _triton_state["error"] = triton_hadamard, None
        except Exception as e:  # ImportError, no driver, ...
            _triton_state["mod"], _triton_state["error"] = None, f"{type(e).__name__}: {e}"
    return _triton_state["mod"]


class _FusedFWHT(torch.autograd.Function):
    """The fused kernel with its gradient, so a rotation inside a model that trains (an online
    input transform under QAT) passes the gradient on instead of cutting it: ``R`` is orthogonal and
    ``H_b / sqrt(b)`` symmetric, so the gradient ``g R^T`` is the same kernel with the signs on the
    other side."""

    @staticmethod
    def forward(ctx, y, b, signs, signs_after):
        ctx.b, ctx.signs_after, ctx.signs = b, signs_after, signs
        return _triton_kernels().block_fwht(y, b, signs, signs_after)

    @staticmethod
    def backward(ctx, g):
        gx = _triton_kernels().block_fwht(g.float().contiguous(), ctx.b, ctx.signs, not ctx.signs_after)
        return gx, None, None, None


def _use_triton(y: torch.Tensor, b: int, method: str) -> bool:
    """Whether this call goes to the fused kernel: always for ``method="triton"`` (which raises when
    it cannot), for ``"auto"`` when the kernel takes the input (CUDA float32 contiguous, b <= 4096)."""
    if method == "triton":
        mod = _triton_kernels()
        if mod is None:
            raise RuntimeError(f"method='triton' is not available here ({_triton_state['error']}); it needs "
                               "a CUDA device and the triton package. Use method='auto'.")
        if not mod.supports(y, b):
            raise ValueError(f"method='triton' needs a contiguous CUDA float32/16/bf16 tensor and a block of "
                             f"2..{mod.MAX_BLOCK}; got {y.dtype} on {y.device}, block {b}, "
                             f"contiguous={y.is_contiguous()}. Use method='auto'.")
        return True
    if method == "auto" and y.is_cuda:
        mod = _triton_kernels()
        return mod is not None and mod.supports(y, b)
    return False


_DENSE_CACHE: dict = {}
DENSE_POW2 = 256  # Paley sizes: power-of-two factors up to this are one dense matmul


def _dense_factor(m: int, dtype, device) -> torch.Tensor:
    """Paley/Kronecker Hadamard matrix of order m (±1), cached per dtype and device."""
    key = (m, dtype, str(device))
    if key not in _DENSE_CACHE:
        _DENSE_CACHE[key] = paley.hadamard_of_order(m).to(device=device, dtype=dtype)
    return _DENSE_CACHE[key]


_PALEY_OPERANDS: dict = {}


def _paley_operand(mod, m: int, transpose: bool, device) -> torch.Tensor:
    """The fused kernel's padded float32 ``H_m`` (or ``H_m^T``), cached per order and device."""
    key = (m, bool(transpose), str(device))
    if key not in _PALEY_OPERANDS:
        _PALEY_OPERANDS[key] = mod.paley_operand(paley.hadamard_of_order(m), transpose, device)
    return _PALEY_OPERANDS[key]


def _paley_fwht(x: torch.Tensor, b: int, method: str, signs: Optional[torch.Tensor], signs_after: bool,
                transpose: bool) -> torch.Tensor:
    """``x @ blockdiag(H_m ⊗ H_p) / sqrt(b)`` (or its transpose) for a block b = m·p that is not a
    power of two. On CUDA (``method`` "auto" or "triton", float32 or upcast half inputs, made
    contiguous) one fused Triton kernel does signs, H_p, H_m and scaling in one read and one write
    (``kernels/triton_hadamard.paley_fwht``); otherwise ``_paley_two_pass``."""
    m, p = paley.check_order(b)
    if method in ("auto", "triton") and x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        mod = _triton_kernels()
        if mod is not None:
            y = x.float().contiguous()
            if mod.paley_supports(y, m, p):
                if torch.is_grad_enabled() and y.requires_grad:
                    return _FusedPaley.apply(y, m, p, signs, signs_after, transpose).to(x.dtype)
                hop = _paley_operand(mod, m, transpose, y.device)
                return mod.paley_fwht(y, hop, m, p, signs, signs_after).to(x.dtype)
    return _paley_two_pass(x, b, method, signs, signs_after, transpose)


class _FusedPaley(torch.autograd.Function):
    """The fused Paley-size kernel with its gradient (as ``_FusedFWHT``): the transform is
    orthogonal, so the gradient is the transposed transform (``H_m`` is not symmetric) with the
    signs on the other side."""

    @staticmethod
    def forward(ctx, y, m, p, signs, signs_after, transpose):
        ctx.shape, ctx.signs, ctx.signs_after, ctx.transpose = (m, p), signs, signs_after, transpose
        mod = _triton_kernels()
        return mod.paley_fwht(y, _paley_operand(mod, m, transpose, y.device), m, p, signs, signs_after)

    @staticmethod
    def backward(ctx, g):
        (m, p), mod = ctx.shape, _triton_kernels()
        hop = _paley_operand(mod, m, not ctx.transpose, g.device)
        gx = mod.paley_fwht(g.float().contiguous(), hop, m, p, ctx.signs, not ctx.signs_after)
        return gx, None, None, None, None, None


def _paley_two_pass(x: torch.Tensor, b: int, method: str, signs: Optional[torch.Tensor], signs_after: bool,
                    transpose: bool) -> torch.Tensor:
    """The torch route for ``_paley_fwht`` (the CPU path, and the CUDA fallback): the fast transform
    on each run of p features (the Triton block kernel on CUDA), then H_m mixing the m runs as one
    batched matmul; two or more passes over the tensor."""
    m, p = paley.check_order(b)
    n = x.shape[-1]
    dtype = x.dtype
    y = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if signs is not None and not signs_after:
        y = y * signs.to(y.device, y.dtype)
    lead = y.shape[:-1]
    if p > 1:  # H_p is symmetric: the same for the transpose
        if p <= DENSE_POW2 and method in ("auto", "kron") and not _use_triton(y, p, method):
            # one dense matmul with H_p: p multiply-adds per element, BLAS speed (measured faster
            # on the CPU than the factored route at these sizes)
            y, scale = y.reshape(-1, p) @ _sylvester(p, y.dtype, y.device), 1.0 / math.sqrt(m * p)
        else:
            y, scale = block_fwht(y.contiguous(), p, method), 1.0 / math.sqrt(m)
    else:
        scale = 1.0 / math.sqrt(m)
    A = _dense_factor(m, y.dtype, y.device)
    A = A if transpose else A.T
    # y[..., a, j] = sum_i A[i, a] y[..., i, j]: (A^T @ Y) for each (m, p) slab, one batched matmul
    y = torch.matmul(A, y.reshape(-1, m, p)).reshape(*lead, n) * scale
    if signs is not None and signs_after:
        y = y * signs.to(y.device, y.dtype)
    return y.to(dtype)


def block_fwht(x: torch.Tensor, block: Optional[int] = None, method: str = "auto",
               signs: Optional[torch.Tensor] = None, signs_after: bool = False,
               transpose: bool = False) -> torch.Tensor:
    """``x @ blockdiag(H_b, ..., H_b)`` over the last dim; ``block`` defaults to ``default_block(n)``.

    ``method="auto"`` (default) runs the fused Triton kernel (``kernels/triton_hadamard.py``) for
    contiguous CUDA float32 (or float16/bfloat16, upcast first) inputs with ``b <= 4096`` when Triton
    imports, and ``"kron"`` otherwise; ``"triton"`` asks for the kernel and raises where it cannot run.
    ``method="kron"`` uses Sylvester's structure ``H_b = H_f1 ⊗ H_f2 ⊗ ...`` with factors of
    at most 64: one small batched matmul per factor, O(n · sum f_i) work that runs at matmul speed.
    ``method="butterfly"`` is the textbook O(n log n) radix-2 transform (log2 b vectorised stages).
    ``signs`` (length n) multiply ``x`` first, or the result when ``signs_after`` (fused in the kernel).
    A block that is not a power of two (a Paley size, see the module docstring) applies
    ``H_m ⊗ H_p``; ``transpose`` then applies its transpose (powers of two are symmetric)."""
    n = x.shape[-1]
    b = default_block(n) if block is None else int(block)
    _check_block(n, b)
    if method not in METHODS:
        raise ValueError(f"unknown Hadamard method {method!r}; accepted: {', '.join(METHODS)}")
    if signs is not None and signs.numel() != n:
        raise ValueError(f"signs must have one entry per feature ({n}), got {signs.numel()}")
    if not is_power_of_two(b):
        return _paley_fwht(x, b, method, signs, signs_after, transpose)
    dtype = x.dtype
    y = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if _use_triton(y, b, method):
        if torch.is_grad_enabled() and y.requires_grad:
            return _FusedFWHT.apply(y, b, signs, signs_after).to(dtype)
        return _triton_kernels().block_fwht(y, b, signs, signs_after).to(dtype)
    if signs is not None and not signs_after:
        y = y * signs.to(y.device, y.dtype)
    if method in ("auto", "triton"):
        method = "kron"
    lead = y.shape[:-1]
    if method == "butterfly":
        y = y.reshape(-1, n // b, b)
        h = 1
        # one stage per bit: view each block as (b/2h, 2, h) and combine the two halves
        while h < b:
            y = y.reshape(y.shape[0], n // b, b // (2 * h), 2, h)
            a, c = y[..., 0, :], y[..., 1, :]
            y = torch.stack((a + c, a - c), dim=-2)
            h *= 2
    else:
        rest = b
        y = y.reshape(-1, 1, b)
        for f in _factors(b):
            # the current factor indexes the leading f of the remaining `rest` positions
            rest //= f
            y = y.reshape(-1, f, rest)
            H = _sylvester(f, y.dtype, y.device)
            if rest == 1:
                y = y.reshape(-1, f) @ H
            else:  # bring this factor's axis last (one copy) so the product is a plain 2-D matmul
                m = y.shape[0]
                y = (y.transpose(1, 2).reshape(-1, f) @ H).reshape(m, rest, f).transpose(1, 2)
    y = y.reshape(*lead, n) * (1.0 / math.sqrt(b))
    if signs is not None and signs_after:
        y = y * signs.to(y.device, y.dtype)
    return y.to(dtype)


def random_signs(n: int, seed: int, device=None) -> torch.Tensor:
    """A reproducible vector of n random signs (+1/-1, float32)."""
    g = torch.Generator().manual_seed(int(seed))
    s = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return s.to(device) if device is not None else s


def hadamard_matrix(n: int, block: Optional[int] = None, signs: Optional[torch.Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The explicit n x n matrix R with ``x R == rotate(x)`` (for tests and small folds):
    ``diag(signs) @ blockdiag(H_b)``, built by Sylvester's recursion (times Paley's matrix for a
    block that is not a power of two: ``kron(H_m, H_p)``), not by the fast transform. float32, or
    float64 with ``dtype``."""
    b = default_block(n) if block is None else int(block)
    _check_block(n, b)
    m, p = paley.check_order(b)
    H = torch.kron(paley.hadamard_of_order(m), paley.sylvester(p)) if m > 1 else paley.sylvester(p)
    H = torch.block_diag(*([H / math.sqrt(b)] * (n // b)))
    if signs is not None:
        H = signs.double().reshape(-1, 1) * H
    return H.to(dtype)


def rotate(x: torch.Tensor, block: Optional[int] = None, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x R`` with ``R = diag(signs) blockdiag(H_b)`` (one fused pass on CUDA, see ``block_fwht``)."""
    return block_fwht(x, block, signs=signs)


def rotate_inverse(x: torch.Tensor, block: Optional[int] = None, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x R^T`` (the inverse of ``rotate``)."""
    return block_fwht(x, block, signs=signs, signs_after=True, transpose=True)
