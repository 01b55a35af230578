"""The ``lowbit finetune`` subcommand and ``lowbit eval BASE --adapter DIR``."""
from __future__ import annotations

import json
from pathlib import Path

from ..train.cli_options import add_eval_options, add_run_options, add_training_options, print_report, train_config


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
    add_training_options(f, lr=1e-4, lr_help="peak learning rate of the adapters",
                         scale_lr_help="LR-QAT: learning rate of the scales (default 10 x --lr)",
                         weight_decay=False, grad_checkpointing=False)
    add_eval_options(f, sentences=False)
    f.add_argument("--peft", action="store_true", help="also export the (dequantized) adapters in PEFT's format")
    add_run_options(f, out_help="directory for the adapter (OUT/adapter) or LR-QAT checkpoint, report.json, "
                                "report.html, loss.png")
    f.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from .job import DEFAULT_TARGETS, run_finetune
    from .report import summary_lines

    report = run_finetune(args.base, args.adapter, args.out, task=args.task, targets=args.target or DEFAULT_TARGETS,
                          rank=args.rank, alpha=args.alpha, scheme=args.scheme, method=args.method,
                          config=train_config(args), batch_size=args.batch_size, seq_len=args.seq_len,
                          eval_tokens=args.eval_tokens or None, context=args.context, peft=args.peft,
                          device=args.device, quiet=args.quiet or args.json)
    what = f"{args.out}/adapter" if report["method"] == "lora" else f"the checkpoint {args.out}"
    print_report(report, args.json, summary_lines,
                 written=args.out and f"{what}, {args.out}/report.json, {args.out}/report.html, {args.out}/loss.png")
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
