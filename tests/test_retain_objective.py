"""The loss model of the retention ratio program: the output Fisher (downstream sensitivity) of each
layer, the Fisher-weighted layer error, GPTQ error curves, and the options that select them."""
import copy

import pytest
import torch

from lowbit.ptq.gptq import HessianAccumulator
from lowbit.ptq.retain_alloc import layer_curve, ratio_grid, solve_allocation
from lowbit.ptq.retain_fisher import output_fisher
from lowbit.ptq.retention import (RetainConfig, RetainFormat, gptq_retained, hessian_saliency, rtn_retained,
                                  top_mask)
from lowbit.quant.plan import Plan
from lowbit.quant.spec import QuantSpec
from lowbit.quant.weight import WeightQuantizer


@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": ids[i: i + 4]} for i in range(0, 8, 4)]


def _layer_problem(rows=16, cols=128, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W.view(-1)[torch.randint(0, rows * cols, (rows * cols // 50,), generator=g)] *= 8
    acc = HessianAccumulator(cols)
    acc.add(torch.randn(n, cols, generator=g) @ (torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5))
    return W, acc.H


def test_output_fisher_is_the_mean_squared_loss_gradient_of_each_output_channel(tiny):
    # independent reference: add a zero tensor to the layer's output and differentiate the summed
    # cross-entropy with respect to it
    model, batches = tiny
    name = "model.layers.1.mlp.down_proj"
    G = output_fisher(model, batches, [name, "model.layers.0.self_attn.q_proj"], seqs=8)
    lin = model.get_submodule(name)
    acc, tokens = torch.zeros(lin.out_features, dtype=torch.float64), 0
    for b in batches:
        ids = b["input_ids"]
        delta = torch.zeros(ids.shape[0], ids.shape[1], lin.out_features, requires_grad=True)
        h = lin.register_forward_hook(lambda m, a, o: o + delta)
        try:
            logits = model(input_ids=ids).logits
        finally:
            h.remove()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (g,) = torch.autograd.grad(loss, delta)
        acc += g.double().pow(2).sum((0, 1))
        tokens += ids.numel()
    torch.testing.assert_close(G[name], acc / tokens, rtol=1e-5, atol=1e-12)
    assert G["model.layers.0.self_attn.q_proj"].shape == (64,) and (G["model.layers.0.self_attn.q_proj"] > 0).all()
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # nothing left behind


def test_output_fisher_sees_what_the_loss_ignores(tiny):
    # the head reads only the first 32 hidden dimensions: the last block's output channels 32..63
    # reach the loss only through the final norm's RMS, so the loss cares far less about them
    model, batches = tiny
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.lm_head.weight[:, 32:] = 0
    G = output_fisher(m, batches, ["model.layers.1.mlp.down_proj"], seqs=8)["model.layers.1.mlp.down_proj"]
    assert G[32:].mean() < 0.05 * G[:32].mean()


def test_output_fisher_on_an_encoder_uses_embedding_projections():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[3:, 8:] = 0  # padded sentences
    batches = [{"input_ids": ids, "attention_mask": mask}]
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    a = output_fisher(model, batches, names, seqs=6, draws=4, seed=0)
    b = output_fisher(model, batches, names, seqs=6, draws=4, seed=0)
    assert all(torch.equal(a[n], b[n]) for n in names)  # the projections are seeded
    assert all(a[n].shape == (model.get_submodule(n).out_features,) and (a[n] > 0).all() for n in names)


def test_output_fisher_rejects_no_sequences(tiny):
    model, batches = tiny
    with pytest.raises(ValueError, match="at least one calibration sequence"):
        output_fisher(model, batches, ["model.layers.0.mlp.up_proj"], seqs=0)


def test_fisher_weighted_curve_is_a_quarter_of_the_row_weighted_output_error():
    W, H = _layer_problem()
    spec, rfmt = QuantSpec.parse("int3:g64"), RetainFormat("int8")
    G = torch.rand(W.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 5
    grid = [0.0, 0.01, 0.04]
    c = layer_curve("l", W, H, spec, rfmt, grid, row_weights=G)
    plain = layer_curve("l", W, H, spec, rfmt, grid)
    score = hessian_saliency(W, H, WeightQuantizer(spec))
    for r, e, e_plain in zip(grid, c.errors, plain.errors):
        D = (W - rtn_retained(W, top_mask(score, r), WeightQuantizer(spec), rfmt).weight).double()
        rows = torch.einsum("ij,jk,ik->i", D, H.double(), D)
        assert e == pytest.approx(0.25 * float((G * rows).sum()), rel=1e-9)
        assert e_plain == pytest.approx(float(rows.sum()), rel=1e-9)
    assert c.errors[0] > c.errors[-1]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_curves_equal_one_gptq_call_per_ratio(act_order):
    W, H = _layer_problem(seed=1)
    spec, rfmt = QuantSpec.parse("int3:g64"), RetainFormat("int8")
    grid = [0.0, 0.02, 0.05]
    c = layer_curve("l", W, H, spec, rfmt, grid, curves="gptq", gptq_kw={"act_order": act_order})
    rtn = layer_curve("l", W, H, spec, rfmt, grid)
    score = hessian_saliency(W, H, WeightQuantizer(spec))
    for r, e in zip(grid, c.errors):
        Q = gptq_retained(W, H, top_mask(score, r), WeightQuantizer(spec), rfmt, act_order=act_order).weight
        D = (W - Q).double()
        assert e == pytest.approx(float(torch.einsum("ij,jk,ik->", D, H.double(), D)), rel=1e-6)
    # GPTQ leaves less error than RTN at every ratio, and the bits do not depend on the curves
    assert all(g < r for g, r in zip(c.errors, rtn.errors)) and c.bits == rtn.bits


def test_the_loss_weights_move_the_budget_to_the_layer_the_loss_cares_about():
    # two layers with identical weights, inputs and local error curves; the loss cares 10x more about
    # layer b's outputs: the Fisher objective gives b the retention, the unweighted error cannot tell
    W, H = _layer_problem(seed=2)
    spec, rfmt = QuantSpec.parse("int3:g64"), RetainFormat("int8")
    grid = ratio_grid(0.02, (0.0, 1.0, 2.0))
    ones = torch.ones(W.shape[0], dtype=torch.float64)
    a = layer_curve("a", W, H, spec, rfmt, grid, row_weights=ones)
    b = layer_curve("b", W, H, spec, rfmt, grid, row_weights=10 * ones)
    alloc = solve_allocation([a, b], [], 0.02)
    assert alloc.ratios == {"a": 0.0, "b": 0.04}
    assert alloc.chosen_bits <= alloc.budget_bits
    assert alloc.objective < alloc.fixed_objective


def test_ratio_grid_and_config_options_are_checked():
    assert ratio_grid(0.01, (0, 1, 8)) == [0.0, 0.01, 0.08]
    with pytest.raises(ValueError, match="must include 1"):
        ratio_grid(0.01, (0, 2))
    with pytest.raises(ValueError, match="accepted: fisher, block"):
        RetainConfig(0.01, "int8", alloc="optimized", objective="hessian")
    with pytest.raises(ValueError, match="accepted: rtn, gptq"):
        RetainConfig(0.01, "int8", alloc="optimized", curves="obs")
    with pytest.raises(ValueError, match="including 1"):
        RetainConfig(0.01, "int8", alloc="optimized", grid=(0, 0.5, 2))
    with pytest.raises(ValueError, match=">= 0"):
        RetainConfig(0.01, "int8", alloc="optimized", grid=(-1, 1))
    d = RetainConfig(0.01, "int8", alloc="optimized", objective="block", curves="gptq", grid=(0, 1, 6)).to_dict()
    assert (d["objective"], d["curves"], d["grid"]) == ("block", "gptq", [0.0, 1.0, 6.0])


@pytest.mark.parametrize("objective,curves", [("fisher", "gptq"), ("block", "rtn")])
def test_pipeline_optimised_ratios_spend_the_fixed_budget(tiny, objective, curves):
    from lowbit.ptq.pipeline import quantize_model

    model, batches = tiny
    m = copy.deepcopy(model)
    cfg = RetainConfig(0.02, "int8", alloc="optimized", objective=objective, curves=curves,
                       grid=(0, 0.5, 1, 2, 6))
    res = quantize_model(m, Plan.from_scheme("w3g64"), batches, "gptq", progress=False, retain=cfg)
    a = cfg.allocation
    assert a["chosen_bits_per_weight"] <= a["budget_bits_per_weight"] + 1e-12
    assert a["modelled_error"] <= a["modelled_error_fixed"] + 1e-12
    assert set(cfg.ratios.values()) <= {0.0, 0.01, 0.02, 0.04, 0.12}
    assert len(set(cfg.ratios.values())) > 1  # the program did choose per layer
    assert {l.retain["ratio"] for l in res.layers} == set(cfg.ratios.values())


def test_cli_parses_the_objective_flags():
    from lowbit.cli import _retain_config, build_parser

    args = build_parser().parse_args(["quantize", "smollm2", "--scheme", "w3g64", "--retain", "1%",
                                      "--retain-alloc", "optimized", "--retain-objective", "block",
                                      "--retain-curves", "gptq", "--retain-grid", "0,1,2,8"])
    cfg = _retain_config(args)
    assert (cfg.objective, cfg.curves, cfg.grid) == ("block", "gptq", (0.0, 1.0, 2.0, 8.0))


def test_curves_use_the_hessian_of_what_a_transformed_layer_multiplies(tiny):
    # a layer with an online input transform (rotation/smoothing) stores W T and multiplies x T: its
    # curve must use T^T H T, as GPTQ does in the pipeline (here a stand-in transform returning 4 H)
    from lowbit.ptq.retain_alloc import measure_curves

    class Quadruple:
        def transform_hessian(self, H):
            return 4 * H

    model, batches = tiny
    m = copy.deepcopy(model)
    name = "model.layers.0.mlp.down_proj"
    kw = dict(objective="block", multipliers=(0, 1), progress=False)
    plain = {c.name: c for c in measure_curves(m, Plan.from_scheme("w3g64"), batches, RetainFormat("int8"), 0.02, **kw)[0]}
    m.get_submodule(name).input_transform = Quadruple()
    tf = {c.name: c for c in measure_curves(m, Plan.from_scheme("w3g64"), batches, RetainFormat("int8"), 0.02, **kw)[0]}
    assert tf[name].local_errors == pytest.approx([4 * e for e in plain[name].local_errors], rel=1e-5)
    assert tf[name].block_sensitivity == pytest.approx(plain[name].block_sensitivity / 4, rel=1e-5)
    other = "model.layers.0.mlp.up_proj"
    assert tf[other].local_errors == pytest.approx(plain[other].local_errors, rel=1e-9)
