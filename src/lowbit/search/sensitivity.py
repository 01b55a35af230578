"""Per-layer sensitivities: how much the task loss grows when a layer takes a candidate spec.

Estimators, all on one :class:`~lowbit.search.objective.Objective` (calibration data):

* ``hutchinson`` (HAWQ-V2): Tr(H_l) per layer from Rademacher probes v and Hessian-vector products
  (double backward), then ``0.5 * Tr(H_l) / n_l * ||dW||^2``;
* ``fisher``: diagonal of the Fisher (squared per-sequence gradients for causal LMs; for the encoder
  objective, whose gradient vanishes at the fp32 weights, squared gradients of random Gaussian
  projections of the embeddings, whose expectation is the Gauss-Newton diagonal), then
  ``0.5 * sum(F * dW^2)``;
* ``measured``: how far the model moves from its fp32 self when only that layer takes that
  candidate (RTN weights), by :meth:`Objective.increase_with`: for causal LMs the mean per-token
  KL(p_fp32 || p_quantized) of the next-token distributions (>= 0; unlike a difference of two
  cross-entropies on a finite sample it has no first-order noise term, and its expectation is the
  expected cross-entropy increase); for encoders the objective itself (a distance to the fp32 self);
* ``pairs`` (inter-layer dependencies): for neighbours within a block and the most sensitive
  layers, the measured value with both layers quantized minus the two single values, at a few
  candidate levels, fitted as ``rho * sqrt(d_a d_b)`` over all candidate combinations.

Results are cached on disk as JSON keyed by model weights + calibration data + candidate set +
settings; a cache from another model, data set or candidate set is detected and not used. The
measured pass saves as it goes, so an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..models.embedding import mean_pool
from ..optimize import Problem
from . import retained
from .candidates import LayerCandidates
from .objective import Objective

ESTIMATORS = ("hutchinson", "fisher", "measured")
CACHE_FORMAT = 2  # 2: causal-LM measured values and pairs are KL divergences (1: cross-entropy differences)
RHO_RANGE = (-0.9, 5.0)  # keeps a pair's total >= 0.55 (d_a + d_b) when both singles are positive


@dataclass
class SensitivitySettings:
    hutchinson_samples: int = 8
    pair_levels: int = 2       # candidate levels measured per pair
    top_layers: int = 6        # every pair among the most sensitive layers gets a term
    neighbours: bool = True    # consecutive linears within a block get a term
    seed: int = 0


def model_fingerprint(layers: Dict[str, nn.Linear]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for n, lin in layers.items():
        h.update(n.encode())
        h.update(lin.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(layers, objective: Objective, cands: List[LayerCandidates], settings: SensitivitySettings,
              model_name: str = "") -> dict:
    return {"format": CACHE_FORMAT, "model": model_name, "weights": model_fingerprint(layers),
            "data": objective.fingerprint(), "kind": objective.kind,
            "candidates": {c.name: c.specs for c in cands}, "settings": asdict(settings)}


def rtn_weight(W: torch.Tensor, spec: str, power: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RTN at ``spec``; SPEC+keepR@FMT retains the most salient weights (``power``: see retained)."""
    return retained.weight(W, spec, power)


def _power(objective: Objective, name: str) -> Optional[torch.Tensor]:
    return (objective.input_power or {}).get(name)


# --- estimators ---------------------------------------------------------------------------------

def _grad_params(model: nn.Module, layers: Dict[str, nn.Linear]):
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    ps = [lin.weight for lin in layers.values()]
    for p in ps:
        p.requires_grad_(True)
    return ps, saved


def _math_attention():
    # double backward needs the math attention kernel (the fused CPU kernel has no second derivative)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def hutchinson_traces(objective: Objective, layers: Dict[str, nn.Linear], samples: int, seed: int = 0,
                      progress=None) -> Dict[str, float]:
    """Tr(H_l) per layer: mean over batches and Rademacher probes of v_l . (H v)_l."""
    gen = torch.Generator().manual_seed(seed)
    ps, saved = _grad_params(objective.model, layers)
    tr = torch.zeros(len(ps), dtype=torch.float64)
    try:
        with torch.enable_grad(), _math_attention():
            for i in range(len(objective.batches)):
                loss = objective.batch_loss(i)
                grads = torch.autograd.grad(loss, ps, create_graph=True)
                for s in range(samples):
                    vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in ps]
                    hv = torch.autograd.grad(grads, ps, grad_outputs=vs, retain_graph=s < samples - 1)
                    tr += torch.tensor([float((v * h).sum()) for v, h in zip(vs, hv)], dtype=torch.float64)
                    if progress:
                        progress(1)
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)
    tr /= len(objective.batches) * samples
    return {n: float(t) for n, t in zip(layers, tr)}


def fisher_diagonals(objective: Objective, layers: Dict[str, nn.Linear], seed: int = 0,
                     draws: int = 4, progress=None) -> Dict[str, torch.Tensor]:
    """Diagonal Fisher per layer (same shape as its weight), in the loss's units."""
    gen = torch.Generator().manual_seed(seed)
    ps, saved = _grad_params(objective.model, layers)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
    count = 0
    try:
        with torch.enable_grad():
            for i, b in enumerate(objective.batches):
                if objective.kind == "causal_lm":
                    ids = b["input_ids"]
                    for s in range(ids.shape[0]):  # per-sequence gradients: empirical Fisher
                        one = {k: v[s:s + 1] for k, v in b.items()}
                        out = objective.model(**one, use_cache=False).logits
                        loss = objective._loss_from_logits(out, one)
                        gs = torch.autograd.grad(loss, ps)
                        tokens = ids.shape[1] - 1
                        for a, g in zip(acc, gs):
                            a += g.float().pow(2) * tokens  # per-sequence mean -> per-token scale
                        count += 1
                else:
                    for _ in range(draws):  # E[(J^T u)^2] with u ~ N(0, I) per sentence = diag(J^T J)
                        e = mean_pool(objective._hidden_out(b), b["attention_mask"])
                        u = torch.randn(e.shape, generator=gen).to(e)  # drawn on the CPU: same probes on any device
                        gs = torch.autograd.grad((e * u).sum(), ps)
                        n_sent = e.shape[0]
                        for a, g in zip(acc, gs):
                            a += g.float().pow(2) * (2.0 / n_sent)  # loss = mean ||de||^2: H = 2/S sum J^T J
                        count += 1
                if progress:
                    progress(1)
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)
    if objective.kind == "causal_lm":
        acc = [a / count for a in acc]
    else:
        acc = [a / (count / len(objective.batches)) / len(objective.batches) for a in acc]
    return dict(zip(layers, acc))


# --- the table ------------------------------------------------------------------------------------

@dataclass
class SensitivityTable:
    """Predicted loss increase per layer and candidate for each estimator, plus pair terms."""
    key: dict
    layers: List[str]
    specs: Dict[str, List[str]]
    base_loss: float
    values: Dict[str, Dict[str, Dict[str, float]]]   # estimator -> layer -> spec -> predicted increase
    traces: Dict[str, float]
    pairs: List[dict]                                 # {"a", "b", "rho", "points": [[spec_a, spec_b, inter]]}
    seconds: Dict[str, float]
    complete: bool = True
    # single-layer measured values at the pair levels only, when the full measured pass was not run
    pair_singles: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SensitivityTable":
        return cls(**d)

    def vector(self, estimator: str, layer: str, specs: Optional[List[str]] = None) -> np.ndarray:
        return np.array([self.values[estimator][layer][s] for s in (specs or self.specs[layer])])

    def problem(self, estimator: str, costs: List[np.ndarray], with_pairs: bool = False,
                cands: Optional[List[LayerCandidates]] = None) -> Problem:
        """The allocation problem of this estimator; with_pairs adds the dependency terms. ``cands``
        (a subset of the table's candidates, e.g. from :func:`restrict`) fixes the spec order."""
        if estimator not in self.values:
            raise ValueError(f"estimator {estimator!r} was not computed; have {', '.join(self.values)}")
        specs = {c.name: c.specs for c in cands} if cands else self.specs
        loss = [self.vector(estimator, n, specs[n]) for n in self.layers]
        pairs = {}
        if with_pairs:
            idx = {n: i for i, n in enumerate(self.layers)}
            for p in self.pairs:
                a, b = idx[p["a"]], idx[p["b"]]
                da, db = np.clip(loss[a], 0, None), np.clip(loss[b], 0, None)
                pairs[(a, b)] = p["rho"] * np.sqrt(np.outer(da, db))
        return Problem(loss, costs, pairs)


def _neighbour_pairs(names: Sequence[str], objective: Objective) -> List[Tuple[str, str]]:
    out = []
    for a, b in zip(names, names[1:]):
        if objective.block_of(a) == objective.block_of(b):
            out.append((a, b))
    return out


def _levels(specs: List[str], costs: np.ndarray, k: int) -> List[str]:
    """k candidates spread over the cost range, cheapest first (pairs matter most at low bits)."""
    order = [specs[i] for i in np.argsort(costs, kind="stable")]
    if k <= 1:
        return order[:1]
    picks = [order[round(j * (len(order) - 1) / (2 * (k - 1)))] for j in range(k)]  # lower half of the range
    return list(dict.fromkeys(picks))


def compute(objective: Objective, layers: Dict[str, nn.Linear], cands: List[LayerCandidates],
            costs: List[np.ndarray], estimators: Sequence[str] = ESTIMATORS, pairs: bool = True,
            settings: Optional[SensitivitySettings] = None, cache: Optional[Path] = None,
            model_name: str = "", progress: bool = True, log=print) -> SensitivityTable:
    """Compute (or load from ``cache``) the sensitivity table."""
    settings = settings or SensitivitySettings()
    unknown = set(estimators) - set(ESTIMATORS)
    if unknown:
        raise ValueError(f"unknown estimators {sorted(unknown)}; accepted: {', '.join(ESTIMATORS)}")
    key = cache_key(layers, objective, cands, settings, model_name)
    table = _load(cache, key, log) if cache else None
    if table is None:
        table = SensitivityTable(key, [c.name for c in cands], {c.name: c.specs for c in cands},
                                 objective.loss(), {}, {}, [], {}, complete=False)
    names = table.layers
    bar = _bar(progress)
    if "hutchinson" in estimators and "hutchinson" not in table.values:
        t = time.time()
        bar.reset(len(objective.batches) * settings.hutchinson_samples, "Hessian traces")
        table.traces = hutchinson_traces(objective, layers, settings.hutchinson_samples, settings.seed, bar.update)
        neg = [n for n, t in table.traces.items() if t < 0]
        if neg:  # an indefinite Hessian or too few probes: those layers look free to quantize
            warnings.warn(f"{len(neg)} of {len(table.traces)} Hessian trace estimates are negative (e.g. {neg[0]}); "
                          f"the Hutchinson estimate is too noisy with {settings.hutchinson_samples} probes on this "
                          "data: raise --hutchinson-samples or use the fisher/measured estimator", stacklevel=2)
        table.values["hutchinson"] = {}
        for c in cands:
            W = layers[c.name].weight.detach().float()
            table.values["hutchinson"][c.name] = {
                s: 0.5 * table.traces[c.name] / W.numel() * float((rtn_weight(W, s, _power(objective, c.name)) - W).pow(2).sum())
                for s in c.specs}
        table.seconds["hutchinson"] = time.time() - t
        _save(cache, table)
    if "fisher" in estimators and "fisher" not in table.values:
        t = time.time()
        bar.reset(len(objective.batches), "Fisher")
        F = fisher_diagonals(objective, layers, settings.seed, progress=bar.update)
        table.values["fisher"] = {}
        for c in cands:
            W = layers[c.name].weight.detach().float()
            table.values["fisher"][c.name] = {s: 0.5 * float((F[c.name] * (rtn_weight(W, s, _power(objective, c.name)) - W).pow(2)).sum())
                                              for s in c.specs}
        table.seconds["fisher"] = time.time() - t
        _save(cache, table)
    if "measured" in estimators:
        t = time.time() - table.seconds.get("measured", 0.0)
        meas = table.values.setdefault("measured", {})
        todo = [c for c in cands if c.name not in meas]
        bar.reset(sum(len(c.specs) for c in todo), "measured")
        for j, c in enumerate(todo):
            W = layers[c.name].weight.detach().float()
            row = {}
            for s in c.specs:
                row[s] = objective.increase_with(layers, {c.name: rtn_weight(W, s, _power(objective, c.name))})
                bar.update(1)
            meas[c.name] = row
            if j % 8 == 7:
                table.seconds["measured"] = time.time() - t
                _save(cache, table)
        table.seconds["measured"] = time.time() - t
        _save(cache, table)
    if pairs and not table.pairs:
        t = time.time()
        table.pairs = measure_pairs(objective, layers, cands, costs, table, settings, bar,
                                    rank_by=next(e for e in ("measured", *estimators) if e in table.values),
                                    save=lambda: _save(cache, table))
        table.seconds["pairs"] = time.time() - t
    table.complete = True
    bar.close()
    _save(cache, table)
    return table


def select_pairs(table: SensitivityTable, objective: Objective, settings: SensitivitySettings,
                 rank_by: str = "measured") -> List[Tuple[str, str]]:
    """Neighbours within a block, and every pair among the ``top_layers`` layers that the
    ``rank_by`` estimator finds most sensitive (at their most damaging candidate)."""
    names = table.layers
    chosen: List[Tuple[str, str]] = _neighbour_pairs(names, objective) if settings.neighbours else []
    worst = {n: max(table.values[rank_by][n].values()) for n in names}
    top = sorted(names, key=lambda n: -worst[n])[: settings.top_layers]
    top = sorted(top, key=names.index)
    for i, a in enumerate(top):
        for b in top[i + 1:]:
            if (a, b) not in chosen:
                chosen.append((a, b))
    return chosen


def measure_pairs(objective, layers, cands, costs, table, settings, bar, rank_by: str = "measured",
                  save=None) -> List[dict]:
    """Interaction terms: the measured value with both quantized minus the two single values, at a
    few levels. The singles come from the measured pass when it ran, else they are measured here at
    the pair levels only (``table.pair_singles``), so other estimators get dependency terms cheaply."""
    chosen = select_pairs(table, objective, settings, rank_by)
    by_name = {c.name: (c, k) for c, k in zip(cands, costs)}
    meas = table.values.get("measured")
    levels = {}
    for a, b in chosen:
        (ca, ka), (cb, kb) = by_name[a], by_name[b]
        levels[(a, b)] = (_levels(ca.specs, ka, settings.pair_levels), _levels(cb.specs, kb, settings.pair_levels))
    todo = set()
    if meas is None:
        for (a, b), (la, lb) in levels.items():
            todo |= {(a, s) for s in la} | {(b, s) for s in lb}
        todo = {(n, s) for n, s in todo if s not in table.pair_singles.get(n, {})}
    bar.reset(len(todo) + sum(len(list(zip(*v))) for v in levels.values()), "pairs")

    def q(name, spec):
        return rtn_weight(layers[name].weight.detach().float(), spec, _power(objective, name))

    for j, (n, s) in enumerate(sorted(todo, key=lambda ns: (table.layers.index(ns[0]), ns[1]))):
        table.pair_singles.setdefault(n, {})[s] = objective.increase_with(layers, {n: q(n, s)})
        bar.update(1)
        if save and j % 16 == 15:
            save()
    single = meas if meas is not None else table.pair_singles
    out = []
    for a, b in chosen:
        la, lb = levels[(a, b)]
        pts = []
        for sa, sb in zip(la, lb):
            both = objective.increase_with(layers, {a: q(a, sa), b: q(b, sb)})
            pts.append([sa, sb, both - single[a][sa] - single[b][sb]])
            bar.update(1)
        num = den = 0.0
        for sa, sb, inter in pts:
            g = math.sqrt(max(single[a][sa], 0.0) * max(single[b][sb], 0.0))
            num += inter * g
            den += g * g
        rho = float(np.clip(num / den, *RHO_RANGE)) if den > 0 else 0.0
        out.append({"a": a, "b": b, "rho": rho, "points": pts})
    return out


# --- cache ---------------------------------------------------------------------------------------

def _differs(old: dict, new: dict) -> List[str]:
    return [k for k in new if old.get(k) != new[k]]


def _load(path: Path, key: dict, log) -> Optional[SensitivityTable]:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        table = SensitivityTable.from_json(d)
    except (json.JSONDecodeError, TypeError) as e:
        warnings.warn(f"sensitivity cache {path} is unreadable ({e}); recomputing", stacklevel=3)
        return None
    diff = _differs(table.key, key)
    if diff:
        names = {"weights": "model weights", "data": "calibration data", "candidates": "candidate set",
                 "model": "model", "settings": "settings", "kind": "model kind", "format": "cache format"}
        warnings.warn(f"sensitivity cache {path} was computed for another "
                      f"{', '.join(names.get(k, k) for k in diff)}; not used, recomputing", stacklevel=3)
        return None
    log(f"sensitivities: using the cache {path}" + ("" if table.complete else " (resuming an unfinished run)"))
    return table


def _save(path: Optional[Path], table: SensitivityTable) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table.to_json()))
    tmp.replace(path)


class _bar:
    """A tqdm bar that can be restarted with a new total and label; silent without tqdm."""

    def __init__(self, enabled: bool):
        self.enabled, self.b = enabled, None

    def reset(self, total: int, desc: str) -> None:
        self.close()
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self.b = tqdm(total=total, desc=desc, leave=False)
            except ImportError:
                self.b = None

    def update(self, n: int = 1) -> None:
        if self.b is not None:
            self.b.update(n)

    def close(self) -> None:
        if self.b is not None:
            self.b.close()
            self.b = None


# --- how well each estimator ranks real mixed configurations -------------------------------------

def random_configs(cands: List[LayerCandidates], costs: List[np.ndarray], n: int, seed: int = 0) -> List[List[int]]:
    """Mixed configurations: every layer draws its candidate uniformly and independently, so the
    configurations have similar average bits and differ in *which* layers got the cheap formats
    (spreading them over the cost range would make any estimator rank them well)."""
    rng = np.random.default_rng(seed)
    return [[int(rng.integers(len(c.specs))) for c in cands] for _ in range(n)]


def rank_agreement(table: SensitivityTable, objective: Objective, layers: Dict[str, nn.Linear],
                   cands: List[LayerCandidates], costs: List[np.ndarray], n: int = 16, seed: int = 0,
                   progress: bool = True) -> dict:
    """Spearman between each estimator's predicted loss and the measured calibration loss increase
    (:meth:`Objective.increase_with`: KL to the fp32 model for causal LMs) of ``n`` random mixed
    configurations (RTN)."""
    from scipy.stats import spearmanr

    configs = random_configs(cands, costs, n, seed)
    bar = _bar(progress)
    bar.reset(n, "random configs")
    measured = []
    for cfg in configs:
        w = {c.name: rtn_weight(layers[c.name].weight, c.specs[i], _power(objective, c.name)) for c, i in zip(cands, cfg)}
        measured.append(objective.increase_with(layers, w))
        bar.update(1)
    bar.close()
    out = {"configs": n, "measured": measured, "spearman": {}, "predicted": {}}
    variants = [(e, False) for e in table.values] + ([(e, True) for e in table.values] if table.pairs else [])
    for est, with_pairs in variants:
        p = table.problem(est, costs, with_pairs)
        pred = [p.evaluate(cfg)[0] for cfg in configs]
        name = est + ("+pairs" if with_pairs else "")
        out["predicted"][name] = pred
        out["spearman"][name] = float(spearmanr(pred, measured).statistic)
    return out
