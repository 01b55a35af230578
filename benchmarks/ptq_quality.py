"""PTQ quality table: {RTN, GPTQ} x schemes on a real model, measured in one run.

    python benchmarks/ptq_quality.py --model smollm2 --calib 32 --seq-len 512 --eval-tokens 8192
    python benchmarks/ptq_quality.py --model minilm

Prints a markdown table (metric, bits/weight, seconds) and writes the raw rows to --json.
"""
from __future__ import annotations

import argparse
import json
import time

from lowbit.jobs import EvalSettings, run_quantize
from lowbit.models.loader import load_model

DEFAULT_SCHEMES = ["w4g64", "w3g64", "w2g64", "w4g128", "fp4g32", "mxfp4", "nvfp4", "w4a8", "w8a8fp8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    ap.add_argument("--methods", default="rtn,gptq",
                    help="columns: rtn, gptq, or gptq:sequential / gptq:parallel to compare calibration orders")
    ap.add_argument("--calibration", default="auto", choices=["auto", "sequential", "parallel"])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--no-act-order", dest="act_order", action="store_false")
    ap.add_argument("--json", default=None, help="write every row here (appended as each finishes)")
    args = ap.parse_args()
    settings = EvalSettings(eval_tokens=args.eval_tokens or None)
    rows = []
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            loaded = load_model(args.model)
            t = time.time()
            name, _, order = method.partition(":")
            rep = run_quantize(args.model, scheme, name, None, calib=args.calib, seq_len=args.seq_len,
                               settings=settings, quiet=True, loaded=loaded,
                               act_order=args.act_order, calibration=order or args.calibration)
            q, b = rep["quantized"], rep["baseline"]
            metric = q.get("perplexity", q.get("cosine_mean"))
            base = b.get("perplexity", 1.0)
            row = {"model": rep["model"], "scheme": scheme, "method": method, "metric": metric,
                   "baseline": base, "bits_per_weight": q["bits_per_weight"], "spearman": q.get("spearman"),
                   "quantize_seconds": q["quantize_seconds"], "seconds": time.time() - t,
                   "calibration": (rep["calibration"] or {}).get("order")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"args": vars(args), "rows": rows}, fh, indent=1)
    metric_name = "perplexity" if "perplexity" in rep["quantized"] else "cosine to fp32"
    print(f"\n{rows[0]['model']}: baseline {metric_name} {rows[0]['baseline']:.3f}; calibration "
          f"{args.calib}x{args.seq_len}; eval {args.eval_tokens} tokens")
    methods = args.methods.split(",")
    print("| scheme | bits/weight | " + " | ".join(f"{m} {metric_name}" for m in methods) + " |")
    print("|---|---:|" + "---:|" * len(methods))
    for scheme in args.schemes.split(","):
        r = {x["method"]: x for x in rows if x["scheme"] == scheme}
        bits = next(iter(r.values()))["bits_per_weight"]
        print(f"| {scheme} | {bits:.3f} | " + " | ".join(f"{r[m]['metric']:.4f}" for m in methods) + " |")


if __name__ == "__main__":
    main()
