"""The Hugging Face Trainer example: prepare_qat, Trainer, convert, save; the saved checkpoint
reloads through lowbit.load with the very logits the converted model computes."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
from _tiny_lm import save_byte_llama  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_qat.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_qat", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hf_trainer_qat"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_hf_trainer_example_trains_converts_and_saves(tmp_path):
    import lowbit
    from lowbit.quant.linear import QuantLinear

    model_dir = save_byte_llama(tmp_path / "model")
    res = _example().main(model_dir, "int4:g32", steps=6, seq_len=64, batch_size=2, lr=1e-3, scale_lr=1e-3,
                          out=str(tmp_path / "out"))
    assert len(res["losses"]) >= 2 and all(torch.isfinite(torch.tensor(res["losses"])))
    assert res["after"] > 0
    ckpt = lowbit.load(tmp_path / "out")
    assert ckpt.meta["method"] == "qat"
    layers = [m for m in ckpt.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(str(m.weight_spec) == "int4:g32" for m in layers)
    again = lowbit.evaluate(ckpt, eval_tokens=2048)["perplexity"]
    assert again == res["after"]  # the same values, the same arithmetic: the same perplexity
