"""The PTQ pipeline with the model on a GPU: every method, outlier transform and retention mode runs
there, keeps the model on the device and matches the CPU run (RTN and activation quantization bit for
bit; GPTQ, whose Hessians are summed in another order, to within a tolerance)."""
import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from lowbit.quant.plan import Plan  # noqa: E402
from _tiny import batches, token_ids, tiny_llama


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    return tiny_llama(intermediate_size=128), token_ids(8, 32)


def _run(model, ids, device, scheme, method, rotate="none", smooth=None, retain=None):
    from lowbit.ptq.pipeline import quantize_model
    from lowbit.transforms.apply import apply_outlier_transforms

    m = copy.deepcopy(model).to(device)
    x = ids.to(device)
    batches = [{"input_ids": x[i : i + 4]} for i in range(0, x.shape[0], 4)]
    plan = Plan.from_scheme(scheme)
    if rotate != "none" or smooth is not None:
        apply_outlier_transforms(m, plan, batches, rotate=rotate, smooth=smooth)
    res = quantize_model(m, plan, batches, method, progress=False, retain=retain)
    with torch.no_grad():
        logits = m(x).logits
    return m, res, logits


def _rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.parametrize("scheme", ["w3g64", "w4g128", "fp4g32", "mxfp4", "nvfp4", "w4a8", "w4a4", "w8a8fp8",
                                    "nvfp4:4over6+nvfp4:4over6"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_methods_on_cuda_match_cpu(tiny, scheme, method):
    model, ids = tiny
    with torch.no_grad():
        ref = model(ids).logits
    mc, rc, lc = _run(model, ids, "cpu", scheme, method)
    mg, rg, lg = _run(model, ids, "cuda", scheme, method)
    assert all(p.device.type == "cuda" for p in mg.parameters())
    assert torch.isfinite(lg).all()
    assert [l.name for l in rg.layers] == [l.name for l in rc.layers]
    assert rg.bits_per_weight() == pytest.approx(rc.bits_per_weight())
    if method == "rtn":  # no data, no summation order: the same codes and scales, bit for bit
        for name, packed in rc.packed.items():
            for k, v in packed.items():
                assert torch.equal(rg.packed[name][k].cpu(), v), (name, k)
    # quantization error of the whole model: same size on both devices
    ec, eg = _rel(lc, ref), _rel(lg, ref)
    assert eg == pytest.approx(ec, rel=0.25, abs=1e-3)


@pytest.mark.parametrize("rotate,smooth", [("hadamard", None), ("block", None), ("none", "auto"),
                                           ("hadamard", "auto"), ("auto", None), ("auto", "auto")])
def test_outlier_transforms_on_cuda(tiny, rotate, smooth):
    model, ids = tiny
    with torch.no_grad():
        ref = model(ids).logits
    _, _, lc = _run(model, ids, "cpu", "w4a4", "gptq", rotate, smooth)
    mg, _, lg = _run(model, ids, "cuda", "w4a4", "gptq", rotate, smooth)
    assert all(p.device.type == "cuda" for p in mg.parameters())
    assert _rel(lg, ref) == pytest.approx(_rel(lc, ref), rel=0.25, abs=1e-3)


@pytest.mark.parametrize("alloc,fmt", [("fixed", "int8"), ("optimized", "int8"), ("fixed", "fp16")])
def test_retention_on_cuda(tiny, alloc, fmt):
    from lowbit.ptq.retention import RetainConfig

    model, ids = tiny
    with torch.no_grad():
        ref = model(ids).logits
    _, rc, lc = _run(model, ids, "cpu", "w3g64", "gptq", retain=RetainConfig(0.02, fmt, "obs", alloc))
    mg, rg, lg = _run(model, ids, "cuda", "w3g64", "gptq", retain=RetainConfig(0.02, fmt, "obs", alloc))
    assert all(p.device.type == "cuda" for p in mg.parameters())
    assert rg.bits_per_weight() == pytest.approx(rc.bits_per_weight(), rel=0.02)
    assert _rel(lg, ref) == pytest.approx(_rel(lc, ref), rel=0.25, abs=1e-3)


def test_perplexity_on_cuda_matches_cpu(tiny):
    from lowbit.evaluate import perplexity

    model, ids = tiny
    tokens = ids.reshape(-1)
    assert perplexity(copy.deepcopy(model).cuda(), tokens, context=64) == pytest.approx(
        perplexity(model, tokens, context=64), rel=1e-4)


@pytest.mark.parametrize("spec", ["int8:token", "e4m3fn:token", "int4:token", "int4:g32", "int8", "nvfp4",
                                  "nvfp4:4over6", "nvfp4:mse"])
def test_activation_quantization_is_bit_identical_on_cuda(spec):
    # CUDA divides by a Python scalar through its reciprocal: the per-token scale amax / fmt.max must
    # not be computed that way, or half the rows get another scale than on the CPU
    from lowbit.quant.activation import quantize_activation
    from lowbit.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 576, generator=g) * (torch.rand(576, generator=g) * 4 + 0.1)
    s = QuantSpec.parse(spec)
    assert torch.equal(quantize_activation(x.cuda(), s).cpu(), quantize_activation(x, s))


def test_scalar_division_is_correctly_rounded_on_cuda():
    from lowbit.kernels.scalar_div import div_scalar

    x = torch.rand(1 << 16, generator=torch.Generator().manual_seed(1)) * 100
    for c in (448.0, 127.0, 7.0, 6.0 * 448.0):
        assert torch.equal(div_scalar(x.cuda(), c).cpu(), x / c)
