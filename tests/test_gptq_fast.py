"""GPTQ's fused column loop (per-column divisors; a Triton kernel per block on CUDA), the shared-
Hessian loop over stacked rows, the keep mask, and the float32 path of block formats."""
import pytest
import torch

from lowbit.kernels import reference
from lowbit.ptq.gptq import HessianAccumulator, gptq, gptq_shared
from lowbit.quant.spec import QuantSpec
from lowbit.quant.weight import WeightQuantizer

SPECS = ["int4:g64", "int3:g32", "int2:g32:asym", "int4:g32:asym:mse", "int4:tensor", "int3:g40",
         "e2m1fn:g32", "e4m3fn:channel", "nf4:g64", "mxfp4", "mxfp8_e4m3", "nvfp4"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(rows=16, cols=96, n=256, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix
    acc = HessianAccumulator(cols)
    acc.add(X)
    H = acc.H
    H[7, :] = 0  # a dead input
    H[:, 7] = 0
    return W.to(device), H.to(device)


def _run(W, H, spec, loop, act_order, keep=None, block_size=32):
    q = WeightQuantizer(QuantSpec.parse(spec))
    return gptq_shared([W], H, [q], block_size=block_size, act_order=act_order,
                       keeps=None if keep is None else [keep], loop=loop)[0]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("act_order", [False, True])
def test_fused_loop_is_the_plain_loop_bit_for_bit_on_cpu(spec, act_order):
    W, H = _problem()
    plain = _run(W, H, spec, "plain", act_order)
    fused = _run(W, H, spec, "fused", act_order)
    assert torch.equal(fused.weight, plain.weight)
    for a, b in zip(fused.params, plain.params):
        assert torch.equal(a.scale, b.scale)
    if not act_order:
        return
    # gptq() takes the fused loop by default
    default = gptq(W, H, WeightQuantizer(QuantSpec.parse(spec)), block_size=32, act_order=act_order)
    assert torch.equal(default.weight, plain.weight)


def test_stochastic_rounding_stays_on_the_plain_loop():
    W, H = _problem()
    with pytest.raises(ValueError, match="fused GPTQ loop cannot run"):
        _run(W, H, "int4:g32:stochastic", "fused", False)
    torch.manual_seed(1)
    a = _run(W, H, "int4:g32:stochastic", "auto", False)
    torch.manual_seed(1)
    b = _run(W, H, "int4:g32:stochastic", "plain", False)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("spec", ["int2:g32:asym", "nvfp4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_rows_equal_separate_layers(spec, act_order):
    """q/k/v in one loop: each result is that of its layer alone (rows never interact), NVFP4's
    per-tensor scale included (the parts get different magnitudes so the scales differ)."""
    W, H = _problem(rows=24)
    parts = [W[:8], 3 * W[8:16], 0.1 * W[16:]]
    qs = [WeightQuantizer(QuantSpec.parse(spec)) for _ in parts]
    together = gptq_shared(parts, H, qs, block_size=32, act_order=act_order)
    for Wp, res in zip(parts, together):
        alone = gptq(Wp, H, WeightQuantizer(QuantSpec.parse(spec)), block_size=32, act_order=act_order)
        assert torch.equal(res.weight, alone.weight)
        assert res.weight.shape == Wp.shape
        assert len(res.params) == len(alone.params)
        for a, b in zip(res.params, alone.params):
            assert torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("loop", ["plain", "fused"])
def test_keep_mask(loop):
    W, H = _problem()
    none = _run(W, H, "int3:g32", loop, False)
    no_keep = _run(W, H, "int3:g32", loop, False, keep=torch.zeros_like(W, dtype=torch.bool))
    assert torch.equal(none.weight, no_keep.weight)
    # keep everything: nothing rounded, no error fed back, so Q is W (dead input column zeroed)
    everything = _run(W, H, "int3:g32", loop, True, keep=torch.ones_like(W, dtype=torch.bool))
    expect = W.clone()
    expect[:, 7] = 0
    assert torch.equal(everything.weight, expect)
    # a sparse mask: the first column's kept weights are exactly W; the result lowers the error
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.05
    keep[:, 0] = torch.arange(W.shape[0]) % 2 == 0
    some = _run(W, H, "int3:g32", loop, False, keep=keep)
    assert torch.equal(some.weight[keep[:, 0], 0], W[keep[:, 0], 0])
    assert not torch.equal(some.weight[~keep[:, 0], 0], W[~keep[:, 0], 0])

    def err(Q):
        D = W - Q
        return torch.einsum("ij,jk,ik->", D, H, D).item()
    assert err(some.weight) < err(none.weight)


def test_keep_mask_fused_equals_plain():
    W, H = _problem()
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(4)) < 0.1
    for act_order in (False, True):
        a = _run(W, H, "int4:g32:asym", "plain", act_order, keep=keep)
        b = _run(W, H, "int4:g32:asym", "fused", act_order, keep=keep)
        assert torch.equal(a.weight, b.weight)


def test_bad_arguments_name_the_problem():
    W, H = _problem()
    q = WeightQuantizer(QuantSpec.parse("int4:g32"))
    with pytest.raises(ValueError, match="unknown GPTQ loop"):
        gptq_shared([W], H, [q], loop="fast")
    with pytest.raises(ValueError, match="keep mask of shape"):
        gptq(W, H, q, keep=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one spec"):
        gptq_shared([W, W], H, [q, WeightQuantizer(QuantSpec.parse("int3:g32"))])
    with pytest.raises(ValueError, match="one input width"):
        gptq_shared([W, W[:, :32]], H, [q, q])


@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4", "mxfp8_e4m3", "mxfp6_e2m3"])
def test_block_formats_float32_path_matches_the_reference(spec):
    """WeightQuantizer's float32 block path (what GPTQ's per-column calls use) gives the float64
    reference's bits, over magnitudes from 1e-30 to 1e3, zero rows and float32 subnormals."""
    q = WeightQuantizer(QuantSpec.parse(spec))
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 3, 64)[:, None]
    W[3, :5] = 0
    W[4] = 0
    W[5, 7] = 1e-40
    q.prepare(W)
    for sl in q.groups(128):
        p = q.params(W[:, sl])
        xb = W[:, sl].double().reshape(64, 1, -1)
        lv = reference.block_elements(xb, p.scale, q.fmt, q.tensor_scale, q.spec.rounding, None, None)
        ref = reference.block_values(lv, p.scale, q.fmt, q.tensor_scale).reshape(64, -1).float()
        assert torch.equal(q.levels(W[:, sl], p), lv.reshape(64, -1))
        assert torch.equal(q.fake(W[:, sl], p), ref)


# --- CUDA: the Triton kernel against the torch loops ------------------------------------------------

def _grid_mismatch(a, b):
    return (a != b).float().mean().item()


@cuda
@pytest.mark.parametrize("spec", ["int4:g64", "int3:g32", "int2:g32:asym", "e2m1fn:g32", "mxfp4", "nvfp4", "nf4:g64",
                                  "int3:g48"])
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_fused_loop_agrees_with_the_plain_loop(spec, act_order):
    """Triton kernel (nf4: the torch fused loop, on the GPU) against the plain loop on CUDA."""
    W, H = _problem(rows=300, cols=320, n=512, device="cuda")
    plain = _run(W, H, spec, "plain", act_order)
    fused = _run(W, H, spec, "fused", act_order)
    # the same grid points except rare ties moved by a fused multiply-add
    assert _grid_mismatch(fused.weight, plain.weight) < 2e-3
    D = fused.weight - plain.weight
    errs = [torch.einsum("ij,jk,ik->", W - Q, H, W - Q).item() for Q in (plain.weight, fused.weight)]
    assert errs[1] == pytest.approx(errs[0], rel=1e-3)
    assert torch.isfinite(D).all()


@cuda
def test_triton_loop_matches_exactly_on_a_small_case():
    W, H = _problem(rows=8, cols=32, n=64, device="cuda")
    plain = _run(W, H, "int4:g16", "plain", True, block_size=16)
    fused = _run(W, H, "int4:g16", "fused", True, block_size=16)
    assert torch.equal(fused.weight, plain.weight)


@cuda
def test_triton_keep_mask_and_stacked_rows():
    W, H = _problem(rows=96, cols=256, n=512, device="cuda")
    keep = torch.rand(W.shape, device="cuda") < 0.05
    plain = _run(W, H, "int3:g64", "plain", True, keep=keep)
    fused = _run(W, H, "int3:g64", "fused", True, keep=keep)
    # rounded weights: the same grid points; kept ones: the same float up to the update's rounding
    assert _grid_mismatch(fused.weight[~keep], plain.weight[~keep]) < 2e-3
    torch.testing.assert_close(fused.weight[keep], plain.weight[keep], rtol=1e-5, atol=1e-5)
    everything = _run(W, H, "int3:g64", "fused", True, keep=torch.ones_like(keep))
    expect = W.clone()
    expect[:, 7] = 0
    assert torch.equal(everything.weight, expect)
    parts = [W[:32], W[32:]]
    qs = [WeightQuantizer(QuantSpec.parse("nvfp4")) for _ in parts]
    together = gptq_shared(parts, H, qs, act_order=True)
    for Wp, res in zip(parts, together):
        alone = gptq(Wp, H, WeightQuantizer(QuantSpec.parse("nvfp4")), act_order=True)
        assert _grid_mismatch(res.weight, alone.weight) < 2e-3


@cuda
def test_triton_loop_agrees_with_the_cpu_loop():
    W, H = _problem(rows=128, cols=256, n=512)
    cpu = _run(W, H, "int3:g64", "fused", True)
    gpu = _run(W.cuda(), H.cuda(), "int3:g64", "fused", True)
    assert _grid_mismatch(gpu.weight.cpu(), cpu.weight) < 2e-3


def test_small_float_grids_round_by_table_as_the_reference():
    """The per-column table rounding (round-half-even, saturating) of small float formats gives the
    reference's values and signs on every grid point, midpoint (the ties), their float32
    neighbours, beyond the largest value, nan, -0 and random values."""
    from lowbit.formats import format
    from lowbit.quant.weight import float_table, round_by_table

    claimed = []
    for name in ["e2m1fn", "e3m2fn", "e2m3fn", "e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz", "e3m4", "p3109_k8p3",
                 "int4", "nf4", "bf16"]:
        fmt = format(name)
        table = float_table(fmt)
        if table is None:
            continue
        claimed.append(name)
        mags, mids = table
        pts = torch.cat([mags, mids, torch.tensor([fmt.max * 2, 1e30, 1e-30, 1e-45, 0.0])])
        pts = torch.cat([pts, torch.nextafter(pts, torch.full_like(pts, float("inf"))),
                         torch.nextafter(pts, torch.zeros_like(pts))])
        y = torch.cat([pts, -pts, torch.tensor([float("nan"), -0.0]),
                       torch.randn(4000, generator=torch.Generator().manual_seed(0)) * fmt.max]).float()
        got = round_by_table(y, table, fmt.has_negative_zero)
        ref = reference.round_element(y.double(), fmt, "nearest_even", "saturate").float()
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), name
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref)), name
        assert torch.equal(torch.signbit(got), torch.signbit(ref)), name
    assert "e2m1fn" in claimed and "e4m3fn" in claimed
    assert "int4" not in claimed and "nf4" not in claimed and "bf16" not in claimed
