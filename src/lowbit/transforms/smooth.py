"""SmoothQuant-style channel scaling: move quantization difficulty from activations to weights.

For linears reading the same input X, ``y = X W^T = (X diag(1/s)) (W diag(s))^T`` for any positive
per-input-channel ``s``; SmoothQuant picks ``s_j = max|X_j|^a / max|W_j|^(1-a)``. The division is
folded into the preceding norm where one exists (Llama: input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up); otherwise it is kept as an explicit scale in the layer's
online input transform (Llama o_proj/down_proj; every BERT linear, since a post-LayerNorm output is
also the residual stream and cannot be rescaled without changing the model).

``alpha="auto"`` searches a grid per group of linears and keeps the alpha (or no smoothing) with the
least relative output error ``sum ||XW^T - Qa(X/s R) Qw(W s R)^T||^2 / ||XW^T||^2`` on calibration
rows, with the plan's weight (RTN) and input quantizers and the online rotation the layer will get.

The search is scored on a sample: ``search_tokens`` calibration rows (default 256) and, per linear,
``search_outputs`` output channels (default 256, a fixed random subset that always holds the row
with the largest weight, so per-tensor scales stay those of the whole weight). Every candidate is
scored on the same sample, so the comparison is paired; the RTN quantization of ``W s`` per
candidate, which dominated the cost, shrinks with the number of output channels.

The statistics themselves (channel absmax and the sampled rows) come from a forward over the first
``stats_tokens`` calibration tokens (default 2048, whole sequences, at least one; None: all of
them), not over every calibration token: the absmax is set by a few outlier channels that show up
in any few thousand tokens, and the search keeps only 512 rows anyway, while the forward over all
calibration tokens cost as much as a third of GPTQ's own time (SmolLM2-135M, 16 x 512 tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..quant.activation import quantize_activation
from ..quant.spec import QuantSpec
from ..quant.weight import WeightQuantizer
from .hadamard import random_signs, rotate
from .rotation import transform_layer

ALPHA_GRID = (0.2, 0.35, 0.5, 0.65, 0.8)
MIN_SCALE = 1e-5
SEARCH_TOKENS = 256    # calibration rows the alpha grid is scored on
SEARCH_OUTPUTS = 256   # output channels per linear the alpha grid is scored on
STATS_TOKENS = 2048    # calibration tokens the channel statistics are collected on (None: all)


@dataclass
class SmoothGroup:
    """Linears reading one input; ``norm`` is the module whose output that input is (for folding)."""
    linears: List[str]
    norm: Optional[str] = None


@dataclass
class GroupStats:
    absmax: torch.Tensor                 # per input channel, over all calibration rows
    rows: torch.Tensor                   # a random sample of input rows (for the alpha search)


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^a / max|W_j|^(1-a)`` clamped away from zero (dead channels get 1)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    x = x_absmax.float().clamp(min=MIN_SCALE)
    w = w_absmax.float().clamp(min=MIN_SCALE)
    s = (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=MIN_SCALE)
    return torch.where(x_absmax > 0, s, torch.ones_like(s))


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)


# --- structure -----------------------------------------------------------------------------------

@torch.no_grad()
def shared_input_groups(model: nn.Module, names: List[str], batch: Optional[dict]) -> List[List[str]]:
    """``names`` grouped by the input tensor they read in one forward of ``batch`` (e.g. BERT's
    query/key/value, which read the same hidden states), in order; singletons without a batch.
    The captured inputs are kept alive during the pass, so tensor identity cannot be reused."""
    if batch is None:
        return [[n] for n in names]
    seen: Dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0]))
             for n in names]
    try:
        model(**batch)
    finally:
        for h in hooks:
            h.remove()
    groups: List[List[str]] = []
    for n in names:
        g = next((g for g in groups if n in seen and g[0] in seen and seen[g[0]] is seen[n]), None)
        if g is None:
            groups.append([n])
        else:
            g.append(n)
    return groups


def smoothing_groups(model: nn.Module, batch: Optional[dict] = None) -> List[SmoothGroup]:
    """Llama-style decoders: q/k/v and gate/up fold into their norms, o_proj and down_proj get
    explicit scales. Anything else: the linears of the repeated blocks, explicit, those reading the
    same input (found by one forward of ``batch``) in one group with one shared scale."""
    core = getattr(model, "model", None)
    layers = getattr(core, "layers", None)
    if layers is not None and all(hasattr(l, "input_layernorm") and hasattr(l, "mlp") for l in layers):
        groups = []
        for i in range(len(layers)):
            p = f"model.layers.{i}"
            groups += [SmoothGroup([f"{p}.self_attn.{x}_proj" for x in "qkv"], f"{p}.input_layernorm"),
                       SmoothGroup([f"{p}.self_attn.o_proj"]),
                       SmoothGroup([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.post_attention_layernorm"),
                       SmoothGroup([f"{p}.mlp.down_proj"])]
        return groups
    from ..models.blocks import find_blocks, linear_layers

    path, blocks = find_blocks(model)
    names = [n for i, b in enumerate(blocks) for n in linear_layers(b, f"{path}.{i}")]
    return [SmoothGroup(g) for g in shared_input_groups(model, names, batch)]


def _batch_tokens(batch: dict) -> Tuple[int, int]:
    """(sequences, tokens per sequence) of a calibration batch (its first tensor's leading dims)."""
    t = batch["input_ids"] if "input_ids" in batch else next(v for v in batch.values() if torch.is_tensor(v))
    return int(t.shape[0]), int(t.shape[1]) if t.dim() > 1 else 1


def stats_batches(batches: List[dict], tokens: Optional[int]) -> List[dict]:
    """The leading whole sequences of ``batches`` that fit in ``tokens`` tokens (at least one
    sequence; all of them when ``tokens`` is None). Batches are cut along their first dimension;
    every tensor of a batch (ids, attention mask, ...) is cut alike."""
    if tokens is None:
        return list(batches)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"smoothing statistics token budget must be a positive integer or None (all), got {tokens!r}")
    out: List[dict] = []
    left = tokens
    for b in batches:
        n, length = _batch_tokens(b)
        take = min(n, left // length) if out else max(1, min(n, left // length))
        if take <= 0:
            break
        out.append(b if take == n else {k: (v[:take] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
                                        for k, v in b.items()})
        left -= take * length
        if take < n or left <= 0:
            break
    return out


class _StatsDone(Exception):
    """Raised by the statistics hook once every group has seen this batch's input."""


@torch.no_grad()
def collect_input_stats(model: nn.Module, groups: List[SmoothGroup], batches: List[dict],
                        max_rows: int = 512, seed: int = 0) -> Dict[int, GroupStats]:
    """Per group: channel absmax of its input over all batches and up to ``max_rows`` sampled rows.
    Each forward stops once every group has seen its input (the rest of the model, e.g. a causal
    LM's lm_head over the whole vocabulary, is not needed)."""
    g = torch.Generator().manual_seed(seed)
    fired: set = set()
    per_batch = max(1, max_rows // max(1, len(batches)))
    absmax: Dict[int, torch.Tensor] = {}
    rows: Dict[int, List[torch.Tensor]] = {}

    def hook(i, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.abs().amax(0)
        absmax[i] = m if i not in absmax else torch.maximum(absmax[i], m)
        idx = torch.randperm(x.shape[0], generator=g)[:per_batch].to(x.device)
        rows.setdefault(i, []).append(x[idx].cpu())
        fired.add(i)
        if len(fired) == len(groups):
            raise _StatsDone

    hooks = [model.get_submodule(gr.linears[0]).register_forward_pre_hook(lambda m, a, i=i: hook(i, a[0]))
             for i, gr in enumerate(groups)]
    try:
        for b in batches:
            fired.clear()
            try:
                model(**b)
            except _StatsDone:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {i: GroupStats(absmax[i].cpu(), torch.cat(rows[i])[:max_rows]) for i in absmax}


# --- the alpha search ----------------------------------------------------------------------------

def smoothed_error(X: torch.Tensor, weights: Sequence[torch.Tensor], s: Optional[torch.Tensor],
                   wspecs: Sequence[Optional[QuantSpec]], aspecs: Sequence[Optional[QuantSpec]],
                   rotation: Optional[Tuple[int, Optional[torch.Tensor]]] = None,
                   outputs: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Sum over the linears of ``||XW^T - Qa(X/s R) Qw(W s R)^T||^2 / ||XW^T||^2`` (RTN weights).
    ``outputs``: the float outputs ``XW^T`` if already computed (they do not depend on ``s``)."""
    X = X.float()
    Xs = X if s is None else X / s
    if rotation is not None:
        Xs = rotate(Xs, *rotation)
    xq: Dict[Optional[str], torch.Tensor] = {}  # linears of a group share their input quantizer
    total = 0.0
    for k, (W, ws, as_) in enumerate(zip(weights, wspecs, aspecs)):
        W = W.detach().float()
        Y = outputs[k] if outputs is not None else X @ W.T
        Ws = W if s is None else W * s
        if rotation is not None:
            Ws = rotate(Ws, *rotation)
        Wq = WeightQuantizer(ws).rtn(Ws)[0] if ws is not None else Ws
        key = None if as_ is None else str(as_)
        if key not in xq:
            xq[key] = quantize_activation(Xs, as_) if as_ is not None else Xs
        total += float((Y - xq[key] @ Wq.T).pow(2).sum() / Y.pow(2).sum().clamp(min=1e-30))
    return total


def output_sample(W: torch.Tensor, k: Optional[int], seed: int = 0) -> torch.Tensor:
    """Indices of ``k`` output channels of ``W``: a seeded random subset that holds the row with the
    largest |weight| (all rows when ``k`` is None or not smaller than the row count)."""
    rows = W.shape[0]
    if k is None or k >= rows:
        return torch.arange(rows)
    top = int(W.detach().float().abs().amax(1).argmax())
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    perm = perm[perm != top][: k - 1]
    return torch.cat([torch.tensor([top]), perm]).sort().values


def search_alpha(stats: GroupStats, weights: Sequence[torch.Tensor], wspecs, aspecs,
                 grid: Sequence[float] = ALPHA_GRID, rotation=None, *, tokens: Optional[int] = SEARCH_TOKENS,
                 outputs: Optional[int] = SEARCH_OUTPUTS) -> Tuple[Optional[float], Dict[str, float]]:
    """The alpha of ``grid`` (or None: no smoothing) with the least output error, and all errors,
    under one fixed ``rotation`` (see search_transform for the sample it is scored on)."""
    a, _, errs = search_transform(stats, weights, wspecs, aspecs, grid, {"": rotation}, tokens=tokens,
                                  outputs=outputs)
    return a, errs


def search_transform(stats: GroupStats, weights: Sequence[torch.Tensor], wspecs, aspecs,
                     grid: Sequence[float] = ALPHA_GRID, rotations: Optional[Dict[str, object]] = None, *,
                     include_none: bool = True, tokens: Optional[int] = SEARCH_TOKENS,
                     outputs: Optional[int] = SEARCH_OUTPUTS) -> Tuple[Optional[float], str, Dict[str, float]]:
    """The (alpha, rotation) pair with the least output error, and every pair's error: alpha from
    ``grid`` (or None: no smoothing, a candidate unless ``include_none`` is False), rotation from
    ``rotations`` (label -> (block, signs) or None; default: none). Errors are keyed by the alpha
    ("none", "0.5") with one rotation candidate, else by "label/alpha".
    Scored on ``tokens`` of the sampled rows (a seeded random subset) and ``outputs`` output channels
    per linear (None: all); the scales themselves come from the full statistics and whole weights.
    Every candidate is scored on the same sample, so the comparison is paired."""
    rotations = {"": None} if rotations is None else dict(rotations)
    alphas = ([None] if include_none else []) + [float(a) for a in grid]
    if not rotations or not alphas:
        raise ValueError("the transform search needs at least one rotation and one alpha candidate")
    wmax = weight_absmax(weights)
    dev = weights[0].device  # the statistics are kept on the CPU; the weights may be on a GPU
    X = stats.rows.float()
    if tokens is not None and tokens < X.shape[0]:  # rows are stored batch by batch: sample across them
        X = X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:tokens]]
    X = X.to(dev)
    weights = [W.detach()[output_sample(W, outputs).to(W.device)] for W in weights]
    Y = [X @ W.float().T for W in weights]
    scales = {a: None if a is None else smooth_scales(stats.absmax.to(dev), wmax, a) for a in alphas}
    errs: Dict[str, float] = {}
    keyed: Dict[str, Tuple[Optional[float], str]] = {}
    for label, rot in rotations.items():
        for a, s in scales.items():
            key = "none" if a is None else f"{a:g}"
            key = key if len(rotations) == 1 else f"{label}/{key}"
            errs[key] = smoothed_error(X, weights, s, wspecs, aspecs, rot, Y)
            keyed[key] = (a, label)
    best = min(errs, key=errs.get)
    return keyed[best][0], keyed[best][1], errs


# --- applying it ---------------------------------------------------------------------------------

@torch.no_grad()
def apply_smoothing(model: nn.Module, batches: List[dict], alpha: Union[float, str, None] = "auto", *,
                    weight_spec_of: Callable[[str], Optional[QuantSpec]] = lambda n: None,
                    act_spec_of: Callable[[str], Optional[QuantSpec]] = lambda n: None,
                    rotation_of: Callable[[str, int], Optional[Tuple[int, Optional[int]]]] = lambda n, d: None,
                    rotation_choices: Optional[Callable[[str, int], Dict[str, Optional[Tuple[int, Optional[int]]]]]] = None,
                    grid: Sequence[float] = ALPHA_GRID, explicit: bool = True, max_rows: int = 512,
                    groups: Optional[List[SmoothGroup]] = None, search_tokens="default",
                    search_outputs="default", stats_tokens="default") -> dict:
    """Smooth every group of linears in place (folded into the norm, or an explicit input scale).
    ``alpha``: a number in [0, 1] for all groups, "auto" (grid search per group under the plan's
    quantizers, which ``weight_spec_of``/``act_spec_of`` give per layer name), or None (no
    smoothing: only meaningful with ``rotation_choices``). ``rotation_of(name, features)`` gives the
    (block, seed) of an online rotation the layer will get afterwards; ``rotation_choices(name,
    features)`` instead offers several (label -> (block, seed) or None) and each group's is chosen
    with its alpha, by the same output error; the record's "rotation" holds, per group, the chosen
    label, its (block, seed) and the group's linears, for the caller to apply after smoothing.
    ``search_tokens``/``search_outputs``: the sample the grid is scored on (None: everything;
    "default": the module's SEARCH_TOKENS/SEARCH_OUTPUTS, read at call time).
    ``stats_tokens``: the calibration tokens the statistics (absmax, sampled rows) are collected on,
    the leading whole sequences (None: all; "default": the module's STATS_TOKENS).
    Returns a record with the chosen alpha per group."""
    search_tokens = SEARCH_TOKENS if search_tokens == "default" else search_tokens
    search_outputs = SEARCH_OUTPUTS if search_outputs == "default" else search_outputs
    stats_tokens = STATS_TOKENS if stats_tokens == "default" else stats_tokens
    if alpha is None and rotation_choices is None:
        raise ValueError("apply_smoothing needs an alpha ('auto' or a number in [0, 1]) unless it chooses rotations")
    if alpha is not None and alpha != "auto":
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--smooth takes a number in [0, 1] or 'auto', got {alpha}")
    searching = alpha == "auto" or rotation_choices is not None
    probe = {k: v[:1, :16] for k, v in batches[0].items() if torch.is_tensor(v)} if batches else None
    groups = groups if groups is not None else smoothing_groups(model, probe)
    if not explicit:
        groups = [g for g in groups if g.norm is not None]
    # groups whose layers nobody quantizes gain nothing from smoothing
    groups = [g for g in groups if any(weight_spec_of(n) or act_spec_of(n) for n in g.linears)]
    subset = stats_batches(batches, stats_tokens)
    stats = collect_input_stats(model, groups, subset, max_rows=max_rows)
    count = lambda bs: sum(_batch_tokens(b)[0] * _batch_tokens(b)[1] for b in bs)
    chosen: Dict[str, Optional[float]] = {}
    rotation: Dict[str, dict] = {}
    errors: Dict[str, Dict[str, float]] = {}
    for i, gr in enumerate(groups):
        lins = [model.get_submodule(n) for n in gr.linears]
        weights = [l.weight for l in lins]
        features = lins[0].in_features
        if searching:
            offered = (rotation_choices(gr.linears[0], features) if rotation_choices is not None
                       else {"": rotation_of(gr.linears[0], features)})
            rots = {k: None if r is None else (r[0], None if r[1] is None else random_signs(features, r[1]))
                    for k, r in offered.items()}
            grid_here = grid if alpha == "auto" else ([] if alpha is None else [alpha])
            a, label, errs = search_transform(stats[i], weights, [weight_spec_of(n) for n in gr.linears],
                                              [act_spec_of(n) for n in gr.linears], grid_here, rots,
                                              include_none=alpha in ("auto", None), tokens=search_tokens,
                                              outputs=search_outputs)
            errors[gr.linears[0]] = errs
            if rotation_choices is not None:
                rotation[gr.linears[0]] = {"label": label, "rotation": offered[label], "linears": list(gr.linears)}
        else:
            a = alpha
        chosen[gr.linears[0]] = a
        if a is None:
            continue
        s = smooth_scales(stats[i].absmax.to(weights[0].device), weight_absmax(weights), a)
        _apply_scale(model, gr, s)
    record = {"alpha": alpha, "grid": list(grid) if alpha == "auto" else None, "explicit": explicit,
              "search_sample": ({"tokens": search_tokens, "outputs": search_outputs} if searching else None),
              "stats": {"token_budget": stats_tokens, "tokens": count(subset),
                        "sequences": sum(_batch_tokens(b)[0] for b in subset), "calibration_tokens": count(batches)},
              "groups": len(groups), "smoothed": sum(a is not None for a in chosen.values()),
              "chosen": chosen}
    if rotation_choices is not None:
        record["rotation"] = rotation
    if errors:
        record["search_error"] = errors
    return record


def _apply_scale(model: nn.Module, group: SmoothGroup, s: torch.Tensor) -> None:
    if group.norm is not None:
        norm = model.get_submodule(group.norm)
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
        for n in group.linears:
            lin = model.get_submodule(n)
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
        return
    for n in group.linears:
        lin = transform_layer(model, n)
        tf = lin.input_transform
        if tf.rotation or tf.scale is not None:
            raise ValueError(f"{n} already has an input transform; smoothing must come before rotations")
        tf.scale = s.detach().float().clone()
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
