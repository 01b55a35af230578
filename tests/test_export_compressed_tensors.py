"""compressed-tensors and dense exports, checked by transformers' own loaders (compressed-tensors'
decompression for the former): the same weights bit for bit and the same logits as lowbit's model."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import save_byte_llama  # noqa: E402

pytest.importorskip("compressed_tensors", reason="the round trip is read back by compressed-tensors (test extra)")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from lowbit.jobs import EvalSettings, run_quantize
    from lowbit.quant.plan import Plan

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ct")
    model_dir = save_byte_llama(root / "m")
    ev = EvalSettings(eval_tokens=256, context=128)
    mixed = Plan({"*": "int4:g64", "*down_proj": "e4m3fn:channel", "*.0.mlp.up_proj": "int3:g32",
                  "*.1.self_attn.o_proj": "int8:channel"})
    run_quantize(model_dir, None, "gptq", str(root / "mixed"), plan=mixed, settings=ev, calib=4, seq_len=64,
                 quiet=True)
    run_quantize(model_dir, "fp8", "rtn", str(root / "fp8"), settings=ev, quiet=True)  # FP8 weights and activations
    run_quantize(model_dir, None, "rtn", str(root / "bad"), settings=ev, quiet=True,
                 plan=Plan({"*": "int4:g64", "*.0.mlp.up_proj": "int4:g32:asym", "*.1.mlp.up_proj": "nvfp4"}))
    return root


def _same_model(exported, ckpt, atol=1e-5):
    from transformers import AutoModelForCausalLM

    from lowbit.data.corpus import evaluation_tokens
    from lowbit.export.checkpoint import load_quantized

    ours, tok, _ = load_quantized(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = evaluation_tokens(tok, 128)[None, :128]
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=atol)
    loaded = theirs.state_dict()  # decompressed by the first forward; also holds the reader's scales
    for name, p in ours.named_parameters():
        assert torch.equal(loaded[name], p), name


def test_mixed_plan_loads_with_same_weights_and_logits(root):
    from lowbit.export.compressed_tensors_export import export_compressed_tensors

    rep = export_compressed_tensors(root / "mixed", root / "mixed_ct")
    assert rep["formats"] == ["float-quantized", "pack-quantized"] and len(rep["schemes"]) == 4
    qc = json.loads((root / "mixed_ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "mixed-precision"
    w4 = next(g for g in qc["config_groups"].values() if g["weights"]["num_bits"] == 4)
    assert w4["weights"]["group_size"] == 64 and w4["format"] == "pack-quantized" and len(w4["targets"]) == 10
    _same_model(root / "mixed_ct", root / "mixed")


def test_fp8_weights_and_activations(root):
    from lowbit.export.compressed_tensors_export import export_compressed_tensors

    rep = export_compressed_tensors(root / "fp8", root / "fp8_ct")
    (scheme,) = rep["schemes"].values()
    assert scheme["act"] == {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    _same_model(root / "fp8_ct", root / "fp8")


def test_refusals_name_the_layer_and_reason(root, capsys):
    from lowbit.cli import main
    from lowbit.export.compressed_tensors_export import CompressedTensorsError, export_compressed_tensors

    with pytest.raises(CompressedTensorsError) as e:
        export_compressed_tensors(root / "bad", root / "bad_ct")
    assert "model.layers.0.mlp.up_proj: int4:g32:asym: asymmetric" in str(e.value)
    assert "model.layers.1.mlp.up_proj: nvfp4" in str(e.value)
    assert main(["export", str(root / "bad"), "--to", "compressed-tensors", "--out", str(root / "bad_ct")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_dense_export_is_lowbits_model(root):
    from lowbit.export.dense import export_dense

    rep = export_dense(root / "mixed", root / "mixed_dense")
    assert rep["lossless"] and rep["dtype"] == "float32"  # float16 scale x level needs float32
    _same_model(root / "mixed_dense", root / "mixed", atol=0)
    with pytest.raises(ValueError, match="activation quantization"):
        export_dense(root / "fp8", root / "fp8_dense")
