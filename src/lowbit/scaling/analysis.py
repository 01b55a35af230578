"""``lowbit scaling report``: the fitted law's signs and trends against the QAT scaling-law paper
(arXiv 2505.14302), the FC2 bottleneck, a table of every run, and report.json / report.html /
plots under DIR."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fit import ACT_PART, WEIGHT_PART, by_precision, fit_sweep
from .sweep import read_runs, select_runs
from .trends import matched_penalties, trend_checks

W4A4, FC2_FIX = "w4a4", "w4a4-fc2a8"

# What the paper found, as (name, parameter, sign the paper reports, words).
PAPER_TRENDS = (
    ("falls with N", "gamma_N", +1, "delta_p falls as models grow"),
    ("rises with D", "gamma_D", +1, "delta_p rises with more training tokens"),
    ("rises with G", "gamma_G", +1, "delta_p rises with coarser groups"),
)


def _verdict(value: float, interval: Optional[List[float]], sign: int) -> str:
    """agrees / disagrees (the interval excludes 0 on one side) / inconclusive (it spans 0)."""
    if interval is None:
        return "agrees (no interval)" if value * sign > 0 else "disagrees (no interval)"
    lo, hi = interval
    if lo * sign > 0 and hi * sign > 0:
        return "agrees"
    if lo * sign < 0 and hi * sign < 0:
        return "disagrees"
    return "inconclusive (interval spans 0)"


def trends(fit: dict) -> List[dict]:
    """Each quantized precision's fitted exponents against the paper's signs."""
    rows = []
    for p, e in fit["penalty"].items():
        for name, param, sign, words in PAPER_TRENDS:
            if param == "gamma_G" and e["gamma_G_fixed"]:
                continue
            iv = e.get("intervals", {}).get(param)
            rows.append({"precision": p, "trend": name, "paper": words, "parameter": param,
                         "value": e["params"][param], "interval": iv,
                         "verdict": _verdict(e["params"][param], iv, sign)})
    return rows


def _partner(pens: List[dict], r: dict, precision: str, group) -> Optional[dict]:
    for q in pens:
        if (q["precision"] == precision and q["width"] == r["width"] and q["D"] == r["D"] and q["G"] == group
                and q["seed"] == r["seed"]):
            return q
    return None


def fc2_comparison(pens: List[dict]) -> dict:
    """w4a4 against w4a4-fc2a8 (8-bit FC2 inputs) at the same (width, D, G): how much of W4A4's
    penalty the FC2 inputs carry."""
    pairs = []
    for r in pens:
        if r["precision"] != W4A4:
            continue
        f = _partner(pens, r, FC2_FIX, r["G"])
        if f is not None:
            pairs.append({"width": r["width"], "D": r["D"], "G": r["G"], "delta_w4a4": r["delta_p"],
                          "delta_fc2a8": f["delta_p"]})
    if not pairs:
        return {"pairs": [], "note": f"no {W4A4} run has a {FC2_FIX} partner"}
    a = np.array([p["delta_w4a4"] for p in pairs])
    b = np.array([p["delta_fc2a8"] for p in pairs])
    return {"pairs": pairs, "mean_delta_w4a4": float(a.mean()), "mean_delta_fc2a8": float(b.mean()),
            "share_removed": float((a.mean() - b.mean()) / a.mean()) if a.mean() > 0 else None,
            "fc2a8_lower_in": int((b < a).sum()), "n": len(pairs)}


def parts_comparison(pens: List[dict]) -> dict:
    """W4A4's observed penalty against its weight part (w4a16) plus activation part (w16a4)."""
    rows = []
    for r in pens:
        if r["precision"] != W4A4:
            continue
        w = _partner(pens, r, WEIGHT_PART, r["G"])
        a = _partner(pens, r, ACT_PART, None) or _partner(pens, r, ACT_PART, r["G"])
        if w is not None and a is not None:
            rows.append({"width": r["width"], "D": r["D"], "G": r["G"], "delta_w4a4": r["delta_p"],
                         "delta_weight": w["delta_p"], "delta_activation": a["delta_p"]})
    return {"rows": rows, "activation_larger_in": sum(r["delta_activation"] > r["delta_weight"] for r in rows)}


def linear_inputs(runs: Sequence[dict]) -> Dict[str, dict]:
    """Per precision and linear type, the mean over runs of the trained model's input statistics
    (relative int4 / int8 per-token error, kurtosis)."""
    out: Dict[str, dict] = {}
    for p, rs in by_precision(runs).items():
        acc: Dict[str, Dict[str, list]] = {}
        for r in rs:
            for kind, stats in (r.get("linear_inputs") or {}).items():
                for m, v in stats.items():
                    acc.setdefault(kind, {}).setdefault(m, []).append(v)
        out[p] = {k: {m: float(np.mean(v)) for m, v in ms.items()} for k, ms in acc.items()}
    return out


def fc2_dominates(stats: Dict[str, dict], metric: str = "rel_err_int4") -> Optional[dict]:
    """Whether the MLP's down projection (FC2) has the largest input error of every linear type."""
    if not stats or "down_proj" not in stats:
        return None
    ranked = sorted(stats, key=lambda k: -stats[k][metric])
    others = [stats[k][metric] for k in stats if k != "down_proj"]
    return {"largest": ranked[0], "down_proj": stats["down_proj"][metric],
            "next_largest": max(others) if others else None, "ratio_to_mean_of_others": float(
                stats["down_proj"][metric] / np.mean(others)) if others else None}


def run_table(runs: Sequence[dict]) -> List[dict]:
    pens = {p["key"]: p["delta_p"] for p in matched_penalties(runs)}
    rows = [{"precision": r["precision"], "width": r["width"], "N": r["N"], "N_no_emb": r["N_no_emb"], "D": r["D"],
             "G": r.get("G"), "loss": r["loss"], "delta_p": pens.get(r["key"]), "seconds": r["seconds"],
             "device": r.get("device")} for r in runs]
    return sorted(rows, key=lambda r: (r["precision"], r["width"], r["D"], r["G"] or 0))


def analyse(runs: Sequence[dict], fit: dict) -> dict:
    pens = matched_penalties(runs)
    stats = linear_inputs(runs)
    return {"trends": trends(fit), "trend_check": trend_checks(runs, pens), "fc2": fc2_comparison(pens), "parts": parts_comparison(pens),
            "linear_inputs": stats,
            "fc2_dominates": {p: fc2_dominates(s) for p, s in stats.items()},
            "cost": {"runs": len(runs), "train_seconds": float(sum(r["seconds"] for r in runs)),
                     "wall_seconds": float(sum(r.get("wall_seconds", r["seconds"]) for r in runs)),
                     "devices": sorted({r.get("device", "?") for r in runs})},
            "table": run_table(runs)}


def fit_selected(runs: Sequence[dict], n_in_dir: int, n_count: str, bootstrap: int, min_tokens: int = 0,
                 min_tokens_per_param: float = 0.0, seed: int = 0) -> dict:
    """fit_sweep of the selected ``runs`` (``n_in_dir`` before the selection), with the selection
    recorded; a fit the selection leaves too few runs for says which filter left how many."""
    try:
        fit = fit_sweep(runs, n_count=n_count, bootstrap_samples=bootstrap, seed=seed)
    except ValueError as e:
        if len(runs) == n_in_dir:
            raise
        raise ValueError(f"{e} (--min-tokens {min_tokens} --min-tokens-per-param {min_tokens_per_param:g} kept "
                         f"{len(runs)} of {n_in_dir} runs)") from None
    return {**fit, "min_tokens": min_tokens, "min_tokens_per_param": min_tokens_per_param,
            "runs_left_out": n_in_dir - len(runs)}


def load_or_fit(out: Path, runs: Sequence[dict], n_count: str, bootstrap: int, min_tokens: int = 0,
                min_tokens_per_param: float = 0.0, n_in_dir: Optional[int] = None) -> dict:
    """OUT/fit.json when it was made from these runs with these settings, else a new fit (saved)."""
    path = out / "fit.json"
    if path.is_file():
        fit = json.loads(path.read_text(encoding="utf-8"))
        if (fit.get("n_runs") == len(runs) and fit.get("n_count") == n_count and fit.get("bootstrap") == bootstrap
                and fit.get("min_tokens", 0) == min_tokens
                and fit.get("min_tokens_per_param", 0) == min_tokens_per_param):
            return fit
    fit = fit_selected(runs, len(runs) if n_in_dir is None else n_in_dir, n_count, bootstrap, min_tokens,
                       min_tokens_per_param)
    path.write_text(json.dumps(fit, indent=1), encoding="utf-8")
    return fit


def write_report(directory, n_count: str = "no_emb", bootstrap: int = 200, min_tokens: int = 0,
                 min_tokens_per_param: float = 0.0, out=None) -> Tuple[List[Path], dict]:
    """Fit (or reuse OUT/fit.json), analyse and write report.json, report.html and the plots to
    ``out`` (default: the sweep's directory), from the runs of at least ``min_tokens`` tokens and
    ``min_tokens_per_param`` tokens per parameter; returns (the files, the report)."""
    from . import plots
    from .report import write_html

    every = read_runs(directory)
    runs = select_runs(every, min_tokens, min_tokens_per_param, n_count)
    if not runs:
        raise ValueError(f"{directory}: no runs (*.jsonl) to report on"
                         + (f" ({len(every)} before --min-tokens/--min-tokens-per-param)" if every else ""))
    out = Path(out or directory)
    out.mkdir(parents=True, exist_ok=True)
    fit = load_or_fit(out, runs, n_count, bootstrap, min_tokens, min_tokens_per_param, len(every))
    report = {"fit": json.loads(json.dumps(fit)), **analyse(runs, fit)}
    for entry in [report["fit"]["base"], *report["fit"]["penalty"].values()]:
        entry.pop("samples", None)  # in fit.json; the report keeps the intervals
    images = plots.write_plots(out, runs, fit, report)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    html = write_html(out, report, images)
    return [out / "fit.json", out / "report.json", html, *images], report
