"""Interruption end to end: a real `lowbit quantize` killed with SIGKILL in the middle of a block, then
rerun, writes the very bytes (model.safetensors, lowbit.json) an uninterrupted run writes; and a run
stopped after any single file operation of its progress folder resumes to the same model."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from _tiny_lm import save_byte_llama  # noqa: E402

BLOCKS = 4
# each block takes about a second on a 2-core CPU: long enough to be killed inside one
ARGS = ["--scheme", "int4:g32", "--method", "gptq", "--calib", "16", "--seq-len", "128", "--eval-tokens", "256",
        "--context", "128", "--device", "cpu", "--quiet"]
FINAL = ("model.safetensors", "lowbit.json")


def _env(tmp: Path) -> dict:
    from lowbit.data.corpus import CORPUS_ENV, save_corpus

    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            # the baseline of this throwaway model is cached here, not in the user's cache; the
            # corpus comes frozen from this process instead of being rebuilt there
            "LOWBIT_CACHE_DIR": str(tmp / "cache"), CORPUS_ENV: save_corpus(str(tmp / "corpus.json")),
            # one thread each: the runs share the CPU
            "OMP_NUM_THREADS": "1"}


def _quantize(model_dir: str, out: Path) -> list:
    return [sys.executable, "-m", "lowbit.cli", "quantize", model_dir, "--out", str(out)] + ARGS


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            pytest.fail(f"lowbit quantize ended (status {proc.returncode}) before writing {path}: {err}")
        if time.time() > end:
            proc.kill()
            pytest.fail(f"no {path} after {timeout} s")
        time.sleep(0.005)


def test_sigkill_in_a_block_then_rerun_writes_the_same_bytes(tmp_path):
    model_dir = save_byte_llama(tmp_path / "model", blocks=BLOCKS, hidden_size=256, intermediate_size=512)
    env = _env(tmp_path)
    killed, ref = tmp_path / "killed", tmp_path / "ref"

    proc = subprocess.Popen(_quantize(model_dir, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    # progress.json is written last, once a block is complete: the next block is then under way
    _wait_for(killed / ".progress" / "progress.json", proc, timeout=180)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    progress = json.loads((killed / ".progress" / "progress.json").read_text())
    assert progress["done"] < BLOCKS - 1, "the run finished its blocks before the kill: nothing to resume"
    assert not any((killed / f).exists() for f in FINAL)
    restored = {l["name"]: l["seconds"] for l in progress["result"]["layers"]}

    # the rerun (the same command) and an uninterrupted run, side by side; both in fresh processes
    # started alike, since float results may differ in the last bit with how threads were set up
    runs = [subprocess.Popen(_quantize(model_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for out in (killed, ref)]
    for p in runs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]

    for name in FINAL:
        assert (killed / name).read_bytes() == (ref / name).read_bytes(), f"{name} differs after the resume"
    # the rerun resumed: the finished blocks' layers come back with the timings recorded before the kill
    layers = {l["name"]: l["seconds"] for l in json.loads((killed / "report.json").read_text())["layers"]}
    assert restored and all(layers[n] == s for n, s in restored.items())
    assert len(layers) == 7 * BLOCKS and not (killed / ".progress").exists()


# --- a stop after any one file operation of the progress folder -------------------------------------

class Stop(BaseException):
    """A crash: not an Exception, so nothing on the way up handles it."""


class StopAfter:
    """Counts the completed file operations on ``folder`` (safetensors writes, text writes, renames)
    and raises Stop after the ``n``-th; ``n`` None only counts."""

    def __init__(self, monkeypatch, folder: Path, n=None):
        import pathlib

        import safetensors.torch as st

        self.folder, self.n, self.ops = str(folder), n, []
        for owner, name in ((st, "save_file"), (os, "replace"), (pathlib.Path, "write_text"),
                            (pathlib.Path, "unlink")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, fn, name):
        def op(*args, **kw):
            out = fn(*args, **kw)
            paths = [str(a) for a in args if isinstance(a, (str, os.PathLike))]
            if any(p == self.folder or p.startswith(self.folder + os.sep) for p in paths):
                self.ops.append((name, [os.path.basename(p) for p in paths]))
                if self.n is not None and len(self.ops) == self.n:
                    raise Stop
            return out
        return op


def _llama_case():
    from _tiny import batches, tiny_llama, token_ids

    ids = token_ids(2, 16, seed=5)
    return tiny_llama(), batches(token_ids(4, 32), 2), "int3:g32", lambda m: m(ids).logits


def _cnn_case():
    from _factories import cnn_data, tiny_cnn

    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    return tiny_cnn(), cnn_data()["calibration"], "int4:g8", lambda m: m(x)


@pytest.mark.parametrize("case", [_llama_case, _cnn_case], ids=["block-by-block", "layer-by-layer"])
def test_a_stop_after_any_progress_file_operation_resumes_to_the_same_result(tmp_path, monkeypatch, request, case):
    from dataclasses import asdict

    from lowbit.ptq.pipeline import quantize_model
    from lowbit.quant.plan import Plan

    float_model, data, scheme, forward = case()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two dozen small runs: one thread is several times faster on a busy CPU
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def run(folder, stop=None):
        model = copy.deepcopy(float_model)
        with monkeypatch.context() as m:
            counter = StopAfter(m, folder, stop)
            res = quantize_model(model, Plan.from_scheme(scheme), data, "gptq", progress=False, progress_dir=folder)
        with torch.no_grad():
            out = forward(model)
        # what the checkpoint is written from: packed tensors in their order, per-layer results
        packed = [(n, k, v) for n, p in res.packed.items() for k, v in p.items()]
        layers = [{k: v for k, v in asdict(l).items() if k != "seconds"} for l in res.layers]
        return (out, packed, layers), counter.ops

    (want, want_packed, want_layers), ops = run(tmp_path / "count")
    assert len(ops) >= 2 * 2, ops  # at least a data file and a commit per block or layer
    for n in range(1, len(ops) + 1):
        folder = tmp_path / f"stop{n}"
        with pytest.raises(Stop):
            run(folder, stop=n)
        (out, packed, layers), _ = run(folder)
        where = f"stopped after {ops[n - 1]}"
        assert torch.equal(out, want), f"{where}, the resumed model differs"
        assert [(a, b) for a, b, _ in packed] == [(a, b) for a, b, _ in want_packed], f"{where}: packed order"
        assert all(torch.equal(v, w) for (_, _, v), (_, _, w) in zip(packed, want_packed)), where
        assert layers == want_layers, where
