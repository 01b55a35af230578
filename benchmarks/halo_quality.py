"""HALO low-precision fine-tuning quality: the same fine-tuning run (data, steps, optimizer, seed) with
every decoder linear's three matmuls in each recipe, and the held-out loss after it, against bf16.

Rows: ``bf16`` (no quantization), ``fp8:2`` (FP8 E4M3/E5M2, HALO-2), ``int8:2`` (INT8 per-row,
HALO-2), ``int8:0`` (the same without rotations: what the rotations buy), ``e3m2:1`` (FP6 E3M2,
emulated) and ``mxfp4:1`` (MXFP4 with stochastic gradients, emulated). Each runs through
``lowbit.lowp.run_lptrain`` (lowbit.train's loop; the next-token loss on the stdlib training corpus;
held-out loss on its validation modules, evaluated on the trained master weights and with the
low-precision forward). Targets: FP8 HALO-2 within 1% of bf16, INT8 HALO-2 within 2%.

Finished rows are kept in OUT/<row>/report.json and skipped by a rerun; an interrupted row resumes
from OUT/<row>/.train.

    python3 benchmarks/halo_quality.py --steps 1000 --out halo_quality        # SmolLM2-135M, the GPU
    python3 benchmarks/halo_quality.py --arch tiny --device cpu --steps 60 --batch-size 4 --seq-len 128 \\
        --lr 1e-3 --out /tmp/halo_quality_tiny                                 # a CPU check from scratch
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

ROWS = ("bf16", "fp8:2", "int8:2", "int8:0", "e3m2:1", "mxfp4:1")
TARGETS = {"fp8:2": 0.01, "int8:2": 0.02}


def tiny_llama(vocab: int):
    """A 2-block Llama (hidden 128) with random weights: a CPU-sized stand-in trained from scratch."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def main() -> None:
    from lowbit.lowp.job import run_lptrain
    from lowbit.models.loader import load_model
    from lowbit.train.loop import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--arch", choices=("tiny",), help="train a tiny random Llama from scratch instead (CPU check)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated recipes")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="one directory per row; finished rows are skipped by a rerun")
    args = ap.parse_args()

    loaded = load_model(args.model)
    base = tiny_llama(len(loaded.tokenizer)) if args.arch else loaded.model
    name = "tiny Llama (hidden 128, 2 blocks, from scratch)" if args.arch else loaded.name
    out = Path(args.out)
    reports = {}
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        d = out / row.replace(":", "_")
        if (d / "report.json").is_file():
            reports[row] = json.loads((d / "report.json").read_text())
            print(f"{row}: finished before, kept", flush=True)
            continue
        cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup=min(args.warmup, args.steps - 1), save_every=50)
        reports[row] = run_lptrain(copy.deepcopy(base), row, str(d), config=cfg, batch_size=args.batch_size,
                                   seq_len=args.seq_len, block=args.block, val_batches=args.val_batches,
                                   device=args.device, tokenizer=loaded.tokenizer, quiet=False)
    ref = reports.get("bf16", {}).get("held_out", {}).get("after")
    print(f"\n{name}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, lr {args.lr}; held-out loss "
          f"(validation modules) of the trained weights")
    print(f"{'recipe':<10} {'before':>8} {'after':>8} {'lowp fwd':>9} {'vs bf16':>8} {'tokens/s':>10}  target")
    summary = {}
    for row, r in reports.items():
        h = r["held_out"]
        rel = h["after"] / ref - 1 if ref else float("nan")
        tgt = TARGETS.get(row)
        verdict = "" if tgt is None or not ref else (f"<= {tgt:.0%}: " + ("met" if rel <= tgt else "MISSED"))
        print(f"{row:<10} {h['before']:8.4f} {h['after']:8.4f} {h['after_lowp']:9.4f} {rel:+8.2%} "
              f"{r['tokens_per_second']:10,.0f}  {verdict}")
        summary[row] = {"before": h["before"], "after": h["after"], "after_lowp": h["after_lowp"], "vs_bf16": rel,
                        "tokens_per_second": r["tokens_per_second"], "device": r["environment"]["device"]}
    (out / "summary.json").write_text(json.dumps({"model": name, "args": vars(args), "rows": summary}, indent=1))


if __name__ == "__main__":
    main()
