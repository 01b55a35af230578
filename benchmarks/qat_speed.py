"""QAT step speed and quality at equal steps: plain bf16 fine-tuning vs lowbit QAT vs torchao QAT.

Same model, batch, sequence length, data (lowbit's stdlib training corpus), optimizer (AdamW) and
objective (next-token loss, so no teacher forward enters the step time), bf16 autocast on CUDA,
eager mode for everyone. The rows:

- ``bf16``: fine-tuning without quantization (the bound);
- ``lowbit-learned``: ``lowbit.prepare_qat(model, "int4:g32")`` with LSQ scales (fused fake-quant
  forward/backward on CUDA);
- ``lowbit-dynamic``: the same spec with absmax scales recomputed every step, as torchao does;
- ``torchao``: ``quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4,
  group_size=32), step="prepare"))`` (dynamic absmax scales, symmetric int4 with range [-8, 7]).

Each row: tokens/s over timed steps after warm-up, the ratio to bf16, peak memory, and the held-out
perplexity after ``--steps`` steps from the same RTN start (the fake-quantized model is evaluated as
it trains, which for lowbit is exactly its frozen checkpoint).

    python3 benchmarks/qat_speed.py --device cuda --steps 100 --json out.json
    python3 benchmarks/qat_speed.py --arch --device cuda      # SmolLM2's architecture, random weights and
                                                             # tokens: speed only, no model files needed
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def _prepare(kind: str, model):
    if kind == "bf16":
        return model
    if kind.startswith("lowbit"):
        from lowbit.train import prepare_qat

        return prepare_qat(model, "int4:g32", scaling="learned" if kind == "lowbit-learned" else "dynamic")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
    return model


def run(kind: str, base, tokenizer, args, batches) -> dict:
    from lowbit.jobs import EvalSettings, evaluate_model
    from lowbit.train.loop import TrainConfig, optimizer_for
    from lowbit.train.qat import trainable_groups

    dev = torch.device(args.device)
    model = _prepare(kind, copy.deepcopy(base)).to(dev)
    cfg = TrainConfig(steps=args.steps, lr=args.lr)
    opt = optimizer_for(trainable_groups(model), cfg)
    model.train()
    torch.cuda.reset_peak_memory_stats(dev) if dev.type == "cuda" else None
    times, tokens = [], 0
    for step in range(args.steps):
        ids = batches.batch(step).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
            tokens += ids.numel()
    model.eval()
    ppl = float("nan")
    if tokenizer is not None:  # --arch: random weights, perplexity means nothing
        with torch.no_grad():
            ppl = evaluate_model(model, tokenizer, "causal_lm", EvalSettings())["perplexity"]
    return {"kind": kind, "tokens_per_second": tokens / sum(times), "step_ms": 1000 * sum(times) / len(times),
            "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "perplexity": ppl, "last_loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", nargs="+", default=["bf16", "lowbit-learned", "lowbit-dynamic", "torchao"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", action="store_true",
                    help="SmolLM2-135M's architecture (benchmarks/configs) with random weights and random tokens")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.warmup >= args.steps:
        ap.error("--warmup must be below --steps")

    if args.arch:
        import transformers

        cfg = json.loads((Path(__file__).parent / "configs" / "smollm2-135m.json").read_text())
        torch.manual_seed(0)
        model, tokenizer = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)), None

        class RandomTokens:
            def batch(self, step):
                g = torch.Generator().manual_seed(step)
                return torch.randint(0, cfg["vocab_size"], (args.batch_size, args.seq_len), generator=g)

        batches = RandomTokens()
    else:
        from lowbit.data.train_corpus import training_batches
        from lowbit.models.loader import load_model

        loaded = load_model(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        batches = training_batches(tokenizer, args.seq_len, args.batch_size, seed=0)
    rows = []
    for kind in args.rows:
        try:
            rows.append(run(kind, model, tokenizer, args, batches))
        except ImportError as e:
            rows.append({"kind": kind, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["kind"] == "bf16" and "error" not in r), None)
    print(f"\n{'SmolLM2-135M architecture, random weights' if args.arch else args.model}, {args.batch_size} x {args.seq_len} tokens a step, {args.steps} steps "
          f"({args.warmup} warm-up), eager, {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    print(f"{'row':16s} {'tokens/s':>10s} {'x bf16':>7s} {'step ms':>8s} {'peak GiB':>8s} {'ppl after':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:16s} {r['error']}")
            continue
        ratio = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['kind']:16s} {r['tokens_per_second']:10,.0f} {ratio:7.3f} {r['step_ms']:8.1f} {peak:>8s} "
              f"{r['perplexity']:9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
