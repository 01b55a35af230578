"""Exactness of each rotation/smoothing rewrite on a real model, and the speed of the Hadamard transform.

    python benchmarks/rotation_check.py --model smollm2 --tokens 256
    python benchmarks/rotation_check.py --model minilm
    python benchmarks/rotation_check.py --model minilm --no-speed

Rotations: ``hadamard`` is full width where a Hadamard matrix of that order exists (576 = 36·16,
384 = 12·32, 1536 = 12·128), ``hadamard-pow2`` power-of-two blocks only; the speed table has both.

For each rewrite (applied to a fresh copy of the float model) prints the max |change| of the logits
(last hidden state for encoders) on ``--tokens`` tokens of the evaluation split, next to the largest
logit. Then times the fast block Walsh-Hadamard transform against a plain copy of the same tensor.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from lowbit.models.loader import load_model
from lowbit.quant.plan import Plan
from lowbit.transforms.apply import apply_outlier_transforms, is_llama_like
from lowbit.transforms.hadamard import block_fwht
from lowbit.transforms.rotation import max_logit_diff, rotate_llama


def _timeit(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--scheme", default="w4a4", help="the plan whose layers smoothing/block rotation touch")
    ap.add_argument("--no-speed", action="store_true", help="skip the transform speed table")
    args = ap.parse_args()
    from lowbit.data.corpus import calibration_batches, evaluation_tokens

    loaded = load_model(args.model)
    ids = evaluation_tokens(loaded.tokenizer, args.tokens)[: args.tokens].reshape(1, -1)
    batch = {"input_ids": ids}
    calib = [{"input_ids": calibration_batches(loaded.tokenizer, 8, 128, 0)}]
    plan = Plan.from_scheme(args.scheme)
    rewrites = {}
    if is_llama_like(loaded.model):
        rewrites["residual rotation only"] = lambda m: rotate_llama(m, heads=False, online_down=False)
        rewrites["+ V/O head rotation"] = lambda m: rotate_llama(m, online_down=False)
        rewrites["+ online down_proj rotation"] = lambda m: rotate_llama(m)
    for rot, sm in (("hadamard", None), ("hadamard-pow2", None), ("block", None), ("none", "auto"),
                    ("hadamard", "auto")):
        rewrites[f"--rotate {rot} --smooth {sm}"] = \
            lambda m, rot=rot, sm=sm: apply_outlier_transforms(m, plan, calib, rotate=rot, smooth=sm)
    print(f"{loaded.name}: max |logit change| on {ids.numel()} tokens")
    print("| rewrite | max abs diff | max abs logit | seconds |")
    print("|---|---:|---:|---:|")
    for name, fn in rewrites.items():
        m = copy.deepcopy(loaded.model)
        t = time.time()
        _, diff, scale = max_logit_diff(m, fn, batch)
        print(f"| {name} | {diff:.2e} | {scale:.2f} | {time.time() - t:.1f} |", flush=True)

    if args.no_speed:
        return
    print(f"\nHadamard transform speed, {torch.get_num_threads()} thread(s), fp32")
    print("| shape | block | fwht ms | copy ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for shape, block in (((4096, 576), 64), ((4096, 576), 576), ((4096, 384), 128), ((4096, 384), 384),
                         ((4096, 1536), 512), ((4096, 1536), 1536), ((4096, 4096), 4096), ((1024, 16384), 128)):
        x = torch.randn(*shape)
        tf = _timeit(lambda: block_fwht(x, block), 5)
        tc = _timeit(lambda: x.clone(), 5)
        print(f"| {shape[0]}x{shape[1]} | {block} | {tf * 1e3:.1f} | {tc * 1e3:.1f} | {tf / tc:.1f} |")


if __name__ == "__main__":
    main()
