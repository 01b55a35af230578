"""Conv-model PTQ quality: RTN vs GPTQ on a project-trained CNN, measured in one run.

    python benchmarks/conv_quality.py            # 3 training seeds, about a minute on one core

No pretrained CNN is available offline here (torchvision's PyPI wheel does not load beside torch
2.13.0 CPU, timm needs torchvision, and no cleanly installing PyPI package was found that ships CNN
weights), so the model is trained (benchmarks/digits_cnn.py): a 3-conv + 1-linear CNN on
scikit-learn's bundled handwritten digits (1,797 8x8 images; pip install scikit-learn). Fixed split: 1,297 training and
500 test images (permutation seed 0); calibration: 256 training images. Every conv and the linear
head are quantized (layer by layer, through ``quantize_model``'s path for models without blocks).
Reports test accuracy and the KL divergence of the quantized model's class distribution from the
float model's (mean over test images), each the mean over the training seeds.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from digits_cnn import CALIB, digits_split, train  # the model and data, shared with the CLI demo
from lowbit.ptq.pipeline import quantize_model
from lowbit.quant.plan import Plan

SCHEMES = {
    "int4 per channel": ({"*": "int4"}, {}),
    "int3 per channel": ({"*": "int3"}, {}),
    "fp4 e2m1 per channel": ({"*": "e2m1fn"}, {}),
    "int4 g32": ({"*": "int4:g32"}, {}),
    "int3 g32": ({"*": "int3:g32"}, {}),
    "int2 per channel": ({"*": "int2"}, {}),
    "w4a8 (int4 channel, int8 per position)": ({"*": "int4"}, {"*": "int8:token"}),
}


@torch.no_grad()
def logits(model, x):
    return model(x)


def kl(ref_logits, q_logits) -> float:
    """Mean KL(float || quantized) of the class distributions on the test images."""
    return F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                    reduction="batchmean").item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (the data split is fixed)")
    ap.add_argument("--calib", type=int, default=CALIB)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = digits_split()
    calib = [xtr[i:i + 64] for i in range(0, args.calib, 64)]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        t = time.time()
        model = train(xtr, ytr, seed)
        ref_logits = logits(model, xte)
        ref = ref_logits.argmax(-1)
        base = (ref == yte).float().mean().item()
        print(f"seed {seed}: float accuracy {base:.4f} (trained in {time.time() - t:.0f} s)", flush=True)
        for label, (w, a) in SCHEMES.items():
            for method in ("rtn", "gptq"):
                m = copy.deepcopy(model)
                res = quantize_model(m, Plan(dict(w), dict(a)), calib, method, progress=False)
                ql = logits(m, xte)
                p = ql.argmax(-1)
                row = {"seed": seed, "scheme": label, "method": method, "float_accuracy": base,
                       "accuracy": (p == yte).float().mean().item(), "agreement": (p == ref).float().mean().item(), "kl": kl(ref_logits, ql),
                       "bits_per_weight": res.bits_per_weight(), "layers": len(res.layers),
                       "skipped": res.skipped, "seconds": res.seconds}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)
    n = len(args.seeds.split(","))
    fl = sum(r["float_accuracy"] for r in rows if r["method"] == "rtn" and r["scheme"] == next(iter(SCHEMES))) / n
    print(f"\ndigits CNN (project-trained, 4 quantized layers, {sum(p.numel() for p in model.parameters())} parameters), float test accuracy {fl:.4f}; mean over {n} seeds; "
          f"500 test images; GPTQ calibration {args.calib} training images")
    print("| scheme | bits/weight | RTN accuracy / KL to float | GPTQ accuracy / KL to float |")
    print("|---|---:|---:|---:|")
    for label in SCHEMES:
        cells = []
        for method in ("rtn", "gptq"):
            rs = [r for r in rows if r["scheme"] == label and r["method"] == method]
            acc = sum(r["accuracy"] for r in rs) / len(rs)
            div = sum(r["kl"] for r in rs) / len(rs)
            cells.append(f"{acc:.4f} / {div:.2e}")
        bits = next(r["bits_per_weight"] for r in rows if r["scheme"] == label)
        print(f"| {label} | {bits:.3f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
