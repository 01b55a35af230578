"""High-impact weight retention quality: {GPTQ, +retention at one fixed ratio, +retention with
per-layer ratios from the integer program} x schemes, and int8 vs fp16 retention at equal bits.

    python benchmarks/retention_quality.py --model minilm --calib 32 --seq-len 128
    python benchmarks/retention_quality.py --model smollm2 --schemes w3g64,w2g64 --calib 16 \
        --seq-len 512 --eval-tokens 4096
    python benchmarks/retention_quality.py --merge a.json b.json ...   # one table from several runs

Rows: gptq, fixed, optimized, or optimized:OBJECTIVE[:CURVES] for one loss model of the ratio
program (objective fisher = each layer's output error weighted by the loss's output Fisher, the
default; block = block-output relative error; curves rtn (default) or gptq), e.g.
--rows fixed,optimized:block,optimized:fisher,optimized:fisher:gptq. --grid sets the ratio
multiples the program chooses from (default 0,0.25,0.5,1,1.5,2,3,4).

The int8-vs-fp16 comparison (--compare-fp16 SCHEMES) adds an fp16 row at the ratio whose bits match
--ratio at --format; compare it with that scheme's "fixed" row.

Every row reports its true bits/weight (codes, scales, retained values, their positions and scales).
The fixed and optimised rows spend the same retention bits; the fp16 row keeps as many weights as
the int8 row's bits allow.
"""
from __future__ import annotations

import argparse
import json
import time

from lowbit.jobs import EvalSettings, run_quantize
from lowbit.models.blocks import find_blocks, linear_layers
from lowbit.models.loader import load_model
from lowbit.ptq.retain_alloc import matching_ratio
from lowbit.ptq.retention import RetainConfig, RetainFormat, parse_ratio
from lowbit.quant.plan import Plan
from lowbit.quant.weight import WeightQuantizer

DEFAULT_SCHEMES = ["w3g64", "w2g64", "fp4g32", "mxfp4", "nvfp4"]
ROWS = ["gptq", "fixed", "optimized"]


def _shapes(model, scheme):
    plan = Plan.from_scheme(scheme)
    path, blocks = find_blocks(model)
    out = []
    for bi, b in enumerate(blocks):
        for n, lin in linear_layers(b, f"{path}.{bi}").items():
            spec = plan.weight_spec(n)
            if spec is not None and WeightQuantizer(spec).check(tuple(lin.weight.shape)) is None:
                out.append(tuple(lin.weight.shape))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    ap.add_argument("--rows", default=",".join(ROWS),
                    help="any of gptq, fixed, optimized, optimized:OBJECTIVE[:CURVES] (fisher|block, rtn|gptq)")
    ap.add_argument("--grid", default=None, help="ratio multiples for the optimised rows, e.g. 0,0.5,1,2,4,8")
    ap.add_argument("--ratio", default="1%")
    ap.add_argument("--format", default="int8")
    ap.add_argument("--saliency", default="obs")
    ap.add_argument("--compare-fp16", default="w3g64", help="schemes for the int8-vs-fp16 rows ('' for none)")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--json", default=None, help="write every row here (rewritten as each finishes)")
    args = ap.parse_args()
    settings = EvalSettings(eval_tokens=args.eval_tokens or None)
    ratio = parse_ratio(args.ratio)
    rows = []

    def run(scheme, label, retain):
        loaded = load_model(args.model)
        t = time.time()
        rep = run_quantize(args.model, scheme, "gptq", None, calib=args.calib, seq_len=args.seq_len,
                           settings=settings, quiet=True, loaded=loaded, retain=retain)
        q, b = rep["quantized"], rep["baseline"]
        row = {"model": rep["model"], "scheme": scheme, "row": label,
               "metric": q.get("perplexity", q.get("cosine_mean")), "spearman": q.get("spearman"),
               "baseline": b.get("perplexity", 1.0), "bits_per_weight": q["bits_per_weight"],
               "kept": sum(l["retain"]["kept"] for l in rep["layers"] if l.get("retain")),
               "retain": rep["retain"], "seconds": time.time() - t}
        if rep["retain"] and rep["retain"]["allocation"]:
            a = rep["retain"]["allocation"]
            row["modelled_error"] = (a["modelled_error_fixed"], a["modelled_error"])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "retain"}), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "rows": rows}, fh, indent=1)

    schemes = args.schemes.split(",")
    for scheme in schemes:
        for label in [x for x in args.rows.split(",") if x]:
            run(scheme, label, _config(label, ratio, args))
    fp16_schemes = [s for s in args.compare_fp16.split(",") if s]
    for scheme in fp16_schemes:
        shapes = _shapes(load_model(args.model).model, scheme)
        r16 = matching_ratio(shapes, RetainFormat.parse(args.format), ratio, RetainFormat("fp16"))
        run(scheme, f"fixed fp16 {r16:.3%}", RetainConfig(r16, "fp16", args.saliency, "fixed"))

    print_table(rows, args, schemes, fp16_schemes)


def _config(label: str, ratio: float, args):
    """RetainConfig of one row label (None for plain GPTQ)."""
    if label == "gptq":
        return None
    alloc, _, rest = label.partition(":")
    objective, _, curves = rest.partition(":")
    if alloc not in ("fixed", "optimized") or (alloc == "fixed" and rest):
        raise SystemExit(f"unknown row {label!r}; accepted: gptq, fixed, optimized[:fisher|block[:rtn|gptq]]")
    extra = {}
    if alloc == "optimized":
        extra = {k: v for k, v in (("objective", objective), ("curves", curves)) if v}
        if args.grid:
            extra["grid"] = tuple(float(x) for x in args.grid.split(","))
    return RetainConfig(ratio, args.format, args.saliency, alloc, **extra)


def print_table(rows, args, schemes, fp16_schemes) -> None:
    name = "perplexity" if "perplexity" in rows[0] or rows[0]["baseline"] != 1.0 else "cosine to fp32"
    print(f"\n{rows[0]['model']}: baseline {name} {rows[0]['baseline']:.4g}; calibration {args.calib}x"
          f"{args.seq_len}; retain {args.ratio} at {args.format} ({args.saliency} saliency); eval "
          f"{args.eval_tokens} tokens / 256 sentences")
    labels = list(dict.fromkeys(r["row"] for r in rows if not r["row"].startswith("fixed fp16")))
    print("| row | " + " | ".join(schemes) + " |")
    print("|---|" + "---:|" * len(schemes))
    for label in labels:
        cells = []
        for s in schemes:
            r = next((x for x in rows if x["scheme"] == s and x["row"] == label), None)
            cells.append(f"{r['metric']:.4g} ({r['bits_per_weight']:.4f} b)" if r else "")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for scheme in fp16_schemes:
        print(f"\nint8 vs fp16 retention at equal bits, {scheme}:")
        for r in rows:
            if r["scheme"] == scheme and r["row"].startswith("fixed"):
                fmt = r["retain"]["format"]
                print(f"  {fmt:>6} ratio {r['retain']['ratio']:.3%}: kept {r['kept']}, "
                      f"{r['bits_per_weight']:.4f} bits/weight, metric {r['metric']:.4g}")


def merge(paths) -> None:
    """Print one table from the JSON files of several runs (e.g. one per row, run in parallel)."""
    rows, args = [], None
    for p in paths:
        d = json.load(open(p))
        rows += d["rows"]
        args = args or argparse.Namespace(**d["args"])
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fp16 = list(dict.fromkeys(r["scheme"] for r in rows if r["row"].startswith("fixed fp16")))
    order = {label: i for i, label in enumerate(ROWS)}
    rows.sort(key=lambda r: (order.get(r["row"].split(":")[0], 99), r["row"], schemes.index(r["scheme"])))
    print_table(rows, args, schemes, fp16)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "--merge":
        merge(sys.argv[2:])
    else:
        main()
