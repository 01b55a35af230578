"""What a training run reports: the loss curve (PNG) and the one-page report.html, rendered from
the report dict that report.json holds."""
from __future__ import annotations

from pathlib import Path
from typing import List

from ..report_html import image, kv, num, page, table


def plot_loss(history: List[dict], path, title: str = "") -> None:
    """Training loss per step (and its running mean) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    k = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    ax.plot(steps, smooth, lw=1.8, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if loss and min(loss) > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(label: str, key: str, report: dict, fmt: str = ".3f") -> list:
    b, s, a = report["baseline"].get(key), (report.get("before") or {}).get(key), report["after"].get(key)
    return [label, num(b, fmt), num(s, fmt), num(a, fmt)]


def train_html(report: dict, out_dir) -> str:
    rows = []
    if "perplexity" in report["after"]:
        rows.append(_row("perplexity (lower is better)", "perplexity", report))
        rows.append(["KL to fp32 on held-out tokens (nats)", "0", "", num(report["after"].get("kl_to_fp32"), ".4f")])
    else:
        rows.append(_row("cosine to fp32, mean", "cosine_mean", report, ".4f"))
        rows.append(_row("Spearman of similarities", "spearman", report, ".4f"))
    rows.append(["bits per weight (quantized layers)", "32", num((report.get("before") or {}).get("bits_per_weight"), ".3f"),
                 num(report["after"].get("bits_per_weight"), ".3f")])
    t = report["training"]
    speed = [["steps", report["steps"]], ["tokens", f"{report['tokens']:,}"],
             ["training time", f"{report['seconds']:.1f} s (teacher forwards {report['teacher_seconds']:.1f} s)"],
             ["tokens/s", f"{report['tokens_per_second']:,.0f}"], ["device", report["environment"]["device"]]]
    if report.get("resumed_from"):
        speed.append(["resumed from step", report["resumed_from"]])
    sections = ["<h2>fp32 vs start vs trained</h2>" + table(["", "fp32", f"start ({report['init']})", "trained"], rows),
                "<h2>Loss</h2>" + image(Path(out_dir) / "loss.png"),
                "<h2>Run</h2>" + table(["", ""], speed),
                "<h2>Settings</h2>" + table(["", ""], [[k, v if not isinstance(v, dict) else kv(v)]
                                                       for k, v in t.items()])]
    return page(f"lowbit train: {report.get('model', '')}", f"{report.get('scheme')} · QAT from {report['init']}",
                sections)


def write_train_html(report: dict, out_dir) -> Path:
    path = Path(out_dir) / "report.html"
    path.write_text(train_html(report, out_dir), encoding="utf-8")
    return path


def summary_lines(report: dict) -> List[str]:
    """A few lines for the terminal: fp32, start and trained metrics, tokens/s."""
    a, b, s = report["after"], report["baseline"], report.get("before") or {}
    if "perplexity" in a:
        lines = [f"perplexity: fp32 {b['perplexity']:.3f} | start ({report['init']}) {s.get('perplexity', float('nan')):.3f}"
                 f" | trained {a['perplexity']:.3f}   KL to fp32 {a.get('kl_to_fp32', float('nan')):.4f} nats"]
    else:
        lines = [f"cosine to fp32: start ({report['init']}) {s.get('cosine_mean', float('nan')):.4f} | trained "
                 f"{a['cosine_mean']:.4f}"]
    clips = a.get("act_clips") or {}
    if clips.get("layers"):
        cal = report.get("calibrated") or {}
        start = f"; after calibrating them {cal.get('perplexity', cal.get('cosine_mean')):.3f}" if cal else ""
        lines.append(f"input clipping ratios of {clips['layers']} layers: min {clips['min']:.3f}, mean "
                     f"{clips['mean']:.3f}, max {clips['max']:.3f}{start}")
    lines.append(f"{report['steps']} steps, {report['tokens']:,} tokens in {report['seconds']:.1f} s "
                 f"({report['tokens_per_second']:,.0f} tokens/s; teacher {report['teacher_seconds']:.1f} s); "
                 f"bits/weight {a.get('bits_per_weight')}")
    return lines
