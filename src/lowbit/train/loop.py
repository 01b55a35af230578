"""The one training loop: every training command (QAT, adapters, low-precision training, scaling
sweeps) runs this, with its own model, data and objective.

- Data is a pure function of the step (``batches(step) -> dict of tensors``) and every step seeds
  torch's generators from (seed, step), so a run killed and resumed from its last saved state ends
  with the same weights as one that never stopped.
- AdamW with one learning rate for weights and another for quantizer scales, linear warm-up then
  cosine decay, gradient accumulation, gradient clipping, bf16 autocast on CUDA.
- State (model, optimizer, step, history) is saved atomically every ``save_every`` steps and when
  interrupted; progress shows loss, tokens/s and the time left.
- Data-parallel (FSDP2 under torchrun, ``parallel``: a ``train.distributed.DataParallel``): each
  rank trains on its slice of every batch, the loss and tokens are reduced over the ranks, rank 0
  alone shows progress and writes the state (gathered in full) every ``save_every`` steps (not on
  an interrupt, which reaches the ranks at different points); a resume loads it on every rank.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

STATE_FILE = "train_state.pt"
STATE_DIR = ".train"   # under a command's --out: the state of its unfinished run


def run_state_dir(out_dir: Optional[os.PathLike]) -> Optional[Path]:
    """Where a command writing to ``out_dir`` keeps its training state (None without ``out_dir``:
    such a run cannot resume)."""
    return Path(out_dir) / STATE_DIR if out_dir else None


def has_saved_state(out_dir: Optional[os.PathLike]) -> bool:
    """Whether ``out_dir`` holds the saved state of an interrupted run (which a rerun resumes)."""
    state_dir = run_state_dir(out_dir)
    return state_dir is not None and (state_dir / STATE_FILE).is_file()


def discard_state(out_dir: os.PathLike) -> None:
    """Remove a finished run's training state: its results are written, so a rerun starts over."""
    state_dir = run_state_dir(out_dir)
    if state_dir is not None and state_dir.is_dir():
        shutil.rmtree(state_dir)


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-5                 # master weights (and anything else trainable)
    scale_lr: Optional[float] = None  # quantizer scales; None: 10 x lr
    weight_decay: float = 0.0
    warmup: int = 0                  # steps of linear warm-up
    min_lr_ratio: float = 0.1        # cosine decay ends at this fraction of the peak
    grad_accum: int = 1
    grad_clip: Optional[float] = 1.0
    save_every: int = 50
    seed: int = 0
    autocast: str = "auto"           # auto: bf16 on CUDA, none on the CPU; bf16; none
    grad_checkpointing: bool = False
    dropout: bool = False            # the model's own dropout; off by default: distillation matches a
                                     # deterministic teacher, and dropout noise is a floor on that loss

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or (self.scale_lr is not None and self.scale_lr < 0):
            raise ValueError(f"learning rates must be positive, got lr={self.lr}, scale_lr={self.scale_lr}")
        if self.warmup < 0 or self.warmup >= max(self.steps, 1) and self.warmup:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} for {self.steps} steps")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"autocast must be auto, bf16 or none, got {self.autocast!r}")

    def autocast_bf16(self, device: torch.device) -> bool:
        """Whether a model on ``device`` trains (and is measured) under bf16 autocast."""
        return self.autocast == "bf16" or (self.autocast == "auto" and device.type == "cuda")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at ``step`` (0-based)."""
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float                      # training steps only (teacher forwards included)
    teacher_seconds: float              # of which the teacher's forwards
    history: List[dict] = field(default_factory=list)   # per step: step, loss, lr, tokens, seconds
    resumed_from: Optional[int] = None

    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def steady_tokens_per_second(self, skip: Optional[int] = None) -> float:
        """Tokens/s over the steps after the first ``skip`` (default: a tenth of them, at least 3),
        which carry the process's warm-up (CUDA context, kernel compilation, allocator growth): the
        rate to compare between configurations run one after another."""
        skip = max(3, len(self.history) // 10) if skip is None else skip
        rest = self.history[skip:]
        seconds = sum(r["seconds"] for r in rest)
        return sum(r["tokens"] for r in rest) / seconds if rest and seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second(),
                "steady_tokens_per_second": self.steady_tokens_per_second()}


# An objective maps (student, teacher or None, batch) to (loss, teacher seconds spent).
Objective = Callable[[nn.Module, Optional[nn.Module], Dict[str, torch.Tensor]], tuple]


def optimizer_for(groups: Dict[str, list], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [{"params": groups["weights"], "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "weights"}]
    if groups.get("scales"):
        params.append({"params": groups["scales"], "lr": cfg.scale_lr if cfg.scale_lr is not None else 10 * cfg.lr,
                       "weight_decay": 0.0, "name": "scales"})
    params = [p for p in params if p["params"]]
    if not params:
        raise ValueError("nothing to train: the model has no parameter that requires a gradient")
    for p in params:
        p["base_lr"] = p["lr"]
    return torch.optim.AdamW(params, betas=(0.9, 0.95), eps=1e-8)


def _save_state(path: Path, model: nn.Module, opt, step: int, result: TrainResult, parallel=None) -> None:
    """Atomically: a killed save leaves the previous state intact."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_state, opt_state = parallel.full_state(model, opt) if parallel else (model.state_dict(), opt.state_dict())
    if parallel is None or parallel.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {k: v for k, v in model_state.items() if k in trainable}
        torch.save({"step": step, "model": state, "optimizer": opt_state, "result": asdict(result)}, tmp)
        os.replace(tmp, path)
    if parallel is not None:
        parallel.barrier()


def _load_state(path: Path, model: nn.Module, opt, parallel=None) -> tuple:
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"training state {path} cannot be read ({type(e).__name__}: {e}); delete it to start "
                         "over") from None
    missing = set(st["model"]) - set(model.state_dict())
    if missing:
        raise ValueError(f"training state {path} does not belong to this model: it holds {sorted(missing)[:3]} "
                         "... which the model lacks; delete it or use another --out")
    if parallel is not None:
        parallel.load_full_state(model, opt, st["model"], st["optimizer"])
    else:
        model.load_state_dict(st["model"], strict=False)
        opt.load_state_dict(st["optimizer"])
    return st["step"], TrainResult(**st["result"])


def train(model: nn.Module, batches: Callable[[int], Dict[str, torch.Tensor]], objective: Objective,
          groups: Dict[str, list], cfg: TrainConfig, *, teacher: Optional[nn.Module] = None,
          state_dir: Optional[os.PathLike] = None, progress: bool = True,
          on_step: Optional[Callable[[dict], None]] = None, parallel=None) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps on ``batches(micro_step)``; resumes from
    ``state_dir`` when it holds a saved state. ``groups``: parameters by role ('weights', 'scales').
    ``parallel``: the ranks of a data-parallel run (``model`` sharded by FSDP2; every rank calls
    with the same ``batches``, each trains on its slice)."""
    device = next(model.parameters()).device
    opt = optimizer_for(groups, cfg)
    state_path = Path(state_dir) / STATE_FILE if state_dir else None
    start, result = 0, TrainResult(0, 0, 0.0, 0.0)
    if state_path is not None and state_path.is_file():
        start, result = _load_state(state_path, model, opt, parallel)
        result.resumed_from = start
    if cfg.grad_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError("gradient checkpointing needs a Hugging Face model (gradient_checkpointing_enable)")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Hugging Face runs gradient checkpointing only in training mode, which also turns dropout on
    model.train(cfg.dropout or cfg.grad_checkpointing)
    if teacher is not None:
        teacher.eval()
    bf16 = cfg.autocast_bf16(device)
    from tqdm.auto import tqdm

    quiet_rank = parallel is not None and not parallel.is_main
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or quiet_rank, desc="train", unit="step",
               dynamic_ncols=True)
    step = start
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            teacher_s = 0.0
            tokens = 0
            total = 0.0
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * cfg.lr_factor(step)
            opt.zero_grad(set_to_none=True)
            for micro in range(cfg.grad_accum):
                k = step * cfg.grad_accum + micro
                torch.manual_seed(cfg.seed * 1_000_003 + k)  # dropout and stochastic rounding: a function of the step
                batch = batches(k) if parallel is None else parallel.local_batch(batches(k))
                batch = {n: v.to(device) for n, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, t_teacher = objective(model, teacher, batch)
                (loss / cfg.grad_accum).backward()
                teacher_s += t_teacher
                total += float(loss.detach())
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            if parallel is not None:
                total, tokens = parallel.reduce_step(total, tokens, device)
            if not math.isfinite(total):
                raise FloatingPointError(f"training loss became {total} at step {step}; lower --lr")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            took = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": total / cfg.grad_accum, "lr": opt.param_groups[0]["lr"],
                   "tokens": tokens, "seconds": took}
            result.history.append(rec)
            result.steps, result.tokens = step + 1, result.tokens + tokens
            result.seconds += took
            result.teacher_seconds += teacher_s
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tokens / took:,.0f}")
            bar.update(1)
            if on_step:
                on_step(rec)
            if state_path is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
                _save_state(state_path, model, opt, step + 1, result, parallel)
    except KeyboardInterrupt:
        # data-parallel: the ranks are interrupted at different points, and the save is collective
        if state_path is not None and result.steps > start and parallel is None:
            _save_state(state_path, model, opt, result.steps, result)
        raise
    finally:
        bar.close()
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_disable()
    model.eval()
    return result
