"""The sweep: one QAT-from-scratch run per (width, tokens, group size, precision, seed), each an
independent unit that appends one JSON line to ``OUT/runs.jsonl`` and is skipped when its line is
already there, so an interrupted sweep resumes (and a run killed half-way resumes from its last
saved training state, lowbit.train's machinery).

Every run trains with :func:`lowbit.train.loop.train` on the stdlib training corpus (training
part), and measures its final loss on the validation part, under the same quantization it trained
with. ``--only i/K`` runs every K-th run from the i-th, so K processes (a SLURM job array, Ray
tasks) share a sweep without any scheduler of ours; docs/scaling.md shows both.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import models
from .fit import param_count
from .tokenizer import EOT, corpus_tokenizer, load_tokenizer, save_tokenizer, tokenizer_sha256

RUNS_FILE = "runs.jsonl"
TOKENIZER_FILE = "tokenizer.json"
STATE_DIR = ".state"

# Weight and input specs of each precision, with {G} the sweep's group size. Activations follow
# the scheme (one int4 scale per token; FC2's inputs in int8 for w4a4-fc2a8), as lowbit's named
# plans do (quant/plan.py); act_granularity="group" quantizes them in groups of G instead.
PRECISIONS: Dict[str, Tuple[Optional[str], Optional[str], Optional[str]]] = {
    # name: (weight spec, input spec, FC2 input spec)
    "bf16": (None, None, None),
    "w4a16": ("int4:g{G}", None, None),
    "w16a4": (None, "int4:{A}", "int4:{A}"),
    "w4a4": ("int4:g{G}", "int4:{A}", "int4:{A}"),
    "w4a4-fc2a8": ("int4:g{G}", "int4:{A}", "int8:{A}"),
    "w16a4-fc2a8": (None, "int4:{A}", "int8:{A}"),
}
ACT_GRANULARITIES = ("token", "group")
FC2 = "*.mlp.down_proj"
LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CURVE_POINTS = 64


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep; ``group`` is None where the precision has no group (bf16, w16a4 with
    per-token inputs)."""

    width: int
    tokens: int
    group: Optional[int]
    precision: str
    seed: int = 0

    @property
    def key(self) -> str:
        g = "-" if self.group is None else self.group
        return f"d{self.width}-t{self.tokens}-g{g}-{self.precision}-s{self.seed}"


@dataclass(frozen=True)
class SweepSettings:
    batch_size: int = 16
    seq_len: int = 128
    vocab: int = 2048
    eval_tokens: int = 32768
    act_granularity: str = "token"
    save_every: int = 200
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "vocab", "eval_tokens", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {', '.join(ACT_GRANULARITIES)}; "
                             f"got {self.act_granularity!r}")


def uses_group(precision: str, act_granularity: str = "token") -> bool:
    w, a, _ = PRECISIONS[precision]
    return w is not None or (a is not None and act_granularity == "group")


def sweep_plan(precision: str, group: Optional[int], act_granularity: str = "token"):
    """The lowbit Plan of ``precision`` at group size ``group`` (None for bf16)."""
    from ..quant.plan import Plan

    check_precision(precision)
    w, a, fc2 = PRECISIONS[precision]
    if w is None and a is None:
        return None
    act = "token" if act_granularity == "token" else f"g{group}"
    fill = lambda s: None if s is None else s.format(G=group, A=act)
    weight = {"*": fill(w)} if w else {}
    acts = {"*": fill(a), FC2: fill(fc2)} if a else {}
    return Plan(weight, acts, name=f"{precision}" + (f"-g{group}" if group else ""))


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")


def sweep_grid(widths: Sequence[int], tokens: Sequence[int], groups: Sequence[int], precisions: Sequence[str],
               seeds: Sequence[int] = (0,), act_granularity: str = "token") -> List[RunSpec]:
    """Every run of the grid, in a fixed order (cheapest first: by tokens x width); precisions
    without a group size get one run per (width, tokens), not one per group."""
    for p in precisions:
        check_precision(p)
    for name, values in (("sizes", widths), ("tokens", tokens), ("groups", groups), ("seeds", seeds)):
        if not values and name != "groups":
            raise ValueError(f"--{name}: give at least one value")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and name != "seeds") or v < 0:
                raise ValueError(f"--{name}: expected positive integers, got {v!r}")
    for g in groups:
        if g < 2:
            raise ValueError(f"--groups: a group size must be >= 2 (the law uses log2 G); got {g}")
    runs = []
    for p in precisions:
        gs: Iterable[Optional[int]] = groups if uses_group(p, act_granularity) else (None,)
        if uses_group(p, act_granularity) and not groups:
            raise ValueError(f"precision {p} quantizes in groups: give --groups")
        for w in widths:
            models.check_width(w)  # before any run starts
            for t in tokens:
                for g in gs:
                    for s in seeds:
                        runs.append(RunSpec(w, t, g, p, s))
    if act_granularity == "group":
        for r in runs:
            mlp = models.mlp_width(r.width)
            if r.group is not None and (r.width % r.group or mlp % r.group):
                raise ValueError(f"act_granularity=group: group size {r.group} must divide the width {r.width} "
                                 f"and the MLP width {mlp}")
    return sorted(runs, key=lambda r: (r.tokens * r.width, r.width, r.tokens, r.precision, r.group or 0, r.seed))


def parse_only(text: Optional[str]) -> Tuple[int, int]:
    """``"i/K"`` -> (i, K) with 0 <= i < K; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--only expects i/K (e.g. 0/4: the first of 4 shares); got {text!r}") from None
    if k < 1 or not 0 <= i < k:
        raise ValueError(f"--only i/K needs K >= 1 and 0 <= i < K; got {text!r}")
    return i, k


def read_runs(out: os.PathLike) -> List[dict]:
    """Every record of ``OUT/*.jsonl``, the first of each key (two processes given overlapping shares
    may both finish a run); a damaged line, from a killed write, is ignored."""
    recs: Dict[str, dict] = {}
    for path in sorted(Path(out).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                recs.setdefault(rec["key"], rec)
    return list(recs.values())


def select_runs(runs: Sequence[dict], min_tokens: int = 0, min_tokens_per_param: float = 0.0,
                n_count: str = "no_emb") -> List[dict]:
    """The runs trained on at least ``min_tokens`` tokens and at least ``min_tokens_per_param``
    tokens per parameter (D / N, N counted as ``n_count`` says: the law's regime is many tokens per
    parameter, not a model far larger than its data)."""
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an int >= 0; got {min_tokens!r}")
    if (isinstance(min_tokens_per_param, bool) or not isinstance(min_tokens_per_param, (int, float))
            or not min_tokens_per_param >= 0 or min_tokens_per_param == float("inf")):
        raise ValueError(f"min_tokens_per_param must be a finite number >= 0; got {min_tokens_per_param!r}")
    return [r for r in runs
            if r["D"] >= min_tokens and r["D"] >= min_tokens_per_param * param_count(r, n_count)]


def append_run(out: os.PathLike, rec: dict) -> None:
    """Append one line under an exclusive lock: processes sharing OUT never interleave lines."""
    path = Path(out) / RUNS_FILE
    line = json.dumps(rec, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sweep_tokenizer(out: os.PathLike, vocab: int, tokenizer_file: Optional[str] = None):
    """The sweep's tokenizer: ``tokenizer_file`` if given, else the one saved in OUT, else the
    corpus BPE of ``vocab`` ids; saved to OUT/tokenizer.json. A different one than OUT already
    holds is refused (its runs would not be comparable)."""
    saved = Path(out) / TOKENIZER_FILE
    if tokenizer_file:
        tok = load_tokenizer(tokenizer_file)
    elif saved.is_file():
        tok = load_tokenizer(str(saved))
    else:
        tok = corpus_tokenizer(vocab)
    if saved.is_file() and tokenizer_sha256(load_tokenizer(str(saved))) != tokenizer_sha256(tok):
        raise ValueError(f"{saved} holds another tokenizer than {tokenizer_file or f'the {vocab}-id corpus BPE'}; "
                         "runs with different tokenizers cannot be fitted together: use another --out")
    if not saved.is_file():
        Path(out).mkdir(parents=True, exist_ok=True)
        save_tokenizer(tok, str(saved))
    return tok


def _validation_loss(model: torch.nn.Module, val: torch.Tensor, bf16: bool) -> float:
    device = next(model.parameters()).device
    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in val:
            ids = batch.to(device)
            total += float(model(input_ids=ids, labels=ids).loss.float())
    return total / len(val)


def linear_input_errors(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> Dict[str, dict]:
    """Per linear type (q/k/v/o/gate/up/down), the relative error ||Q(x) - x||^2 / ||x||^2 of its
    inputs under int4 and int8 per-token quantization, and their mean kurtosis (outliers), averaged
    over layers, on one validation batch of the trained model."""
    from ..quant.activation import quantize_activation
    from ..quant.spec import QuantSpec

    specs = {"int4": QuantSpec.parse("int4:token"), "int8": QuantSpec.parse("int8:token")}
    stats: Dict[str, List[dict]] = {t: [] for t in LINEAR_TYPES}

    def hook(kind):
        def fn(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            row = {}
            for name, spec in specs.items():
                row[f"rel_err_{name}"] = float((quantize_activation(x, spec) - x).pow(2).sum() / x.pow(2).sum())
            c = x - x.mean(-1, keepdim=True)
            row["kurtosis"] = float((c.pow(4).mean(-1) / c.pow(2).mean(-1).pow(2).clamp(min=1e-30)).mean())
            stats[kind].append(row)
        return fn

    handles = []
    for name, mod in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in stats and isinstance(mod, torch.nn.Module) and hasattr(mod, "weight"):
            handles.append(mod.register_forward_pre_hook(hook(kind)))
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: {m: sum(r[m] for r in rows) / len(rows) for m in rows[0]} for k, rows in stats.items() if rows}


def _curve(history: List[dict]) -> List[List[float]]:
    """At most CURVE_POINTS (step, mean training loss since the previous point) pairs."""
    if not history:
        return []
    k = max(1, math.ceil(len(history) / CURVE_POINTS))
    out = []
    for i in range(0, len(history), k):
        part = history[i:i + k]
        out.append([part[-1]["step"], round(sum(h["loss"] for h in part) / len(part), 5)])
    return out


def run_one(spec: RunSpec, settings: SweepSettings, tokenizer, out: os.PathLike, *,
            progress: bool = False) -> dict:
    """Train ``spec`` from scratch, measure it and return its record (not yet appended)."""
    from ..job_common import resolve_device
    from ..train.job import training_data
    from ..train.loop import TrainConfig, train
    from ..train.objectives import causal_lm_objective
    from ..train.qat import prepare_qat, trainable_groups
    from ..data.train_corpus import training_corpus, validation_batches

    device = resolve_device(settings.device)
    vocab = len(tokenizer)
    shape = models.model_shape(spec.width, vocab, settings.seq_len)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    model = models.build_model(shape, spec.seed, eot).to(device)
    plan = sweep_plan(spec.precision, spec.group, settings.act_granularity)
    if plan is not None:
        prepare_qat(model, plan, scaling="dynamic", gradient="straight")
    per_step = settings.batch_size * settings.seq_len
    steps = max(1, math.ceil(spec.tokens / per_step))
    cfg = TrainConfig(steps=steps, lr=models.peak_lr(spec.width), warmup=models.warmup_steps(steps),
                      weight_decay=0.1, min_lr_ratio=0.1, grad_clip=1.0, save_every=settings.save_every,
                      seed=spec.seed)
    data = training_data("causal_lm", tokenizer, settings.batch_size, settings.seq_len, spec.seed)
    state = Path(out) / STATE_DIR / spec.key
    t0 = time.perf_counter()
    res = train(model, data, causal_lm_objective("ce"), trainable_groups(model), cfg, state_dir=state,
                progress=progress)
    bf16 = device.type == "cuda"
    val_batch = max(1, min(settings.batch_size, settings.eval_tokens // settings.seq_len))
    val = validation_batches(tokenizer, settings.seq_len, val_batch,
                             max(1, settings.eval_tokens // (val_batch * settings.seq_len)))
    loss = _validation_loss(model, val, bf16)
    errors = linear_input_errors(model, val[0], bf16)
    counts = shape.params()
    return {
        "key": spec.key, **asdict(spec), "N": counts["total"], "N_no_emb": counts["no_emb"],
        "N_linear": counts["linear"], "D": steps * per_step, "G": spec.group, "loss": loss,
        "train_loss_end": res.history[-1]["loss"] if res.history else None,
        "loss_curve": _curve(res.history), "steps": steps, "seconds": res.seconds,
        "wall_seconds": time.perf_counter() - t0, "resumed_from": res.resumed_from,
        "eval_tokens": int(val.numel()), "lr": cfg.lr, "warmup": cfg.warmup, "shape": shape.to_dict(),
        "plan": plan.to_dict() if plan is not None else None, "settings": asdict(settings),
        "linear_inputs": errors, "device": _device_name(device), "autocast": "bf16" if bf16 else "none",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "tokenizer_sha256": tokenizer_sha256(tokenizer), "corpus_sha256": training_corpus().sha256,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def run_sweep(out: os.PathLike, runs: Sequence[RunSpec], settings: SweepSettings, *,
              tokenizer_file: Optional[str] = None, only: Tuple[int, int] = (0, 1),
              log: Callable[[str], None] = print, progress: bool = False) -> List[dict]:
    """Run this process's share (``only`` = (i, K)) of ``runs`` that OUT does not hold yet, appending
    each record as it finishes; returns the records written now."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = sweep_tokenizer(out, settings.vocab, tokenizer_file)
    i, k = only
    mine = [r for j, r in enumerate(runs) if j % k == i]
    done = {r["key"]: r for r in read_runs(out)}
    for r in done.values():
        if r.get("settings") and _comparable(r["settings"]) != _comparable(asdict(settings)):
            raise ValueError(f"{out} holds runs made with other settings ({_comparable(r['settings'])}, now "
                             f"{_comparable(asdict(settings))}); use another --out")
    todo = [r for r in mine if r.key not in done]
    log(f"sweep: {len(runs)} runs in the grid, {len(mine)} in this share ({i}/{k}), "
        f"{len(mine) - len(todo)} already in {out / RUNS_FILE}, {len(todo)} to run")
    written = []
    t_start = time.perf_counter()
    for n, spec in enumerate(todo, 1):
        rec = run_one(spec, settings, tok, out, progress=progress)
        append_run(out, rec)
        shutil.rmtree(out / STATE_DIR / spec.key, ignore_errors=True)
        written.append(rec)
        spent = time.perf_counter() - t_start
        log(f"[{n}/{len(todo)}] {spec.key}: N={rec['N']:,} D={rec['D']:,} val loss {rec['loss']:.4f} "
            f"in {rec['wall_seconds']:.1f} s ({spent:.0f} s so far)")
    return written


def _comparable(settings: dict) -> dict:
    """The settings that change a run's loss (not where it ran or how often it saved)."""
    return {k: settings.get(k) for k in ("batch_size", "seq_len", "eval_tokens", "act_granularity")}
