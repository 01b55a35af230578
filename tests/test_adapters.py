"""LoRA on a frozen base with low-precision adapters, LR-QAT and its fold, adapter files (lowbit's and
PEFT's), on a tiny random Llama."""
import json

import pytest
import torch

import lowbit
from lowbit.adapters import AdapterFormat, add_lora, fold, lora_layers, parse_targets, prepare_lrqat
from lowbit.adapters.io import adapter_bytes, export_peft, load_adapter, load_peft, save_adapter
from lowbit.adapters.lora import rule_for
from lowbit.adapters.lrqat import LRQATLinear, layer_scales, lrqat_layers
from lowbit.export.checkpoint import load_quantized, save_quantized
from lowbit.quant.spec import QuantSpec
from lowbit.quant.weight import WeightQuantizer
from _tiny_lm import byte_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
FORMATS = ["1bit", "2bit", "4bit", "8bit", "16bit", "32bit", "nf4", "e2m1"]


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


def adapted(fmt="1bit", rules=("*proj=4",), seed=0):
    m = byte_llama()
    add_lora(m, parse_targets(list(rules)), AdapterFormat.parse(fmt))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(m).values():  # a trained-looking adapter: B away from its zero start
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return m


def test_targets_last_rule_wins_and_star_skips_lm_head():
    rules = parse_targets(["*", "*q_proj=8:4"], rank=4)
    assert rule_for("model.layers.0.self_attn.q_proj", rules).rank == 8
    assert rule_for("model.layers.0.self_attn.q_proj", rules).alpha == 4
    assert rule_for("model.layers.0.mlp.up_proj", rules).rank == 4
    assert rule_for("model.layers.0.mlp.up_proj", rules).alpha == 8  # 2 x rank
    assert rule_for("lm_head", rules) is None
    with pytest.raises(ValueError, match="PATTERN=RANK"):
        parse_targets(["*q_proj=x"])
    with pytest.raises(ValueError, match="rank >= 1"):
        parse_targets(["*q_proj=0"])
    with pytest.raises(ValueError, match="no linear layer matches"):
        add_lora(byte_llama(), parse_targets(["*nothing*"]))


def test_bad_adapter_formats_name_what_is_accepted():
    for bad, msg in (("9bit", "accepted"), ("mxfp4", "block format"), ("fp16x", "accepted"), ("e5m10", "at most 8")):
        with pytest.raises(ValueError, match=msg):
            AdapterFormat.parse(bad)
    with pytest.raises(TypeError):
        AdapterFormat.parse(4)


def test_lora_starts_at_the_base_and_trains_only_the_adapters():
    base = logits(byte_llama())
    m = byte_llama()
    add_lora(m, parse_targets(["*proj=4"]), AdapterFormat.parse("1bit"))
    assert torch.equal(logits(m), base)  # B = 0
    m(IDS).logits.float().pow(2).mean().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    layer = m.model.layers[0].self_attn.q_proj
    assert layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", ["1bit", "4bit", "16bit"])
def test_forward_is_base_plus_the_stored_low_rank_update(fmt):
    m = adapted(fmt)
    layer = m.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    f = AdapterFormat.parse(fmt)
    a = f.unpack(f.pack(layer.lora_A), (layer.rank, layer.in_features))
    b = f.unpack(f.pack(layer.lora_B.t()), (layer.rank, layer.out_features)).t()
    want = layer.base(x) + (x @ a.t() @ b.t()) * (layer.alpha / layer.rank)
    with torch.no_grad():
        assert torch.allclose(layer(x), want, atol=1e-5, rtol=1e-5)
    if fmt == "1bit":  # sign times the mean |.| of each rank component
        assert torch.equal(a.abs().amax(1), a.abs().amin(1))
        s = layer.lora_A.detach().double().abs().mean(1).to(torch.float16).float()
        assert torch.allclose(a.abs()[:, 0], s, rtol=2e-3)


@pytest.mark.parametrize("fmt", ["32bit", "16bit", "1bit"])
def test_fake_quantization_passes_the_gradient_straight_through(fmt):
    """The forward uses the stored matrix and the gradient reaches the float master unchanged; fp32
    storage is the master itself (no copy, no extra autograd node)."""
    f = AdapterFormat.parse(fmt)
    w = torch.randn(4, 32, requires_grad=True)
    q = f.fake(w)
    assert (q is w) == (fmt == "32bit")
    assert torch.equal(q.detach(), f.unpack(f.pack(w), (4, 32)))
    g = torch.randn(4, 32)
    q.backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("fmt", FORMATS)
def test_storage_is_counted_exactly(fmt):
    f = AdapterFormat.parse(fmt)
    w = torch.randn(5, 37)
    packed = f.pack(w)
    assert sum(v.numel() * v.element_size() for v in packed.values()) == f.nbytes((5, 37))
    bits = {"1bit": 1, "2bit": 2, "4bit": 4, "8bit": 8, "nf4": 4, "e2m1": 4}
    if fmt in bits:
        assert f.nbytes((5, 37)) == (5 * 37 * bits[fmt] + 7) // 8 + 5 * 2


def test_one_bit_adapters_are_over_ten_times_smaller_than_16_bit():
    small, big = adapter_bytes(adapted("1bit")), adapter_bytes(adapted("16bit"))
    assert big / small > 10


@pytest.mark.parametrize("fmt", FORMATS)
def test_adapter_save_load_round_trip_bit_for_bit(fmt, tmp_path):
    m = adapted(fmt, rules=("*proj=4", "*o_proj=2:3"))
    meta = save_adapter(m, tmp_path / "a", base={"model": "tiny"})
    assert meta["bytes"] == adapter_bytes(m)
    m2 = byte_llama()
    load_adapter(m2, tmp_path / "a")
    assert torch.equal(logits(m2), logits(m))
    save_adapter(m2, tmp_path / "b", base={"model": "tiny"})
    assert (tmp_path / "a/adapter.safetensors").read_bytes() == (tmp_path / "b/adapter.safetensors").read_bytes()


def test_adapters_swap_on_one_base_and_damage_is_caught(tmp_path):
    save_adapter(adapted("1bit", seed=1), tmp_path / "one")
    save_adapter(adapted("4bit", seed=2), tmp_path / "two")
    ref_one, ref_two = logits(adapted("1bit", seed=1)), logits(adapted("4bit", seed=2))
    m = byte_llama()
    load_adapter(m, tmp_path / "one")
    assert torch.equal(logits(m), ref_one)
    with pytest.raises(ValueError, match="already carries"):
        load_adapter(m, tmp_path / "two")
    load_adapter(m, tmp_path / "two", replace=True)
    assert torch.equal(logits(m), ref_two)
    data = bytearray((tmp_path / "one/adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "one/adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_adapter(byte_llama(), tmp_path / "one")
    with pytest.raises(FileNotFoundError, match="not a lowbit adapter"):
        load_adapter(byte_llama(), tmp_path)


@pytest.mark.parametrize("fmt", ["32bit", "4bit"])
def test_peft_loads_the_export_and_gives_lowbits_outputs(fmt, tmp_path):
    peft = pytest.importorskip("peft", reason="the PEFT interop check needs peft (test extra)")
    m = adapted(fmt, rules=("*proj=4", "*v_proj=2:6"))
    export_peft(m, tmp_path / "p", None)
    pm = peft.PeftModel.from_pretrained(byte_llama(), str(tmp_path / "p"))
    with torch.no_grad():
        got = pm(input_ids=IDS).logits
    assert torch.allclose(got, logits(m), atol=1e-5, rtol=1e-5)
    ranks = {n: mod.lora_A["default"].weight.shape[0] for n, mod in pm.named_modules() if hasattr(mod, "lora_A")
             and "default" in getattr(mod, "lora_A", {})}
    assert ranks and all(r == (2 if n.endswith("v_proj") else 4) for n, r in ranks.items())
    m2 = byte_llama()  # and back into lowbit, exactly
    load_peft(m2, tmp_path / "p")
    assert torch.equal(logits(m2), logits(m))
    export_peft(m2, tmp_path / "q", None)
    assert (tmp_path / "p/adapter_model.safetensors").read_bytes() == (tmp_path / "q/adapter_model.safetensors").read_bytes()


def quantized_tiny(scheme="int4:g32"):
    m = byte_llama()
    lowbit.quantize_model(m, scheme)
    from lowbit.adapters.job import own_tensors

    own_tensors(m)
    return m


@pytest.mark.parametrize("scheme", ["int4:g32", "int3:g32:asym", "int4"])
def test_lrqat_starts_at_the_quantized_base_and_folds_exactly(scheme, tmp_path):
    m = quantized_tiny(scheme)
    ref = logits(m)
    made = prepare_lrqat(m, parse_targets(["*proj=4"]), stored=layer_scales(m, m.lowbit_result.packed))
    assert all(l.phi.dtype == torch.int8 for l in made.values())
    assert torch.equal(logits(m), ref)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in made.values():
            l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=g))
    trained = logits(m)
    assert not torch.equal(trained, ref)
    m(IDS).logits.pow(2).mean().backward()
    layer = next(iter(made.values()))
    assert layer.lora_A.grad.abs().sum() > 0 and layer.scale.grad.abs().sum() > 0
    packed = fold(m)
    assert not lrqat_layers(m)
    assert torch.equal(logits(m), trained)  # the fold is exact: zero extra parameters, same outputs
    save_quantized(m, packed, tmp_path / "ck", kind="causal_lm")   # rounds embeddings/norms to 16 bits
    back, _, meta = load_quantized(tmp_path / "ck")
    assert torch.equal(logits(back), logits(m))
    assert all(info["weight"] == scheme for info in meta["layers"].values())


def test_lrqat_from_a_float_base_keeps_fractional_bits():
    lin = byte_llama().model.layers[0].mlp.up_proj
    layer = LRQATLinear.from_layer(lin, "int4:g32", 4, 8)
    assert layer.frac == 4 and layer.phi.dtype == torch.int8
    q = WeightQuantizer(QuantSpec.parse("int4:g32"))
    rtn, params = q.rtn(lin.weight.detach())
    s = torch.cat([p.scale for p in params], 1).repeat_interleave(32, 1)
    y = lin.weight.detach().double() / s
    assert (layer.phi.double() / 16 - y).abs().max() <= 1 / 32 + 1e-9  # W0 / s to 1/16 of a step
    # with A B = 0 the forward is RTN, except where W0 / s lies within 1/32 of a rounding boundary
    near_tie = ((y - y.floor()) - 0.5).abs() < 1 / 32
    with torch.no_grad():
        same = layer.quantized_weight() == rtn
    assert torch.all(same | near_tie)


def test_lrqat_refuses_non_integer_grids():
    with pytest.raises(ValueError, match="integer weight format"):
        LRQATLinear.from_layer(byte_llama().model.layers[0].mlp.up_proj, "e2m1:g32", 4, 8)


@pytest.mark.parametrize("scheme", ["int4:g32", "int3:g32:asym", "int8"])
def test_compact_base_rebuilds_the_same_weights_from_int8(scheme):
    from lowbit.adapters.compact_base import CompactQuantLinear, compact_base

    m = quantized_tiny(scheme)
    ref = logits(m)
    grids = layer_scales(m, m.lowbit_result.packed)
    add_lora(m, parse_targets(["*q_proj=4"]), AdapterFormat.parse("1bit"))
    saved = compact_base(m, grids)
    compact = [mod for mod in m.modules() if isinstance(mod, CompactQuantLinear)]
    assert len(compact) == len(grids) and saved == sum(3 * c.levels.numel() for c in compact)
    assert all(c.levels.dtype == torch.int8 for c in compact)
    assert torch.equal(logits(m), ref)  # B = 0: exactly the quantized base
