"""lowbit scaling: tokenizer, model shapes, plans, the sweep runner (skip/resume/shares), the CLI and the
report, on tiny models and synthetic runs."""
import hashlib
import json

import pytest
import torch

from lowbit.cli import main
from lowbit.data.train_corpus import Document, TrainingCorpus
from lowbit.scaling import models
from lowbit.scaling.sweep import (RUNS_FILE, RunSpec, SweepSettings, parse_only, read_runs, run_sweep, sweep_grid,
                                  sweep_plan)
from lowbit.scaling.tokenizer import EOT, load_tokenizer, save_tokenizer, tokenizer_sha256, train_bpe_json

from test_scaling_fit import synthetic_runs


def _corpus():
    texts = [f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n    return x + {i}\n" * 3 for i in range(40)]
    docs = tuple(Document(f"m{i}", f"m{i}.py", t, "validation" if i % 10 == 0 else "train") for i, t in enumerate(texts))
    text = "\n\n".join(d.text for d in docs)
    return TrainingCorpus(docs, hashlib.sha256(text.encode()).hexdigest(), "3", "e", (), (), ())


def test_bpe_is_deterministic_and_round_trips(tmp_path):
    a, b = train_bpe_json(_corpus(), 300), train_bpe_json(_corpus(), 300)
    assert a == b
    spec = json.loads(a)
    assert len(spec["model"]["vocab"]) <= 300 and EOT in spec["model"]["vocab"]
    (tmp_path / "t.json").write_text(a)
    tok = load_tokenizer(str(tmp_path / "t.json"))
    text = "def f7(x):\n    return x + 7 # ünïcode"
    assert tok.decode(tok(text)["input_ids"]) == text
    save_tokenizer(tok, str(tmp_path / "u.json"))
    assert tokenizer_sha256(load_tokenizer(str(tmp_path / "u.json"))) == tokenizer_sha256(tok)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_json(_corpus(), 100)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("d", [32, 64, 96])
def test_shapes_count_what_the_model_holds(d):
    shape = models.model_shape(d, 300, 16)
    model = models.build_model(shape, 0, 0)  # raises if params() disagrees with the model
    counts = shape.params()
    emb = model.get_input_embeddings().weight.numel()
    assert counts["total"] - counts["no_emb"] == emb
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    assert counts["linear"] == linear
    assert models.peak_lr(4 * d) == pytest.approx(models.peak_lr(d) / 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        models.model_shape(d + 1, 300, 16)


def test_plans_follow_the_schemes():
    q = "model.layers.0.self_attn.q_proj"
    down = "model.layers.0.mlp.down_proj"
    p = sweep_plan("w4a4", 32)
    assert str(p.weight_spec(q)) == "int4:g32" and str(p.act_spec(q)) == "int4:token"
    assert str(sweep_plan("w4a4-fc2a8", 32).act_spec(down)) == "int8:token"
    assert str(sweep_plan("w4a4-fc2a8", 32).act_spec(q)) == "int4:token"
    assert sweep_plan("w16a4", None).weight_spec(q) is None
    assert sweep_plan("w4a16", 64).act_spec(q) is None
    assert str(sweep_plan("w4a4", 16, "group").act_spec(down)) == "int4:g16"
    assert sweep_plan("bf16", None) is None
    assert sweep_plan("w4a4", 16).weight_spec("lm_head") is None


def test_grid_and_shares():
    runs = sweep_grid([32, 64], [1000, 2000], [16, 64], ["w4a4", "bf16", "w16a4"])
    assert len(runs) == 2 * 2 * 2 + 2 * 2 + 2 * 2
    assert len({r.key for r in runs}) == len(runs)
    assert {r.group for r in runs if r.precision != "w4a4"} == {None}
    shares = [{r.key for j, r in enumerate(runs) if j % 3 == i} for i in range(3)]
    assert set().union(*shares) == {r.key for r in runs} and sum(map(len, shares)) == len(runs)
    assert parse_only("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError, match="--only"):
            parse_only(bad)
    with pytest.raises(ValueError, match="unknown precision"):
        sweep_grid([32], [1000], [16], ["w3a3"])
    with pytest.raises(ValueError, match="give --groups"):
        sweep_grid([32], [1000], [], ["w4a4"])
    with pytest.raises(ValueError, match="must divide"):
        sweep_grid([32], [1000], [64], ["w4a4"], act_granularity="group")


def test_sweep_writes_one_line_per_run_and_resumes(tmp_path):
    torch.set_num_threads(1)
    settings = SweepSettings(batch_size=2, seq_len=32, vocab=512, eval_tokens=64, device="cpu", save_every=2)
    runs = [RunSpec(32, 256, None, "bf16"), RunSpec(32, 256, 16, "w4a4")]
    logs = []
    first = run_sweep(tmp_path, runs[:1], settings, log=logs.append)   # "interrupted" after one run
    recs = run_sweep(tmp_path, runs, settings, log=logs.append)
    assert [r["key"] for r in first] == [runs[0].key] and [r["key"] for r in recs] == [runs[1].key]
    assert "1 already in" in logs[-2]
    lines = (tmp_path / RUNS_FILE).read_text().splitlines()
    assert len(lines) == 2
    with open(tmp_path / RUNS_FILE, "a") as fh:  # a run two overlapping shares both finished, a torn line
        fh.write(lines[0].replace('"loss": ', '"loss": 1') + "\n{\"key\": \"d3")
    assert [r["loss"] for r in read_runs(tmp_path)] == [json.loads(x)["loss"] for x in lines]
    got = {r["key"]: r for r in read_runs(tmp_path)}
    w = got[runs[1].key]
    assert w["D"] == 256 and w["steps"] == 4 and w["G"] == 16 and w["N_no_emb"] < w["N"]
    assert w["plan"]["weight"] == {"*": "int4:g16"} and 0 < w["loss"] < 10 and len(w["loss_curve"]) == 4
    assert set(w["linear_inputs"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # the state of finished runs is removed; a third call has nothing to do
    assert not any((tmp_path / ".state").iterdir())
    assert run_sweep(tmp_path, runs, settings, log=logs.append) == []
    # another tokenizer or other loss-changing settings in the same directory are refused
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(tmp_path, runs, SweepSettings(batch_size=4, seq_len=32, vocab=512, eval_tokens=64, device="cpu"))


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["scaling", "run", "--sizes", "33", "--tokens", "1k", "--precisions", "bf16", "--out",
                 str(tmp_path)]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["scaling", "run", "--sizes", "32", "--tokens", "lots", "--out", str(tmp_path)]) == 2
    assert main(["scaling", "fit", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--tokens" in err[0] and "no runs" in err[1]
    assert main(["scaling", "predict", str(tmp_path), "--params", "1e6", "--tokens", "1e8"]) == 2


def test_fit_report_and_predict_on_a_synthetic_sweep(tmp_path, capsys):
    runs = synthetic_runs(seed=5, extra={"w4a16": (32, 128), "w16a4": (None,)})
    with open(tmp_path / RUNS_FILE, "w") as fh:
        for r in runs:
            fh.write(json.dumps({**r, "seconds": 1.0, "device": "synthetic"}) + "\n")
    assert main(["scaling", "fit", str(tmp_path), "--bootstrap", "8"]) == 0
    assert "held out largest N" in capsys.readouterr().out
    assert main(["scaling", "report", str(tmp_path), "--bootstrap", "8"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    verdicts = {(t["precision"], t["trend"]): t["verdict"] for t in report["trends"]}
    assert verdicts[("w4a4", "falls with N")] == "agrees" and verdicts[("w4a4", "rises with D")] == "agrees"
    assert report["fit"]["decomposition"]["weight_grows_faster_with_D"]
    for name in ("report.html", "loss_vs_N.png", "delta_p.png", "decomposition.png", "residuals.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert main(["scaling", "predict", str(tmp_path), "--params", "2e6", "--tokens", "5e7", "--group", "64",
                 "--max-penalty", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "w4a4 N=2e+06 D=5e+07 G=64: loss" in out and "largest power-of-two group size" in out
    # the runs past the first tokens only, written elsewhere
    assert main(["scaling", "fit", str(tmp_path), "--bootstrap", "0", "--min-tokens", "20000000",
                 "--out", str(tmp_path / "late")]) == 0
    late = json.loads((tmp_path / "late" / "fit.json").read_text())
    assert late["min_tokens"] == 20_000_000 and late["n_runs"] == len([r for r in runs if r["D"] >= 2e7])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sweep_runs_on_cuda_in_bf16(tmp_path):
    settings = SweepSettings(batch_size=4, seq_len=64, vocab=512, eval_tokens=256, device="cuda")
    recs = run_sweep(tmp_path, [RunSpec(64, 2048, None, "bf16"), RunSpec(64, 2048, 32, "w4a4")], settings,
                     log=lambda s: None)
    assert [r["autocast"] for r in recs] == ["bf16", "bf16"]
    assert all(0 < r["loss"] < 10 for r in recs) and recs[1]["plan"]["act"]["*"] == "int4:token"
