"""Fake quantization with learned scales (LSQ / LSQ+): the torch reference
(kernels/fake_quant_ref.py) against WeightQuantizer.fake bit for bit and its backward against
autograd, on the CPU; the fused Triton kernels (kernels/triton_fake_quant.py) against the
reference on CUDA: forward and grad_w bit for bit (nan as nan), grad_s / grad_z within float32
summation error (``SUM_RTOL`` of the sum of the terms' magnitudes).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import pytest
import torch

import lowbit
from lowbit.kernels import fake_quant_ref as ref
from lowbit.quant.exp_round import exp_params
from lowbit.quant.spec import QuantSpec
from lowbit.quant.weight import GroupParams, WeightQuantizer, float_table

SUM_RTOL = 1e-5   # |grad_s - reference| <= SUM_RTOL * |grad_scale| * sum over the group of |terms|

# (label, spec format, symmetric)
GRIDS = [("int3", "int3", True), ("int3-asym", "int3", False), ("int4", "int4", True),
         ("int4-asym", "int4", False), ("e2m1fn", "e2m1fn", True), ("e4m3fn", "e4m3fn", True)]


def grid_of(fmt_name: str, symmetric: bool):
    """(WeightQuantizer with groups of 1 (any group size works: fake takes given params), kind,
    params, neg_zero) for a grid."""
    wq = WeightQuantizer(QuantSpec(fmt_name, "group", 1, symmetric=symmetric))
    grid = wq.grid
    if fmt_name.startswith("int"):
        return wq, "int", (grid.qmin, grid.qmax), False
    params = exp_params(grid, float_table(grid))
    assert params is not None, fmt_name
    return wq, "exp", params, grid.has_negative_zero


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal float32 bit patterns; any nan matches any nan (payloads are not specified)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a.nan_to_num(0.0).view(torch.int32),
                                               b.nan_to_num(0.0).view(torch.int32))


def tie_points(fmt_name: str, kind: str, params) -> torch.Tensor:
    """Values of y exactly halfway between two neighbouring grid points (both signs)."""
    if kind == "int":
        return torch.arange(int(params[0]), int(params[1])).float() + 0.5
    mids = float_table(lowbit.format(fmt_name))[1]
    return torch.cat([mids, -mids])


def make_case(rows: int, cols: int, group: int, kind: str, params, asym: bool, seed: int,
              device: str = "cpu", specials=True, ties: Optional[torch.Tensor] = None):
    """Weights, scales (fp16-representable, as trained scales are stored) and zero points with
    zeros, -0, exact ties, saturating values and (optionally) nan / inf in them."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = -(-cols // group)
    lo, hi = ref.grid_range(kind, params)
    scale = (torch.rand(rows, n_groups, generator=gen) * 0.5 + 0.05).half().float()
    zero = None
    if asym:
        zero = torch.randint(0, int(hi) + 1, (rows, n_groups), generator=gen).float()
    s = ref.expand_groups(scale, group, cols)
    z = ref.expand_groups(zero, group, cols) if asym else torch.zeros_like(s)
    # y spread a bit past the grid (saturation) with the zero point's offset undone
    span = hi - lo
    y = lo - 0.3 * span + torch.rand(rows, cols, generator=gen) * 1.6 * span
    w = (y - z) * s
    if specials and rows * cols >= 8:
        flat = w.view(-1)
        pick = torch.randperm(rows * cols, generator=gen)
        n = max(1, rows * cols // 16)
        flat[pick[:n]] = 0.0
        flat[pick[n: 2 * n]] = -0.0
        # exact ties: power-of-two scales make w / s exact, so y lands on the midpoint
        t = pick[2 * n: 4 * n]
        r, c = t // cols, t % cols
        g = c // group
        scale[r, g] = 0.25
        mids = ties if ties is not None else torch.tensor([0.5, -0.5])
        mids = mids[torch.randint(0, mids.numel(), (t.numel(),), generator=gen)]
        zt = zero[r, g] if asym else 0.0
        flat[t] = (mids - zt) * 0.25
        if specials == "nan":
            flat[pick[4 * n]] = float("nan")
            flat[pick[4 * n + 1]] = float("inf")
            flat[pick[4 * n + 2]] = -float("inf")
    dev = lambda t: None if t is None else t.to(device)   # noqa: E731
    return dev(w), dev(scale), dev(zero)


def fake_by_quantizer(wq: WeightQuantizer, w, scale, zero, group: int) -> torch.Tensor:
    """WeightQuantizer.fake one group of columns at a time."""
    cols = w.shape[1]
    parts = []
    for j, c0 in enumerate(range(0, cols, group)):
        sl = slice(c0, min(c0 + group, cols))
        p = GroupParams(scale[:, j: j + 1], None if zero is None else zero[:, j: j + 1])
        parts.append(wq.fake(w[:, sl], p))
    return torch.cat(parts, dim=1)


# --- CPU: the reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("label,fmt_name,symmetric", GRIDS)
@pytest.mark.parametrize("rows,cols,group", [(7, 64, 64), (5, 100, 32), (3, 130, 64), (4, 37, 37), (6, 50, 1),
                                             (2, 96, 7)])
def test_reference_matches_weight_quantizer(label, fmt_name, symmetric, rows, cols, group):
    wq, kind, params, neg_zero = grid_of(fmt_name, symmetric)
    w, scale, zero = make_case(rows, cols, group, kind, params, not symmetric, seed=rows * cols + group,
                               ties=tie_points(fmt_name, kind, params))
    got = ref.fake_quant_forward(w, scale, zero, group, kind, params, neg_zero)
    want = fake_by_quantizer(wq, w, scale, zero, group)
    assert same_bits(got, want), label


@pytest.mark.parametrize("label,fmt_name,symmetric", GRIDS)
def test_reference_specials_match_weight_quantizer(label, fmt_name, symmetric):
    """nan, +-inf, +-0 and values far past the grid."""
    wq, kind, params, neg_zero = grid_of(fmt_name, symmetric)
    w, scale, zero = make_case(8, 96, 32, kind, params, not symmetric, seed=3, specials="nan",
                               ties=tie_points(fmt_name, kind, params))
    w[0, :6] = torch.tensor([1e30, -1e30, 1e-42, -1e-42, -0.0, 0.0])
    got = ref.fake_quant_forward(w, scale, zero, 32, kind, params, neg_zero)
    assert same_bits(got, fake_by_quantizer(wq, w, scale, zero, 32)), label
    assert torch.isnan(got).any()


def _autograd_lsq(w, scale, zero, group, kind, params, neg_zero, grad_out):
    """The LSQ/LSQ+ gradients by autograd: a clamp (whose gradient passes at the bounds, like the
    mask lo <= y <= hi) and a straight-through rounding."""
    w = w.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    zero = None if zero is None else zero.clone().requires_grad_(True)
    cols = w.shape[1]
    s = ref.expand_groups(scale, group, cols)
    y = w / s
    if zero is not None:
        z = ref.expand_groups(zero, group, cols)
        y = y + z
    lo, hi = ref.grid_range(kind, params)
    yc = y.clamp(lo, hi)
    q = yc + (ref.round_to_grid(y, kind, params, neg_zero) - yc).detach()
    out = (q - z) * s if zero is not None else q * s
    out.backward(grad_out)
    return w.grad, scale.grad, None if zero is None else zero.grad


@pytest.mark.parametrize("label,fmt_name,symmetric", GRIDS)
@pytest.mark.parametrize("rows,cols,group", [(6, 128, 64), (5, 100, 32), (3, 77, 77)])
def test_reference_backward_matches_autograd(label, fmt_name, symmetric, rows, cols, group):
    _, kind, params, neg_zero = grid_of(fmt_name, symmetric)
    w, scale, zero = make_case(rows, cols, group, kind, params, not symmetric, seed=11 + cols,
                               ties=tie_points(fmt_name, kind, params))
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(5))
    grad_scale = 0.37
    gw, gs, gz = ref.fake_quant_backward(g, w, scale, zero, group, kind, params, grad_scale, neg_zero)
    aw, as_, az = _autograd_lsq(w, scale, zero, group, kind, params, neg_zero, g)
    # autograd goes through s * (1 / s) and (q - z) - w / s: the same values up to rounding
    torch.testing.assert_close(gw, aw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gs, as_ * grad_scale, rtol=1e-4, atol=1e-4)
    assert (gz is None) == symmetric
    if gz is not None:
        torch.testing.assert_close(gz, az * grad_scale, rtol=1e-5, atol=1e-5)


def test_reference_backward_formulas_by_hand():
    """One row, int4 with a zero point, values chosen inside, outside and on the range's edges."""
    kind, params = "int", (0, 15)
    scale = torch.tensor([[0.5]])
    zero = torch.tensor([[3.0]])
    y = torch.tensor([[0.0, 15.0, -0.25, 15.5, 4.25, 7.5, 20.0, -3.0]])
    w = (y - zero) * scale
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    gw, gs, gz = ref.fake_quant_backward(g, w, scale, zero, 8, kind, params, 0.5)
    inside = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]]).float()
    q = torch.tensor([[0.0, 15.0, 0.0, 15.0, 4.0, 8.0, 15.0, 0.0]])
    assert torch.equal(gw, g * inside)
    want_s = 0.5 * (g * torch.where(inside > 0, q - y, q - 3.0)).sum()
    want_z = 0.5 * (g * torch.where(inside > 0, 0.0, -0.5)).sum()
    assert torch.allclose(gs, want_s.reshape(1, 1)) and torch.allclose(gz, want_z.reshape(1, 1))
    assert torch.equal(ref.fake_quant_forward(w, scale, zero, 8, kind, params), (q - 3.0) * 0.5)


def test_reference_rejects_bad_arguments():
    w, s = torch.zeros(4, 10), torch.ones(4, 3)
    ref.fake_quant_forward(w, s, None, 4, "int", (-8, 7))
    with pytest.raises(ValueError, match="shape"):
        ref.fake_quant_forward(w, torch.ones(4, 2), None, 4, "int", (-8, 7))
    with pytest.raises(ValueError, match="float32"):
        ref.fake_quant_forward(w.double(), s, None, 4, "int", (-8, 7))
    with pytest.raises(ValueError, match="kind"):
        ref.fake_quant_forward(w, s, None, 4, "nf4", (-8, 7))
    with pytest.raises(ValueError, match="params"):
        ref.fake_quant_forward(w, s, None, 4, "exp", (-8, 7))
    with pytest.raises(ValueError, match="group"):
        ref.fake_quant_forward(w, s, None, 0, "int", (-8, 7))
    with pytest.raises(ValueError, match="grad_out"):
        ref.fake_quant_backward(torch.zeros(4, 9), w, s, None, 4, "int", (-8, 7), 1.0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_triton_rejects_cpu_tensors(monkeypatch):
    from lowbit.kernels import triton_fake_quant as tfq

    monkeypatch.setattr(tfq, "_INTERPRET", False)
    w, s = torch.zeros(4, 8), torch.ones(4, 1)
    with pytest.raises(ValueError, match="CUDA"):
        tfq.fake_quant_forward(w, s, None, 8, "int", (-8, 7))
    with pytest.raises(ValueError, match="CUDA"):
        tfq.fake_quant_backward(w, w, s, None, 8, "int", (-8, 7), 1.0)


# --- CUDA: the Triton kernels against the reference --------------------------------------------------

_REASON = None
if not torch.cuda.is_available():
    _REASON = "needs CUDA"
elif importlib.util.find_spec("triton") is None:
    _REASON = "needs the triton package"
needs_cuda = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def sum_bound(g, w, scale, zero, group, kind, params, grad_scale, neg_zero):
    """SUM_RTOL * |grad_scale| * the sum of |terms| per group, for grad_s and grad_z."""
    cols = w.shape[1]
    n_groups = scale.shape[1]
    s = ref.expand_groups(scale, group, cols)
    y = w / s
    z = None
    if zero is not None:
        z = ref.expand_groups(zero, group, cols)
        y = y + z
    q = ref.round_to_grid(y, kind, params, neg_zero)
    lo, hi = ref.grid_range(kind, params)
    inside = (lo <= y) & (y <= hi)
    ts = (g * torch.where(inside, q - y, q - z if z is not None else q)).abs()
    bs = ref.sum_groups(ts, group, n_groups) * abs(grad_scale) * SUM_RTOL
    bz = None
    if zero is not None:
        bz = ref.sum_groups((g * torch.where(inside, 0.0, s)).abs(), group, n_groups) * abs(grad_scale) * SUM_RTOL
    return bs, bz


def assert_sums_close(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: nan in different places"
    ok = ~torch.isnan(want)
    err = (got - want).abs()[ok]
    assert bool((err <= bound[ok] + 1e-30).all()), f"{what}: max error {err.max().item():.3g}"


def check_against_reference(tfq, device: str, rows: int, cols: int, group: int, label: str, fmt_name: str,
                            symmetric: bool, seed: int, specials=True, grad_scale: float = 0.3,
                            flip_neg_zero: bool = False) -> None:
    _, kind, params, neg_zero = grid_of(fmt_name, symmetric)
    if flip_neg_zero:
        neg_zero = not neg_zero
    w, scale, zero = make_case(rows, cols, group, kind, params, not symmetric, seed, device, specials,
                               tie_points(fmt_name, kind, params))
    what = f"{label} {rows}x{cols} g{group}"
    got = tfq.fake_quant_forward(w, scale, zero, group, kind, params, neg_zero)
    want = ref.fake_quant_forward(w, scale, zero, group, kind, params, neg_zero)
    assert same_bits(got, want), f"forward {what}"
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    gw, gs, gz = tfq.fake_quant_backward(g, w, scale, zero, group, kind, params, grad_scale, neg_zero)
    rw, rs, rz = ref.fake_quant_backward(g, w, scale, zero, group, kind, params, grad_scale, neg_zero)
    assert same_bits(gw, rw), f"grad_w {what}"
    bs, bz = sum_bound(g, w, scale, zero, group, kind, params, grad_scale, neg_zero)
    assert_sums_close(gs, rs, bs, f"grad_s {what}")
    assert (gz is None) == (rz is None)
    if rz is not None:
        assert_sums_close(gz, rz, bz, f"grad_z {what}")


# rows x cols x group: whole groups, ragged last groups, groups that are not powers of two, one
# group per row (per channel) shorter and longer than one step of the kernel (1024 columns)
SHAPES = [(64, 256, 64), (33, 200, 64), (17, 100, 96), (9, 1000, 128), (5, 3000, 3000), (3, 4096, 4096),
          (40, 77, 77), (2, 2500, 1100), (128, 64, 16), (7, 130, 1), (1, 1, 1), (300, 48, 32)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("label,fmt_name,symmetric", GRIDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("specials", [True, "nan"])
def test_triton_matches_reference(label, fmt_name, symmetric, shape, specials):
    from lowbit.kernels import triton_fake_quant as tfq

    rows, cols, group = shape
    check_against_reference(tfq, "cuda", rows, cols, group, label, fmt_name, symmetric,
                            seed=rows * 7919 + cols * 31 + group, specials=specials)


@pytest.mark.gpu
@needs_cuda
def test_triton_larger_random_shapes():
    from lowbit.kernels import triton_fake_quant as tfq

    gen = torch.Generator().manual_seed(1)
    for i in range(12):
        rows = int(torch.randint(1, 700, (1,), generator=gen))
        cols = int(torch.randint(1, 5000, (1,), generator=gen))
        group = [16, 32, 64, 128, 100, cols][i % 6]
        label, fmt_name, symmetric = GRIDS[i % len(GRIDS)]
        check_against_reference(tfq, "cuda", rows, cols, group, label, fmt_name, symmetric, seed=100 + i,
                                grad_scale=1.0 / (i + 1))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt_name", ["e2m1fn", "e4m3fn"])
def test_triton_exp_without_negative_zero(fmt_name):
    """The exp grids with neg_zero off (-0 -> +0), the other branch of the sign handling."""
    from lowbit.kernels import triton_fake_quant as tfq

    for shape in [(33, 200, 64), (5, 3000, 3000)]:
        check_against_reference(tfq, "cuda", *shape, fmt_name, fmt_name, True, seed=sum(shape), flip_neg_zero=True)


@pytest.mark.gpu
@needs_cuda
def test_triton_rejects_bad_tensors():
    from lowbit.kernels import triton_fake_quant as tfq

    w = torch.zeros(8, 16, device="cuda")
    s = torch.ones(8, 1, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        tfq.fake_quant_forward(torch.zeros(16, 8, device="cuda").t(), s, None, 16, "int", (-8, 7))
    with pytest.raises(ValueError, match="float32"):
        tfq.fake_quant_forward(w.half(), s, None, 16, "int", (-8, 7))
    with pytest.raises(ValueError, match="shape"):
        tfq.fake_quant_backward(w, w, torch.ones(8, 2, device="cuda"), None, 16, "int", (-8, 7), 1.0)
    empty = tfq.fake_quant_forward(torch.zeros(0, 16, device="cuda"), torch.ones(0, 1, device="cuda"), None,
                                   16, "int", (-8, 7))
    assert empty.shape == (0, 16)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_triton_rounds_stored_scales_and_writes_bf16(scale_dtype, monkeypatch):
    """The kernels' own scale rounding (clamp to tiny, nearest-even to fp16/bf16) and bf16 output
    equal torch's, on CUDA or in Triton's CPU interpreter (bit tricks, not the interpreter's casts)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    import importlib as il

    from lowbit.kernels import triton_fake_quant as tfq
    if not torch.cuda.is_available():
        tfq = il.reload(tfq)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 96, generator=g)
    raw = w.abs().reshape(16, 3, 32).amax(2) / 7 * (1 + 0.01 * torch.randn(16, 3, generator=g))
    raw[0, 0] = -1.0
    tiny = torch.finfo(scale_dtype).tiny
    s = raw.clamp(min=tiny).to(scale_dtype).float()
    want = ref.fake_quant_forward(w, s, None, 32, "int", (-8, 7)).to(torch.bfloat16)
    got = tfq.fake_quant_forward(w.to(dev), raw.to(dev), None, 32, "int", (-8, 7), scale_dtype=scale_dtype,
                                 out_dtype=torch.bfloat16)
    assert torch.equal(got.cpu(), want)
    go = torch.randn(16, 96, generator=g).to(torch.bfloat16)
    gw, gs, _ = ref.fake_quant_backward(go.float(), w, s, None, 32, "int", (-8, 7), 0.5)
    gw2, gs2, _ = tfq.fake_quant_backward(go.to(dev), w.to(dev), raw.to(dev), None, 32, "int", (-8, 7), 0.5,
                                          scale_dtype=scale_dtype)
    assert torch.equal(gw2.cpu(), gw)
    gs[0, 0] = 0.0
    torch.testing.assert_close(gs2.cpu(), gs, rtol=1e-5, atol=1e-6)
