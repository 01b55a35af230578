"""Low-precision linear on CUDA: the FP8 (torch._scaled_mm) and INT8 (torch._int_mm) kernel path
against the emulated path on the same inputs (operand codes identical, outputs to accumulation-order
tolerance), and a tiny model training end to end under bf16 autocast."""
import pytest
import torch

from lowbit.lowp import lowp_linear, parse_recipe, prepare_lowp
from lowbit.lowp.linear import choose_kernel
from lowbit.lowp.operand import quantize_operand, rotate
from lowbit.quant.spec import QuantSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _data(T=200, K=256, N=384, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    x[:, 7] *= 50
    w = torch.randn(N, K, generator=g) * 0.05
    gy = torch.randn(T, N, generator=g) * 1e-3
    return x.to("cuda", dtype), w.cuda(), gy.to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", ["e4m3fn:tensor", "e5m2:tensor", "int8:channel", "int8:tensor", "e4m3fn:channel"])
def test_cuda_codes_equal_lowbit_rounding(spec, dtype):
    """The compiled scale-and-cast gives exactly lowbit's rounding (Triton) of the same operand,
    rotated or not."""
    x, _, _ = _data(dtype=dtype)
    s = QuantSpec.parse(spec)
    for a in (x, rotate(x, 64)[0]):
        nat, emu = quantize_operand(a, s, codes=True), quantize_operand(a, s, fast=False)
        assert nat.values.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
        assert torch.equal(nat.values.float(), emu.values)
        assert torch.equal(nat.scale, emu.scale)


@pytest.mark.parametrize("text", ["fp8:0", "fp8:1", "fp8:2", "fp8e4:1", "fp8row:1", "int8:0", "int8:2"])
def test_cuda_kernel_path_matches_emulation(text):
    x, w, gy = _data()
    outs = []
    for backend in ("emulate", "kernel"):
        r = parse_recipe(text, block=64, backend=backend)
        xv, wv = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = lowp_linear(xv, wv, None, r)
        assert y.dtype == torch.bfloat16
        y.backward(gy)
        outs.append((y.float(), xv.grad.float(), wv.grad))
    xf, wf, gf = x.float(), w.float(), gy.float()
    # The scale of each output's terms, ||row|| * ||column|| (>= sum |a_i b_i|, and unchanged by the
    # rotations): where a sum cancels, the tensor cores' accumulation order (FP8 partial sums are
    # promoted to float32 in blocks) moves the result by a small multiple of its terms, not of itself.
    terms = {"y": xf.norm(dim=1, keepdim=True) * wf.norm(dim=1)[None, :],
             "x.grad": gf.norm(dim=1, keepdim=True) * wf.norm(dim=0)[None, :],
             "w.grad": gf.norm(dim=0)[:, None] * xf.norm(dim=0)[None, :]}
    for name, a, b in zip(("y", "x.grad", "w.grad"), *outs):
        # bf16 outputs: one rounding of sums accumulated in different orders
        bad = (a - b).abs() > 2 ** -7 * b.abs() + 2 ** -9 * terms[name]
        assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} outside tolerance, max abs diff "
                               f"{float((a - b).abs().max()):.3g}, max |ref| {float(b.abs().max()):.3g}")


def test_cuda_auto_backend_picks_the_kernels():
    x, w, _ = _data(T=208)   # lowp_mm pads the tokens to a multiple of 16 before choosing
    r = parse_recipe("fp8:1", block=64)
    assert choose_kernel(r, "x", "w", x, w.shape, torch.bfloat16) == "fp8"
    assert choose_kernel(parse_recipe("int8:2"), "g", "x", x, w.shape, torch.float32) == "int8"
    assert choose_kernel(parse_recipe("e3m2:1"), "x", "w", x, w.shape, torch.bfloat16) is None


@pytest.mark.parametrize("text", ["fp8:2", "int8:2", "mxfp4:1"])
def test_tiny_model_trains_on_cuda(text):
    from _tiny import tiny_llama, token_ids

    model = tiny_llama(hidden_size=128, intermediate_size=256).cuda()
    prepare_lowp(model, text, block=64)
    ids = token_ids(8, 64).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
