"""Run a quality benchmark with the model on another torch device (e.g. a GPU), unchanged otherwise.

    python3 benchmarks/on_device.py --device cuda benchmarks/ptq_quality.py --model smollm2 --calib 32 ...

The quality benchmarks (ptq_quality, outliers_quality, retention_quality, kv_quality) load their
model with ``lowbit.models.loader.load_model``, which returns it on the CPU. This wrapper moves every
loaded model to ``--device``, then runs the benchmark script as ``__main__`` with the remaining
arguments; ``lowbit.jobs`` already puts the calibration ids on the model's device, evaluates there
and keys its cached fp32 baseline by the device type. Figures differ from the CPU's only by
floating-point summation order (matmuls, Hessians), which GPTQ and activation quantization amplify.
"""
from __future__ import annotations

import argparse
import functools
import os
import runpy
import sys


def install(device: str) -> None:
    """Patch the loader so that every model it returns lives on ``device``."""
    import torch

    import lowbit.models.loader as loader

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")

    load = loader.load_model

    @functools.wraps(load)
    def load_on_device(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded.model.to(dev)
        return loaded

    loader.load_model = load_on_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("script", help="the benchmark script to run")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    a = ap.parse_args()
    if not os.path.isfile(a.script):
        ap.error(f"no such script: {a.script}")
    install(a.device)
    sys.argv = [a.script, *a.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.script)))
    runpy.run_path(a.script, run_name="__main__")


if __name__ == "__main__":
    main()
