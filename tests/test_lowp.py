"""Low-precision linear (HALO): the three matmuls of each level against an independent float64
reference of the same quantized maths, the rotation identities, the kernel operand rounding against
lowbit's quantizers, model surgery, and bad input."""
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import BlockFormat
from lowbit.lowp import LowpLinear, LowpRecipe, lowp_linear, parse_recipe, prepare_lowp
from lowbit.lowp.matmul import emulated_mm, kernel_for, kernel_mm
from lowbit.lowp.operand import inner_block, quantize_operand, rotate
from lowbit.transforms.hadamard import hadamard_matrix

T, K, N = 40, 64, 96   # 40 tokens: padded to 48 (or 64) so HALO-2's token rotation has whole blocks


# --- the float64 reference: explicit Hadamard matrices, scales and matmuls in float64 ---------------

def ref_quantize(a: torch.Tensor, spec) -> torch.Tensor:
    """``a`` (rows, inner) float64 rounded to ``spec`` with absmax scales along the inner dimension;
    the dequantized values, float64 (lowbit's reference rounding of float64 tensors)."""
    fmt = spec.fmt
    if isinstance(fmt, BlockFormat):
        return lowbit.quantize(a, fmt, spec.rounding, axis=-1, backend="reference")
    rows, n = a.shape
    g = {"tensor": rows * n, "channel": n, "token": n}.get(spec.granularity, spec.group_size)
    blocks = a.reshape(-1, g) if spec.granularity != "tensor" else a.reshape(1, -1)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))
    q = lowbit.quantize(blocks / s, fmt, spec.rounding, backend="reference")
    return (q * s).reshape(rows, n)


def ref_matmul(a, b, recipe, a_role, b_role, rotate_level):
    """Q(a R) Q(b R)^T in float64 with R the explicit block-Hadamard matrix of the inner dimension."""
    n = a.shape[1]
    if recipe.level >= rotate_level:
        H = hadamard_matrix(n, inner_block(n, recipe.block), dtype=torch.float64)
        a, b = a @ H, b @ H
    return ref_quantize(a, recipe.spec(a_role)) @ ref_quantize(b, recipe.spec(b_role)).T


def reference_grads(x, w, gy, recipe, tokens_padded):
    x, w, gy = x.double(), w.double(), gy.double()
    pad = lambda t: torch.cat([t, t.new_zeros(tokens_padded - t.shape[0], t.shape[1])])
    y = ref_matmul(x, w, recipe, "x", "w", 1)
    gx = ref_matmul(gy, w.T.contiguous(), recipe, "g", "w", 1)
    gw = ref_matmul(pad(gy).T.contiguous(), pad(x).T.contiguous(), recipe, "g", "x", 2)
    return y, gx, gw


RECIPES = ["fp8", "fp8e4", "int8", "int8t", "e3m2", "e2m1fn:g16", "mxfp4:nearest"]


def _recipe(name, level, block=16):
    if name == "mxfp4:nearest":   # the preset's stochastic gradients have their own test
        return LowpRecipe("mxfp4", "mxfp4", "mxfp4", level=level, block=block, backend="emulate")
    r = parse_recipe(f"{name}:{level}", block=block, backend="emulate")
    return r


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    x[:, 3] *= 30   # an outlier channel, as activations have
    w = torch.randn(N, K, generator=g) * 0.1
    gy = torch.randn(T, N, generator=g) * 1e-3
    gy[5] *= 40     # an outlier token in the gradient
    return x, w, gy


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("name", RECIPES)
def test_each_level_matches_float64_reference(name, level):
    from lowbit.lowp.linear import padded_tokens

    recipe = _recipe(name, level)
    x, w, gy = _data()
    xv, wv = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = lowp_linear(xv, wv, None, recipe)
    y.backward(gy)
    ry, rgx, rgw = reference_grads(x, w, gy, recipe, padded_tokens(T, recipe))
    for got, want in ((y, ry), (xv.grad, rgx), (wv.grad, rgw)):
        assert got.dtype == torch.float32
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 2e-6, f"{name} HALO-{level}: max error {err:.2e} of the max"
    # the quantized maths is not the float maths: the test would notice a missing quantization
    assert (y.double() - x.double() @ w.double().T).abs().max() > 1e-4 * y.abs().max()


def test_rotation_changes_the_rounding_not_the_product():
    x, w, gy = _data()
    r0, r1 = parse_recipe("int8:0", block=16), parse_recipe("int8:1", block=16)
    y0, y1 = lowp_linear(x, w, None, r0), lowp_linear(x, w, None, r1)
    exact = x @ w.T
    # the outlier channel wrecks per-token int8 scales; the rotation spreads it
    assert (y1 - exact).norm() < 0.5 * (y0 - exact).norm()


@pytest.mark.parametrize("n,block", [(64, 16), (96, 64), (48, 256), (576, 64)])
def test_rotation_is_orthogonal_block_hadamard(n, block):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, n, generator=g), torch.randn(5, n, generator=g)
    bs = inner_block(n, block)
    assert bs == math.gcd(n & -n, block) and n % bs == 0
    H = hadamard_matrix(n, bs, dtype=torch.float64) * math.sqrt(bs)   # the +-1 matrix
    (ra, ga), (rb, gb) = rotate(a, block), rotate(b, block)
    assert ga == gb == bs
    torch.testing.assert_close(ra.double(), a.double() @ H, rtol=0, atol=1e-5)
    torch.testing.assert_close(ra @ rb.T / bs, a @ b.T, rtol=0, atol=1e-4)
    torch.testing.assert_close(H @ H.T, bs * torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # bf16 operands rotate in float32 (the fused kernel's arithmetic): no rounding to bf16 after
    r16, _ = rotate(a.bfloat16(), block)
    assert r16.dtype == torch.float32
    torch.testing.assert_close(r16.double(), a.bfloat16().double() @ H, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec,dtype", [("e4m3fn:tensor", torch.float8_e4m3fn), ("e5m2:tensor", torch.float8_e5m2),
                                        ("int8:channel", torch.int8), ("e4m3fn:channel", torch.float8_e4m3fn)])
def test_native_codes_equal_lowbit_rounding(spec, dtype):
    """The kernel path casts with torch; the emulation rounds with lowbit: same values, bit for bit."""
    from lowbit.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(2)
    a = torch.randn(64, 128, generator=g) * torch.logspace(-3, 3, 128)
    a[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0])
    a[1] = 0   # an all-zero row keeps scale 1
    spec = QuantSpec.parse(spec)
    emu, nat = quantize_operand(a, spec, fast=False), quantize_operand(a, spec, codes=True)
    assert nat.values.dtype == dtype
    assert torch.equal(nat.values.float(), emu.values)
    assert torch.equal(nat.scale, emu.scale)


def test_stochastic_gradient_rounding_is_unbiased_and_seeded():
    recipe = parse_recipe("int8t:2", block=16, grad_rounding="stochastic", backend="emulate")
    assert recipe.spec("g").rounding == "stochastic"
    x, w, gy = _data()
    gy = gy * 0 + torch.linspace(-1, 1, T * N).reshape(T, N) * 1e-3
    grads = []
    for seed in range(40):
        torch.manual_seed(seed)
        wv = w.clone().requires_grad_()
        lowp_linear(x, wv, None, recipe).backward(gy)
        grads.append(wv.grad)
    torch.manual_seed(0)
    wv = w.clone().requires_grad_()
    lowp_linear(x, wv, None, recipe).backward(gy)
    assert torch.equal(wv.grad, grads[0])            # a function of the seed
    assert not torch.equal(grads[0], grads[1])
    # E[Q_sr(g)] = g: the mean approaches the product with E_Y unrounded (X^T still rounded, nearest)
    from lowbit.lowp.linear import padded_tokens

    rows = padded_tokens(T, recipe)
    pad = lambda t: torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])]).double()
    H = hadamard_matrix(rows, 16, dtype=torch.float64)
    unbiased = (pad(gy).T @ H) @ ref_quantize(pad(x).T @ H, recipe.spec("x")).T
    mean = torch.stack(grads).mean(0).double()
    assert (mean - unbiased).norm() < 0.3 * (grads[0].double() - unbiased).norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe_text,level", [("fp8", 0), ("fp8", 2), ("fp8e4", 1), ("int8", 0), ("int8", 2)])
def test_kernel_path_matches_emulation(recipe_text, level, dtype):
    """torch._scaled_mm / torch._int_mm where this torch runs them (CPU here, CUDA in test_lowp_cuda):
    identical operand codes, outputs within accumulation-order tolerance (and one bf16 rounding)."""
    x, w, gy = _data()
    x, gy = x.to(dtype), gy.to(dtype)
    emu = parse_recipe(f"{recipe_text}:{level}", block=16, backend="emulate")
    ker = parse_recipe(f"{recipe_text}:{level}", block=16, backend="kernel")
    try:
        outs = []
        for r in (emu, ker):
            xv, wv = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = lowp_linear(xv, wv, None, r)
            y.backward(gy)
            outs.append((y, xv.grad, wv.grad))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no CPU kernel for it: {e}")
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        assert ((a - b).abs() <= tol * b.abs() + 1e-5 * b.abs().max()).all()


def test_kernel_selection():
    from lowbit.quant.spec import QuantSpec as Q

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert kernel_for(Q.parse("e4m3fn:tensor"), Q.parse("e5m2:tensor"), 32, 64, 48, cpu, bf16) == "fp8"
    assert kernel_for(Q.parse("e5m2:tensor"), Q.parse("e5m2:tensor"), 32, 64, 48, cpu, bf16) is None
    assert kernel_for(Q.parse("e4m3fn:tensor"), Q.parse("e4m3fn:tensor"), 32, 60, 48, cpu, bf16) is None
    assert kernel_for(Q.parse("int8:channel"), Q.parse("int8:tensor"), 32, 64, 48, cpu, bf16) == "int8"
    assert kernel_for(Q.parse("int8:g32"), Q.parse("int8:channel"), 32, 64, 48, cpu, bf16) is None
    assert kernel_for(Q.parse("e3m2fn:tensor"), Q.parse("e3m2fn:tensor"), 32, 64, 48, cpu, bf16) is None
    cuda, row = torch.device("cuda"), Q.parse("e4m3fn:channel")
    for out in (bf16, torch.float32):   # row scales: CUDA only; a float32 output is the bf16 kernel's, upcast
        assert kernel_for(row, row, 32, 64, 48, cuda, out) == "fp8_row"
    assert kernel_for(row, row, 32, 64, 48, cpu, bf16) is None
    with pytest.raises(ValueError, match="no low-precision kernel"):
        lowp_linear(torch.randn(32, 64), torch.randn(48, 64), None, parse_recipe("e3m2:0", backend="kernel"))


def test_emulated_mm_factors_scales_exactly():
    from lowbit.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 32, generator=g), torch.randn(6, 32, generator=g)
    for spec in ("int8:channel", "int8:g8", "e4m3fn:tensor", "mxfp4"):
        s = QuantSpec.parse(spec)
        qa, qb = quantize_operand(a, s), quantize_operand(b, s)
        want = qa.dequantize().double() @ qb.dequantize().double().T
        torch.testing.assert_close(emulated_mm(qa, qb).double(), want, rtol=1e-6, atol=1e-6)


def test_module_swap_shares_parameters_and_trains():
    from _tiny import tiny_llama, token_ids

    model = tiny_llama()
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    w_before = model.model.layers[0].mlp.down_proj.weight
    names = prepare_lowp(model, {"*": "fp8:2", "*.mlp.down_proj": "int8:1", "*.self_attn.o_proj": None}, block=16)
    assert "lm_head" not in names and "model.layers.0.self_attn.o_proj" not in names
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, LowpLinear) and down.weight is w_before and down.recipe.name == "int8"
    assert model.model.layers[0].mlp.up_proj.recipe.level == 2
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert set(model.state_dict()) == set(ref_sd)
    ids = token_ids(2, 12)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_lora_style_frozen_base_skips_weight_gradient():
    x, w, gy = _data()
    xv = x.clone().requires_grad_()
    layer = LowpLinear(K, N, bias=True, recipe=parse_recipe("fp8:1", block=16))
    layer.weight.requires_grad_(False)
    layer(xv).backward(gy)
    assert layer.weight.grad is None and layer.bias.grad is not None and xv.grad is not None


@pytest.mark.parametrize("text,match", [
    ("fp8:3", "level must be 0, 1 or 2"),
    ("nosuch:1", "neither a preset"),
    ("int4:asym:1", "asymmetric"),
    ("int8:mse:0", "absmax"),
    ("", "recipe is text"),
])
def test_bad_recipes(text, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(text)


def test_bad_block_shapes_and_rules():
    with pytest.raises(ValueError, match="power of two"):
        parse_recipe("fp8:1", block=48)
    with pytest.raises(ValueError, match="in_features=48 is not a multiple of 32"):
        LowpLinear(48, 64, recipe="mxfp4:1")
    with pytest.raises(ValueError, match="input has 32 features"):
        lowp_linear(torch.randn(4, 32), torch.randn(8, 16), None, parse_recipe("fp8:0"))
    with pytest.raises(ValueError, match="no nn.Linear of the model matches"):
        prepare_lowp(nn.Sequential(nn.Linear(4, 4)), {"nothing*": "fp8:0"})
    with pytest.raises(TypeError, match="rules must be"):
        prepare_lowp(nn.Sequential(nn.Linear(4, 4)), 3)
    assert parse_recipe("bf16") is None


def _tiny_lowp_run(state_dir, interrupt_at=None):
    from _tiny import tiny_llama, token_ids
    from lowbit.train.loop import TrainConfig, train
    from lowbit.train.objectives import causal_lm_objective

    model = tiny_llama()
    prepare_lowp(model, "int8:2", block=16, grad_rounding="stochastic")
    ids = token_ids(16, 24)

    def on_step(rec):
        if rec["step"] == interrupt_at:
            raise KeyboardInterrupt

    cfg = TrainConfig(steps=4, lr=1e-3, save_every=10)
    train(model, lambda k: {"input_ids": ids[(2 * k) % 16: (2 * k) % 16 + 2]}, causal_lm_objective("ce"),
          {"weights": [p for p in model.parameters()]}, cfg, state_dir=state_dir, progress=False, on_step=on_step)
    return model


def test_lowp_training_resumes_bit_exactly(tmp_path):
    """Stochastic gradient rounding is a function of the step: an interrupted run resumed through
    lowbit.train's loop ends with the weights of one that never stopped."""
    straight = _tiny_lowp_run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _tiny_lowp_run(tmp_path / "b", interrupt_at=2)
    resumed = _tiny_lowp_run(tmp_path / "b")
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_lptrain_cli_bad_recipe_exits_2(capsys):
    from lowbit.cli import main

    assert main(["lptrain", "--halo", "fp8:7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HALO level must be 0, 1 or 2" in err[0]


def test_compiled_cast_is_the_eager_cast(monkeypatch):
    """The torch.compile'd scale-and-cast (CUDA's path; compiled for the CPU here) gives the eager
    codes, for every native format, input dtype and scale shape, within dynamo's recompile limit."""
    import warnings

    from lowbit.lowp import fused

    monkeypatch.setattr(fused, "COMPILE_ON", ("cpu",))
    monkeypatch.setattr(fused, "_COMPILED", {})
    g = torch.Generator().manual_seed(5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lowbit.lowp")   # a compile failure falls back, warning
        for dt in (torch.bfloat16,):   # the autocast dtype; float32 inputs take the same graph
            for rows in (32, 48):
                a = (torch.randn(rows, 64, generator=g) * 10).to(dt)
                for fmt, dtype in (("e4m3fn", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2), ("int8", torch.int8)):
                    fmax = lowbit.format(fmt).max
                    for s in (a.abs().amax().float() / fmax, a.abs().amax(1, keepdim=True).float() / fmax):
                        got = fused.cast_codes(a, s, fmax, dtype)
                        want = fused._cast_codes(a.float() / s, fmax, dtype == torch.int8, dtype)
                        assert got.dtype == dtype and torch.equal(got.float(), want.float())
    assert all(v is not fused._EAGER for v in fused._COMPILED.values())


@pytest.mark.parametrize("spec,exact", [("e4m3fn:tensor", True), ("e5m2:channel", True), ("int8:channel", True),
                                        ("e3m2fn:tensor", True), ("int8:g16", False), ("mxfp4", False),
                                        ("e4m3fn:g16", False)])
def test_bf16_exact_grid_values(spec, exact):
    """Where the emulation may multiply in bf16 (CUDA): exactly the operands whose grid values bf16 holds."""
    from lowbit.lowp.matmul import bf16_exact
    from lowbit.quant.spec import QuantSpec

    a = torch.randn(16, 64, generator=torch.Generator().manual_seed(6)) * 1e3
    op = quantize_operand(a, QuantSpec.parse(spec), fast=False)
    assert bf16_exact(op) == exact
    if exact:
        assert torch.equal(op.values.bfloat16().float(), op.values)


def test_lptrain_lora_over_a_low_precision_base(tmp_path):
    """``lptrain --lora``: adapters train over the frozen FP8 HALO-1 base (the base's weights do not
    move, its matmuls stay low precision); the saved adapter on a fresh low-precision base gives the
    trained model's outputs."""
    from _tiny_lm import save_byte_llama

    from lowbit.adapters.io import load_adapter
    from lowbit.lowp.job import run_lptrain
    from lowbit.models.loader import load_model
    from lowbit.train.loop import TrainConfig

    model_dir = save_byte_llama(tmp_path / "model", blocks=1)
    loaded = load_model(model_dir)
    model = loaded.model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    report = run_lptrain(model, "fp8:1", str(tmp_path / "out"), config=TrainConfig(steps=4, lr=1e-2, warmup=1),
                         batch_size=2, seq_len=32, block=16, backend="emulate", val_batches=1, device="cpu",
                         tokenizer=loaded.tokenizer, save_model=True, quiet=True, lora="*q_proj,*v_proj", lora_rank=4)
    lora = report["lora"]
    assert lora["layers"] == 2 and lora["rank"] == 4 and report["lowp_layers"] == 7
    assert lora["trained_parameters"] == sum(4 * (m.in_features + m.out_features)
                                             for n, m in model.named_modules() if isinstance(m, LowpLinear)
                                             and n.endswith(("q_proj.base", "v_proj.base")))
    assert lora["adapter_bytes"] == 4 * lora["trained_parameters"]   # float32 adapters
    after = model.state_dict()
    for k, v in base.items():   # the base, under its new names inside the adapter wrappers
        k2 = k if k in after else k.replace(".weight", ".base.weight")
        assert torch.equal(after[k2], v), k
    wrapped = [m for m in model.modules() if hasattr(m, "lora_B")]
    assert all(isinstance(m.base, LowpLinear) and m.base.lowp for m in wrapped)
    assert any(float(m.lora_B.detach().abs().max()) > 0 for m in wrapped)
    assert all(math.isfinite(h["loss"]) for h in report["history"])
    from lowbit.lowp.job import summary_lines

    assert "LoRA rank 4 on 2 layers" in summary_lines(report)[0]
    fresh = load_model(model_dir).model
    prepare_lowp(fresh, parse_recipe("fp8:1", block=16, backend="emulate"))
    load_adapter(fresh, tmp_path / "out")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lptrain_lora_bad_input():
    from lowbit.lowp.job import run_lptrain

    with pytest.raises(ValueError, match="PATTERN=RANK"):
        run_lptrain("smollm2", "fp8:1", lora="*q_proj=x")
    with pytest.raises(ValueError, match="lora with fsdp"):
        run_lptrain("smollm2", "fp8:1", lora="*q_proj", fsdp=True)
