"""The ``lowbit lptrain`` subcommand: its arguments and its runner (registered by lowbit.cli)."""
from __future__ import annotations

import json

from .recipe import PRESETS


def add_parser(sub) -> None:
    t = sub.add_parser("lptrain", help="low-precision fine-tuning (HALO): every linear's forward and both gradient "
                                       "matmuls in FP8/INT8 (real kernels on Hopper) or any emulated format")
    t.add_argument("model", nargs="?", help="smollm2 (default) or a path to a causal LM")
    t.add_argument("--halo", default="fp8:2", help=f"RECIPE[:LEVEL]: a preset ({', '.join(PRESETS)}) or a quant spec "
                                                   "for all operands, HALO level 0/1/2 (default fp8:2); bf16: unquantized")
    t.add_argument("--block", type=int, default=256, help="Hadamard block size (a power of two; default 256)")
    t.add_argument("--backend", default="auto", choices=("auto", "emulate", "kernel"),
                   help="auto: FP8/INT8 kernels on CUDA where the operands allow, emulation elsewhere")
    t.add_argument("--grad-rounding", default=None, help="rounding of the output gradients, e.g. stochastic")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup", type=int, default=0)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--objective", default="ce", choices=("ce", "kl", "kl+ce"),
                   help="ce: next-token loss (default); kl: distil the fp32 model")
    t.add_argument("--val-batches", type=int, default=8, help="validation batches of the held-out loss")
    t.add_argument("--autocast", default="auto", choices=("auto", "bf16", "none"), help="auto: bf16 on CUDA")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda, cuda:N")
    t.add_argument("--save-model", action="store_true", help="write the fine-tuned weights to --out")
    t.add_argument("--out", help="directory for report.json, loss.png (and the model); a rerun resumes there")
    t.add_argument("--fsdp", action="store_true",
                   help="data-parallel FSDP2 under torchrun (torchrun --nproc-per-node K -m lowbit.cli lptrain ... "
                        "--fsdp); --batch-size is the global batch, split over the processes")
    t.add_argument("--gather", default="bf16",
                   help="with --fsdp: all-gather format of the low-precision linears' weights: bf16 (default), "
                        "fp8 (E4M3 per tensor), fp8row (E4M3 per row), int8 (per row) or a quant spec (HQ-FSDP)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_lptrain)


def cmd_lptrain(args) -> int:
    from ..train.loop import TrainConfig
    from .job import run_lptrain, summary_lines

    cfg = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                      grad_accum=args.grad_accum, save_every=args.save_every, seed=args.seed, autocast=args.autocast,
                      grad_checkpointing=args.grad_checkpointing)
    report = run_lptrain(args.model, args.halo, args.out, config=cfg, batch_size=args.batch_size, seq_len=args.seq_len,
                         objective=args.objective, block=args.block, backend=args.backend,
                         grad_rounding=args.grad_rounding, val_batches=args.val_batches, device=args.device,
                         save_model=args.save_model, quiet=args.quiet, fsdp=args.fsdp, gather=args.gather)
    if args.fsdp:
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return 0   # rank 0 reports
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))
    else:
        print("\n".join(summary_lines(report)))
    return 0
