"""Where one measured single-layer evaluation of `lowbit search` spends its time (causal LM).

Times, for a layer of the first block (the worst case: every block re-runs) and of the last block:
the whole evaluation (KL, and the older cross-entropy difference), and its parts: the blocks, the
final norm + the head product, and the KL arithmetic over the vocabulary. Median of --reps runs.

    PYTHONPATH=src python3 benchmarks/measured_profile.py smollm2 --calib 4 --seq-len 256 --batch-size 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit.models.blocks import run_block
from lowbit.models.loader import load_model
from lowbit.search.candidates import quantizable_layers
from lowbit.search.objective import Objective, make_batches, swapped
from lowbit.search.sensitivity import rtn_weight


def _median(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--spec", default="int4:g64")
    args = ap.parse_args()
    loaded = load_model(args.model)
    layers = quantizable_layers(loaded.model)
    obj = Objective(loaded.model, loaded.kind, make_batches(loaded, args.calib, args.seq_len, args.batch_size))
    t = time.perf_counter()
    obj.increase_with(layers, {})
    print(f"threads {torch.get_num_threads()}, {args.calib} x {args.seq_len} tokens in batches of {args.batch_size}; "
          f"fp32 reference (block inputs + KL reference) {time.perf_counter() - t:.2f} s")
    names = list(layers)
    first, last = names[0], names[-1]
    rows = []
    for name in (first, last):
        w = {name: rtn_weight(layers[name].weight, args.spec)}
        rows.append((f"KL evaluation, {name}", _median(lambda: obj.increase_with(layers, w), args.reps)))
        rows.append((f"cross-entropy evaluation, {name}", _median(lambda: obj.loss_with(layers, w), args.reps)))
    w = {first: rtn_weight(layers[first].weight, args.spec)}
    head = loaded.model.lm_head
    with torch.inference_mode(), swapped(layers, w):
        def blocks():
            out = []
            for cap, h in zip(obj._caps, obj._inputs[0]):
                for b in obj.blocks:
                    h = run_block(b, cap, h)
                out.append(h)
            return out
        hs = blocks()
        rows.append(("  all blocks", _median(blocks, args.reps)))
        hn = [obj._final_norm(h) for h in hs]
        rows.append(("  final norm", _median(lambda: [obj._final_norm(h) for h in hs], args.reps)))
        rows.append(("  head product (h @ W^T)", _median(lambda: [head(x) for x in hn], args.reps)))
        refs = obj._reference_kl()

        def kl_math():
            for x, r in zip(hn, refs):
                dh = x - r.hidden
                m = (dh * r.pw).sum(-1)
                dz = F.linear(dh, head.weight)
                dz.sub_(m.unsqueeze(-1)).expm1_()
                torch.log1p(torch.linalg.vecdot(dz, r.p).double()).mean()
        rows.append(("  KL: dz product + expm1 + dot with p", _median(kl_math, args.reps)))

        def kl_vocab():
            for x, r in zip(hn, refs):
                dz = F.linear(x - r.hidden, head.weight)
                t0 = time.perf_counter()
                dz.expm1_()
                torch.linalg.vecdot(dz, r.p)
                kl_vocab.t += time.perf_counter() - t0
        kl_vocab.t = 0.0
        for _ in range(args.reps):
            kl_vocab()
        rows.append(("  KL vocabulary passes only (expm1 + dot)", kl_vocab.t / args.reps))

        def ce():
            for x, b in zip(hn, obj.batches):
                z = head(x)
                obj._loss_from_logits(z, b)
        rows.append(("  cross-entropy: head + log_softmax", _median(ce, args.reps)))
    print("| part | seconds |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()
