"""Two variants of the outlier transforms that were measured and not adopted, kept reproducible:
runs benchmarks/outliers_quality.py with one piece of the transforms changed.

    python benchmarks/outliers_variants.py block-no-down --model smollm2 --calib 16 --seq-len 512 \
        --eval-tokens 4096 --schemes nvfp4:mse+nvfp4:4over6 --rows block --seeds 0,1
    python benchmarks/outliers_variants.py stats-spread --model smollm2 --calib 16 --seq-len 512 \
        --eval-tokens 4096 --schemes w4a4 --rows hadamard+smooth --seeds 0,1

block-no-down: ``--rotate block`` on every quantized linear except mlp.down_proj (whose input holds
SmolLM2's ~3,600x outlier channel, where the per-layer analysis puts rotation's NVFP4 W4A4 loss).
stats-spread: the smoothing statistics' token budget taken as the leading tokens of every calibration
sequence (16 x 128 of 16 x 512) instead of the leading whole sequences (4 x 512).
"""
from __future__ import annotations

import os
import runpy
import sys

import torch

import lowbit.transforms.apply as apply_module
import lowbit.transforms.smooth as smooth_module


def block_no_down() -> None:
    every = apply_module._block_linears
    apply_module._block_linears = lambda model, plan: [n for n in every(model, plan)
                                                       if not n.endswith("mlp.down_proj")]


def stats_spread() -> None:
    def spread(batches, tokens):
        if tokens is None:
            return list(batches)
        per = max(1, tokens // sum(smooth_module._batch_tokens(b)[0] for b in batches))
        return [{k: (v[:, :per] if torch.is_tensor(v) and v.dim() > 1 else v) for k, v in b.items()}
                for b in batches]

    smooth_module.stats_batches = spread


VARIANTS = {"block-no-down": block_no_down, "stats-spread": stats_spread}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: outliers_variants.py {{{'|'.join(VARIANTS)}}} OUTLIERS_QUALITY_ARGS...")
    VARIANTS[sys.argv[1]]()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "outliers_quality.py")
    sys.argv = [script] + sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
