"""`lowbit search --device`: the search runs where it is told (a tiny byte-level Llama saved as a model
directory), and a bad device is refused before anything loads."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from lowbit.cli import main  # noqa: E402

from _tiny_lm import save_byte_llama  # noqa: E402

FAST = ["--budget", "6", "--candidates", "int4:g32,int8:g32", "--no-pairs", "--no-uniform", "--no-portfolio",
        "--calib", "2", "--seq-len", "32", "--eval-tokens", "256", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_byte_llama(tmp_path_factory.mktemp("byte_llama") / "m")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_search_runs_on_the_named_device(model_dir, tmp_path, device):
    out = tmp_path / device
    assert main(["search", model_dir, "--device", device, "--out", str(out)] + FAST) == 0
    rep = json.loads((out / "search.json").read_text())
    assert rep["environment"]["device"].startswith(device)
    plan = json.loads((out / "plan.json").read_text())
    assert 4.5 <= plan["bits_per_weight"] <= 6 and rep["search"]["mode"] == "budget"


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'; accepted: auto, cpu, cuda, cuda:N"),
    ("cuda:x", "unknown device 'cuda:x'"),
    (f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda", "CUDA device"),
])
def test_a_bad_device_exits_2_before_loading(capsys, tmp_path, device, message):
    # the model path does not exist: the device is checked first, so the error names the device
    assert main(["search", str(tmp_path / "no-such-model"), "--device", device, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit search: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
