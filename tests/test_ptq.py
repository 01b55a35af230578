"""PTQ core on tensors and on a tiny random Llama: specs, group fitting, GPTQ, packing, pipeline."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.export.packing import pack_bits, pack_weight, unpack_bits, unpack_weight
from lowbit.kernels import reference
from lowbit.ptq.gptq import HessianAccumulator, gptq
from lowbit.quant.plan import Plan
from lowbit.quant.spec import SCHEMES, QuantSpec, scheme
from lowbit.quant.weight import WeightQuantizer
from _tiny import batches, token_ids, tiny_llama

SPECS = ["int4:g64", "int3:g128", "int2:g32:asym", "int4:g32:asym:mse", "int8:channel", "int4:tensor",
         "e2m1fn:g32", "e4m3fn:channel", "nf4:g64", "fp4_bnb:g64", "mxfp4", "mxfp8_e4m3", "nvfp4",
         "int3:g64:p99.5", "int4:g64:stochastic"]


def _problem(rows=48, cols=192, n=512, seed=0):
    """A weight and a correlated input distribution (as in real layers, where GPTQ matters)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix
    acc = HessianAccumulator(cols)
    acc.add(X[: n // 2])
    acc.add(X[n // 2 :])
    return W, X, acc.H


def _output_error(W, Q, X):
    return ((X @ (W - Q).t()) ** 2).sum().item()


@pytest.mark.parametrize("text", SPECS)
def test_spec_string_round_trips(text):
    spec = QuantSpec.parse(text)
    assert QuantSpec.parse(str(spec)) == spec
    assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("bad, match", [
    ("int4:g0", "group_size"), ("e2m1fn:g32:asym", "asymmetric"), ("mxfp4:g64", "block format"),
    ("int4:weird", "unknown option"), ("int99:g64", "integer width"), ("", "quant spec"),
])
def test_bad_specs_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec.parse(bad)


def test_every_named_scheme_parses():
    for name in SCHEMES:
        w, a = scheme(name)
        assert isinstance(w, QuantSpec)
    with pytest.raises(ValueError, match="unknown scheme"):
        scheme("w5g7x")


def test_hessian_accumulator_matches_definition():
    X = torch.randn(300, 16, dtype=torch.float64).float()
    acc = HessianAccumulator(16)
    for chunk in X.split(70):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * X.t() @ X / 300, rtol=1e-5, atol=1e-5)


def test_ragged_groups_are_described_and_fitted_separately():
    q = WeightQuantizer(QuantSpec.parse("int4:g128"))
    assert [s.stop - s.start for s in q.groups(576)] == [128, 128, 128, 128, 64]
    assert q.describe_groups(576) == "4 groups of 128 and a last group of 64 along the 576 input features"
    W = torch.randn(8, 576)
    W[:, 512:] *= 100  # the last group's scale must not leak into the others
    Q, params = q.rtn(W)
    assert len(params) == 5
    assert torch.all(params[4].scale > 10 * params[0].scale)
    for sl, p in zip(q.groups(576), params):
        assert torch.equal(Q[:, sl], lowbit.quantize(W[:, sl], "int4", scale=p.scale))


def test_bits_per_weight_counts_scales_and_zero_points():
    assert WeightQuantizer(QuantSpec.parse("int3:g64")).bits_per_weight(576) == pytest.approx(3 + 16 / 64)
    assert WeightQuantizer(QuantSpec.parse("int4:g128")).bits_per_weight(576) == pytest.approx(4 + 5 * 16 / 576)
    assert WeightQuantizer(QuantSpec.parse("int4:g32:asym")).bits_per_weight(64) == pytest.approx(4 + 20 / 32)
    assert WeightQuantizer(QuantSpec.parse("mxfp4")).bits_per_weight(64) == pytest.approx(4.25)
    assert WeightQuantizer(QuantSpec.parse("nvfp4")).bits_per_weight(64) == pytest.approx(4.5)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3", "nvfp4", "mxint8"])
def test_rtn_of_block_formats_equals_the_core_quantize(fmt):
    W = torch.randn(16, 128) * torch.logspace(-2, 2, 128)
    Q, _ = WeightQuantizer(QuantSpec.parse(fmt)).rtn(W)
    assert torch.equal(Q, lowbit.quantize(W, fmt, axis=-1))


def test_integer_fast_path_matches_reference_rounding():
    q = WeightQuantizer(QuantSpec.parse("int3:g64"))
    W = torch.randn(32, 64) * 3
    p = q.params(W)
    y = (W / p.scale).double()
    expected = reference.round_element(y, lowbit.format("int3"), "nearest_even", "saturate")
    assert torch.equal(q.levels(W, p), expected)


@pytest.mark.parametrize("text", ["int3:g64", "int2:g32:asym", "e2m1fn:g32", "nf4:g64", "mxfp4", "nvfp4",
                                  "int4:channel"])
def test_gptq_beats_rtn_on_output_error(text):
    W, X, H = _problem()
    q = WeightQuantizer(QuantSpec.parse(text))
    rtn, _ = q.rtn(W)
    res = gptq(W, H, WeightQuantizer(QuantSpec.parse(text)))
    assert _output_error(W, res.weight, X) < 0.9 * _output_error(W, rtn, X)


@pytest.mark.parametrize("text", ["int3:g64", "mxfp4", "nvfp4", "e2m1fn:g32"])
def test_gptq_output_is_on_the_grid_of_its_groups(text):
    W, X, H = _problem()
    q = WeightQuantizer(QuantSpec.parse(text))
    res = gptq(W, H, q)
    for sl, p in zip(q.groups(W.shape[1]), res.params):
        assert torch.equal(q.fake(res.weight[:, sl], p), res.weight[:, sl])


def test_gptq_act_order_and_dead_columns():
    W, X, H = _problem()
    H[5, :] = 0
    H[:, 5] = 0
    res = gptq(W, H, WeightQuantizer(QuantSpec.parse("int3:g64")), act_order=True)
    assert res.dead_columns == 1
    assert torch.all(res.weight[:, 5] == 0)
    rtn, _ = WeightQuantizer(QuantSpec.parse("int3:g64")).rtn(W)
    assert _output_error(W, res.weight, X) < _output_error(W, rtn, X)


def test_gptq_survives_a_singular_hessian_by_damping_more():
    W, _, _ = _problem(cols=64)
    X = torch.randn(8, 64)  # rank 8 << 64
    H = 2 * X.t() @ X / 8
    res = gptq(W, H, WeightQuantizer(QuantSpec.parse("int4:g32")), percdamp=0.0)
    assert torch.isfinite(res.weight).all()
    assert res.damping > 0


def test_gptq_rejects_mismatched_or_nonfinite_hessian():
    W = torch.randn(4, 8)
    with pytest.raises(ValueError, match="does not match"):
        gptq(W, torch.eye(7), WeightQuantizer(QuantSpec.parse("int4")))
    H = torch.eye(8)
    H[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nan"):
        gptq(W, H, WeightQuantizer(QuantSpec.parse("int4")))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_pack_bits_round_trips(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("text", SPECS)
def test_packed_weight_decodes_to_the_same_bits(text):
    W, X, H = _problem(rows=24, cols=160 if "mx" not in text else 128)
    if "nvfp4" in text:
        W = W[:, :144]
        H = H[:144, :144]
    q = WeightQuantizer(QuantSpec.parse(text))
    res = gptq(W, H, q)
    packed = pack_weight(res.weight, q, res.params)
    assert torch.equal(unpack_weight(packed, QuantSpec.parse(text), tuple(W.shape)), res.weight)


def test_plan_rules_override_in_order_and_skip_the_head():
    plan = Plan({"*": "int4:g64", "*.mlp.down_proj": "int8", "*.layers.0.*": None}, {"*": "int8:token"})
    assert str(plan.weight_spec("model.layers.3.self_attn.q_proj")) == "int4:g64"
    assert str(plan.weight_spec("model.layers.3.mlp.down_proj")) == "int8"
    assert plan.weight_spec("model.layers.0.mlp.up_proj") is None
    assert plan.weight_spec("lm_head") is None
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    searched = Plan.from_dict({"layers": {"model.layers.1.mlp.up_proj": "int2:g64"}})
    assert str(searched.weight_spec("model.layers.1.mlp.up_proj")) == "int2:g64"
    assert searched.weight_spec("model.layers.1.mlp.down_proj") is None


# --- the pipeline on a tiny random Llama --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    ids = token_ids(8, 24)
    return tiny_llama(), ids, batches(ids, 4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("scheme_name", ["w3g64", "nvfp4", "w4a8", "int4:g48:asym"])
def test_pipeline_checkpoint_reloads_bit_identically(tiny, tmp_path, scheme_name):
    from lowbit.export.checkpoint import load_quantized, save_quantized
    from lowbit.ptq.pipeline import quantize_model

    model, ids, batches = tiny
    m = copy.deepcopy(model)
    res = quantize_model(m, Plan.from_scheme(scheme_name), batches, "gptq", progress=False)
    assert len(res.layers) == 14 and not res.skipped
    size = save_quantized(m, res.packed, tmp_path, kind="causal_lm")
    assert size > 0
    m2, _, meta = load_quantized(tmp_path)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


def test_pipeline_gptq_beats_rtn_on_the_model(tiny):
    from lowbit.ptq.pipeline import quantize_model

    model, ids, batches = tiny
    ref = _logits(model, ids)
    errs = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        quantize_model(m, Plan.from_scheme("w3g64"), batches, method, progress=False)
        errs[method] = ((_logits(m, ids) - ref) ** 2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_pipeline_resumes_after_interruption(tiny, tmp_path):
    from lowbit.ptq.pipeline import quantize_model

    model, ids, batches = tiny
    full = copy.deepcopy(model)
    quantize_model(full, Plan.from_scheme("w3g64"), batches, "gptq", progress=False)

    class Stop(Exception):
        pass

    def stop_in_second_block(layer):
        if ".1." in layer.name:
            raise Stop

    m = copy.deepcopy(model)
    with pytest.raises(Stop):
        quantize_model(m, Plan.from_scheme("w3g64"), batches, "gptq", progress=False, progress_dir=tmp_path,
                       on_layer=stop_in_second_block)
    assert (tmp_path / "progress.json").is_file()
    resumed = copy.deepcopy(model)
    res = quantize_model(resumed, Plan.from_scheme("w3g64"), batches, "gptq", progress=False, progress_dir=tmp_path)
    assert len(res.layers) == 14
    assert torch.equal(_logits(resumed, ids), _logits(full, ids))


def test_layer_the_format_cannot_fit_is_kept_with_a_warning(tiny):
    from lowbit.ptq.pipeline import quantize_model

    model, ids, batches = tiny
    m = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="left in full precision"):
        res = quantize_model(m, Plan({"*": "block(e2m1fn,e8m0fnu,64)"}), batches, "rtn", progress=False)
    assert set(res.skipped) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "multiple of 64" in res.skipped["model.layers.0.mlp.down_proj"]


def test_nan_weights_stop_the_run_naming_the_layer(tiny):
    from lowbit.ptq.pipeline import quantize_model

    model, ids, batches = tiny
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="up_proj"):
        quantize_model(m, Plan.from_scheme("w4g64"), batches, "rtn", progress=False)


def test_layers_fed_the_same_input_share_one_hessian(tiny):
    from lowbit.models.blocks import capture_block_inputs, linear_layers
    from lowbit.ptq.pipeline import block_hessians

    model, ids, batches = tiny
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, batches)
    with torch.inference_mode():
        hess = block_hessians(block, inputs, [i.hidden for i in inputs], linear_layers(block, "b"))
    attn = "b.self_attn."
    assert hess[attn + "q_proj"] is hess[attn + "k_proj"] is hess[attn + "v_proj"]
    assert hess["b.mlp.gate_proj"] is hess["b.mlp.up_proj"]
    assert hess[attn + "o_proj"] is not hess[attn + "q_proj"]
    # and the shared accumulator holds the real statistic of that input
    x = torch.cat([model.model.layers[0].input_layernorm(i.hidden) for i in inputs]).reshape(-1, 64)
    assert torch.allclose(hess[attn + "q_proj"].H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
