"""Learned clipping ratios of the input activations (lowbit.train.act_quant): the forward is the
dynamic absmax quantizer times the ratio (the unclipped one bit for bit at 1), the input's gradient
is the clipped straight-through one, the ratio's gradient is LSQ's (checked against finite
differences of the function it differentiates), and a trained ratio freezes, saves and reloads into
exactly the forward that was trained."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from _tiny import tiny_llama, token_ids
from lowbit.quant.activation import CLIP_MIN, clipped_activation, quantize_activation
from lowbit.quant.linear import QuantLinear
from lowbit.quant.spec import QuantSpec
from lowbit.train import QATLinear, convert, packed_weights, prepare_qat, trainable_groups
from lowbit.train.act_quant import ActivationFakeQuant, calibrate_act_clips, learnable_clip

ELEMENT_SPECS = ["int4:token", "int8:token", "int4:g16", "int4:tensor", "e4m3fn:token", "e2m1fn:token", "int3:channel"]


def _acts(shape=(3, 5, 64), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 3
    x[0, 1, 7] = 25.0  # an outlier token: clipping matters there
    return x


def _steps(x: torch.Tensor, spec: QuantSpec, alpha: float):
    """(x viewed by step, step s) computed independently of the module: alpha * amax / fmt.max."""
    if spec.granularity == "tensor":
        v, amax = x, x.abs().amax()
    elif spec.granularity == "group":
        v = x.reshape(*x.shape[:-1], -1, spec.group_size)
        amax = v.abs().amax(-1, keepdim=True)
    else:
        v, amax = x, x.abs().amax(-1, keepdim=True)
    return v, alpha * amax / spec.fmt.max, amax


@pytest.mark.parametrize("spec", ELEMENT_SPECS)
def test_ratio_one_is_the_fixed_quantizer_bit_for_bit(spec):
    x = _acts()
    sp = QuantSpec.parse(spec)
    fixed = quantize_activation(x, sp)
    assert torch.equal(quantize_activation(x, sp, 1.0), fixed)
    aq = ActivationFakeQuant(sp, x.shape[-1])
    assert torch.equal(aq(x), fixed)
    # and under a bf16 input, as autocast gives on the GPU
    xb = x.bfloat16()
    assert torch.equal(ActivationFakeQuant(sp, 64)(xb), quantize_activation(xb, sp))


@pytest.mark.parametrize("spec", ELEMENT_SPECS + ["int4:token:nearest_away", "int8:g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_quantizer_is_emulate_quantize_with_the_absmax_step(spec, dtype):
    """The dynamic quantizer (integer grids rounded by torch.round) against ``emulate.quantize`` with
    the absmax step: the same bits, and a plain straight-through gradient."""
    from lowbit.emulate import quantize
    from lowbit.kernels.scalar_div import div_scalar

    sp = QuantSpec.parse(spec)
    x = _acts().to(dtype).requires_grad_(True)
    v, _, amax = _steps(x.detach().float(), sp, 1.0)
    s = torch.where(amax > 0, div_scalar(amax, sp.fmt.max), torch.ones_like(amax))
    ref = quantize(v, sp.fmt, sp.rounding, scale=s).reshape(x.shape).to(dtype)
    out = quantize_activation(x, sp)
    assert torch.equal(out, ref)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("spec", ["int4:token", "int4:g16", "int4:tensor", "e4m3fn:token"])
def test_clipped_forward_matches_an_independent_reference(spec):
    sp = QuantSpec.parse(spec)
    x = _acts().double()
    out = clipped_activation(x.float(), sp, 0.7)
    v, s, _ = _steps(x, sp, 0.7)
    y = (v / s).float()
    from lowbit.emulate import quantize

    ref = (quantize(y, sp.fmt) * s.float()).reshape(x.shape)
    # the step is float32 arithmetic here and float64 in the reference: allow an ulp of the step
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert (out.abs() < x.float().abs() - 1e-3).any()  # something was clipped


@pytest.mark.parametrize("spec", ["int4:token", "int4:g16", "e2m1fn:token", "int8:tensor"])
def test_input_gradient_is_zero_exactly_where_values_saturate(spec):
    sp = QuantSpec.parse(spec)
    x = _acts().requires_grad_(True)
    alpha = torch.tensor(0.6, requires_grad=True)
    out = clipped_activation(x, sp, alpha)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    out.backward(g)
    v, s, _ = _steps(x.detach(), sp, 0.6)
    y = (v / s).reshape(x.shape)
    fmt = sp.fmt
    inside = (y >= fmt.min) & (y <= fmt.max)
    assert (~inside).any() and inside.any()
    # away from the boundary (an ulp of float32 decides it there) the definition is exact
    firm = ((y - fmt.max).abs() > 1e-4) & ((y - fmt.min).abs() > 1e-4)
    assert torch.equal(x.grad[firm], torch.where(inside, g, torch.zeros_like(g))[firm])
    assert alpha.grad is not None and math.isfinite(float(alpha.grad))


def _surrogate(x, alpha, spec, q_base, y_base, inside_base, amax):
    """The function LSQ differentiates, of alpha: inside ``(y + r) * s`` with the rounding residual
    ``r = Q(y) - y`` held at its base value, outside ``Q(y_sat) * s``; ``s = alpha * amax / max``."""
    v = x if spec.granularity != "group" else x.reshape(*x.shape[:-1], -1, spec.group_size)
    s = alpha * amax / spec.fmt.max
    y = v / s
    return torch.where(inside_base, (y + (q_base - y_base)) * s, q_base * s)


@pytest.mark.parametrize("spec", ["int4:token", "int4:g16", "int3:channel", "e2m1fn:token", "int8:tensor"])
def test_ratio_gradient_matches_finite_differences(spec):
    sp = QuantSpec.parse(spec)
    x = _acts(seed=2).double()
    a0 = 0.73
    alpha = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
    grad_scale = 0.37
    out = clipped_activation(x, sp, alpha, grad_scale)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * w).sum().backward()
    # the base point, independently of the module
    v, s, amax = _steps(x, sp, a0)
    y = v / s
    from lowbit.emulate import quantize

    q = quantize(y, sp.fmt)
    inside = (y >= sp.fmt.min) & (y <= sp.fmt.max)
    h = 1e-6
    f = lambda a: float((_surrogate(x, a, sp, q, y, inside, amax).reshape(x.shape) * w).sum())  # noqa: E731
    fd = (f(a0 + h) - f(a0 - h)) / (2 * h) * grad_scale
    # the quantizer computes in float32 (as it runs in training): agreement to its precision
    assert float(alpha.grad) == pytest.approx(fd, rel=2e-5)
    assert abs(fd) > 1e-3


def test_module_gradient_scale_is_lsq_and_clamp_passes_straight_through():
    aq = ActivationFakeQuant("int4:token", 576)
    assert aq.grad_scale == pytest.approx(1 / math.sqrt(576 * 7))
    assert ActivationFakeQuant("int4:g64", 576).grad_scale == pytest.approx(1 / math.sqrt(64 * 7))
    with torch.no_grad():
        aq.alpha.fill_(1.2)  # pushed past 1 by an optimizer step: the forward uses 1, the gradient still flows
    x = _acts((2, 4, 576))
    out = aq(x)
    assert torch.equal(out, quantize_activation(x, QuantSpec.parse("int4:token")))
    (out * torch.randn_like(out)).sum().backward()
    assert aq.alpha.grad is not None and float(aq.alpha.grad) != 0
    assert aq.value() == 1.0


def test_bad_specs_and_ratios_are_refused_clearly():
    for spec in ("mxfp4", "nvfp4", "int4:token:stochastic"):
        assert not learnable_clip(spec)
        with pytest.raises(ValueError, match="clipping ratio|deterministic"):
            ActivationFakeQuant(spec, 64)
    for bad in (0.0, 1.5, -1, "x", True):
        with pytest.raises(ValueError, match=r"clipping ratio must be a number in \[0.001, 1\]"):
            clipped_activation(_acts(), QuantSpec.parse("int4:token"), bad)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.one_of(st.just(1.0), st.floats(CLIP_MIN, 1.0)),
       spec=st.sampled_from(["int4:token", "int3:g8", "int8:tensor", "int2:channel"]),
       scale=st.floats(1e-3, 1e3))
def test_property_grid_range_and_idempotence(seed, alpha, spec, scale):
    sp = QuantSpec.parse(spec)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(seed)) * scale
    out = clipped_activation(x, sp, alpha)
    v, s, amax = _steps(x, sp, torch.tensor(alpha, dtype=torch.float32).item())
    s32 = torch.where(amax > 0, alpha * amax / sp.fmt.max, torch.ones_like(amax)).float()
    k = out.reshape(v.shape) / s32
    # on the grid: s times an integer of the format's range (up to the ulp of the recomputed step)
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert (k.round() >= sp.fmt.min).all() and (k.round() <= sp.fmt.max).all()
    assert (out.reshape(v.shape).abs() <= s32 * max(abs(sp.fmt.min), sp.fmt.max) * (1 + 1e-6)).all()
    # idempotent: the output is a fixed point of the same quantizer (same steps) ...
    from lowbit.emulate import quantize

    ov = out.reshape(v.shape)
    assert torch.equal(quantize(ov, sp.fmt, scale=s32.expand_as(ov).contiguous()), ov)
    # ... and, unclipped, of the dynamic one too (its amax lands on the top level: the same steps)
    if alpha == 1.0:
        assert torch.equal(clipped_activation(out, sp, 1.0), out)


def _held_out():
    return token_ids(4, 24, seed=7)


def test_qat_linear_learns_the_ratio_in_the_scales_group_and_freezes_exactly(tmp_path):
    from lowbit.export.checkpoint import load_quantized, save_quantized
    from lowbit.train.loop import TrainConfig, train
    from lowbit.train.objectives import causal_lm_objective

    teacher = tiny_llama()
    student = prepare_qat(copy.deepcopy(teacher), "w4a4", act_scaling="learned")
    acts = [m.act_quant for m in student.modules() if isinstance(m, QATLinear)]
    assert len(acts) == 14 and all(isinstance(a, ActivationFakeQuant) for a in acts)
    groups = trainable_groups(student)
    assert {id(a.alpha) for a in acts} <= {id(p) for p in groups["scales"]}
    assert not ({id(a.alpha) for a in acts} & {id(p) for p in groups["weights"]})
    ids = _held_out()
    with torch.no_grad():  # at ratio 1 the learned quantizer is the fixed one
        fixed = prepare_qat(copy.deepcopy(teacher), "w4a4")(input_ids=ids).logits
        assert torch.equal(student(input_ids=ids).logits, fixed)
    chosen = calibrate_act_clips(student, [{"input_ids": token_ids(4, 24, seed=50 + i)} for i in range(2)])
    assert len(chosen) == 14 and min(chosen.values()) < 1.0
    cfg = TrainConfig(steps=6, lr=1e-4, scale_lr=1e-2, save_every=100)
    train(student, lambda k: {"input_ids": token_ids(4, 24, seed=1000 + k)}, causal_lm_objective("kl"), groups, cfg,
          teacher=teacher, progress=False)
    trained_clips = {n: m.act_quant.value() for n, m in student.named_modules() if isinstance(m, QATLinear)}
    assert any(trained_clips[n] != chosen[n] for n in chosen)  # the ratios moved
    with torch.no_grad():
        trained = student(input_ids=ids).logits
    convert(student)
    frozen = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    assert {n: m.act_clip for n, m in frozen.items()} == trained_clips
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, trained)
    save_quantized(student, packed_weights(student), tmp_path, kind="causal_lm")
    reloaded, _, meta = load_quantized(tmp_path)
    assert meta["act_clips"] == trained_clips
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
    # a checkpoint's ratio starts the next training run (learned) or stays as it is (fixed)
    from lowbit.train.job import checkpoint_scales

    scales = checkpoint_scales(tmp_path, meta)
    again = prepare_qat(copy.deepcopy(reloaded), None, act_scaling="learned", scales=scales)
    kept = prepare_qat(copy.deepcopy(reloaded), None, act_scaling="fixed", scales=scales)
    with torch.no_grad():
        ref = reloaded(input_ids=ids).logits
        assert torch.equal(again(input_ids=ids).logits, ref)
        assert torch.equal(kept(input_ids=ids).logits, ref)
    assert not any(p is not None for m in kept.modules() if isinstance(m, QATLinear) for p in [m.act_quant])


def test_block_formats_keep_their_rule_and_manifest_checks_ratios(tmp_path):
    from lowbit.export.checkpoint import CheckpointError, load_quantized, save_quantized

    model = prepare_qat(tiny_llama(), "nvfp4a", act_scaling="learned")
    assert all(m.act_quant is None for m in model.modules() if isinstance(m, QATLinear))
    model = convert(prepare_qat(tiny_llama(), "w4a4", act_scaling="learned"))
    save_quantized(model, packed_weights(model), tmp_path, kind="causal_lm")
    import json

    from lowbit.export.validate import manifest_digest

    meta = json.loads((tmp_path / "lowbit.json").read_text())
    name = next(iter(meta["act_clips"]))
    try:  # compressed-tensors' dynamic activation scales are the plain absmax: the ratios are refused
        from lowbit.export.compressed_tensors_export import CompressedTensorsError, export_compressed_tensors
    except ImportError:
        pass
    else:
        with pytest.raises(CompressedTensorsError, match="learned input clipping ratios of 14 layers"):
            export_compressed_tensors(tmp_path, tmp_path / "ct")
    for bad, why in ((1.5, "clipping ratio in"), ("0.5", "clipping ratio in"), (0.5, None)):
        m = copy.deepcopy(meta)
        if why is None:  # a ratio for a layer without quantized inputs
            m["act_clips"]["model.nope"] = bad
            why = "layer with quantized inputs"
        else:
            m["act_clips"][name] = bad
        m.pop("manifest_sha256")
        m["manifest_sha256"] = manifest_digest(m)
        (tmp_path / "lowbit.json").write_text(json.dumps(m))
        with pytest.raises(CheckpointError, match=why):
            load_quantized(tmp_path)


def test_lowbit_train_with_learned_clipping_runs_improves_and_reloads_exactly(tmp_path):
    from _tiny_lm import save_byte_llama
    from lowbit.cli import main

    model_dir = save_byte_llama(tmp_path / "model", hidden_size=64, intermediate_size=128)
    out = tmp_path / "qat"
    rc = main(["train", model_dir, "--scheme", "w4a4", "--init", "rtn", "--steps", "12", "--batch-size", "2",
               "--seq-len", "32", "--lr", "1e-3", "--scale-lr", "1e-2", "--act-scaling", "learned", "--calib", "4",
               "--eval-tokens", "512", "--context", "64", "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0
    import json

    rep = json.loads((out / "report.json").read_text())
    assert rep["training"]["act_scaling"] == "learned" and rep["training"]["act_clip_init"] == "mse"
    assert rep["after"]["act_clips"]["layers"] == 14 and rep["calibrated"]["act_clips"]["layers"] == 14
    # per-step losses of this near-random model are noise-dominated; the held-out perplexity is not
    assert rep["after"]["perplexity"] < rep["before"]["perplexity"], (rep["before"], rep["after"])
    from lowbit.export.checkpoint import load_quantized

    model, _, meta = load_quantized(out)
    assert len(meta["act_clips"]) == 14
    assert all(model.get_submodule(n).act_clip == c for n, c in meta["act_clips"].items())
    # `lowbit eval DIR` measures the checkpoint again with the perplexity the run reported
    from lowbit.jobs import run_eval

    again = run_eval(str(out), quiet=True, device="cpu")
    assert again["perplexity"] == rep["after"]["perplexity"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["int4:token", "int8:token", "e4m3fn:token", "int4:g64"])
def test_cuda_learned_clip_matches_cpu(spec):
    """The same bits forward on CUDA (the step's division is correctly rounded there too), the same
    input gradient, and the ratio's gradient to float32 summation order; bf16 inputs as autocast gives."""
    x = _acts((4, 16, 256), seed=3)
    coef = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    aq = ActivationFakeQuant(spec, 256, clip=0.8)
    aq_cuda = copy.deepcopy(aq).cuda()
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    out_c, out_g = aq(xc), aq_cuda(xg)
    assert torch.equal(out_c, out_g.cpu())
    (out_c * coef).sum().backward()
    (out_g * coef.cuda()).sum().backward()
    assert torch.equal(xc.grad, xg.grad.cpu())
    torch.testing.assert_close(aq.alpha.grad, aq_cuda.alpha.grad.cpu(), rtol=1e-4, atol=1e-6)
    xb = x.bfloat16()
    assert torch.equal(aq(xb), aq_cuda(xb.cuda()).cpu())


def test_adapter_layers_keep_a_learned_ratio():
    """LR-QAT and the compact adapter base built on a layer with a learned ratio compute what it
    computes, and LR-QAT's fold keeps the ratio."""
    from lowbit.adapters.compact_base import CompactQuantLinear
    from lowbit.adapters.lrqat import LRQATLinear

    lin = torch.nn.Linear(64, 32)
    layer = QATLinear.from_linear(lin, QuantSpec.parse("int4:g32"), QuantSpec.parse("int4:token"),
                                  act_scaling="learned")
    with torch.no_grad():
        layer.act_quant.alpha.fill_(0.7)
    frozen, packed = layer.freeze()
    assert frozen.act_clip == pytest.approx(0.7)
    x = _acts((2, 5, 64), seed=4)
    with torch.no_grad():
        ref = frozen(x)
        assert torch.equal(layer(x), ref)
        scales = packed["scales"].float()
        assert torch.equal(CompactQuantLinear(frozen, scales, None)(x), ref)
        lr = LRQATLinear.from_layer(frozen, None, rank=2, alpha=1.0, scales=scales)
        assert torch.equal(lr(x), ref)
        folded, _ = lr.fold()
    assert folded.act_clip == frozen.act_clip
