"""Interruption end to end: a real `lowbit train` killed with SIGKILL mid-run and started again with
the same command resumes from its last saved step and writes the very checkpoint bytes an
uninterrupted run writes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from _tiny_lm import save_byte_llama  # noqa: E402

STEPS = 16
ARGS = ["--scheme", "int3:g32:asym+int8:token", "--init", "rtn", "--steps", str(STEPS), "--save-every", "2",
        "--batch-size", "2", "--seq-len", "64", "--lr", "1e-3", "--warmup", "3", "--objective", "kl+ce",
        "--eval-tokens", "256", "--context", "128", "--device", "cpu", "--quiet"]
FINAL = ("model.safetensors", "lowbit.json")


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _train(model_dir: str, out: Path) -> list:
    return [sys.executable, "-m", "lowbit.cli", "train", model_dir, "--out", str(out)] + ARGS


def test_sigkill_mid_training_then_rerun_writes_the_same_bytes(tmp_path):
    model_dir = save_byte_llama(tmp_path / "model", hidden_size=128, intermediate_size=256)
    env = _env()
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    proc = subprocess.Popen(_train(model_dir, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = killed / ".train" / "train_state.pt"
    end = time.time() + 300
    while not state.exists():
        if proc.poll() is not None:
            pytest.fail(f"lowbit train ended (status {proc.returncode}) before saving a state: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        assert time.time() < end, "no training state after 300 s"
        time.sleep(0.01)
    time.sleep(0.3)  # into the next steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not any((killed / f).exists() for f in FINAL), "the run finished before the kill: nothing to resume"

    runs = [subprocess.Popen(_train(model_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for out in (killed, ref)]
    for p in runs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    resumed = json.loads((killed / "report.json").read_text())
    assert 2 <= resumed["resumed_from"] < STEPS and resumed["resumed_from"] % 2 == 0
    assert json.loads((ref / "report.json").read_text())["resumed_from"] is None
    for name in FINAL:
        assert (killed / name).read_bytes() == (ref / name).read_bytes(), f"{name} differs after the resume"
    assert resumed["after"]["perplexity"] == json.loads((ref / "report.json").read_text())["after"]["perplexity"]
    assert not (killed / ".train").exists()
    # lowbit eval on the trained checkpoint: the very perplexity the training report holds
    from lowbit.jobs import run_eval

    again = run_eval(str(ref), quiet=True, device="cpu")
    assert again["perplexity"] == json.loads((ref / "report.json").read_text())["after"]["perplexity"]
