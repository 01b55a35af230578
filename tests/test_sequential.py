"""Sequential (one pass per block) calibration: merged batches, the order layers are quantized in,
the Hessians they are quantized from, and the Hessian accumulator's symmetric path."""
import copy

import pytest
import torch
import transformers

from lowbit.models.blocks import capture_block_inputs, find_blocks, linear_layers, merge_block_inputs, run_block
from lowbit.ptq.gptq import HessianAccumulator
from lowbit.ptq.pipeline import quantize_model
from lowbit.ptq.sequential import run_sequential
from lowbit.quant.linear import QuantLinear
from lowbit.quant.plan import Plan
from lowbit.quant.spec import QuantSpec
from lowbit.quant.weight import WeightQuantizer
from _tiny import batches, token_ids, tiny_llama


@pytest.fixture(scope="module")
def tiny():
    ids = token_ids(6, 20)
    return tiny_llama(), ids, batches(ids, 3)


@pytest.mark.parametrize("cols", [96, 1536])  # the full product and the symmetric (syrk) path
def test_hessian_accumulator_matches_float64(cols):
    g = torch.Generator().manual_seed(cols)
    xs = [torch.randn(n, cols, generator=g) * (1 + torch.arange(cols) / cols) for n in (700, 1, 333)]
    with torch.inference_mode():
        acc = HessianAccumulator(cols)
        for x in xs:
            acc.add(x.reshape(1, -1, cols))
        H = acc.H
    X = torch.cat(xs).double()
    ref = 2 * X.t() @ X / X.shape[0]
    assert acc.n == X.shape[0]
    torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if cols >= HessianAccumulator.SYRK_MIN_COLS:
        assert torch.equal(H, H.t())


def test_merge_concatenates_batches_and_refuses_what_it_cannot(tiny):
    model, ids, batches = tiny
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], batches)
    hidden = [i.hidden for i in inputs]
    merged = merge_block_inputs(inputs, hidden)
    assert merged is not None and merged.hidden.shape[0] == ids.shape[0]
    with torch.inference_mode():
        apart = torch.cat([run_block(blocks[0], i, i.hidden) for i in inputs])
        together = run_block(blocks[0], merged, merged.hidden)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    # batches of different lengths cannot run as one
    ragged = capture_block_inputs(model, blocks[0], [{"input_ids": ids[:3]}, {"input_ids": ids[3:, :10]}])
    assert merge_block_inputs(ragged, [i.hidden for i in ragged]) is None


def _block_pass(model, hint=None):
    """Block 0 of a copy of ``model`` run sequentially with RTN int3 and a recording quantizer."""
    m = copy.deepcopy(model)
    _, blocks = find_blocks(m)
    batches = [{"input_ids": torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    inputs = capture_block_inputs(m, blocks[0], batches)
    merged = merge_block_inputs(inputs, [i.hidden for i in inputs])
    block = blocks[0]
    spec = QuantSpec.parse("int3:g32")
    todo = {n: (lin, spec) for n, lin in linear_layers(block, "b0").items()}
    calls, last_H = [], {}

    def quantize_group(items, H):
        calls.append([n.split(".", 1)[1] for n, _, _ in items])
        out = {}
        for name, lin, s in items:
            last_H[name] = H.clone()
            Q, _ = WeightQuantizer(s).rtn(lin.weight.detach().float())
            q = QuantLinear.from_linear(lin, Q, s, None)
            parent, _, child = name[len("b0."):].rpartition(".")
            setattr(block.get_submodule(parent), child, q)
            out[name] = q
        return out

    with torch.inference_mode():
        out, groups = run_sequential(block, merged, todo, quantize_group, prefix="b0", groups=hint)
    return block, merged, out, groups, calls, last_H


def _final_inputs(block, merged):
    final = {}

    def keep(name):  # a forward hook that returns something would replace the output
        def hook(mod, args, output):
            final[name] = args[0]
        return hook

    hooks = [lin.register_forward_hook(keep(n)) for n, lin in linear_layers(block, "b0").items()]
    with torch.inference_mode():
        again = run_block(block, merged, merged.hidden)
    for h in hooks:
        h.remove()
    return again, final


def test_sequential_quantizes_in_forward_order_from_the_quantized_prefix(tiny):
    """Each layer is quantized from the inputs it receives in the block whose earlier layers are
    already quantized: the Hessians used equal those of the final block's inputs."""
    model, ids, batches = tiny
    block, merged, out, groups, calls, last_H = _block_pass(model)
    assert calls == [["self_attn.q_proj"], ["self_attn.k_proj"], ["self_attn.v_proj"], ["self_attn.o_proj"],
                     ["mlp.gate_proj"], ["mlp.up_proj"], ["mlp.down_proj"]]
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert groups["self_attn.k_proj"] == qkv and groups["mlp.up_proj"] == ("mlp.gate_proj", "mlp.up_proj")
    assert groups["self_attn.o_proj"] == ("self_attn.o_proj",)
    assert all(isinstance(mod, QuantLinear) for mod in linear_layers(block).values())
    again, final = _final_inputs(block, merged)
    assert torch.equal(again, out)
    for name, H in last_H.items():
        acc = HessianAccumulator(H.shape[0])
        acc.add(final[name])
        torch.testing.assert_close(H, acc.H, rtol=1e-6, atol=1e-6)
    # o_proj's inputs are those of the quantized q/k/v, not of the float block
    float_out = {}
    hook = model.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda mod, a, o: float_out.__setitem__("x", a[0]))
    with torch.inference_mode():
        run_block(model.model.layers[0], merged, merged.hidden)
    hook.remove()
    assert not torch.allclose(float_out["x"], final["b0.self_attn.o_proj"], atol=1e-4)


def test_groups_seen_in_one_block_are_quantized_together_in_the_next(tiny):
    model, ids, batches = tiny
    *_, groups, _, _ = _block_pass(model)
    block, merged, out, _, calls, last_H = _block_pass(model, hint=groups)
    assert calls == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                     ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    # a wrong guess (o_proj does not read q_proj's input) is caught: o_proj is quantized again, alone,
    # from its own inputs, before it produces any output
    wrong = {**groups, "self_attn.q_proj": ("self_attn.q_proj", "self_attn.o_proj")}
    block, merged, out, _, calls, last_H = _block_pass(model, hint=wrong)
    assert calls[0] == ["self_attn.q_proj", "self_attn.o_proj"] and ["self_attn.o_proj"] in calls[1:]
    again, final = _final_inputs(block, merged)
    assert torch.equal(again, out)
    acc = HessianAccumulator(last_H["b0.self_attn.o_proj"].shape[0])
    acc.add(final["b0.self_attn.o_proj"])
    torch.testing.assert_close(last_H["b0.self_attn.o_proj"], acc.H, rtol=1e-6, atol=1e-6)


def test_sequential_and_parallel_pipelines(tiny):
    model, ids, batches = tiny
    results = {}
    for order in ("sequential", "parallel"):
        m = copy.deepcopy(model)
        res = quantize_model(m, Plan.from_scheme("w3g64"), batches, "gptq", progress=False, calibration=order)
        assert res.calibration == order and len(res.layers) == 14
        assert all(0 < l.rel_error < 0.2 for l in res.layers)
        with torch.no_grad():
            results[order] = m(ids).logits
    with torch.no_grad():
        ref = model(ids).logits
    rtn = copy.deepcopy(model)
    quantize_model(rtn, Plan.from_scheme("w3g64"), [], "rtn", progress=False)
    with torch.no_grad():
        err_rtn = ((rtn(ids).logits - ref) ** 2).mean()
    for order, logits in results.items():
        assert ((logits - ref) ** 2).mean() < err_rtn, order


def test_a_layer_the_forward_never_calls_is_quantized_without_data(tiny):
    model, ids, batches = tiny
    m = copy.deepcopy(model)
    m.model.layers[1].mlp.unused = torch.nn.Linear(64, 64)
    res = quantize_model(m, Plan.from_scheme("w4g64"), batches, "gptq", progress=False, calibration="sequential")
    unused = [l for l in res.layers if l.name.endswith("mlp.unused")]
    assert len(unused) == 1 and "RTN" in unused[0].note
    assert isinstance(m.model.layers[1].mlp.unused, QuantLinear)


def test_bad_calibration_orders_are_refused(tiny):
    model, ids, batches = tiny
    with pytest.raises(ValueError, match="accepted: auto, sequential, parallel"):
        quantize_model(copy.deepcopy(model), Plan.from_scheme("w4g64"), batches, "gptq", calibration="both")
    ragged = [{"input_ids": ids[:3]}, {"input_ids": ids[3:, :10]}]
    with pytest.raises(ValueError, match="cannot be concatenated"):
        quantize_model(copy.deepcopy(model), Plan.from_scheme("w4g64"), ragged, "gptq", progress=False,
                       calibration="sequential")
    res = quantize_model(copy.deepcopy(model), Plan.from_scheme("w4g64"), ragged, "gptq", progress=False)
    assert res.calibration == "parallel"  # auto falls back to one batch at a time


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("order", ["sequential", "parallel"])
def test_offload_streams_blocks_through_the_gpu_with_the_same_result(tiny, order):
    model, ids, batches = tiny
    on_gpu = copy.deepcopy(model).cuda()
    gpu_batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    full = quantize_model(on_gpu, Plan.from_scheme("w3g64"), gpu_batches, "gptq", progress=False, calibration=order)
    streamed_model = copy.deepcopy(model)
    streamed = quantize_model(streamed_model, Plan.from_scheme("w3g64"), batches, "gptq", progress=False,
                              calibration=order, device="cuda")
    assert all(p.device.type == "cpu" for p in streamed_model.parameters())
    assert streamed.calibration == order
    # the rotary tables are computed on the CPU here and on the GPU there (last-bit differences), so
    # a few roundings may flip; the layers and their errors must otherwise agree
    assert set(streamed.packed) == set(full.packed)
    differ = sum((v.cpu() != streamed.packed[n]["codes"].cpu()).sum().item() for n, p in full.packed.items()
                 for k, v in p.items() if k == "codes")
    total = sum(p["codes"].numel() for p in full.packed.values())
    assert differ <= 0.02 * total
    for a, b in zip(sorted(full.layers, key=lambda l: l.name), sorted(streamed.layers, key=lambda l: l.name)):
        assert a.name == b.name and a.rel_error == pytest.approx(b.rel_error, rel=0.05, abs=1e-6)
