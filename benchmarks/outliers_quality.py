"""Outlier transforms table: {GPTQ, +rotation, +block rotation, +smoothing, +both, +retention,
all} x schemes on a real model, measured in one run (each cell is one `lowbit quantize` job on a freshly loaded model).

    python benchmarks/outliers_quality.py --model minilm --calib 32 --seq-len 128 --sentences 128
    python benchmarks/outliers_quality.py --model smollm2 --calib 16 --seq-len 512 --eval-tokens 4096 \
        --schemes fp4g32,mxfp4,nvfp4,w4a4 --rows gptq,hadamard

Rows: gptq (no transform), hadamard (--rotate hadamard: fused residual rotation on Llama-style
decoders, online per-linear on encoders; full-width Hadamard where the width allows, e.g. 384 =
12·32), hadamard-pow2 (the same with power-of-two blocks only), block (--rotate block: MR-GPTQ block rotation at the
format's group size), auto (--rotate auto: none, block or full-width online rotation chosen per group
of linears), smooth (--smooth auto), hadamard+smooth, block+smooth, auto+smooth, retain-fixed /
retain-opt (1% of the weights kept at int8, one ratio / per-layer ratios from the program), and
all:ROTATION (ROTATION + smoothing + optimised retention). Prints a markdown table of the metric
(perplexity, or mean cosine to the fp32 embeddings), the true bits per weight and the quantization time (transforms included)
and writes every row to --json as it finishes. ``--from-json A.json B.json`` prints the tables of
rows measured earlier (in one or several runs).
"""
from __future__ import annotations

import argparse
import json
import time

from lowbit.jobs import EvalSettings, run_quantize
from lowbit.models.loader import load_model
from lowbit.ptq.retention import RetainConfig
from lowbit.transforms.apply import parse_smooth_tokens

SCHEMES = {"int3 g64": "w3g64", "fp4_e2m1 g32": "fp4g32", "mxfp4": "mxfp4", "nvfp4": "nvfp4",
           "w4a4 int": "w4a4", "w4a8": "w4a8"}
# row -> (rotation, smoothing, retention: None, "fixed" or "optimized"; 1% of the weights at int8, obs saliency)
ROWS = {"gptq": ("none", None, None), "hadamard": ("hadamard", None, None),
        "hadamard-pow2": ("hadamard-pow2", None, None), "block": ("block", None, None),
        "auto": ("auto", None, None), "smooth": ("none", "auto", None),
        "hadamard+smooth": ("hadamard", "auto", None), "block+smooth": ("block", "auto", None),
        "auto+smooth": ("auto", "auto", None),
        "retain-fixed": ("none", None, "fixed"), "retain-opt": ("none", None, "optimized"),
        "all:hadamard": ("hadamard", "auto", "optimized"), "all:block": ("block", "auto", "optimized"),
        "all:auto": ("auto", "auto", "optimized")}
LABELS = {"gptq": "GPTQ", "hadamard": "+rotation (hadamard, full width)",
          "hadamard-pow2": "+rotation (hadamard-pow2, power-of-two blocks)", "block": "+block rotation (MR-GPTQ)",
          "auto": "+rotation chosen per layer (auto)", "smooth": "+smoothing (auto)",
          "hadamard+smooth": "+both (hadamard, auto)", "block+smooth": "+both (block, auto)",
          "auto+smooth": "+both (rotation chosen per layer, auto)",
          "retain-fixed": "+retention 1% int8, fixed ratio", "retain-opt": "+retention 1% int8, optimised ratios",
          "all:hadamard": "all: hadamard + smoothing + retention (optimised)",
          "all:block": "all: block + smoothing + retention (optimised)",
          "all:auto": "all: auto rotation + smoothing + retention (optimised)"}
RETAIN_RATIO, RETAIN_FORMAT = 0.01, "int8"


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--from-json":
        return from_json(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--schemes", default=",".join(SCHEMES.values()))
    ap.add_argument("--rows", default="gptq,hadamard,block,smooth,hadamard+smooth")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--json", default=None, help="write every row here (rewritten as each finishes)")
    ap.add_argument("--full-search", action="store_true",
                    help="--smooth auto scores its alpha grid on all 512 sampled rows and every output channel "
                    "(the earlier, slower search) instead of 256 rows x 256 output channels")
    ap.add_argument("--smooth-tokens", default="default",
                    help="calibration tokens the smoothing statistics are collected on: a number, 'all' (every "
                    "calibration token, the earlier behaviour) or 'default' (transforms.smooth.STATS_TOKENS)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the rotations' random signs; rows "
                    "with a rotation run once per seed (the table shows the mean and the spread)")
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows (another sample)")
    args = ap.parse_args()
    schemes, rows_wanted = args.schemes.split(","), args.rows.split(",")
    for r in rows_wanted:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; accepted: {', '.join(ROWS)}")
    settings = EvalSettings(eval_tokens=args.eval_tokens or None, sentences=args.sentences)
    seeds = [int(x) for x in args.seeds.split(",")]
    try:
        smooth_tokens = parse_smooth_tokens(args.smooth_tokens)
    except ValueError as e:
        ap.error(str(e))
    if args.full_search:
        from lowbit.transforms import smooth as smooth_module

        smooth_module.SEARCH_TOKENS = smooth_module.SEARCH_OUTPUTS = None
    rows = []
    for scheme in schemes:
        for row, seed in ((r, sd) for r in rows_wanted for sd in (seeds if ROWS[r][0] != "none" else [0])):
            rotate, smooth, alloc = ROWS[row]
            retain = RetainConfig(RETAIN_RATIO, RETAIN_FORMAT, "obs", alloc) if alloc else None
            loaded = load_model(args.model)
            t = time.time()
            rep = run_quantize(args.model, scheme, "gptq", None, calib=args.calib, seq_len=args.seq_len,
                               settings=settings, quiet=True, loaded=loaded, rotate=rotate, smooth=smooth,
                               transform_seed=seed, smooth_tokens=smooth_tokens, retain=retain,
                               calib_seed=args.calib_seed)
            q, b = rep["quantized"], rep["baseline"]
            tf = rep.get("transforms") or {}
            res = {"model": rep["model"], "scheme": scheme, "row": row, "rotate": rotate, "smooth": smooth,
                   "seed": seed, "calib_seed": args.calib_seed,
                   "metric": q.get("perplexity", q.get("cosine_mean")), "baseline": b.get("perplexity", 1.0),
                   "spearman": q.get("spearman"), "bits_per_weight": q["bits_per_weight"],
                   "quantize_seconds": q["quantize_seconds"], "transform_seconds": tf.get("seconds", 0.0),
                   "gptq_layer_seconds": sum(l["seconds"] for l in rep["layers"]),
                   "float_check": tf.get("float_check"),
                   "smoothed_groups": (tf.get("smoothing") or {}).get("smoothed"),
                   "search_sample": (tf.get("smoothing") or {}).get("search_sample"),
                   "smooth_stats": (tf.get("smoothing") or {}).get("stats"),
                   "chosen_alpha": (tf.get("smoothing") or {}).get("chosen"),
                   "rotation_choice": (tf.get("choice") or {}).get("count"),
                   "chosen_rotation": {k: v["rotation"] for k, v in ((tf.get("choice") or {}).get("chosen") or {}).items()} or None,
                   "seconds": time.time() - t}
            rows.append(res)
            print(json.dumps(res), flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"args": vars(args), "rows": rows}, fh, indent=1)
    print_tables(rows, schemes, rows_wanted, vars(args))


def print_tables(rows, schemes, rows_wanted, args) -> None:
    kind = "perplexity" if rows[0]["baseline"] != 1.0 else "cosine to fp32 (mean)"
    print(f"\n{rows[0]['model']}: baseline {kind} {rows[0]['baseline']:.4f}; GPTQ calibration "
          f"{args['calib']}x{args['seq_len']}; eval " +
          (f"{args['eval_tokens']} tokens" if kind == "perplexity" else f"{args['sentences']} sentences"))
    names = {v: k for k, v in SCHEMES.items()}
    def table(cell) -> None:
        print("| | " + " | ".join(names.get(s, s) for s in schemes) + " |")
        print("|---|" + "---:|" * len(schemes))
        for row in rows_wanted:
            found = [[x for x in rows if x["scheme"] == s and x["row"] == row] for s in schemes]
            print(f"| {LABELS[row]} | " + " | ".join(cell(r) for r in found) + " |")

    def metric(rs) -> str:
        if not rs:
            return "not run"
        v = [r["metric"] for r in rs]
        if len(v) == 1:
            return f"{v[0]:.4f}"
        mean = sum(v) / len(v)
        sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
        return f"{mean:.4f} ± {sd:.4f} ({min(v):.4f}-{max(v):.4f}, {len(v)} seeds)"

    def bits(rs) -> str:
        return f"{rs[0]['bits_per_weight']:.3f}" if rs else ""

    def seconds(rs) -> str:
        if not rs:
            return ""
        q = sum(r["quantize_seconds"] + r["transform_seconds"] for r in rs) / len(rs)
        t = sum(r["transform_seconds"] for r in rs) / len(rs)
        return f"{q:.0f} ({t:.0f})"

    table(metric)
    print("\nbits per weight (codes, scales, retained values with their positions; weights only)")
    table(bits)
    print("\nquantize seconds (transforms included; transform seconds in brackets; mean over seeds)")
    table(seconds)


def from_json(paths) -> None:
    """Print the tables of one or more --json files (e.g. a table measured in several runs)."""
    rows, args = [], None
    for p in paths:
        d = json.load(open(p))
        rows += d["rows"]
        args = args or d["args"]
    schemes = [s for s in SCHEMES.values() if any(r["scheme"] == s for r in rows)]
    schemes += [s for s in dict.fromkeys(r["scheme"] for r in rows) if s not in schemes]  # e.g. nvfp4:mse
    wanted = [r for r in ROWS if any(x["row"] == r for x in rows)]
    print_tables(rows, schemes, wanted, args)

if __name__ == "__main__":
    main()
