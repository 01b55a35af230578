"""Running a Triton kernel test file again under Triton's CPU interpreter, from a process without
CUDA or the interpreter (where its kernel tests skip)."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def rerun_under_interpreter(test_file: str) -> None:
    """Run ``test_file`` with ``TRITON_INTERPRET=1`` in a subprocess and fail with its output unless
    every test there passes (skips allowed)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                      env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def kernel_module(name: str):
    """``lowbit.kernels.<name>`` where its kernels can run here: on CUDA, or under Triton's
    interpreter (which must be on before triton is imported); else the test skips (the file's
    ``test_interpreter_run`` covers it)."""
    if not (torch.cuda.is_available() or INTERPRET):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (test_interpreter_run covers it)")
    return importlib.import_module(f"lowbit.kernels.{name}")


def interpreter_rerun(test_file: str):
    """The ``test_interpreter_run`` of a Triton kernel test file: without CUDA and without the
    interpreter on, the file again in a process that has it on; elsewhere its tests run directly."""
    def test_interpreter_run():
        if torch.cuda.is_available() or INTERPRET:
            pytest.skip("the kernel tests run in this process")
        rerun_under_interpreter(test_file)
    return test_interpreter_run
