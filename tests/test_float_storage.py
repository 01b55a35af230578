"""Checkpoints store unquantized tensors in 16 bits: the dtype rule, the in-place rounding, and the
end to end guarantee that `lowbit eval DIR` gives the figures the quantize job reported."""
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import save_byte_llama  # noqa: E402

from lowbit.export.float_storage import check_float_storage, exactly_in, round_to_storage, storage_dtype


def test_dtype_rule():
    bf = torch.randn(64).to(torch.bfloat16).float()
    assert storage_dtype(bf) == torch.bfloat16  # a bf16 model's tensors round-trip exactly
    fp = torch.tensor([1.0 + 2 ** -10, 3.0])  # 11 significant bits: fp16 holds it, bf16 does not
    assert storage_dtype(fp) == torch.float16
    assert storage_dtype(torch.tensor([1.0 + 2 ** -20])) == torch.float16  # lossy: fp16 (more mantissa)
    assert storage_dtype(torch.tensor([1e6 + 1.0])) == torch.bfloat16  # beyond fp16's range
    assert storage_dtype(torch.randn(4), "fp32") == torch.float32
    assert storage_dtype(torch.randn(4), "bf16") == torch.bfloat16
    assert storage_dtype(torch.arange(4)) == torch.int64
    assert storage_dtype(torch.randn(4).half()) == torch.float16
    assert exactly_in(torch.tensor([float("nan"), 1.0]), torch.float16)
    with pytest.raises(ValueError, match="accepted: auto, fp16, bf16, fp32"):
        check_float_storage("fp8")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e5, 1e5, allow_nan=False, width=32), min_size=1, max_size=40),
       st.sampled_from(["auto", "fp16", "bf16"]))
def test_rounding_is_exact_in_storage_and_idempotent(values, choice):
    m = torch.nn.Linear(1, len(values), bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(values).reshape(-1, 1))
    dt = round_to_storage(m, (), choice)["weight"]
    once = m.weight.detach().clone()
    assert exactly_in(once, dt)
    assert torch.equal(once, torch.tensor(values).reshape(-1, 1).to(dt).float())
    round_to_storage(m, (), choice)
    assert torch.equal(m.weight.detach(), once)


def test_checkpoint_floats_16bit_and_eval_reproduces(tmp_path):
    from lowbit.export.checkpoint import load_quantized
    from lowbit.jobs import EvalSettings, run_eval, run_quantize

    torch.set_num_threads(1)
    model_dir = save_byte_llama(tmp_path / "m")  # random fp32 weights: no 16-bit type holds them exactly
    settings_ = EvalSettings(eval_tokens=1024, context=128)
    rep = run_quantize(model_dir, "w4g32", "rtn", str(tmp_path / "ck"), settings=settings_, quiet=True)
    meta = json.loads((tmp_path / "ck" / "lowbit.json").read_text())
    floats = {n: r["dtype"] for n, r in meta["tensors"].items() if ".weight." not in n}
    assert floats and set(floats.values()) <= {"float16", "bfloat16"}, floats
    br = rep["quantized"]["size_breakdown"]
    assert sum(br.values()) == rep["quantized"]["size_bytes"] and 0 < br["header"] < 20000
    # what the job measured is what is stored: lowbit eval gives the same perplexity, bit for bit
    assert run_eval(str(tmp_path / "ck"), quiet=True)["perplexity"] == rep["quantized"]["perplexity"]
    model, _, _ = load_quantized(tmp_path / "ck")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # fp32 storage (the old layout) still writes and reads; its file is bigger
    old = run_quantize(model_dir, "w4g32", "rtn", str(tmp_path / "old"), settings=settings_, quiet=True,
                       float_storage="fp32")
    assert old["quantized"]["size_bytes"] > rep["quantized"]["size_bytes"]
    assert run_eval(str(tmp_path / "old"), quiet=True)["perplexity"] == old["quantized"]["perplexity"]
    with pytest.raises(ValueError, match="unknown float storage"):
        run_quantize(model_dir, "w4g32", "rtn", None, settings=settings_, quiet=True, float_storage="half")
