"""Where NVFP4 activations lose under a rotation: per linear layer of a real model, the relative
output error of quantizing only its input activations, ||Q(X R) (W R)^T - X W^T||^2 / ||X W^T||^2
(W in float, so nothing but the activation quantizer and the rotation differ), for no rotation, a
full-width Hadamard rotation and a block-16 rotation (MR-GPTQ's), under the plain amax rule,
Four Over Six and a full MSE scale search.

    python benchmarks/nvfp4a_layer_error.py --model minilm --calib 8 --seq-len 128

Prints one row per layer kind (errors summed over the layers of that kind, relative to the summed
reference output energy) and the activations' channel-outlier ratio (largest channel absmax over the
median channel absmax).
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch import nn

from lowbit.data.corpus import calibration_batches
from lowbit.models.loader import load_model
from lowbit.quant.activation import quantize_activation
from lowbit.quant.spec import QuantSpec
from lowbit.transforms.hadamard import full_block, random_signs, rotate

QUANT = ["nvfp4", "nvfp4:4over6", "nvfp4:mse"]


def capture_inputs(model: nn.Module, ids: torch.Tensor) -> dict:
    """Inputs (tokens, features) of every nn.Linear, float32, on one forward."""
    got, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: got.setdefault(name, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def kind_of(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="lm_head", help="comma-separated name parts of layers to leave out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model)
    ids = calibration_batches(lm.tokenizer, args.calib, args.seq_len)
    inputs = capture_inputs(lm.model, ids)
    mods = dict(lm.model.named_modules())
    num = defaultdict(float)
    den = defaultdict(float)
    outlier = {}
    for name, X in inputs.items():
        if any(s and s in name for s in args.skip.split(",")):
            continue
        W = mods[name].weight.detach().float()
        n = X.shape[1]
        Y = X @ W.T
        k = kind_of(name)
        den[k] += float(Y.pow(2).sum())
        ch = X.abs().amax(0)
        outlier[k] = max(outlier.get(k, 0.0), float(ch.max() / ch.median().clamp_min(1e-12)))
        signs = random_signs(n, args.seed)
        for rot, block in (("none", None), ("full", full_block(n)), ("block16", 16)):
            if rot == "none":
                Xr, Wr = X, W
            else:
                Xr, Wr = rotate(X, block, signs), rotate(W, block, signs)
            for qname in QUANT:
                Q = quantize_activation(Xr, QuantSpec.parse(qname))
                num[(k, rot, qname)] += float((Q @ Wr.T - Y).pow(2).sum())
    cols = [(r, q) for r in ("none", "full", "block16") for q in QUANT]
    print("| layer kind | max/median channel | " + " | ".join(f"{r} {q}" for r, q in cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    tot = defaultdict(float)
    for k in den:
        row = [num[(k, r, q)] / den[k] for r, q in cols]
        for c, r in zip(cols, row):
            tot[c] += num[(k, *c)]
        print(f"| {k} | {outlier[k]:.1f} | " + " | ".join(f"{v:.2e}" for v in row) + " |")
    d = sum(den.values())
    print("| all | | " + " | ".join(f"{tot[c] / d:.2e}" for c in cols) + " |")


if __name__ == "__main__":
    main()
