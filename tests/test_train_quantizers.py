"""Trainable quantizers: the forward is lowbit's own fake quantization bit for bit (so freezing is
exact), the value gradient is the straight-through definition, and the LSQ/LSQ+ scale and offset
gradients match finite differences of the function LSQ differentiates."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.quant.spec import QuantSpec
from lowbit.quant.weight import WeightQuantizer
from lowbit.kernels.fake_quant_ref import expand_groups, sum_groups
from lowbit.train.quantizers import WeightFakeQuant, grid_range

SPECS = ["int4:g64", "int3:g32:asym", "int2:g16", "int8:channel", "int4:tensor", "int4:g48", "int3:g64:asym:mse",
         "e2m1fn:g32", "e4m3fn:g16", "e3m2fn:channel", "nf4:g64", "fp4_bnb:g32", "e2m1fn:g32:toward_zero",
         "mxfp4", "mxfp8_e4m3", "nvfp4", "mxint8"]


def _weight(spec: str, rows: int = 12, cols: int = 160, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0, 3] = 9.0  # an outlier: a clipped element for the mse scales, a large block amax for the rest
    return w


@pytest.mark.parametrize("spec", SPECS)
def test_forward_is_rtn_and_freeze_is_forward(spec):
    w = _weight(spec, cols=150 if spec == "int4:g48" else 160)
    fq = WeightFakeQuant(spec, tuple(w.shape))
    fq.init_from(w)
    out = fq(w)
    rtn, _ = WeightQuantizer(QuantSpec.parse(spec)).rtn(w)
    assert torch.equal(out, rtn), spec
    frozen, params = fq.freeze(w)
    assert torch.equal(frozen, out)
    from lowbit.export.packing import pack_weight, unpack_weight

    packed = pack_weight(frozen, fq.quantizer, params)  # raises unless the codes decode to the values
    assert torch.equal(unpack_weight(packed, QuantSpec.parse(spec), tuple(w.shape)), out)


@pytest.mark.parametrize("spec", ["int4:g64", "int3:g32:asym", "e2m1fn:g32", "nf4:g64", "int4:g48", "int4:tensor"])
def test_learned_forward_after_scales_move_is_still_exactly_what_is_stored(spec):
    w = _weight(spec, cols=150 if spec == "int4:g48" else 160)
    fq = WeightFakeQuant(spec, tuple(w.shape))
    fq.init_from(w)
    with torch.no_grad():
        fq.scale.mul_(torch.empty_like(fq.scale).uniform_(0.7, 1.3, generator=torch.Generator().manual_seed(1)))
        if fq.zero is not None:
            fq.zero.add_(0.4)
    out = fq(w)
    frozen, params = fq.freeze(w)
    assert torch.equal(frozen, out)
    # the scale in use is the fp16-rounded parameter: what the checkpoint stores
    s, _ = fq.effective_params()
    assert torch.equal(s, s.half().float())


def _surrogate(w, s, z, q_base, y_base, inside_base, group):
    """The function LSQ differentiates: inside the range ``(y + r - z) * s`` with the rounding
    residual ``r = q - y`` held at its value at the base point, outside ``(q_sat - z) * s``."""
    cols = w.shape[1]
    sc = expand_groups(s, group, cols)
    zc = expand_groups(z, group, cols) if z is not None else torch.zeros_like(w)
    y = w / sc + zc
    r = q_base - y_base
    inside_val = (y + r - zc) * sc
    outside_val = (q_base - zc) * sc
    return torch.where(inside_base, inside_val, outside_val)


@pytest.mark.parametrize("spec", ["int4:g64", "int3:g32:asym", "e2m1fn:g32", "nf4:g64", "int4:g48", "int2:channel"])
def test_scale_and_zero_gradients_match_finite_differences(spec):
    torch.manual_seed(0)
    cols = 150 if spec == "int4:g48" else 160
    w = _weight(spec, cols=cols).double()
    fq = WeightFakeQuant(spec, (12, cols)).double()
    fq.init_from(w.float())
    with torch.no_grad():  # shrink the scales so that some elements clip
        fq.scale.mul_(0.8)
    coef = torch.randn(12, cols, dtype=torch.float64)
    s, z = fq.effective_params()
    s, z = s.detach().double().requires_grad_(), (None if z is None else z.detach().double().requires_grad_())
    from lowbit.train.quantizers import _LearnedStep  # the autograd function itself, with grad_scale 1

    out = _LearnedStep.apply(w, s, z, fq.quantizer, fq.group, 1.0)
    (out * coef).sum().backward()
    # base point of the surrogate
    cols_s = expand_groups(s.detach(), fq.group, cols)
    y = w / cols_s + (expand_groups(z.detach(), fq.group, cols) if z is not None else 0)
    lo, hi = grid_range(fq.quantizer)
    inside = (y >= lo) & (y <= hi)
    q = fq.quantizer.round_scaled(y.float()).double()
    assert inside.sum() < inside.numel(), "the test needs clipped elements"

    def f(s_, z_):
        return float((_surrogate(w, s_, z_, q, y, inside, fq.group) * coef).sum())

    eps = 1e-6
    for j in range(s.shape[1]):
        for i in (0, 5, 11):
            sp, sm = s.detach().clone(), s.detach().clone()
            sp[i, j] += eps
            sm[i, j] -= eps
            zz = None if z is None else z.detach()
            fd = (f(sp, zz) - f(sm, zz)) / (2 * eps)
            assert math.isclose(float(s.grad[i, j]), fd, rel_tol=1e-6, abs_tol=1e-6), (spec, i, j)
            if z is not None:
                zp, zm = z.detach().clone(), z.detach().clone()
                zp[i, j] += eps
                zm[i, j] -= eps
                fdz = (f(s.detach(), zp) - f(s.detach(), zm)) / (2 * eps)
                assert math.isclose(float(z.grad[i, j]), fdz, rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("spec", ["int4:g64", "int3:g32:asym", "e2m1fn:g32"])
def test_value_gradient_is_clipped_straight_through(spec):
    w = _weight(spec).requires_grad_()
    fq = WeightFakeQuant(spec, tuple(w.shape))
    fq.init_from(w.detach())
    with torch.no_grad():
        fq.scale.mul_(0.7)
    g = torch.randn_like(w)
    (fq(w) * g).sum().backward()
    s, z = fq.effective_params()
    y = w.detach() / expand_groups(s.detach(), fq.group, w.shape[1])
    if z is not None:
        y = y + expand_groups(z.detach(), fq.group, w.shape[1])
    lo, hi = grid_range(fq.quantizer)
    inside = (y >= lo) & (y <= hi)
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(w.grad, g * inside)


@pytest.mark.parametrize("gradient", ["straight", "clipped"])
@pytest.mark.parametrize("spec", ["int4:g64:mse", "mxfp4", "nvfp4", "e2m1fn:g32"])
def test_dynamic_scaling_forward_and_gradients(spec, gradient):
    w = _weight(spec).requires_grad_()
    fq = WeightFakeQuant(spec, tuple(w.shape), scaling="dynamic", gradient=gradient)
    out = fq(w)
    rtn, params = WeightQuantizer(QuantSpec.parse(spec)).rtn(w.detach())
    assert torch.equal(out, rtn)
    g = torch.randn_like(w)
    (out * g).sum().backward()
    if gradient == "straight" or spec in ("mxfp4", "nvfp4"):
        assert torch.equal(w.grad, g)
    else:
        s = torch.cat([p.scale for p in params], dim=1)
        y = w.detach() / expand_groups(s, fq.group, w.shape[1])
        lo, hi = grid_range(fq.quantizer)
        assert torch.equal(w.grad, g * ((y >= lo) & (y <= hi)))
    assert list(fq.parameters()) == []


def test_lsq_gradient_scale_is_one_over_sqrt_n_qmax():
    fq = WeightFakeQuant("int4:g64", (8, 128))
    assert fq.grad_scale == pytest.approx(1 / math.sqrt(64 * 7))
    fq = WeightFakeQuant("int3:channel:asym", (8, 96))
    assert fq.grad_scale == pytest.approx(1 / math.sqrt(96 * 7))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 70), group=st.integers(1, 33), seed=st.integers(0, 10_000))
def test_group_expand_and_reduce_are_adjoint(rows, cols, group, seed):
    g = torch.Generator().manual_seed(seed)
    n = math.ceil(cols / group)
    a = torch.randn(rows, n, generator=g, dtype=torch.float64)
    b = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # <expand(a), b> == <a, reduce(b)>: the scale gradient sums exactly each group's columns
    assert torch.allclose((expand_groups(a, group, cols) * b).sum(), (a * sum_groups(b, group, n)).sum())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="scaling must be one of"):
        WeightFakeQuant("int4:g64", (4, 64), scaling="lsq++")
    with pytest.raises(ValueError, match="multiple of 32"):
        WeightFakeQuant("mxfp4", (4, 48))
    fq = WeightFakeQuant("int4:g64", (4, 64))
    with pytest.raises(ValueError, match="built for weights of shape"):
        fq(torch.zeros(4, 128))
    with pytest.raises(ValueError, match="do not fit"):
        fq.init_from(torch.zeros(4, 64), scales=torch.ones(4, 2))
