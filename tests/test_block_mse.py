"""MSE-searched block scales (``nvfp4:mse``, ``mxfp4:mse``) and the exponent-arithmetic rounding of
small float grids (quant/exp_round.py)."""
import pytest
import torch

from lowbit.export.packing import pack_weight, unpack_weight
from lowbit.formats import format
from lowbit.kernels import reference
from lowbit.ptq.gptq import gptq
from lowbit.quant.block_mse import candidate_offsets, mse_block_scales, scale_values
from lowbit.quant.exp_round import exp_params, round_by_exponent
from lowbit.quant.spec import QuantSpec, scheme
from lowbit.quant.weight import WeightQuantizer, float_table, round_by_table


# --- exponent rounding ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["e2m1fn", "e3m2fn", "e2m3fn", "e4m3fn", "e5m2", "e4m3fnuz"])
def test_exponent_rounding_matches_the_table_bit_for_bit(name):
    fmt = format(name)
    table = float_table(fmt)
    params = exp_params(fmt, table)
    assert params is not None
    g = torch.Generator().manual_seed(0)
    mags, mids = table
    # random values over the whole range, every midpoint nudged both ways, huge, tiny, inf, nan
    y = torch.cat([torch.randn(20000, generator=g) * float(mags[-1]) / 3,
                   torch.randn(20000, generator=g) * float(mags[1]) * 4,
                   mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids * 2),
                   torch.tensor([0.0, -0.0, 1e38, -1e38, 1e-40, float("inf"), -float("inf"), float("nan")])])
    y = torch.cat([y, -y]).float()
    want = round_by_table(y, table, fmt.has_negative_zero)
    got = round_by_exponent(y, params, fmt.has_negative_zero)
    assert torch.equal(torch.isnan(want), torch.isnan(got))
    assert torch.equal(want.nan_to_num(0.0).view(torch.int32), got.nan_to_num(0.0).view(torch.int32))


def test_formats_the_arithmetic_does_not_reproduce_keep_the_table():
    fmt = format("e2m1fn")
    mags, mids = float_table(fmt)
    # a table whose top value breaks the binade pattern must be refused
    bad = (torch.cat([mags[:-1], torch.tensor([5.0])]), torch.cat([mids[:-1], torch.tensor([4.5])]))
    assert exp_params(fmt, bad) is None
    assert exp_params(fmt, None) is None


# --- MSE block scales ----------------------------------------------------------------------------

def test_candidates_span_half_to_one_and_a_half_the_amax_scale():
    nv, mx = format("nvfp4"), format("mxfp4")
    vals = scale_values(nv)
    assert torch.all(vals[1:] > vals[:-1]) and float(vals[-1]) == 448.0
    offs = candidate_offsets(nv)
    assert offs.start < 0 < offs.stop - 1
    one = int(torch.searchsorted(vals, torch.tensor(1.0, dtype=torch.float64)))
    assert float(vals[one + offs.start]) >= 0.5 and float(vals[one + offs.stop - 1]) >= 1.5
    assert list(candidate_offsets(mx)) == [-1, 0, 1]  # powers of two: half, same, double


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_mse_scales_never_lose_to_absmax_and_usually_win(name):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 128, generator=g)
    W[:, 3] *= 8  # an outlier column
    err = {}
    for method in ("", ":mse"):
        q = WeightQuantizer(QuantSpec.parse(name + method))
        Q, params = q.rtn(W)
        err[method] = (Q - W).pow(2).reshape(64, -1, q.fmt.size).sum(-1)
        if method:
            scales = torch.cat([p.scale for p in params], dim=1)
            vals = scale_values(q.fmt)
            assert torch.isin(scales.flatten(), vals).all()  # every scale is a stored scale value
    assert (err[":mse"] <= err[""] + 1e-12).all()
    assert err[":mse"].sum() < 0.97 * err[""].sum()


def test_mse_search_is_exhaustive_over_its_candidates():
    """Per block, the chosen scale's error is the least over all candidates tried."""
    fmt = format("nvfp4")
    q = WeightQuantizer(QuantSpec.parse("nvfp4:mse"))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    q.prepare(x)
    base = reference.block_scales(x.double().reshape(32, 1, 16), fmt, q.tensor_scale)
    fake = lambda w, s: q.fake(w, type(q.params(x))(s))
    best = mse_block_scales(x, base, fmt, fake)
    vals = scale_values(fmt)
    idx = torch.searchsorted(vals, base.flatten())
    best_err = (fake(x, best) - x).pow(2).sum(1)
    for k in candidate_offsets(fmt):
        cand = vals[(idx + k).clamp(0, vals.numel() - 1)].reshape(-1, 1)
        assert (best_err <= (fake(x, cand) - x).pow(2).sum(1) + 1e-12).all()


def test_column_weights_steer_the_search():
    fmt = format("nvfp4")
    q = WeightQuantizer(QuantSpec.parse("nvfp4:mse"))
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(3))
    q.prepare(x)
    base = reference.block_scales(x.double().reshape(200, 1, 16), fmt, q.tensor_scale)
    fake = lambda w, s: q.fake(w, type(q.params(x))(s))
    c = torch.ones(16)
    c[0] = 1000.0  # column 0 dominates: its error must be no larger than under unweighted MSE
    s_plain = mse_block_scales(x, base, fmt, fake)
    s_w = mse_block_scales(x, base, fmt, fake, col_weight=c)
    e_plain = (fake(x, s_plain) - x)[:, 0].pow(2).sum()
    e_w = (fake(x, s_w) - x)[:, 0].pow(2).sum()
    assert e_w < e_plain
    assert not torch.equal(s_plain, s_w)


def test_zero_and_nonfinite_blocks_keep_their_scale():
    q = WeightQuantizer(QuantSpec.parse("nvfp4:mse"))
    x = torch.randn(4, 32)
    x[1, :16] = 0.0
    x[2, 16:] = float("nan")
    q.prepare(torch.nan_to_num(x))
    Q, params = q.rtn(x)
    assert torch.equal(Q[1, :16], torch.zeros(16))
    assert torch.isnan(Q[2, 16:]).all()
    assert torch.isfinite(Q[[0, 3]]).all()


@pytest.mark.parametrize("name", ["nvfp4:mse", "mxfp4:mse"])
def test_gptq_with_mse_scales_packs_and_decodes_exactly(name):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(48, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    spec = QuantSpec.parse(name)
    assert str(spec) == name and scheme(name)[0] == spec
    q = WeightQuantizer(spec)
    res = gptq(W, H, q, act_order=True)
    packed = pack_weight(res.weight, q, res.params)
    assert torch.equal(unpack_weight(packed, spec, W.shape), res.weight)
    # and GPTQ with MSE scales has no larger output error than GPTQ with absmax scales here
    base = gptq(W, H, WeightQuantizer(QuantSpec.parse(name.split(":")[0])), act_order=True)
    err = lambda Q: float(torch.einsum("ij,jk,ik->", W - Q, H, W - Q))
    assert err(res.weight) < err(base.weight)


# --- one online rotation per shared input --------------------------------------------------------

def test_layers_reading_one_input_through_equal_transforms_rotate_it_once(monkeypatch):
    from lowbit.transforms import online
    from lowbit.transforms.online import InputTransform

    calls = []
    real = online.rotate
    monkeypatch.setattr(online, "rotate", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = torch.rand(64) + 0.5
    a = InputTransform(64, rotation=True, block=64, seed=3, scale=s)
    b = InputTransform(64, rotation=True, block=64, seed=3, scale=s.clone())
    c = InputTransform(64, rotation=True, block=64, seed=4, scale=s.clone())
    x = torch.randn(5, 64)
    ya = a(x)
    assert torch.equal(b(x), ya) and len(calls) == 1          # equal transform, same tensor: reused
    yc = c(x)
    assert len(calls) == 2 and not torch.equal(yc, ya)        # other signs: computed
    assert torch.equal(a(x.clone()), ya) and len(calls) == 3  # another tensor: computed
    x2 = x.clone()
    a(x2)
    x2.mul_(2)                                                # changed in place: computed again
    assert torch.allclose(b(x2), 2 * ya, atol=1e-5) and len(calls) == 5
    b.scale.mul_(2)                                           # a transform changed since: computed
    y = a(x)
    assert torch.allclose(b(x), y / 2, atol=1e-5) and len(calls) == 7


def test_the_shared_rotation_under_inference_mode_notices_a_change_in_place(monkeypatch):
    from lowbit.transforms import online
    from lowbit.transforms.online import InputTransform

    calls = []
    real = online.rotate
    monkeypatch.setattr(online, "rotate", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = InputTransform(32, rotation=True, block=32, seed=1)
    b = InputTransform(32, rotation=True, block=32, seed=1)
    with torch.inference_mode():
        x = torch.randn(4, 32)
        y = a(x)
        assert torch.equal(b(x), y) and len(calls) == 1
        x[0, 0] += 1.0
        assert not torch.equal(b(x), y) and len(calls) == 2


@pytest.mark.parametrize("name", ["nvfp4", "block(e2m1,e4m3,32,tensor)", "block(e2m1,e4m3,16)"])
def test_float32_amax_rule_scales_equal_the_reference(name):
    from lowbit.quant.exp_round import amax_block_scales

    fmt = format(name)
    g = torch.Generator().manual_seed(5)
    size = fmt.size
    w = torch.randn(3000, size, generator=g) * torch.logspace(-12, 12, 3000).reshape(-1, 1).float()
    w[0] = 0.0
    w[1, 3] = float("nan")
    w[2, 0] = float("inf")
    w[3] = 1e38
    for ts in ([None] if not fmt.tensor_scale else []) + ([reference.tensor_scale(w[4:].double(), fmt),
                                                           torch.tensor(1e-30), torch.tensor(3.7)]
                                                          if fmt.tensor_scale else []):
        want = reference.block_scales(w.double().reshape(-1, 1, size), fmt, ts)
        got = amax_block_scales(w, fmt, ts)
        assert torch.equal(torch.isnan(want), torch.isnan(got))
        assert torch.equal(want.nan_to_num(0.0), got.nan_to_num(0.0))
    assert amax_block_scales(w, format("mxfp4"), None) is None  # power-of-two scales: the reference


# --- with the outlier transforms -----------------------------------------------------------------

@pytest.mark.parametrize("rotate", ["block", "hadamard"])
def test_rotated_model_with_mse_scales_saves_and_reloads_identically(tmp_path, rotate):
    transformers = pytest.importorskip("transformers")
    import copy

    from lowbit.export.checkpoint import load_quantized, save_quantized
    from lowbit.ptq.pipeline import quantize_model
    from lowbit.quant.plan import Plan
    from lowbit.transforms.apply import apply_outlier_transforms

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[i : i + 4]} for i in range(0, 8, 4)]
    with torch.no_grad():
        ref = model(ids).logits
    err = {}
    for scheme_name in ("nvfp4", "nvfp4:mse"):
        m = copy.deepcopy(model)
        plan = Plan.from_scheme(scheme_name)
        apply_outlier_transforms(m, plan, batches, rotate=rotate)
        res = quantize_model(m, plan, batches, "gptq", progress=False)
        assert {l.weight_spec for l in res.layers} == {scheme_name}
        save_quantized(m, res.packed, tmp_path / scheme_name, kind="causal_lm")
        m2, _, meta = load_quantized(tmp_path / scheme_name)
        with torch.no_grad():
            out, out2 = m(ids).logits, m2(ids).logits
        assert torch.equal(out, out2)
        err[scheme_name] = sum(l.rel_error for l in res.layers)
    assert err["nvfp4:mse"] < err["nvfp4"]  # summed GPTQ output error of the layers
