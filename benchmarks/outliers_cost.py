"""What the outlier pipeline adds to GPTQ's time: GPTQ alone vs rotation + smoothing + GPTQ, in one run.

    python3 benchmarks/outliers_cost.py --model minilm --schemes w3g64,fp4g32,mxfp4,nvfp4,w4a4,w4a8 --reps 2

For each scheme, ``--reps`` rounds; each round runs, on fresh copies of the float model and the same
calibration batches (``--calib`` x ``--seq-len``): GPTQ alone; ``--rotate`` + ``--smooth auto`` +
GPTQ with the sampled alpha search and the smoothing statistics on the first 2048 calibration
tokens (the defaults); ``pipeline-all-tokens``: the same with the statistics over every calibration
token (the earlier behaviour); and ``pipeline-full-search``: the full search (every sampled row and
output channel, the earlier behaviour). Times are CPU seconds of this process
(``time.process_time``, one thread), which a shared, loaded machine inflates far less than wall
time; wall seconds are printed too. No evaluation: only quantization is timed. Prints the median
over rounds of each part and the overhead of the whole pipeline relative to GPTQ alone.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from lowbit.jobs import calibration_batches
from lowbit.models.loader import load_model
from lowbit.ptq.pipeline import quantize_model
from lowbit.quant.plan import Plan
from lowbit.transforms import smooth as smooth_module
from lowbit.transforms.apply import apply_outlier_transforms


def _timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--schemes", default="w3g64,fp4g32,mxfp4,nvfp4,w4a4,w4a8")
    ap.add_argument("--rotate", default="hadamard")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", default="gptq,pipeline,pipeline-full-search",
                    help="which of gptq, pipeline, pipeline-all-tokens, pipeline-full-search to run")
    ap.add_argument("--transforms-only", action="store_true",
                    help="time only the transforms of the pipeline variants (no GPTQ; for a machine too loaded for "
                    "the whole run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    batches = calibration_batches(loaded, args.calib, args.seq_len)
    defaults = (smooth_module.SEARCH_TOKENS, smooth_module.SEARCH_OUTPUTS)
    rows = []
    for scheme in args.schemes.split(","):
        plan = Plan.from_scheme(scheme)
        for rep in range(args.reps):
            for variant in args.variants.split(","):
                m = copy.deepcopy(loaded.model)
                smooth_module.SEARCH_TOKENS, smooth_module.SEARCH_OUTPUTS = (
                    (None, None) if variant == "pipeline-full-search" else defaults)
                tf_c = tf_w = 0.0
                if variant != "gptq":
                    tokens = None if variant == "pipeline-all-tokens" else "default"
                    _, tf_c, tf_w = _timed(lambda: apply_outlier_transforms(m, plan, batches, rotate=args.rotate,
                                                                            smooth="auto", smooth_tokens=tokens))
                q_c = q_w = float("nan")
                if not args.transforms_only:
                    _, q_c, q_w = _timed(lambda: quantize_model(m, plan, batches, "gptq", progress=False))
                r = {"scheme": scheme, "rep": rep, "variant": variant, "transform_cpu": tf_c, "gptq_cpu": q_c,
                     "transform_wall": tf_w, "gptq_wall": q_w}
                rows.append(r)
                print(json.dumps(r), flush=True)
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump({"args": vars(args), "rows": rows}, fh, indent=1)
    smooth_module.SEARCH_TOKENS, smooth_module.SEARCH_OUTPUTS = defaults
    print_table(rows, args)


def print_table(rows, args) -> None:
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    if args.transforms_only:
        variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "gptq"]
        print(f"\n{args.model}, {args.calib}x{args.seq_len} calibration; transforms only, CPU seconds (median of "
              f"{args.reps}); --rotate {args.rotate} --smooth auto")
        print("| scheme | " + " | ".join(variants) + " |")
        print("|---|" + "---:|" * len(variants))
        for scheme in dict.fromkeys(r["scheme"] for r in rows):
            cells = [med([r["transform_cpu"] for r in rows if r["scheme"] == scheme and r["variant"] == v])
                     for v in variants]
            print(f"| {scheme} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        return
    print(f"\n{args.model}, {args.calib}x{args.seq_len} calibration; CPU seconds (median of {args.reps}); "
          f"pipeline = --rotate {args.rotate} --smooth auto + GPTQ")
    variants = [v for v in ("pipeline", "pipeline-all-tokens", "pipeline-full-search")
                if any(r["variant"] == v for r in rows)]
    heads = {"pipeline": "pipeline", "pipeline-all-tokens": "statistics on all tokens",
             "pipeline-full-search": "full search"}
    print("| scheme | GPTQ | " + " | ".join(f"{heads[v]}: transforms + GPTQ | overhead" for v in variants) + " |")
    print("|---|---:|" + "---:|---:|" * len(variants))
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        get = lambda v, k: med([r[k] for r in rows if r["scheme"] == scheme and r["variant"] == v])
        g = get("gptq", "gptq_cpu")
        cells = [f"{g:.1f}"]
        for v in variants:
            t, q = get(v, "transform_cpu"), get(v, "gptq_cpu")
            if q != q:  # not run for this scheme
                cells += ["", ""]
                continue
            cells += [f"{t:.1f} + {q:.1f} = {t + q:.1f}", f"{(t + q) / g - 1:+.0%}"]
        print(f"| {scheme} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
