"""The ``lowbit lptrain`` subcommand: its arguments and its runner (registered by lowbit.cli)."""
from __future__ import annotations

from ..train.cli_options import add_run_options, add_training_options, print_report, train_config
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
    add_training_options(t, lr=1e-5, lr_help="peak learning rate of the weights")
    t.add_argument("--objective", default="ce", choices=("ce", "kl", "kl+ce"),
                   help="ce: next-token loss (default); kl: distil the fp32 model")
    t.add_argument("--val-batches", type=int, default=8, help="validation batches of the held-out loss")
    t.add_argument("--save-model", action="store_true", help="write the fine-tuned weights to --out")
    t.add_argument("--fsdp", action="store_true",
                   help="data-parallel FSDP2 under torchrun (torchrun --nproc-per-node K -m lowbit.cli lptrain ... "
                        "--fsdp); --batch-size is the global batch, split over the processes")
    t.add_argument("--gather", default="bf16",
                   help="with --fsdp: all-gather format of the low-precision linears' weights: bf16 (default), "
                        "fp8 (E4M3 per tensor), fp8row (E4M3 per row), int8 (per row) or a quant spec (HQ-FSDP)")
    t.add_argument("--lora", metavar="TARGETS", default=None,
                   help="train LoRA adapters on these linears (globs, e.g. '*q_proj,*v_proj' or '*q_proj=16:32') "
                        "over the frozen low-precision base, instead of all weights")
    t.add_argument("--lora-rank", type=int, default=16, help="adapter rank where a target gives none (default 16)")
    add_run_options(t, out_help="directory for report.json, loss.png (and the model); a rerun resumes there")
    t.set_defaults(func=cmd_lptrain)


def cmd_lptrain(args) -> int:
    from .job import run_lptrain, summary_lines

    report = run_lptrain(args.model, args.halo, args.out, config=train_config(args), batch_size=args.batch_size,
                         seq_len=args.seq_len, objective=args.objective, block=args.block, backend=args.backend,
                         grad_rounding=args.grad_rounding, val_batches=args.val_batches, device=args.device,
                         save_model=args.save_model, quiet=args.quiet, fsdp=args.fsdp, gather=args.gather,
                         lora=args.lora, lora_rank=args.lora_rank)
    if args.fsdp:
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return 0   # rank 0 reports
    print_report(report, args.json, summary_lines)
    return 0
