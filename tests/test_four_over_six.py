"""Four Over Six block scales (``nvfp4:4over6``): spec parsing and refusals, equality with a brute
force over the two candidate scales computed through the reference kernels, never worse than the
plain amax rule per block, activations / KV / GPTQ / packing."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.export.packing import pack_weight, unpack_weight
from lowbit.formats import format
from lowbit.kernels import reference
from lowbit.ptq.gptq import gptq
from lowbit.quant.activation import quantize_activation
from lowbit.quant.four_over_six import check_four_over_six, four_over_six_scales, quantize_blocks_dynamic
from lowbit.quant.kv import quantize_kv
from lowbit.quant.spec import QuantSpec, scheme
from lowbit.quant.weight import GroupParams, WeightQuantizer

NV = format("nvfp4")
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def brute(xb: torch.Tensor, ts, rounding="nearest_even"):
    """Independent reference: both candidate scales through kernels.reference (float64 blocks),
    the one with the smaller float64 squared error (ties: the amax rule). Returns (values, scales,
    values under the plain amax rule)."""
    xd = xb.double().reshape(xb.shape[0], 1, xb.shape[1])
    s6 = reference.block_scales(xd, NV, ts)
    amax = xd.abs().amax(dim=-1)
    s32 = amax.float() / 4.0
    s32 = s32 / ts if ts is not None else s32
    s4 = reference.round_element(s32.double(), NV.scale, "nearest_even", "saturate")
    good = torch.isfinite(amax) & (amax > 0)
    s4 = torch.where(good, s4, s6)
    out = []
    for s in (s6, s4):
        q = reference.block_elements(xd, s, NV, ts, rounding, None, None)
        v = reference.block_values(q, s, NV, ts)
        out.append((v, ((v.float().double() - xd.float().double()) ** 2).sum(-1)))
    (v6, e6), (v4, e4) = out
    pick = good & (e4 < e6)
    vals = torch.where(pick.unsqueeze(-1), v4, v6).reshape(xb.shape).float()
    return vals, torch.where(pick, s4, s6), v6.reshape(xb.shape).float()


def ours(xb: torch.Tensor, spec="nvfp4:4over6"):
    q = WeightQuantizer(QuantSpec.parse(spec))
    q.prepare(xb)
    p = q.params(xb)
    return q.fake(xb, p), p.scale, q.tensor_scale


# --- spec ----------------------------------------------------------------------------------------

def test_spec_round_trips_and_composes_into_schemes():
    s = QuantSpec.parse("nvfp4:4over6")
    assert s.scale_method == "4over6" and str(s) == "nvfp4:4over6" and QuantSpec.parse(str(s)) == s
    assert QuantSpec.from_dict(s.to_dict()) == s
    w, a = scheme("nvfp4:mse+nvfp4:4over6")
    assert w.scale_method == "mse" and a == s
    assert str(QuantSpec.parse("nvfp4:4over6:toward_zero")) == "nvfp4:4over6:toward_zero"


@pytest.mark.parametrize("text,words", [
    ("mxfp4:4over6", "powers of two"),
    ("mxfp6_e3m2:4over6", "powers of two"),
    ("int4:g64:4over6", "no block scales"),
    ("e2m1fn:g32:4over6", "no block scales"),
    ("nvfp4:4over6:stochastic", "random"),
])
def test_refused_where_it_does_not_apply(text, words):
    with pytest.raises(ValueError, match=words):
        QuantSpec.parse(text)
    with pytest.raises(ValueError):
        scheme(f"nvfp4+{text}")


def test_block_formats_with_other_elements_are_refused():
    assert "E2M1" in check_four_over_six(format("block(e2m3fn,e4m3fn,16,tensor)"))
    assert check_four_over_six(format("block(e2m1fn,e4m3fn,32)")) is None  # any E2M1 / E4M3 block
    with pytest.raises(ValueError, match="E2M1"):
        QuantSpec.parse("block(e3m2fn,e4m3fn,16):4over6")


def test_unknown_option_error_lists_4over6():
    with pytest.raises(ValueError, match="4over6"):
        QuantSpec.parse("nvfp4:4over7")


# --- the choice ----------------------------------------------------------------------------------

def test_equals_brute_force_over_the_two_candidates():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3000, 16, generator=g),                   # Gaussian blocks
                   torch.rand(1000, 16, generator=g) * 2 - 1,             # uniform
                   torch.randn(1000, 16, generator=g) ** 3,               # heavy tails
                   torch.randn(500, 16, generator=g) * 1e-6,              # tiny: subnormal scales
                   torch.randn(500, 16, generator=g) * 300]).float()     # near the tensor amax
    got, s, ts = ours(x)
    want, ws, plain = brute(x, ts)
    assert torch.equal(s, ws)
    assert torch.equal(got, want)
    chose4 = (s != reference.block_scales(x.double().unsqueeze(1), NV, ts)).float().mean()
    assert 0.05 < float(chose4) < 0.95  # both candidates really occur
    # plain nvfp4 is the all-6 choice: same tensor scale, same values as the plain quantizer
    assert torch.equal(ours(x, "nvfp4")[0], plain)


def test_exhaustive_two_level_blocks():
    """Every block (1, v, v, ..., v) for v over a fine grid of [0, 1] and both signs: equals brute
    force; the choice follows the grid's geometry (v near 0.75 or 0.5 of the amax: 4 wins)."""
    v = torch.linspace(0, 1, 4001)
    x = torch.ones(v.numel() * 2 + 1, 16)
    x[:-1, 1:] = torch.cat([v, -v]).unsqueeze(1)
    x[-1] = 10.0  # the tensor amax elsewhere: the other blocks' 4-candidates do not saturate
    got, s, ts = ours(x)
    want, ws, _ = brute(x, ts)
    assert torch.equal(s, ws) and torch.equal(got, want)
    at = lambda val: int(torch.argmin((v - val).abs()))
    s6 = reference.block_scales(x.double().unsqueeze(1), NV, ts)
    assert s[at(0.75)] != s6[at(0.75)]   # 0.75 * 4 = 3 exactly, while 0.75 * 6 = 4.5 is a tie
    assert s[at(0.8)] != s6[at(0.8)]     # 3.2 -> 3 beats 4.8 -> 4
    assert s[at(2 / 3)] == s6[at(2 / 3)]  # 4 exactly under the 6-scale
    assert s[at(0.0)] == s6[at(0.0)]     # (1, 0, ...): both exact, tie keeps the amax rule


@SETTINGS
@given(st.lists(st.floats(-1e4, 1e4, width=32, allow_nan=False), min_size=16, max_size=16 * 6)
       .filter(lambda v: len(v) % 16 == 0),
       st.floats(1e-3, 1e3))
def test_property_never_worse_than_the_amax_rule_and_equal_to_brute_force(vals, mag):
    x = (torch.tensor(vals, dtype=torch.float32) * np.float32(mag / 1e4)).reshape(-1, 16)
    got, s, ts = ours(x)
    want, ws, plain = brute(x, ts)
    assert torch.equal(got, want) and torch.equal(s, ws)
    e = ((got.double() - x.double()) ** 2).sum(1)
    e_plain = ((plain.double() - x.double()) ** 2).sum(1)
    assert bool((e <= e_plain).all())


def test_zero_nan_and_inf_blocks_keep_the_amax_rule():
    x = torch.randn(4, 16)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    q = WeightQuantizer(QuantSpec.parse("nvfp4:4over6"))
    q.prepare(x)
    p = q.params(x)
    base = WeightQuantizer(QuantSpec.parse("nvfp4"))
    base.prepare(x)
    b = base.params(x).scale
    assert torch.equal(p.scale[:3].nan_to_num(-1), b[:3].nan_to_num(-1))
    out = q.fake(x, p)
    assert (out[0] == 0).all() and torch.isnan(out[1:3]).all()


def test_column_weights_steer_the_choice():
    # block (1.5, 1.2 x15), no tensor scale: s6 = 0.25, s4 = 0.375, both exact for 1.5 (6 and 4);
    # unweighted, 4 wins (1.2 -> 3.2 -> 3, not 4.8 -> 4); if only the first element counts, the
    # two tie and the amax rule stays
    x = torch.full((1, 16), 1.2)
    x[0, 0] = 1.5
    q = WeightQuantizer(QuantSpec.parse("nvfp4:4over6"))
    fake = lambda a, s: q.fake(a, GroupParams(s))
    assert float(four_over_six_scales(x, NV, None, fake)) == 0.375
    c = torch.zeros(16)
    c[0] = 1
    assert float(four_over_six_scales(x, NV, None, fake, col_weight=c)) == 0.25
    c[1] = 1e-3
    assert float(four_over_six_scales(x, NV, None, fake, col_weight=c)) == 0.375


def test_directed_rounding_is_honoured():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=g)
    got, s, ts = ours(x, "nvfp4:4over6:toward_zero")
    want, ws, _ = brute(x, ts, "toward_zero")
    assert torch.equal(s, ws) and torch.equal(got, want)


# --- activations, KV, GPTQ -----------------------------------------------------------------------

def test_activations_are_quantized_per_block_on_the_fly():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 64, generator=g) * torch.rand(64, generator=g) * 5
    spec = QuantSpec.parse("nvfp4:4over6")
    y = quantize_activation(x, spec)
    ts = reference.tensor_scale(x.double(), NV)
    want, _, plain = brute(x.reshape(-1, 16), ts)
    assert torch.equal(y, want.reshape(x.shape))
    # the plain activation path is untouched and is the all-6 choice
    assert torch.equal(quantize_activation(x, QuantSpec.parse("nvfp4")), plain.reshape(x.shape))
    assert ((y - x) ** 2).sum() < ((plain.reshape(x.shape) - x) ** 2).sum()
    # bf16 in, bf16 out; gradient passes straight through
    xb = x.bfloat16().requires_grad_()
    yb = quantize_activation(xb, spec)
    assert yb.dtype == torch.bfloat16
    yb.sum().backward()
    assert torch.equal(xb.grad, torch.ones_like(xb))
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_blocks_dynamic(torch.randn(3, 20), spec)


def test_activation_mse_is_honoured_and_beats_4over6():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 128, generator=g)
    err = {m: float(((quantize_activation(x, QuantSpec.parse(m)) - x) ** 2).sum())
           for m in ("nvfp4", "nvfp4:4over6", "nvfp4:mse")}
    assert err["nvfp4:mse"] <= err["nvfp4:4over6"] < err["nvfp4"]


def test_kv_states_take_4over6():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 8, 32, generator=g)
    y = quantize_kv(x, QuantSpec.parse("nvfp4:4over6"))
    ts = reference.tensor_scale(x.double(), NV)
    assert torch.equal(y, brute(x.reshape(-1, 16), ts)[0].reshape(x.shape))


def test_gptq_with_4over6_scales_packs_and_decodes_exactly():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(48, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    spec = QuantSpec.parse("nvfp4:4over6")
    q = WeightQuantizer(spec)
    res = gptq(W, H, q, act_order=True)
    packed = pack_weight(res.weight, q, res.params)
    assert torch.equal(unpack_weight(packed, spec, W.shape), res.weight)
    base = gptq(W, H, WeightQuantizer(QuantSpec.parse("nvfp4")), act_order=True)
    err = lambda Q: float(torch.einsum("ij,jk,ik->", W - Q, H, W - Q))
    assert err(res.weight) < err(base.weight)

