"""The ``lowbit finetune`` subcommand and ``lowbit eval BASE --adapter DIR``."""
from __future__ import annotations

import json
from pathlib import Path


def add_finetune_parser(sub) -> None:
    f = sub.add_parser("finetune", help="adapt a (quantized) model to a task with adapters: LoRA (down to 1-bit "
                                        "adapters) or LR-QAT (folded into the integer codes)")
    f.add_argument("base", nargs="?", default=None,
                   help="a lowbit checkpoint directory, or smollm2 (default) / a model path (with --scheme: "
                        "quantized on the fly)")
    f.add_argument("--adapter", default="lora", help="lora | lora:FORMAT (1bit, 2bit, 4bit, 8bit, 16bit, nf4, "
                                                     "e2m1, ...) | lrqat (default lora: fp32 adapters)")
    f.add_argument("--task", default="docs", help="docs | code (stdlib docstrings / source) | a text file")
    f.add_argument("--target", action="append", default=None,
                   help="glob over linear names, with optional =RANK[:ALPHA]; repeatable (default '*': every "
                        "linear but lm_head)")
    f.add_argument("--rank", type=int, default=16, help="rank of targets without their own (default 16)")
    f.add_argument("--alpha", type=float, default=None, help="alpha of targets without their own (default 2 x rank)")
    f.add_argument("--scheme", help="quantize a float base on the fly with this scheme (e.g. w3g64)")
    f.add_argument("--method", default="rtn", choices=("rtn", "gptq"), help="PTQ method for --scheme (default rtn)")
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--seq-len", type=int, default=512)
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the adapters")
    f.add_argument("--scale-lr", type=float, default=None, help="LR-QAT: learning rate of the scales (default 10 x --lr)")
    f.add_argument("--warmup", type=int, default=0)
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--save-every", type=int, default=50, help="steps between saved training states")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens measured (0: all)")
    f.add_argument("--context", type=int, default=512)
    f.add_argument("--peft", action="store_true", help="also export the (dequantized) adapters in PEFT's format")
    f.add_argument("--autocast", default="auto", choices=("auto", "bf16", "none"))
    f.add_argument("--device", default="auto", help="auto (a GPU when torch sees one, default), cpu, cuda, cuda:N")
    f.add_argument("--out", help="directory for the adapter (OUT/adapter) or LR-QAT checkpoint, report.json, "
                                 "report.html, loss.png")
    f.add_argument("--json", action="store_true")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from ..train.loop import TrainConfig
    from .job import DEFAULT_TARGETS, run_finetune
    from .report import summary_lines

    cfg = TrainConfig(steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, warmup=args.warmup,
                      grad_accum=args.grad_accum, save_every=args.save_every, seed=args.seed, autocast=args.autocast)
    report = run_finetune(args.base, args.adapter, args.out, task=args.task, targets=args.target or DEFAULT_TARGETS,
                          rank=args.rank, alpha=args.alpha, scheme=args.scheme, method=args.method, config=cfg,
                          batch_size=args.batch_size, seq_len=args.seq_len, eval_tokens=args.eval_tokens or None,
                          context=args.context, peft=args.peft, device=args.device, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))
    else:
        print("\n".join(summary_lines(report)))
        if args.out:
            what = f"{args.out}/adapter" if report["method"] == "lora" else f"the checkpoint {args.out}"
            print(f"wrote {what}, {args.out}/report.json, {args.out}/report.html, {args.out}/loss.png")
    return 0


def cmd_eval_adapters(args) -> int:
    from .job import run_eval_adapters

    res = run_eval_adapters(args.dir, args.adapter, task=args.task, eval_tokens=args.eval_tokens or 8192,
                            context=args.context or 512, device=args.device, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for r in res:
            print(f"{Path(r['adapter']).as_posix()}: {r['task']} held-out perplexity {r['perplexity']:.3f} "
                  f"({r['format']}, {r['adapter_bytes']:,} bytes)")
    return 0
