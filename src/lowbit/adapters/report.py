"""What ``lowbit finetune`` reports: report.html (before/after, adapter bytes, the loss curve, the
settings) and the terminal summary, rendered from the report dict of report.json."""
from __future__ import annotations

from pathlib import Path
from typing import List

from ..report_html import image, kv, num, page, table


def finetune_html(report: dict, out_dir) -> str:
    b, a = report["before"], report["after"]
    rows = [["held-out perplexity (lower is better)", num(b["perplexity"], ".3f"), num(a["perplexity"], ".3f")],
            ["adapter bytes (as stored)", "", f"{a.get('adapter_bytes', 0):,}"],
            ["extra parameters at inference", "0", f"{a.get('inference_extra_parameters', 0):,}"]]
    run = [["steps", report["steps"]], ["tokens", f"{report['tokens']:,}"],
           ["training time", f"{report['seconds']:.1f} s"], ["tokens/s", f"{report['tokens_per_second']:,.0f}"],
           ["device", report["environment"]["device"]]]
    if report.get("resumed_from"):
        run.append(["resumed from step", report["resumed_from"]])
    settings = [["base", kv(report["base"])], ["targets", ", ".join(report["targets"])],
                ["task", kv(report["task"])]] + [[k, v if not isinstance(v, dict) else kv(v)]
                                                  for k, v in report["training"].items()]
    sections = ["<h2>Base vs adapted</h2>" + table(["", "base", f"with {report['adapter']}"], rows),
                "<h2>Loss</h2>" + image(Path(out_dir) / "loss.png"),
                "<h2>Run</h2>" + table(["", ""], run),
                "<h2>Settings</h2>" + table(["", ""], settings)]
    return page(f"lowbit finetune: {report['base'].get('model', '')}",
                f"{report['adapter']} on {report['task']['task']}", sections)


def write_finetune_html(report: dict, out_dir) -> Path:
    path = Path(out_dir) / "report.html"
    path.write_text(finetune_html(report, out_dir), encoding="utf-8")
    return path


def summary_lines(report: dict) -> List[str]:
    b, a = report["before"], report["after"]
    return [f"held-out perplexity on {report['task']['task']}: base {b['perplexity']:.3f} -> {a['perplexity']:.3f} "
            f"({report['adapter']}, adapter {a.get('adapter_bytes', 0):,} bytes, "
            f"{a.get('inference_extra_parameters', 0):,} extra parameters at inference)",
            f"{report['steps']} steps, {report['tokens']:,} tokens in {report['seconds']:.1f} s "
            f"({report['tokens_per_second']:,.0f} tokens/s)"]
