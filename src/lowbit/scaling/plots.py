"""The report's figures (PNG): fitted curves over the runs (loss against N and D, per precision),
observed and fitted delta_p against N, D and G, residuals, the weight/activation decomposition and
the per-layer-type input error."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np

from .fit import ACT_PART, UNQUANTIZED, WEIGHT_PART, by_precision
from .law import base_log_loss, log_log2, penalty
from .sweep import LINEAR_TYPES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _n(r: dict, fit: dict) -> float:
    return float(r["N_no_emb"] if fit["n_count"] == "no_emb" else r["N"])


def predicted_loss(fit: dict, n, d, g, precision: str) -> np.ndarray:
    x, y = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
    lb = np.exp(base_log_loss(np.asarray(fit["base"]["theta"]), x, y)[0])
    if precision == UNQUANTIZED or precision not in fit["penalty"]:
        return lb
    return lb + penalty(np.asarray(fit["penalty"][precision]["theta"]), x, y, log_log2(g))


def _mid_group(rs: Sequence[dict]):
    gs = sorted({r.get("G") for r in rs if r.get("G") is not None})
    return gs[len(gs) // 2] if gs else None


def _loss_panels(path: Path, runs, fit, axis: str) -> None:
    plt = _plt()
    groups = {p: rs for p, rs in by_precision(runs).items() if p == UNQUANTIZED or p in fit["penalty"]}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False, sharey=True)
    other = "D" if axis == "N" else "N"
    level = (lambda r: r["D"]) if axis == "N" else (lambda r: _n(r, fit))
    every = sorted({level(r) for r in runs})  # one colour per level in every panel
    palette = dict(zip(every, plt.cm.viridis(np.linspace(0, 0.9, len(every)))))
    for ax, (p, rs) in zip(axes[0], sorted(groups.items())):
        g = _mid_group(rs)
        rs = [r for r in rs if r.get("G") == g]
        levels = sorted({level(r) for r in rs})
        xs = [(_n(r, fit) if axis == "N" else r["D"]) for r in rs]
        grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 60)
        for lv in levels:
            c = palette[lv]
            pts = [r for r in rs if level(r) == lv]
            ax.scatter([(_n(r, fit) if axis == "N" else r["D"]) for r in pts], [r["loss"] for r in pts], color=c,
                       s=18, label=f"{other}={lv:.3g}")
            n, d = (grid, np.full_like(grid, lv)) if axis == "N" else (np.full_like(grid, lv), grid)
            ax.plot(grid, predicted_loss(fit, n, d, [g] * len(grid), p), color=c, lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("N (" + ("no embedding" if fit["n_count"] == "no_emb" else "total") + ")" if axis == "N"
                      else "D (training tokens)")
        ax.set_title(p + (f", G={g}" if g else ""))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _penalty_plot(path: Path, report: dict, fit: dict, precision: str = "w4a4") -> bool:
    rows = [r for r in report_penalties(report) if r["precision"] == precision]
    if not rows or precision not in fit["penalty"]:
        return False
    plt = _plt()
    theta = np.asarray(fit["penalty"][precision]["theta"])
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.6))
    key = {"N": lambda r: r["N_no_emb"] if fit["n_count"] == "no_emb" else r["N"], "D": lambda r: r["D"],
           "G": lambda r: r["G"]}
    for ax, (axis, colour_by) in zip(axes, (("N", "D"), ("D", "N"), ("G", "N"))):
        levels = sorted({key[colour_by](r) for r in rows})
        colors = plt.cm.plasma(np.linspace(0, 0.85, len(levels)))
        for c, lv in zip(colors, levels):
            pts = [r for r in rows if key[colour_by](r) == lv]
            ax.scatter([key[axis](r) for r in pts], [r["delta_p"] for r in pts], color=c, s=18,
                       label=f"{colour_by}={lv:.3g}")
            # the fitted delta_p at this level, the other variables at their points' medians
            xs = np.geomspace(min(key[axis](r) for r in rows) / 1.3, max(key[axis](r) for r in rows) * 1.3, 40)
            med = {a: float(np.median([key[a](r) for r in pts])) for a in ("N", "D", "G")}
            med[axis] = xs
            med[colour_by] = np.full_like(xs, lv)
            ax.plot(xs, penalty(theta, np.log(med["N"] * np.ones_like(xs)), np.log(med["D"] * np.ones_like(xs)),
                                log_log2(med["G"] * np.ones_like(xs))), color=c, lw=1)
        ax.set_xscale("log", base=2 if axis == "G" else 10)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(axis)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"delta_p = L({precision}) - L(bf16)")
    fig.suptitle(f"{precision}: observed (points) and fitted (lines) quantization penalty", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report_penalties(report: dict) -> List[dict]:
    return [r for r in report["table"] if r["delta_p"] is not None]


def _residuals(path: Path, runs, fit) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for p, rs in sorted(by_precision(runs).items()):
        if p != UNQUANTIZED and p not in fit["penalty"]:
            continue
        obs = np.array([r["loss"] for r in rs])
        pred = predicted_loss(fit, [_n(r, fit) for r in rs], [r["D"] for r in rs], [r.get("G") for r in rs], p)
        ax.scatter(pred, (obs - pred) / pred * 100, s=14, label=p)
    ax.axhline(0, color="grey", lw=0.7)
    ax.set_xlabel("fitted loss")
    ax.set_ylabel("(observed - fitted) / fitted, %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _decomposition(path: Path, runs, fit) -> bool:
    if WEIGHT_PART not in fit["penalty"] or ACT_PART not in fit["penalty"]:
        return False
    plt = _plt()
    w, a = np.asarray(fit["penalty"][WEIGHT_PART]["theta"]), np.asarray(fit["penalty"][ACT_PART]["theta"])
    sizes = sorted({_n(r, fit) for r in runs})
    ds = np.geomspace(min(r["D"] for r in runs) / 2, max(r["D"] for r in runs) * 8, 60)
    g = _mid_group(by_precision(runs)[WEIGHT_PART])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    for c, n in zip(colors, sizes):
        x = np.full_like(ds, np.log(n))
        ax.plot(ds, penalty(w, x, np.log(ds), log_log2([g] * len(ds))), color=c, lw=1.5, label=f"weight, N={n:.3g}")
        ax.plot(ds, penalty(a, x, np.log(ds), log_log2([None] * len(ds))), color=c, lw=1.5, ls="--",
                label=f"activation, N={n:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("D (training tokens)")
    ax.set_ylabel("fitted delta_p")
    ax.set_title(f"{WEIGHT_PART} (solid, G={g}) vs {ACT_PART} (dashed)", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _linear_inputs(path: Path, report: dict) -> bool:
    stats = report["linear_inputs"]
    if not stats:
        return False
    plt = _plt()
    precisions = sorted(stats)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(precisions)
    for ax, metric, label in ((axes[0], "rel_err_int4", "relative int4 per-token error of the input"),
                              (axes[1], "kurtosis", "input kurtosis (outliers)")):
        for i, p in enumerate(precisions):
            vals = [stats[p].get(t, {}).get(metric, np.nan) for t in LINEAR_TYPES]
            ax.bar(np.arange(len(LINEAR_TYPES)) + i * width, vals, width, label=p)
        ax.set_xticks(np.arange(len(LINEAR_TYPES)) + 0.4 - width / 2)
        ax.set_xticklabels(LINEAR_TYPES, rotation=30, fontsize=8)
        ax.set_ylabel(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("inputs of each linear type of the trained models (mean over runs and layers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(out: Path, runs: Sequence[dict], fit: dict, report: dict) -> List[Path]:
    paths = [out / "loss_vs_N.png", out / "loss_vs_D.png"]
    _loss_panels(paths[0], runs, fit, "N")
    _loss_panels(paths[1], runs, fit, "D")
    if _penalty_plot(out / "delta_p.png", report, fit):
        paths.append(out / "delta_p.png")
    _residuals(out / "residuals.png", runs, fit)
    paths.append(out / "residuals.png")
    if _decomposition(out / "decomposition.png", runs, fit):
        paths.append(out / "decomposition.png")
    if _linear_inputs(out / "linear_inputs.png", report):
        paths.append(out / "linear_inputs.png")
    return paths
