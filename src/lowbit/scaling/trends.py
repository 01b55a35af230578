"""Model-free check of the QAT scaling-law paper's trends (arXiv 2505.14302): no law is fitted.

For each quantized precision, the observed penalty ``delta_p = L_q - L_bf16`` (bf16 partner of
the same width, tokens and seed) is compared between runs adjacent along one axis with everything
else equal: N (same D, G, seed), D (same N, G, seed), G (same N, D, seed). The paper says delta_p
falls with N and rises with D and G; the share of pairs that move that way, with a one-sided sign
test, says whether the runs agree without assuming the law's power-law form. The same test on
``delta_p(w4a16) - delta_p(w16a4)`` along D checks that the weight part grows faster with D.

Adjacent pairs along one axis share runs (a run is the larger end of one pair and the smaller end
of the next), so they are not independent; the sign test's p-value is a guide, not an exact level.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fit import ACT_PART, UNQUANTIZED, WEIGHT_PART, observed_penalty

ALPHA = 0.05
PARTS = f"{WEIGHT_PART} - {ACT_PART}"
# axis: (coordinate that orders the runs, coordinates held equal, sign of the paper's change, words)
AXES: Dict[str, Tuple[str, Tuple[str, ...], int, str]] = {
    "N": ("width", ("D", "G", "seed"), -1, "delta_p falls with N"),
    "D": ("D", ("width", "G", "seed"), +1, "delta_p rises with D"),
    "G": ("G", ("width", "D", "seed"), +1, "delta_p rises with G"),
}


def matched_penalties(runs: Sequence[dict]) -> List[dict]:
    """Observed delta_p = L_q - L_bf16 of every quantized run that has its bf16 partner."""
    out = []
    for r in runs:
        if r["precision"] == UNQUANTIZED:
            continue
        dp = observed_penalty(r, runs)
        if dp is not None:
            out.append({"key": r["key"], "precision": r["precision"], "width": r["width"], "seed": r["seed"], "N": r["N"],
                        "N_no_emb": r["N_no_emb"], "D": r["D"], "G": r.get("G"), "loss": r["loss"], "delta_p": dp})
    return out


def adjacent_pairs(points: Sequence[dict], axis: str) -> List[Tuple[dict, dict]]:
    """(smaller, larger) pairs of points of one precision that are neighbours along ``axis`` (N, D
    or G) with the other coordinates and the seed equal; points without a value on the axis (no
    group size) are left out."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}; got {axis!r}")
    order, same, _, _ = AXES[axis]
    lines: Dict[tuple, Dict[float, dict]] = {}
    for p in points:
        if p.get(order) is None:
            continue
        key = (p["precision"], *(p.get(k) for k in same))
        lines.setdefault(key, {}).setdefault(p[order], p)
    pairs = []
    for line in lines.values():
        values = sorted(line)
        pairs += [(line[a], line[b]) for a, b in zip(values, values[1:])]
    return pairs


def sign_test(k: int, n: int) -> dict:
    """One-sided sign tests of k successes in n pairs: p toward the paper (more than half move its
    way) and p the other way, and the verdict at ALPHA."""
    from scipy.stats import binomtest

    if n == 0:
        return {"p_value": None, "p_other_side": None, "verdict": "no pairs"}
    p = float(binomtest(k, n, 0.5, alternative="greater").pvalue)
    q = float(binomtest(k, n, 0.5, alternative="less").pvalue)
    verdict = (f"agrees (p<{ALPHA:g})" if p < ALPHA else f"disagrees (p<{ALPHA:g}, other side)" if q < ALPHA
               else "inconclusive")
    return {"p_value": p, "p_other_side": q, "verdict": verdict}


def pair_trend(pairs: Sequence[Tuple[dict, dict]], sign: int, value: str = "delta_p") -> dict:
    """How many pairs move ``value`` in the direction ``sign`` (+1 rises, -1 falls) from the
    smaller to the larger end; exact ties count for neither side and are left out of n."""
    changes = np.array([b[value] - a[value] for a, b in pairs], dtype=float)
    k = int((changes * sign > 0).sum())
    ties = int((changes == 0).sum())
    n = len(changes) - ties
    return {"k": k, "n": n, "ties": ties, "share": k / n if n else None,
            "median_change": float(np.median(changes)) if len(changes) else None, **sign_test(k, n)}


def part_differences(points: Sequence[dict]) -> List[dict]:
    """delta_p(w4a16) - delta_p(w16a4) at every (width, D, G, seed) where both were run (the
    activation run has no group size with per-token inputs, or the same G with grouped ones)."""
    acts = {(p["width"], p["D"], p["seed"], p["G"]): p for p in points if p["precision"] == ACT_PART}
    out = []
    for w in points:
        if w["precision"] != WEIGHT_PART:
            continue
        a = acts.get((w["width"], w["D"], w["seed"], None)) or acts.get((w["width"], w["D"], w["seed"], w["G"]))
        if a is not None:
            out.append({"precision": PARTS, "width": w["width"], "D": w["D"], "G": w["G"], "seed": w["seed"],
                        "delta_p": w["delta_p"] - a["delta_p"]})
    return out


def trend_checks(runs: Sequence[dict], points: Optional[List[dict]] = None) -> List[dict]:
    """One row per (quantized precision, axis) with pairs, and one for the weight part against the
    activation part along D: the paper's direction, k of n pairs, share, median change, sign-test
    p-values and verdict. ``points``: the runs' matched_penalties, where the caller has them."""
    points = matched_penalties(runs) if points is None else points
    rows = []
    for precision in sorted({p["precision"] for p in points}):
        mine = [p for p in points if p["precision"] == precision]
        for axis, (_, _, sign, words) in AXES.items():
            pairs = adjacent_pairs(mine, axis)
            if pairs:
                rows.append({"precision": precision, "axis": axis, "paper": words, **pair_trend(pairs, sign)})
    diffs = part_differences(points)
    if diffs:
        rows.append({"precision": PARTS, "axis": "D", "paper": "weight part grows faster with D",
                     **pair_trend(adjacent_pairs(diffs, "D"), +1)})
    return rows


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def trend_lines(rows: Sequence[dict]) -> List[str]:
    """The trend check as a fixed-width table."""
    head = (f"{'precision':<16} {'paper':<32} {'k/n':>7} {'share':>6} {'median chg':>10} {'p':>8} "
            f"{'p other':>8}  verdict")
    lines = [f"model-free trends (observed delta_p of adjacent runs, one-sided sign test at {ALPHA:g}):", head]
    for r in rows:
        lines.append(f"{r['precision']:<16} {r['paper']:<32} {str(r['k']) + '/' + str(r['n']):>7} "
                     f"{_fmt(r['share'], '.0%'):>6} {_fmt(r['median_change'], '+.4f'):>10} "
                     f"{_fmt(r['p_value'], '.3g'):>8} {_fmt(r['p_other_side'], '.3g'):>8}  {r['verdict']}"
                     + (f" ({r['ties']} ties)" if r["ties"] else ""))
    return lines
