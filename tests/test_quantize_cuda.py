"""The PTQ pipeline with the model on a GPU: every method, outlier transform and retention mode runs
there, keeps the model on the device and matches the CPU run (RTN up to last-bit differences of the
scales; GPTQ, whose Hessians are summed in another order, to within a tolerance)."""
import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from lowbit.quant.plan import Plan  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, ids


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


@pytest.mark.parametrize("scheme", ["w3g64", "w4g128", "fp4g32", "mxfp4", "nvfp4", "w4a8", "w4a4", "w8a8fp8"])
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
    if method == "rtn":
        # Same scales and codes up to the last bit of a few: CUDA divides by a Python scalar through
        # its reciprocal, so a scale may differ by one ulp and a weight on a rounding tie may flip.
        for name, packed in rc.packed.items():
            for k, v in packed.items():
                g = rg.packed[name][k]
                assert g.shape == v.shape and g.dtype == v.dtype, (name, k)
                if v.is_floating_point():
                    torch.testing.assert_close(g.float(), v.float(), rtol=2e-3, atol=0, msg=f"{name} {k}")
                else:
                    assert (g != v).float().mean().item() < 0.02, (name, k)
    # quantization error of the whole model: same size on both devices
    ec, eg = _rel(lc, ref), _rel(lg, ref)
    assert eg == pytest.approx(ec, rel=0.25, abs=1e-3)


@pytest.mark.parametrize("rotate,smooth", [("hadamard", None), ("block", None), ("none", "auto"),
                                           ("hadamard", "auto")])
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
