"""Re-measure trained MiniLM checkpoints on sentences that chose nothing.

`lowbit train minilm` reports embedding fidelity on the first 256 evaluation sentences (the
default ``--sentences``). When several runs (learning rates, steps) are compared on those numbers,
the winner is picked on them; this script measures every given checkpoint again on the *other*
evaluation sentences (index 256 on: 945 of the 1,201), so the figure reported for the chosen run
is one no choice was made on. The reference is the fp32 MiniLM; the metric is the same
``embedding_fidelity`` (cosine mean / min, Spearman of pairwise similarities).

    python3 benchmarks/qat_minilm_heldout.py RUN_DIR [RUN_DIR ...] [--skip 256] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.data.corpus import evaluation_sentences
from lowbit.evaluate.embedding import embed, embedding_fidelity
from lowbit.models.loader import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="checkpoint directories (lowbit train/quantize --out)")
    ap.add_argument("--skip", type=int, default=256, help="evaluation sentences left out (those runs were compared on)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    sentences = evaluation_sentences()[args.skip:]
    if len(sentences) < 2:
        sys.exit(f"--skip {args.skip} leaves {len(sentences)} sentences; the split has {args.skip + len(sentences)}")
    loaded = load_model("minilm")
    tok = loaded.tokenizer
    ref = embed(loaded.model.to(args.device).eval(), tok, sentences)
    rows = {}
    for run in args.runs:
        model, _, meta = lowbit.load(run)
        fid = embedding_fidelity(ref, model.to(args.device).eval(), tok, sentences)
        report = Path(run) / "report.json"
        rep = json.loads(report.read_text()) if report.is_file() else {}
        before = rep.get("after", {}).get("cosine_mean")
        n_report = rep.get("evaluation", {}).get("sentences")
        rows[run] = {**fid, "report_cosine_mean": before, "report_sentences": n_report, "scheme": meta.get("scheme")}
        print(f"{run}: cosine mean {fid['cosine_mean']:.4f} min {fid['cosine_min']:.4f} spearman "
              f"{fid['spearman']:.4f} on sentences {args.skip}..{args.skip + len(sentences) - 1}"
              + (f" (its report: {before:.4f} on the first {n_report})" if before is not None else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"skip": args.skip, "sentences": len(sentences), "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
