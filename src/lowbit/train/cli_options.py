"""What the training commands (``lowbit train``, ``finetune``, ``lptrain``) share on the command
line: the options of the training loop, of the held-out evaluation and of the run, the TrainConfig
made of them, and how a report is printed. Each command passes what legitimately differs: its
learning rate and which optional knobs it offers."""
from __future__ import annotations

import argparse
import json
from typing import Callable, List, Optional

from ..jobs import DEFAULT_CONTEXT, DEFAULT_EVAL_TOKENS, DEFAULT_SENTENCES
from .loop import TrainConfig

# the TrainConfig fields a command line can set; a command without an option keeps the field's default
CONFIG_OPTIONS = ("steps", "lr", "scale_lr", "weight_decay", "warmup", "grad_accum", "save_every", "seed",
                  "autocast", "grad_checkpointing")


def add_training_options(parser: argparse.ArgumentParser, *, lr: float, lr_help: str,
                         scale_lr_help: Optional[str] = None, weight_decay: bool = True,
                         grad_checkpointing: bool = True) -> None:
    """The training loop's options: --steps --batch-size --seq-len --lr --warmup --grad-accum
    --autocast --save-every --seed, plus --scale-lr when ``scale_lr_help`` is given (the command
    trains quantizer scales) and --weight-decay / --grad-checkpointing unless turned off."""
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (default 512)")
    parser.add_argument("--lr", type=float, default=lr, help=f"{lr_help} (default {lr:g})")
    if scale_lr_help is not None:
        parser.add_argument("--scale-lr", type=float, default=None, help=scale_lr_help)
    if weight_decay:
        parser.add_argument("--weight-decay", type=float, default=0.0,
                            help="AdamW weight decay of the weights (default 0)")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up before the cosine decay")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    if grad_checkpointing:
        parser.add_argument("--grad-checkpointing", action="store_true",
                            help="recompute activations in the backward pass: less memory, more time")
    parser.add_argument("--autocast", default="auto", choices=("auto", "bf16", "none"),
                        help="auto (default): bf16 on CUDA, none elsewhere")
    parser.add_argument("--save-every", type=int, default=50,
                        help="steps between saved training states (default 50)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the run: the data order and every random draw (default 0)")


def add_eval_options(parser: argparse.ArgumentParser, *, sentences: bool) -> None:
    """The held-out evaluation's options: --eval-tokens --context, and --sentences for commands that
    also measure encoders."""
    parser.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                        help=f"held-out tokens measured (0: all; default {DEFAULT_EVAL_TOKENS})")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                        help=f"perplexity window (default {DEFAULT_CONTEXT})")
    if sentences:
        parser.add_argument("--sentences", type=int, default=DEFAULT_SENTENCES,
                            help=f"held-out sentences for encoders (default {DEFAULT_SENTENCES})")


def add_run_options(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """Where the run goes and what it prints: --device --out --json --quiet."""
    parser.add_argument("--device", default="auto", help="auto (a GPU when torch sees one, default), cpu, cuda, cuda:N")
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--json", action="store_true", help="print the report (without its per-step history) as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed training options (fields without an option keep their defaults)."""
    return TrainConfig(**{name: getattr(args, name) for name in CONFIG_OPTIONS if hasattr(args, name)})


def print_report(report: dict, as_json: bool, summary_lines: Callable[[dict], List[str]],
                 written: Optional[str] = None) -> None:
    """The report as JSON without its per-step history, or the command's summary lines followed by
    ``wrote {written}`` (what the run left in its --out, if anything)."""
    if as_json:
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))
        return
    print("\n".join(summary_lines(report)))
    if written:
        print(f"wrote {written}")
