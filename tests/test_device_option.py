"""`--device` of the main job: accepted names, clear errors, the report says where it ran."""
import pytest
import torch

from lowbit.cli import main
from lowbit.job_common import resolve_device


def test_device_names_resolve_or_fail_clearly():
    assert resolve_device(None) is None
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "cuda:x", "mps"):
        with pytest.raises(ValueError, match="accepted: auto, cpu, cuda, cuda:N"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda")


def test_cli_refuses_a_bad_device_before_loading(capsys):
    assert main(["quantize", "--device", "tpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'tpu'" in err and "Traceback" not in err
    assert main(["eval", "/nonexistent-dir", "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
