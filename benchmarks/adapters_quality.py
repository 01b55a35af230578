"""Low-bit adapters, measured: held-out perplexity and training tokens/s on the stdlib tasks for

  task x base (fp32, w3g64 GPTQ, ...) x adapter (LoRA stored at 1/2/4/8/16/32 bits at one rank; 16-bit
  LoRA at the 1-bit adapter's storage; LR-QAT folded into the base's codes; the fp32 LoRA merged into
  the quantized base and re-quantized by RTN) and HF PEFT's LoRA on the fp32 base (its A matrices
  set to lowbit's initial draw, so both start from the same adapters)

all in one run, with the same rank, targets, steps, learning rate, data and seed. Prints one table
and the issue's ratios; --json writes every row. Training tokens/s is the steady rate: the steps
after the first tenth (at least 3), so the row that runs first does not carry the process's warm-up
(``tokens_per_second_with_warmup`` keeps the whole run's).

CPU, small (about 15 min on 2 cores):
  python3 benchmarks/adapters_quality.py --tasks docs --bits 1,4,16,32 --steps 30 --batch-size 2 \
      --seq-len 128 --eval-tokens 2048 --context 256 --calib 16 --threads 2
GPU (full scale): see docs/adapters.md. A run split over processes (one per task and base, each with
its own --json) is put together, with the quantized bases' share of the fp32 perplexity recovered:
  python3 benchmarks/adapters_quality.py --merge docs_fp32.json docs_w3g64.json ... --json all.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.adapters import AdapterFormat, add_lora, fold, lora_layers, parse_targets, prepare_lrqat  # noqa: E402
from lowbit.adapters import tasks as task_data  # noqa: E402
from lowbit.adapters.io import adapter_bytes  # noqa: E402
from lowbit.adapters.job import heldout_perplexity, load_base  # noqa: E402
from lowbit.adapters.lrqat import layer_scales  # noqa: E402
from lowbit.train.loop import TrainConfig, train  # noqa: E402
from lowbit.train.objectives import causal_lm_objective  # noqa: E402

BITS_NAMES = {1: "1bit", 2: "2bit", 4: "4bit", 8: "8bit", 16: "16bit", 32: "32bit"}


def run_training(model, corpus, tok, args, groups):
    cfg = TrainConfig(steps=args.steps, lr=args.lr, seed=0, warmup=min(args.steps // 10, 20), save_every=10 ** 9)
    batches = task_data.task_batches(corpus, tok, args.seq_len, args.batch_size, 0)
    res = train(model, batches, causal_lm_objective("ce"), groups, cfg, progress=not args.quiet)
    return res


def lora_row(base_model, corpus, tok, tokens, args, bits: int, rank: int, dev):
    model = add_lora_to_copy(base_model, args, bits, rank).to(dev)
    layers = lora_layers(model)
    res = run_training(model, corpus, tok, args, {"weights": [p for l in layers.values() for p in (l.lora_A, l.lora_B)]})
    ppl = heldout_perplexity(model, tokens, args.context)
    return model, {"adapter": f"lora {bits}-bit", "rank": rank, "perplexity": ppl, "adapter_bytes": adapter_bytes(model),
                   "tokens_per_second": res.steady_tokens_per_second(),
                   "tokens_per_second_with_warmup": res.tokens_per_second(), "train_seconds": res.seconds}


def peft_row(base_model, corpus, tok, tokens, args, dev, start: dict):
    import peft

    pm = peft_model(base_model, args, dev, start)
    res = run_training(pm, corpus, tok, args, {"weights": [p for p in pm.parameters() if p.requires_grad]})
    ppl = heldout_perplexity(pm, tokens, args.context)
    n = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return {"adapter": f"peft {peft.__version__} lora (fp32)", "rank": args.rank, "perplexity": ppl,
            "adapter_bytes": 4 * n, "tokens_per_second": res.steady_tokens_per_second(),
            "tokens_per_second_with_warmup": res.tokens_per_second(), "train_seconds": res.seconds}


def peft_model(base_model, args, dev, start: dict):
    """HF PEFT's LoRA (same targets, rank, alpha; no dropout) on a copy of the base, its A matrices
    set to ``start`` (``initial_adapters``: lowbit's draw; B is zero in both), so the two libraries
    start from the same adapters and differ only in how they train."""
    import peft

    model = copy.deepcopy(base_model)
    names = sorted(n for n in lora_targets(model, args))
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=names,
                             bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, config).to(dev)
    modules = dict(pm.named_modules())
    with torch.no_grad():
        for name, a in start.items():
            w = modules[f"base_model.model.{name}"].lora_A["default"].weight
            w.copy_(a.to(w.device, w.dtype))
    return pm


def speed_rounds(base_model, corpus, tok, args, dev, start: dict) -> dict:
    """lowbit's fp32 LoRA and PEFT's trained in turn, ABBA order (lowbit first, then PEFT first, ...)
    for ``--speed-rounds`` rounds of ``--speed-steps`` steps: the steady tokens/s of each, and the
    median of the per-round ratios, so neither side gains from running first or from drift."""
    import statistics

    short = argparse.Namespace(**{**vars(args), "steps": args.speed_steps, "quiet": True})
    rates = {"lowbit": [], "peft": []}
    for i in range(args.speed_rounds):
        for who in (("lowbit", "peft") if i % 2 == 0 else ("peft", "lowbit")):
            if who == "lowbit":
                m = add_lora_to_copy(base_model, args).to(dev)
                params = [p for l in lora_layers(m).values() for p in (l.lora_A, l.lora_B)]
            else:
                m = peft_model(base_model, args, dev, start)
                params = [p for p in m.parameters() if p.requires_grad]
            rates[who].append(run_training(m, corpus, tok, short, {"weights": params}).steady_tokens_per_second())
            del m
    ratios = [a / b for a, b in zip(rates["lowbit"], rates["peft"])]
    return {"rounds": args.speed_rounds, "steps": args.speed_steps, "lowbit_tokens_per_second": rates["lowbit"],
            "peft_tokens_per_second": rates["peft"], "ratios": ratios, "median_ratio": statistics.median(ratios)}


def initial_adapters(base_model, args) -> dict:
    """The A matrices lowbit's fp32 LoRA starts from (seed 0), by layer name."""
    return {name: layer.lora_A.detach() for name, layer in lora_layers(add_lora_to_copy(base_model, args)).items()}


def add_lora_to_copy(base_model, args, bits: int = 32, rank: Optional[int] = None):
    """A copy of the base with lowbit's LoRA (rank ``rank``, default --rank; stored at ``bits``) on the targets."""
    model = copy.deepcopy(base_model)
    add_lora(model, parse_targets(args.targets, rank or args.rank), AdapterFormat.parse(BITS_NAMES[bits]), seed=0)
    return model


def lora_targets(model, args):
    from lowbit.adapters.lora import linear_targets

    return linear_targets(model, parse_targets(args.targets, args.rank))


def merged_requantized(lora_model, tokens, args):
    """The fp32 LoRA on a quantized base merged into its weights and re-quantized (RTN, same spec)."""
    from lowbit.models.blocks import replace_module
    from lowbit.quant.linear import QuantLinear
    from lowbit.quant.weight import WeightQuantizer

    model = copy.deepcopy(lora_model)
    for name, layer in lora_layers(model).items():
        base = layer.base
        with torch.no_grad():
            a, b = layer.adapter_matrices()
            w = base.weight.float() + layer.scaling * (b @ a)
            spec = getattr(base, "weight_spec", None)
            if spec is not None:
                w, _ = WeightQuantizer(spec).rtn(w)
        lin = torch.nn.Linear(base.in_features, base.out_features, base.bias is not None, device=w.device)
        replace_module(model, name, QuantLinear.from_linear(lin, w, spec, getattr(base, "act_spec", None)))
    return heldout_perplexity(model, tokens, args.context)


def lrqat_row(base_model, packed, corpus, tok, tokens, args, dev):
    model = copy.deepcopy(base_model)
    prepare_lrqat(model, parse_targets(args.targets, args.rank), stored=layer_scales(model, packed), seed=0)
    model.to(dev)
    from lowbit.adapters.lrqat import lrqat_layers

    layers = lrqat_layers(model)
    res = run_training(model, corpus, tok, args, {"weights": [p for l in layers.values() for p in (l.lora_A, l.lora_B)],
                                                  "scales": [l.scale for l in layers.values()]})
    fold(model)
    ppl = heldout_perplexity(model, tokens, args.context)
    return {"adapter": "lr-qat (folded)", "rank": args.rank, "perplexity": ppl, "adapter_bytes": 0,
            "tokens_per_second": res.steady_tokens_per_second(),
            "tokens_per_second_with_warmup": res.tokens_per_second(), "train_seconds": res.seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="docs,code")
    p.add_argument("--bases", default="fp32,w3g64", help="fp32 and/or schemes quantized by GPTQ (e.g. w3g64,w4g64; rtn:w3g64 for RTN)")
    p.add_argument("--bits", default="1,2,4,8,16,32", help="adapter bits on the fp32 base")
    p.add_argument("--quant-bits", default="1,16,32", help="adapter bits on the quantized bases")
    p.add_argument("--no-lrqat", dest="lrqat", action="store_false")
    p.add_argument("--no-peft", dest="peft", action="store_false")
    p.add_argument("--speed-rounds", type=int, default=4, help="ABBA rounds timing lowbit's fp32 LoRA against PEFT "
                   "(0: none; the quality rows' tokens/s are then the only speed figures)")
    p.add_argument("--speed-steps", type=int, default=20, help="training steps per side and round of --speed-rounds")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="*q_proj,*v_proj", help="comma-separated globs (default PEFT's Llama targets)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--calib", type=int, default=128, help="GPTQ calibration sequences of the quantized bases")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="put together the --json files of a split run "
                   "(no training): one table, the ratios, and --json")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    fp32_bits = [int(b) for b in args.bits.split(",") if b]
    quant_bits = [int(b) for b in args.quant_bits.split(",") if b]
    t0 = time.time()
    bases = {}
    for b in args.bases.split(","):
        method, _, scheme = b.rpartition(":")  # "w3g64" (GPTQ) or "rtn:w3g64"
        scheme = None if b == "fp32" else scheme
        model, tok, info, packed = load_base(args.model, scheme, method or "gptq", calib=args.calib,
                                             calib_seq_len=512, device=dev, quiet=args.quiet)
        bases[b] = (model.to(dev), packed)
    rows, speed = [], []
    for task in args.tasks.split(","):
        corpus = task_data.load_task(task)
        tokens = task_data.heldout_tokens(corpus, tok, args.eval_tokens, args.context)
        fp32_ppl = heldout_perplexity(bases["fp32"][0], tokens, args.context) if "fp32" in bases else None
        for bname, (model, packed) in bases.items():
            base_ppl = heldout_perplexity(model, tokens, args.context)
            common = {"task": task, "base": bname, "base_perplexity": base_ppl, "fp32_perplexity": fp32_ppl}
            rows.append({**common, "adapter": "none", "perplexity": base_ppl, "adapter_bytes": 0})
            float_lora = None
            bits = fp32_bits if bname == "fp32" else quant_bits
            for nb in bits:
                lm, row = lora_row(model, corpus, tok, tokens, args, nb, args.rank, dev)
                rows.append({**common, **row})
                if nb == 32:
                    float_lora = lm
                print(json.dumps(rows[-1]), flush=True)
            if 1 in bits and bname == "fp32":  # 16-bit LoRA with the 1-bit adapter's storage
                r16 = max(1, args.rank // 16)
                _, row = lora_row(model, corpus, tok, tokens, args, 16, r16, dev)
                rows.append({**common, **row, "adapter": f"lora 16-bit rank {r16} (rank/16: 1-bit's storage)"})
                print(json.dumps(rows[-1]), flush=True)
            if bname != "fp32":
                if float_lora is not None:
                    rows.append({**common, "adapter": "lora 32-bit merged + RTN re-quantized", "rank": args.rank,
                                 "perplexity": merged_requantized(float_lora, tokens, args), "adapter_bytes": 0})
                    print(json.dumps(rows[-1]), flush=True)
                if args.lrqat:
                    rows.append({**common, **lrqat_row(model, packed, corpus, tok, tokens, args, dev)})
                    print(json.dumps(rows[-1]), flush=True)
            elif args.peft:
                start = initial_adapters(model, args)  # both comparisons start PEFT from lowbit's draw
                rows.append({**common, **peft_row(model, corpus, tok, tokens, args, dev, start)})
                print(json.dumps(rows[-1]), flush=True)
                if args.speed_rounds:
                    speed.append({"task": task, **speed_rounds(model, corpus, tok, args, dev, start)})
                    print(json.dumps(speed[-1]), flush=True)
    print_table(rows)
    summary = ratios(rows) + [
        f"{sp['task']}/fp32: lowbit/PEFT steady tokens/s, ABBA over {sp['rounds']} rounds of {sp['steps']} steps: "
        f"median {sp['median_ratio']:.3f} (rounds {', '.join(f'{r:.3f}' for r in sp['ratios'])}; target >= 1)"
        for sp in speed]
    for line in summary:
        print(line)
    env = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": time.time() - t0,
           "settings": vars(args)}
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "speed": speed, "summary": summary, "environment": env},
                                              indent=1))
    print(f"{env['seconds']:.0f} s on {env['gpu'] or 'cpu'} ({env['threads']} threads)")
    return 0


def merge(paths, out=None) -> int:
    """One table and the ratios from the --json files of runs split by task and base; rows of a
    quantized base get the fp32 perplexity of their task from the fp32 run's rows."""
    runs = [json.loads(Path(f).read_text()) for f in paths]
    rows = [r for run in runs for r in run["rows"]]
    fp32 = {r["task"]: r["perplexity"] for r in rows if r["base"] == "fp32" and r["adapter"] == "none"}
    rows = [{**r, "fp32_perplexity": r.get("fp32_perplexity") or fp32.get(r["task"])} for r in rows]
    print_table(rows)
    summary = ratios(rows)
    for line in summary:
        print(line)
    if out:
        Path(out).write_text(json.dumps({"rows": rows, "summary": summary, "merged_from": [str(f) for f in paths],
                                         "environments": [run["environment"] for run in runs]}, indent=1))
    return 0


def print_table(rows):
    print(f"\n{'task':<6} {'base':<7} {'adapter':<42} {'rank':>4} {'held-out ppl':>12} {'bytes':>10} {'tok/s':>8}")
    for r in rows:
        tps = r.get("tokens_per_second")
        print(f"{r['task']:<6} {r['base']:<7} {r['adapter']:<42} {r.get('rank', ''):>4} {r['perplexity']:>12.3f} "
              f"{r['adapter_bytes']:>10,} {('%.0f' % tps) if tps else '':>8}")


def ratios(rows):
    """The issue's targets, as measured."""
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["base"]), {})[r["adapter"]] = r
    for (task, base), d in by.items():
        before = d["none"]["perplexity"]
        ref = d.get("lora 16-bit")
        one = d.get("lora 1-bit")
        if ref and one and before > ref["perplexity"]:
            gain = (before - one["perplexity"]) / (before - ref["perplexity"])
            out.append(f"{task}/{base}: 1-bit gets {gain:.3f} of 16-bit LoRA's improvement (target >= 0.95) with "
                       f"{ref['adapter_bytes'] / one['adapter_bytes']:.1f}x smaller storage (target >= 10)")
        fp32 = d["none"].get("fp32_perplexity")
        lora = d.get("lora 32-bit")
        if base != "fp32" and fp32 and lora and before > fp32:
            out.append(f"{task}/{base}: LoRA recovers {(before - lora['perplexity']) / (before - fp32):.3f} of the "
                       f"perplexity the quantization lost (target >= 0.5)")
        lr, merged = d.get("lr-qat (folded)"), d.get("lora 32-bit merged + RTN re-quantized")
        if lr and merged:
            out.append(f"{task}/{base}: LR-QAT {lr['perplexity']:.3f} vs merged LoRA re-quantized "
                       f"{merged['perplexity']:.3f} (target: LR-QAT lower)")
        pf = next((v for k, v in d.items() if k.startswith("peft")), None)
        if pf and lora:
            out.append(f"{task}/{base}: lowbit fp32 LoRA ppl {lora['perplexity']:.3f} vs PEFT {pf['perplexity']:.3f}; "
                       f"tokens/s ratio lowbit/PEFT {lora['tokens_per_second'] / pf['tokens_per_second']:.3f} "
                       f"(targets: ppl <= PEFT, ratio >= 1)")
    return out


if __name__ == "__main__":
    sys.exit(main())
