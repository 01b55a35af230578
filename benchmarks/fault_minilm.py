"""MiniLM under soft errors: sentence-embedding cosine against fp32 vs the bit error rate of its weights.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/fault_minilm.py [--sentences 64 --seeds 2]

Every nn.Linear weight of all-MiniLM-L6-v2 (offline package) is stored in int8 (per-row absmax scale),
e4m3fn or bf16, and every bit of the stored codes (sign, exponent, mantissa) flips independently with
probability p (lowbit.arith.weight_faults). Reported: the mean and minimum over sentences of the
cosine between the faulty model's embedding and the fp32 model's, averaged over seeds; p = 0 is the
storage format alone.
"""
from __future__ import annotations

import argparse
import time

import torch

from lowbit import arith
from lowbit.data.corpus import evaluation_sentences
from lowbit.evaluate.embedding import embed
from lowbit.models.loader import load_model

RATES = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)
FORMATS = ("int8", "e4m3fn", "bf16")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    loaded = load_model("minilm")
    model, tok = loaded.model, loaded.tokenizer
    sentences = evaluation_sentences(a.sentences)
    ref = embed(model, tok, sentences)
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences, {n_weights:,} Linear weights, {a.seeds} seeds")
    print(f"{'format':<8}{'bit error rate':>15}{'flips/model':>13}{'cosine mean':>13}{'cosine min':>12}")
    t0 = time.perf_counter()
    for fmt in FORMATS:
        bits = {"int8": 8, "e4m3fn": 8, "bf16": 16}[fmt]
        for p in RATES:
            means, mins = [], []
            for s in range(a.seeds if p else 1):
                with arith.weight_faults(model, fmt, p, seed=1000 * s):
                    emb = embed(model, tok, sentences)
                cos = (emb.double() * ref.double()).sum(-1)
                cos = torch.nan_to_num(cos, nan=-1.0)  # an inf/nan embedding counts as the worst
                means.append(float(cos.mean()))
                mins.append(float(cos.min()))
            print(f"{fmt:<8}{p:>15g}{p * bits * n_weights:>13.1f}{sum(means) / len(means):>13.5f}"
                  f"{sum(mins) / len(mins):>12.5f}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
