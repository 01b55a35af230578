"""Running a Triton kernel test file again under Triton's CPU interpreter, from a process without
CUDA or the interpreter (where its kernel tests skip)."""
import os
import subprocess
import sys
from pathlib import Path


def rerun_under_interpreter(test_file: str) -> None:
    """Run ``test_file`` with ``TRITON_INTERPRET=1`` in a subprocess and fail with its output unless
    every test there passes (skips allowed)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                      env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
