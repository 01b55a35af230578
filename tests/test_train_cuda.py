"""QAT on CUDA: the fused fake-quant kernels give the CPU path's forward bits and its gradients,
and a tiny model trains end to end with bf16 autocast."""
import copy

import pytest
import torch

from lowbit.train.quantizers import WeightFakeQuant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("spec", ["int4:g64", "int3:g32:asym", "e2m1fn:g32", "e4m3fn:g16", "int4:g48", "int8:channel"])
def test_cuda_quantizer_matches_cpu(spec):
    from lowbit.kernels import triton_backend

    assert triton_backend() is not None, "the fused path needs Triton on CUDA"
    g = torch.Generator().manual_seed(0)
    cols = 150 if spec == "int4:g48" else 320
    w = torch.randn(64, cols, generator=g)
    fq = WeightFakeQuant(spec, tuple(w.shape))
    fq.init_from(w)
    with torch.no_grad():
        fq.scale.mul_(0.8)
    fq_cuda = copy.deepcopy(fq).cuda()
    coef = torch.randn(64, cols, generator=g)
    wc, wg = w.clone().requires_grad_(), w.cuda().requires_grad_()
    out_c, out_g = fq(wc), fq_cuda(wg)
    assert torch.equal(out_c, out_g.cpu())
    (out_c * coef).sum().backward()
    (out_g * coef.cuda()).sum().backward()
    assert torch.equal(wc.grad, wg.grad.cpu())
    torch.testing.assert_close(fq.scale.grad, fq_cuda.scale.grad.cpu(), rtol=1e-5, atol=1e-6)
    if fq.zero is not None:
        torch.testing.assert_close(fq.zero.grad, fq_cuda.zero.grad.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["int4:g32", "e2m1fn:g32", "int3:g64"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_cuda_quantizer_under_autocast_gives_the_cast_weight(spec, scale_dtype):
    """Under bf16 autocast the kernels round the scale parameter themselves and write the weight in
    bf16: the values autocast's cast of the float32 path would give, and the same gradients, with a
    scale below the storage dtype's tiny clamped and given no gradient."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g) * 0.05
    fq = WeightFakeQuant(spec, tuple(w.shape), scale_dtype=scale_dtype)
    fq.init_from(w)
    with torch.no_grad():
        fq.scale.mul_(1 + 0.01 * torch.randn(fq.scale.shape, generator=g))
        fq.scale[0, 0] = -1.0
    fq_cuda = copy.deepcopy(fq).cuda()
    coef = torch.randn(48, 256, generator=g).to(torch.bfloat16)
    wc, wg = w.clone().requires_grad_(), w.cuda().requires_grad_()
    out_c = fq(wc).to(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_g = fq_cuda(wg)
    assert out_g.dtype == torch.bfloat16
    assert torch.equal(out_c, out_g.cpu())
    (out_c.float() * coef.float()).sum().backward()
    (out_g * coef.cuda()).float().sum().backward()
    assert torch.equal(wc.grad, wg.grad.cpu())
    torch.testing.assert_close(fq.scale.grad, fq_cuda.scale.grad.cpu(), rtol=1e-5, atol=1e-6)
    assert float(fq_cuda.scale.grad[0, 0]) == 0.0


def test_tiny_model_trains_on_cuda_with_bf16_autocast():
    from _tiny import tiny_llama, token_ids
    from lowbit.train import convert, prepare_qat, trainable_groups
    from lowbit.train.loop import TrainConfig, train
    from lowbit.train.objectives import causal_lm_objective

    teacher = tiny_llama().cuda()
    student = prepare_qat(copy.deepcopy(teacher), "w4a8")
    res = train(student, lambda k: {"input_ids": token_ids(4, 32, seed=k)}, causal_lm_objective("kl"),
                trainable_groups(student), TrainConfig(steps=5, lr=1e-4), teacher=teacher, progress=False)
    assert res.steps == 5 and all(torch.isfinite(torch.tensor([h["loss"] for h in res.history])))
    ids = token_ids(2, 16).cuda()
    with torch.no_grad():
        trained = student(input_ids=ids).logits
        convert(student)
        assert torch.equal(student(input_ids=ids).logits, trained)
