"""Quantized convolutions and layer-by-layer PTQ of plain nn.Modules (tiny random CNNs)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.conv import (QuantConv1d, QuantConv2d, conv_weight_matrix, quant_conv_from,
                               quantize_channels, unfold_conv_input)
from lowbit.quant.plan import Plan
from lowbit.quant.spec import QuantSpec


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.ReLU(),   # grouped
        nn.Conv2d(16, 24, 3, stride=2, padding=1, dilation=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(96, 10),
    ).eval()


def _data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 10, 10, generator=g) for _ in range(n)]


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=2, groups=2),
                                  nn.Conv2d(4, 5, (3, 1), padding=(1, 0)),
                                  nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2)])
def test_unfolded_rows_times_flattened_weight_is_the_convolution(conv):
    x = torch.randn(2, conv.in_channels, *([9, 11] if isinstance(conv, nn.Conv2d) else [13]))
    y = conv(x).detach()
    W = conv_weight_matrix(conv.weight.detach())
    rows = conv.out_channels // conv.groups
    for g, X in enumerate(unfold_conv_input(conv, x)):
        out = X @ W[g * rows:(g + 1) * rows].T + conv.bias.detach()[g * rows:(g + 1) * rows]
        ref = y[:, g * rows:(g + 1) * rows].movedim(1, -1).reshape(-1, rows)
        assert torch.allclose(out, ref, atol=1e-5)


def test_quant_conv_is_a_conv_with_its_weight_and_quantized_input():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    q = quant_conv_from(conv, conv_weight_matrix(conv.weight.detach()), QuantSpec.parse("int4"), None)
    assert isinstance(q, QuantConv2d) and torch.equal(q(x), conv(x))
    a = QuantSpec.parse("int4:token")
    qa = quant_conv_from(conv, conv.weight.detach(), None, a)
    xq = quantize_channels(x, a)
    for i in range(5):  # one scale per position over the 4 channels
        col = xq[0, :, i, i]
        s = x[0, :, i, i].abs().max() / 7
        assert torch.allclose(col, torch.round(x[0, :, i, i] / s) * s, atol=1e-6)
    assert torch.allclose(qa(x), conv(xq), atol=1e-6)
    assert isinstance(quant_conv_from(nn.Conv1d(2, 3, 3), torch.zeros(3, 2, 3), None, None), QuantConv1d)


def test_same_padding_is_refused_by_name():
    with pytest.raises(ValueError, match="padding 'same'"):
        unfold_conv_input(nn.Conv2d(2, 2, 3, padding="same"), torch.randn(1, 2, 4, 4))


def _out_err(model, ref_model, data):
    with torch.no_grad():
        return sum(((model(x) - ref_model(x)) ** 2).mean().item() for x in data)


@pytest.mark.parametrize("scheme", ["int3", "int4:g16", "e2m1fn", "mxfp4"])
def test_gptq_beats_rtn_on_a_cnn_and_packs(scheme):
    from lowbit.export.packing import unpack_weight
    from lowbit.ptq.pipeline import quantize_model

    model, data = _cnn(), _data()
    errs = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        res = quantize_model(m, Plan({"*": scheme}), data[:3], method, progress=False)
        kinds = [type(mod) for mod in m.modules()]
        if scheme == "mxfp4":  # 27, 36 and 144 columns cannot hold blocks of 32: named, kept, reported
            assert sorted(res.skipped) == ["0", "2", "4"] and "multiple of 32" in res.skipped["0"]
            assert [lr.name for lr in res.layers] == ["8"] and QuantConv2d not in kinds
        else:
            assert kinds.count(QuantConv2d) == 3 and not res.skipped and len(res.layers) == 4
        for lr in res.layers:  # the report's fields, and the packed codes decode to the weights
            mod = m.get_submodule(lr.name)
            W = unpack_weight(res.packed[lr.name], QuantSpec.parse(lr.weight_spec), lr.shape)
            assert torch.equal(W, mod.weight.detach().reshape(lr.shape))
            assert lr.bits_per_weight > 0 and lr.rel_error >= 0
        errs[method] = _out_err(m, model, data[3:])
    assert errs["gptq"] < errs["rtn"]


def test_grouped_conv_gets_one_hessian_per_group_and_act_quant():
    from lowbit.ptq.pipeline import quantize_model

    model, data = _cnn(), _data()
    m = copy.deepcopy(model)
    res = quantize_model(m, Plan({"*": "int4"}, {"*": "int8:token"}), data, "gptq", progress=False)
    grouped = next(lr for lr in res.layers if lr.name == "2")
    assert grouped.shape == (16, 36) and "4 conv groups" in grouped.note
    assert all(mod.act_spec is not None for mod in m.modules() if isinstance(mod, QuantConv2d))
    with torch.no_grad():
        power = sum(model(x).pow(2).mean().item() for x in data)
    assert _out_err(m, model, data) < 0.05 * power  # W4A8 stays close to the float outputs
    with pytest.raises(ValueError, match="KV"):
        quantize_model(copy.deepcopy(model), Plan({"*": "int4"}, kv={"*": "int8:token"}), data, "rtn", progress=False)


def test_plain_mlp_without_blocks_goes_layer_by_layer():
    from lowbit.ptq.pipeline import quantize_model

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    data = [{"input": torch.randn(32, 16)} for _ in range(2)]
    m = copy.deepcopy(mlp)
    res = quantize_model(m, Plan.from_scheme("w4g64"), data, "gptq", progress=False)
    assert [lr.name for lr in res.layers] == ["0", "2"]
    with torch.no_grad():
        assert torch.allclose(m(data[0]["input"]), mlp(data[0]["input"]), atol=0.1)
    with pytest.raises(ValueError, match="calibration batches"):
        quantize_model(copy.deepcopy(mlp), Plan.from_scheme("w4g64"), [], "gptq", progress=False)


def test_checkpoint_of_a_cnn_loads_into_a_fresh_instance(tmp_path):
    from lowbit.export.checkpoint import save_quantized
    from lowbit.export.module_checkpoint import load_quantized_into
    from lowbit.ptq.pipeline import quantize_model

    model, data = _cnn(), _data()
    m = copy.deepcopy(model)
    plan = Plan({"*": "int4:g16", "4": None}, {"*": "int8:token"})  # layer 4: inputs only
    res = quantize_model(m, plan, data[:2], "gptq", progress=False)
    save_quantized(m, res.packed, tmp_path, kind="cnn")
    fresh = _cnn(seed=7)
    meta = load_quantized_into(fresh, tmp_path)
    assert sorted(meta["layers"]) == ["0", "2", "8"] and list(meta["act_only"]) == ["4"]
    with torch.no_grad():
        assert torch.equal(fresh(data[3]), m(data[3]))
    with pytest.raises(ValueError, match="does not match"):
        load_quantized_into(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1)), tmp_path)
