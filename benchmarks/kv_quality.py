"""KV-cache quantization quality on a real model, measured in one run.

    python benchmarks/kv_quality.py --model smollm2      # perplexity, EvalSettings() defaults
    python benchmarks/kv_quality.py --model minilm       # cosine / Spearman to the fp32 embeddings

Rows: full-precision weights with each KV setting, then w4g64 GPTQ weights (calibrated with the KV
quantization in place, as `lowbit quantize --scheme w4g64 --kv kv8` does) with and without kv8.
Prints a markdown table; --json writes the rows.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from lowbit.jobs import EvalSettings, calibration_batches, evaluate_model
from lowbit.models.kv_cache import apply_kv_plan, attention_modules, remove_kv_quant
from lowbit.models.loader import load_model
from lowbit.ptq.pipeline import quantize_model
from lowbit.quant.kv import kv_bits, kv_scheme_rules
from lowbit.quant.plan import Plan
from lowbit.quant.spec import QuantSpec

KV_SETTINGS = ["kv8", "kvfp8", "kv4", "kv4g32", "kv4c", "kvnvfp4", "kvmxfp4", "kv2c"]
LABELS = {
    "kv8": "int8, per token (over head_dim)",
    "kvfp8": "fp8 e4m3, per token",
    "kv4": "int4 asym, per token",
    "kv4g32": "int4 asym, groups of 32 along head_dim",
    "kv4c": "int4 asym, keys per channel / values per token (KIVI)",
    "kvnvfp4": "nvfp4 (blocks of 16 along head_dim)",
    "kvmxfp4": "mxfp4 (blocks of 32 along head_dim)",
    "kv2c": "int2 asym, keys per channel / values per token (KIVI)",
}


def _bits(rules: dict, head_dim: int, tokens: int) -> float:
    k = QuantSpec.parse(rules.get("*.key", rules.get("*")))
    v = QuantSpec.parse(rules.get("*.value", rules.get("*")))
    return (kv_bits(k, head_dim, tokens) + kv_bits(v, head_dim, tokens)) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--kv", default=",".join(KV_SETTINGS))
    ap.add_argument("--calib", type=int, default=32, help="GPTQ calibration sequences")
    ap.add_argument("--seq-len", type=int, default=None, help="default 512 (smollm2) / 128 (minilm)")
    ap.add_argument("--no-gptq", action="store_true", help="skip the w4g64 GPTQ rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    settings = EvalSettings()
    loaded = load_model(args.model)
    model = loaded.model
    seq_len = args.seq_len or (512 if loaded.kind == "causal_lm" else 128)
    reference = None
    if loaded.kind == "encoder":
        import copy

        reference = copy.deepcopy(model)
    head_dim = next(iter(attention_modules(model).values()))
    head_dim = getattr(head_dim, "head_dim", None) or head_dim.attention_head_size
    ctx = settings.context if loaded.kind == "causal_lm" else 128
    rows = []

    def measure(weights: str, kv: str) -> None:
        t = time.time()
        rules = kv_scheme_rules(kv) if kv != "none" else {}
        if rules:
            apply_kv_plan(model, Plan(kv=rules))
        m = evaluate_model(model, loaded.tokenizer, loaded.kind, settings, reference)
        remove_kv_quant(model)
        row = {"weights": weights, "kv": kv, "kv_label": LABELS.get(kv, kv or "fp32"),
               "kv_bits": _bits(rules, head_dim, ctx) if rules else 32.0,
               "metric": m.get("perplexity", m.get("cosine_mean")), "spearman": m.get("spearman"),
               "seconds": time.time() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "rows": rows}, fh, indent=1)

    measure("fp32", "none")
    for kv in args.kv.split(","):
        measure("fp32", kv)
    if not args.no_gptq:
        batches = calibration_batches(loaded, args.calib, seq_len)
        res = quantize_model(model, Plan.from_scheme("w4g64kv8"), batches, "gptq", progress=False)
        remove_kv_quant(model)
        print(f"w4g64 GPTQ (calibrated with kv8) in {res.seconds:.0f} s", flush=True)
        measure("w4g64 GPTQ", "none")
        measure("w4g64 GPTQ", "kv8")

    name = "perplexity" if loaded.kind == "causal_lm" else "cosine / Spearman"
    print(f"\n{loaded.name}: {name}; eval {settings.describe(loaded.kind)}; KV bits per element count fp16 "
          f"scales (zero points at the element width; per-channel scales amortised over {ctx} tokens)")
    print(f"| weights | KV cache | KV bits/elem | {name} |")
    print("|---|---|---:|---:|")
    for r in rows:
        metric = f"{r['metric']:.3f}" if loaded.kind == "causal_lm" else f"{r['metric']:.4f} / {r['spearman']:.4f}"
        print(f"| {r['weights']} | {r['kv_label']} | {r['kv_bits']:.3f} | {metric} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
