"""Adapters on CUDA: the least-squares fake quantization gives the CPU's bits, and a tiny model
fine-tunes (LoRA 1-bit and LR-QAT) end to end with bf16 autocast."""
import pytest
import torch

from lowbit.adapters import AdapterFormat, add_lora, fold, lora_layers, parse_targets, prepare_lrqat
from lowbit.train.loop import TrainConfig, train
from lowbit.train.objectives import causal_lm_objective
from _tiny_lm import byte_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("fmt", ["1bit", "2bit", "4bit", "nf4", "8bit"])
def test_cuda_adapter_quantization_matches_cpu(fmt):
    f = AdapterFormat.parse(fmt)
    w = torch.randn(16, 576, generator=torch.Generator().manual_seed(0))
    assert torch.equal(f.fake(w), f.fake(w.cuda()).cpu())
    packed_cpu, packed_gpu = f.pack(w), f.pack(w.cuda())
    assert all(torch.equal(packed_cpu[k], packed_gpu[k]) for k in packed_cpu)


@pytest.mark.parametrize("kind", ["lora:1bit", "lrqat"])
def test_tiny_finetune_on_cuda(kind):
    import lowbit
    from lowbit.adapters.job import own_tensors
    from lowbit.adapters.lrqat import layer_scales

    m = byte_llama()
    if kind == "lrqat":
        lowbit.quantize_model(m, "int4:g32")
        own_tensors(m)
        m.cuda()  # the stored scales stay on the CPU: LR-QAT must follow the weights' device
        made = prepare_lrqat(m, parse_targets(["*proj=4"]), stored=layer_scales(m, m.lowbit_result.packed))
        groups = {"weights": [p for l in made.values() for p in (l.lora_A, l.lora_B)],
                  "scales": [l.scale for l in made.values()]}
    else:
        add_lora(m, parse_targets(["*proj=4"]), AdapterFormat.parse("1bit"))
        groups = {"weights": [p for l in lora_layers(m).values() for p in (l.lora_A, l.lora_B)], "scales": []}
    m.cuda()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (2, 32), generator=g)  # one batch to memorise: random bytes have nothing else
    res = train(m, lambda step: {"input_ids": data}, causal_lm_objective("ce"), groups,
                TrainConfig(steps=8, lr=1e-2), progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    if kind == "lrqat":
        fold(m)
