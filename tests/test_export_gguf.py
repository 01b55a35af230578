"""GGUF export, checked by its readers: gguf's own dequantizer gives lowbit's weights bit for bit,
and transformers (``gguf_file=``) loads the file into a model with lowbit's weights and logits."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import save_byte_llama  # noqa: E402

from lowbit.export.gguf_blocks import encode, exact_type
from lowbit.quant.spec import QuantSpec

gguf = pytest.importorskip("gguf", reason="the GGUF round trip is read back by the gguf package (test extra)")


def _dequant(blocks: np.ndarray, gtype: str) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(blocks, gguf.GGMLQuantizationType[gtype]), dtype=np.float32))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["Q4_0", "Q8_0", "Q4_1"]), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2 ** 31))
def test_blocks_decode_to_levels_times_scales(gtype, rows, nb, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = {"Q4_0": (-8, 7), "Q8_0": (-128, 127), "Q4_1": (0, 15)}[gtype]
    levels = torch.randint(lo, hi + 1, (rows, 32 * nb), generator=g).double()
    # float16 scales over its whole normal and subnormal range
    scales = (torch.rand(rows, nb, generator=g) * 2.0 ** torch.randint(-24, 8, (rows, nb), generator=g).float())
    scales = scales.half().float().clamp_min(2.0 ** -24)
    zeros = None
    if gtype == "Q4_1":  # zero points whose offset -z*s float16 holds (powers of two times small z)
        zeros = torch.randint(0, 4, (rows, nb), generator=g).float()
        scales = 2.0 ** torch.randint(-12, 4, (rows, nb), generator=g).float()
    want = levels.float().reshape(rows, nb, 32)
    want = (want - zeros.unsqueeze(-1)) * scales.unsqueeze(-1) if zeros is not None else want * scales.unsqueeze(-1)
    got = _dequant(encode(gtype, levels, scales, zeros, "w"), gtype)
    assert torch.equal(got.reshape(rows, -1), want.reshape(rows, -1))


def test_exact_types_and_refusals():
    assert exact_type(QuantSpec.parse("int4:g32"), 64) == ("Q4_0", "")
    assert exact_type(QuantSpec.parse("int4:g32:mse"), 64) == ("Q4_0", "")  # the scale search does not matter
    assert exact_type(QuantSpec.parse("int4:g32:asym"), 64) == ("Q4_1", "")
    assert exact_type(QuantSpec.parse("int8:g32"), 64) == ("Q8_0", "")
    for spec, why in (("int3:g64", "no GGUF type"), ("int4:g64", "no GGUF type"), ("int8:g32:asym", "asymmetric"),
                      ("e2m1fn:g32", "no GGUF type"), ("int4:channel", "no GGUF type")):
        assert exact_type(QuantSpec.parse(spec), 64)[0] is None and why in exact_type(QuantSpec.parse(spec), 64)[1]
    assert "blocks of 32" in exact_type(QuantSpec.parse("int4:g32"), 48)[1]
    with pytest.raises(ValueError, match="not float16 numbers"):
        encode("Q4_0", torch.zeros(1, 32), torch.tensor([[1.0 + 2 ** -20]]), None, "w")
    with pytest.raises(ValueError, match="outside Q4_0"):
        encode("Q4_0", torch.full((1, 32), 8.0), torch.ones(1, 1), None, "w")
    with pytest.raises(ValueError, match="offset -zero\\*scale"):
        encode("Q4_1", torch.zeros(1, 32), torch.tensor([[1.0 + 2 ** -10]]), torch.tensor([[3.0]]), "w")


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory):
    """A tiny Llama quantized per layer to the three exact types (Q4_0, Q8_0 by rule; one layer in
    int4:g32:asym) plus one int3 layer with no GGUF type, and a lossless one without it."""
    from lowbit.jobs import EvalSettings, run_quantize
    from lowbit.quant.plan import Plan

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gguf")
    model_dir = save_byte_llama(root / "m")
    ev = EvalSettings(eval_tokens=256, context=128)
    lossless = Plan({"*": "int4:g32", "*down_proj": "int8:g32"})
    run_quantize(model_dir, None, "gptq", str(root / "ok"), plan=lossless, settings=ev, calib=4, seq_len=64,
                 quiet=True)
    mixed = Plan({"*": "int4:g32", "*.0.mlp.up_proj": "int4:g32:asym", "*.1.mlp.gate_proj": "int3:g32"})
    run_quantize(model_dir, None, "rtn", str(root / "mixed"), plan=mixed, settings=ev, quiet=True)
    return root


def test_transformers_reads_lowbit_weights_and_logits(mixed_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.data.corpus import evaluation_tokens
    from lowbit.export.checkpoint import load_quantized
    from lowbit.export.gguf_export import export_gguf

    root = mixed_checkpoint
    rep = export_gguf(root / "ok", root / "ok" / "model.gguf")
    # 2 blocks x 7 linears; norms F32; the (tied) embedding in its stored float16
    assert rep.lossless and rep.to_dict()["types"] == {"Q4_0": 12, "Q8_0": 2, "F32": 5, "F16": 1}, rep.to_dict()
    ours, tok, _ = load_quantized(root / "ok")
    theirs = AutoModelForCausalLM.from_pretrained(root / "ok", gguf_file="model.gguf", dtype=torch.float32).eval()
    mine = ours.state_dict()
    for name, t in theirs.state_dict().items():  # every weight, bit for bit (q/k rows un-permuted by the reader)
        assert torch.equal(t, mine[name]), name
    ids = evaluation_tokens(tok, 128)[None, :128]
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    gtok = AutoTokenizer.from_pretrained(root / "ok", gguf_file="model.gguf")
    text = "def f(x):\n    return {'a': x}  # ünïcode"
    assert gtok(text).input_ids == tok(text).input_ids


def test_no_exact_type_refused_then_requantized(mixed_checkpoint, capsys):
    from lowbit.cli import main
    from lowbit.export.gguf_export import ExportError, export_gguf, GGUFOptions

    root = mixed_checkpoint
    with pytest.raises(ExportError) as e:
        export_gguf(root / "mixed", root / "mixed.gguf")
    assert "model.layers.1.mlp.gate_proj: int3:g32 has no GGUF type" in str(e.value)
    assert "offset -zero*scale is not a float16 number" in str(e.value)
    assert not (root / "mixed.gguf").exists()
    assert main(["export", str(root / "mixed"), "--to", "gguf", "--out", str(root / "mixed.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-requantize" in err
    rep = export_gguf(root / "mixed", root / "mixed.gguf", GGUFOptions(allow_requantize=True)).to_dict()
    lossy = {t["source"]: t for t in rep["requantized"]}
    assert set(lossy) == {"model.layers.1.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    assert lossy["model.layers.1.mlp.gate_proj"]["gguf_type"] == "Q4_0"
    assert 0 < lossy["model.layers.0.mlp.up_proj"]["rel_error"] < 1e-2  # only the offsets rounded
    assert 0 < lossy["model.layers.1.mlp.gate_proj"]["rel_error"] < 0.5
