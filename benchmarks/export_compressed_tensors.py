"""SmolLM2-135M: lowbit w4g64 and FP8 (weights and activations) -> compressed-tensors, loaded back
by transformers through compressed-tensors' own loader.

    PYTHONPATH=src python3 benchmarks/export_compressed_tensors.py [--method rtn|gptq] [--schemes w4g64,fp8]

For each scheme: quantize (or reuse OUT/<scheme>), export, load the export with
``AutoModelForCausalLM.from_pretrained``, and print how many of lowbit's tensors the reader holds bit
for bit, the largest logit difference on one window, and both perplexities on the same held-out
tokens (lowbit's evaluation split, windows of 512), with the file sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="rtn", choices=("gptq", "rtn"))
    ap.add_argument("--schemes", default="w4g64,fp8")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/lowbit_export_ct")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lowbit
    from transformers import AutoModelForCausalLM

    from lowbit.data.corpus import evaluation_tokens
    from lowbit.evaluate.perplexity import perplexity_stats
    from lowbit.export.compressed_tensors_export import export_compressed_tensors
    from lowbit.jobs import EvalSettings, run_quantize

    work = Path(args.out)
    settings = EvalSettings(eval_tokens=args.eval_tokens, context=args.context)
    results = []
    for scheme in args.schemes.split(","):
        ckpt = work / f"{scheme}_{args.method}"
        if not (ckpt / "lowbit.json").is_file():
            print(f"quantizing SmolLM2 {scheme} with {args.method} ...", flush=True)
            run_quantize(None, scheme, args.method, str(ckpt), calib=args.calib, seq_len=512, settings=settings,
                         quiet=True, device="cpu")
        t = time.perf_counter()
        rep = export_compressed_tensors(ckpt, work / f"{scheme}_ct")
        export_s = time.perf_counter() - t
        ck = lowbit.load(ckpt)
        hf = AutoModelForCausalLM.from_pretrained(work / f"{scheme}_ct", dtype=torch.float32).eval()
        tokens = evaluation_tokens(ck.tokenizer, args.eval_tokens)
        with torch.no_grad():
            ids = tokens[None, : args.context]
            diff = (hf(ids).logits - ck.model(ids).logits).abs().max().item()
        theirs = hf.state_dict()  # decompressed by the first forward
        mine = dict(ck.model.named_parameters())
        equal = sum(torch.equal(theirs[n], p) for n, p in mine.items() if n in theirs)
        ppl_lowbit = perplexity_stats(ck.model, tokens, context=args.context)["perplexity"]
        ppl_hf = perplexity_stats(hf, tokens, context=args.context)["perplexity"]
        results.append({"scheme": scheme, "method": args.method, "formats": rep["formats"],
                        "lowbit_bytes": (ckpt / "model.safetensors").stat().st_size, "export_bytes": rep["bytes"],
                        "export_seconds": export_s, "tensors_equal": equal, "tensors": len(mine),
                        "max_logit_diff": diff, "ppl_lowbit": ppl_lowbit, "ppl_transformers": ppl_hf})
        del hf
    print(f"\nSmolLM2-135M-Instruct, {args.eval_tokens} held-out tokens, windows of {args.context}; "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'scheme':8s} {'format':32s} {'lowbit MB':>9s} {'export MB':>9s} {'equal tensors':>13s} "
          f"{'max |dlogit|':>12s} {'ppl lowbit':>10s} {'ppl transformers':>16s}")
    for r in results:
        print(f"{r['scheme']:8s} {'+'.join(r['formats']):32s} {r['lowbit_bytes'] / 1e6:9.1f} "
              f"{r['export_bytes'] / 1e6:9.1f} {r['tensors_equal']:>6d} of {r['tensors']:<4d} "
              f"{r['max_logit_diff']:12.2e} {r['ppl_lowbit']:10.3f} {r['ppl_transformers']:16.3f}")
    work.mkdir(parents=True, exist_ok=True)
    (work / "export_compressed_tensors.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
