"""What a person reads: the summary table of a run and a plot of per-layer error."""
from __future__ import annotations

from pathlib import Path
from typing import List


def _mb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"  # kB: small models (CNNs) show a size


def summary_table(report: dict) -> str:
    b, q = report["baseline"], report["quantized"]
    rows = [("", "baseline", "quantized")]
    if "perplexity" in q:
        rows.append(("perplexity", f"{b['perplexity']:.3f}", f"{q['perplexity']:.3f}"))
        rel = q["perplexity"] / b["perplexity"] - 1
        rows.append(("change", "", f"{rel * 100:+.2f}%"))
    elif "metrics" in report:  # a user's model object (lowbit.module_job)
        for k in report["metrics"]:
            rows.append((k, f"{b[k]:.6g}", f"{q[k]:.6g}"))
    else:
        rows.append(("cosine to fp32 (mean)", "1.000", f"{q['cosine_mean']:.4f}"))
        rows.append(("cosine to fp32 (min)", "1.000", f"{q['cosine_min']:.4f}"))
        rows.append(("spearman of similarities", "1.000", f"{q['spearman']:.4f}"))
    rows.append(("bits/weight (quantized layers)", f"{b.get('bits_per_weight', 32):g}", f"{q['bits_per_weight']:.3f}"))
    rows.append(("size", _mb(b.get("size_bytes")), _mb(q.get("size_bytes"))))
    rows.append(("time", "", f"{report.get('seconds', 0):.0f} s (quantize {q.get('quantize_seconds', 0):.0f} s)"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{report['model']}  {report['scheme']}  {report['method']}"]
    lines += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    if report.get("skipped"):
        lines.append(f"left in full precision: {', '.join(report['skipped'])}")
    return "\n".join(lines)


def plot_layer_errors(layers: List, path, title: str = "", output_space: bool = True) -> None:
    """Bar chart of each quantized layer's relative output error on the calibration data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [l.name for l in layers]
    errs = [l.rel_error for l in layers]
    short = [n.replace("model.layers.", "").replace("encoder.layer.", "") for n in names]
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.09), 4))
    kinds = sorted({s.split(".")[-1] for s in short})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    ax.bar(range(len(errs)), errs, color=[colors[s.split(".")[-1]] for s in short], width=0.85)
    ax.set_yscale("log")
    ax.set_ylabel("relative output error  ||X(W-Q)ᵀ||² / ||XWᵀ||²" if output_space
                  else "relative weight error  ||W-Q||² / ||W||²")
    ax.set_xlabel("layer (in order)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds]
    ax.legend(handles, kinds, fontsize=7, ncol=min(len(kinds), 7), loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
