"""Search figures: the Pareto plot (bits per weight vs metric loss, uniform and searched
configurations) and the per-layer chart of chosen formats with sensitivities."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(points: List[dict], path, metric_label: str, limit: Optional[float] = None,
                chosen: Optional[dict] = None, title: str = "") -> None:
    """Every measured point: x = true bits per weight, y = metric loss (%, log scale)."""
    plt = _plt()
    points = [p for p in points if p.get("kind") != "baseline"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"uniform": ("s", "tab:gray"), "search": ("o", "tab:blue"), "budget": ("D", "tab:green"),
              "hawq": ("^", "tab:orange")}
    for kind in sorted({p["kind"] for p in points}):
        pts = [p for p in points if p["kind"] == kind]
        m, c = styles.get(kind, ("x", "tab:purple"))
        ax.scatter([p["bits"] for p in pts], [max(p["loss"], 1e-6) * 100 for p in pts], marker=m, color=c,
                   label=kind, alpha=0.8)
        if kind == "uniform":
            for p in pts:
                ax.annotate(p.get("label", ""), (p["bits"], max(p["loss"], 1e-6) * 100), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    if limit is not None:
        ax.axhline(limit * 100, color="tab:red", ls="--", lw=1, label=f"limit {limit * 100:g}%")
    if chosen is not None:
        ax.scatter([chosen["bits"]], [max(chosen["loss"], 1e-6) * 100], s=160, facecolors="none",
                   edgecolors="tab:red", lw=2, label="chosen plan")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per weight (codes + scales)")
    ax.set_ylabel(f"{metric_label} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_chart(choice: Dict[str, str], sensitivity: Dict[str, float], bits: Dict[str, float], path,
                title: str = "") -> None:
    """Bars: bits per weight of each layer's chosen spec, coloured by spec; line: sensitivity."""
    plt = _plt()
    names = list(choice)
    specs = sorted(set(choice.values()), key=lambda s: bits.get(s, 0))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(specs)}
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.09), 4.5))
    b = [bits[f"{n}|{choice[n]}"] for n in names]
    ax.bar(range(len(names)), b, color=[colors[choice[n]] for n in names], width=0.85)
    ax.set_ylabel("bits per weight")
    ax.set_xlabel("layer (in order)")
    ax2 = ax.twinx()
    ax2.plot(range(len(names)), [max(sensitivity[n], 1e-9) for n in names], color="black", lw=1, marker=".", ms=3)
    ax2.set_yscale("log")
    ax2.set_ylabel("sensitivity (largest measured loss increase)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in specs]
    ax.legend(handles, specs, fontsize=7, ncol=min(len(specs), 5), loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
