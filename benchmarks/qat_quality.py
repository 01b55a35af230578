"""QAT quality: `lowbit train` runs against their PTQ start and an fp32 control trained identically.

Each run is `lowbit train` (run_train) with the given scheme, init, steps and learning rates; the
control trains the unquantized model with the same data, steps, objective and teacher, so what
in-domain training alone does to perplexity is measured beside what QAT recovers. Prints one row per
run: fp32 / start / trained perplexity (or MiniLM cosine), KL to fp32 on held-out tokens, the share
of the PTQ gap closed, tokens/s and minutes; --json writes every report.

    python3 benchmarks/qat_quality.py --runs int3g64 control --steps 400 --device cuda --json out.json
    python3 benchmarks/qat_quality.py --runs w4a4 w4a4-fc2a8 --steps 400 --device cuda
    python3 benchmarks/qat_quality.py --runs w4a4-rot w4a4-fc2a8-rot --steps 400 --device cuda  # from
        # `quantize --rotate hadamard --smooth auto`
    python3 benchmarks/qat_quality.py --model minilm --runs int3g64 --steps 300 --device cuda
    python3 benchmarks/qat_quality.py --runs w4a4-rot w4a4-rot-lact --steps 300 --device cuda  # input
        # activations: fixed absmax vs learned clipping ratio (-lact), from the same start

A run named NAME-lact trains with `--act-scaling learned` (the ratio calibrated by MSE, then learned);
NAME and NAME-lact share one PTQ start (quantized once, kept in OUT/MODEL-NAME-init).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LEARNED_ACTS = "-lact"  # suffix of a run: the same run with learned input clipping ratios
RUNS = {  # name -> (scheme, init, PTQ transforms of the start)
    "int3g64": ("int3:g64", "gptq", {}),
    "int4g64": ("int4:g64", "gptq", {}),
    "w4a4": ("w4a4", "gptq", {}),
    "w4a4-fc2a8": ("w4a4-fc2a8", "gptq", {}),
    "w4a4-rot": ("w4a4", "gptq", {"rotate": "hadamard", "smooth": "auto"}),
    "w4a4-fc2a8-rot": ("w4a4-fc2a8", "gptq", {"rotate": "hadamard", "smooth": "auto"}),
    "w4a16": ("w4a16", "gptq", {}),
    "w16a4": ("w16a4", "rtn", {}),
}


def control(model: str, steps: int, batch_size: int, seq_len: int, lr: float, device: str, quiet: bool) -> dict:
    """The fp32 model trained exactly as QAT trains (same data, objective, teacher, schedule)."""
    from lowbit.data.corpus import evaluation_tokens
    from lowbit.evaluate.kl import token_kl_divergence
    from lowbit.job_common import resolve_device
    from lowbit.jobs import EvalSettings, evaluate_model
    from lowbit.models.loader import load_model
    from lowbit.train.job import training_data
    from lowbit.train.loop import TrainConfig, train
    from lowbit.train.objectives import causal_lm_objective, encoder_objective
    from lowbit.train.qat import trainable_groups

    dev = resolve_device(device)
    loaded = load_model(model)
    teacher = loaded.model.to(dev)
    student = copy.deepcopy(teacher)
    settings = EvalSettings()
    kind = loaded.kind
    before = evaluate_model(teacher, loaded.tokenizer, kind, settings, teacher if kind == "encoder" else None)
    cfg = TrainConfig(steps=steps, lr=lr)
    obj = causal_lm_objective("kl") if kind == "causal_lm" else encoder_objective()
    res = train(student, training_data(kind, loaded.tokenizer, batch_size, seq_len, cfg.seed), obj,
                trainable_groups(student), cfg, teacher=teacher, progress=not quiet)
    after = evaluate_model(student, loaded.tokenizer, kind, settings, teacher if kind == "encoder" else None)
    if kind == "causal_lm":
        after["kl_to_fp32"] = token_kl_divergence(student, teacher, evaluation_tokens(loaded.tokenizer,
                                                                                      settings.eval_tokens))
    return {"baseline": before, "before": before, "after": after, "steps": res.steps, "tokens": res.tokens,
            "seconds": res.seconds, "tokens_per_second": res.tokens_per_second(), "scheme": "fp32 (control)",
            "init": "fp32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", nargs="+", default=["int3g64", "control"],
                    help=f"any of {', '.join(RUNS)} (each also as NAME{LEARNED_ACTS}: learned input clipping), "
                         "control")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--scale-lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="out/qat_quality", help="directory for each run's checkpoint and report")
    ap.add_argument("--json", help="write all reports (without per-step history) here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    from lowbit.jobs import run_quantize
    from lowbit.train.job import run_train
    from lowbit.train.loop import TrainConfig

    rows, reports = [], {}
    for name in args.runs:
        t = time.time()
        if name == "control":
            rep = control(args.model, args.steps, args.batch_size, args.seq_len, args.lr, args.device, args.quiet)
        else:
            base = name[: -len(LEARNED_ACTS)] if name.endswith(LEARNED_ACTS) else name
            if base not in RUNS:
                raise SystemExit(f"unknown run {name!r}: any of {', '.join(RUNS)}, NAME{LEARNED_ACTS}, control")
            scheme, init, transforms = RUNS[base]
            cfg = TrainConfig(steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, warmup=args.warmup)
            out = f"{args.out}/{args.model}-{name}"
            if transforms:  # the start is a rotated/smoothed PTQ checkpoint, trained with its own specs
                start = Path(f"{args.out}/{args.model}-{base}-init")
                if not (start / "lowbit.json").is_file():  # NAME and NAME-lact share it
                    run_quantize(args.model, scheme, init, str(start), calib=args.calib, seq_len=args.seq_len,
                                 device=args.device, quiet=args.quiet, **transforms)
                scheme, init = None, str(start)
            rep = run_train(args.model, scheme, out, init=init, config=cfg,
                            batch_size=args.batch_size, seq_len=args.seq_len, calib=args.calib,
                            act_scaling="learned" if name != base else "fixed",
                            device=args.device, quiet=args.quiet)
        rep.pop("history", None)
        rep["minutes"] = (time.time() - t) / 60
        reports[name] = rep
        b, s, a = rep["baseline"], rep["before"] or {}, rep["after"]
        if "perplexity" in a:
            gap = s.get("perplexity", float("nan")) - b["perplexity"]
            closed = (s.get("perplexity", float("nan")) - a["perplexity"]) / gap if gap else float("nan")
            cal = rep.get("calibrated")  # the start with calibrated clipping ratios (learned runs)
            clip = f" clip {cal['perplexity']:7.3f}" if cal else ""
            rows.append(f"{name:19s} fp32 {b['perplexity']:7.3f}  start {s.get('perplexity', float('nan')):7.3f}{clip}  "
                        f"trained {a['perplexity']:7.3f} ({a['perplexity'] / b['perplexity']:.3f} x fp32, "
                        f"{closed:6.1%} of the gap)  KL {a.get('kl_to_fp32', float('nan')):.4f}  "
                        f"{rep['tokens_per_second']:9,.0f} tok/s  {rep['minutes']:5.1f} min")
        else:
            rows.append(f"{name:19s} cosine start {s.get('cosine_mean', float('nan')):.4f}  trained "
                        f"{a['cosine_mean']:.4f}  {rep['tokens_per_second']:9,.0f} tok/s  {rep['minutes']:5.1f} min")
        print(rows[-1], flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(reports, indent=1))
    print("\n".join(["", f"{args.model}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, lr {args.lr}"]
                    + rows))


if __name__ == "__main__":
    main()
