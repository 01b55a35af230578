"""The one-page HTML report next to report.json (``lowbit quantize``) and search.json (``lowbit
search``): one self-contained file, the figures embedded as base64 PNG, the numbers as HTML tables.

Pure rendering: it reads the report dicts the jobs already write (and the PNGs beside them) and
computes nothing new, so the page and the JSON can never disagree.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}tr.hl td{background:#fff6d5;font-weight:600}
img{max-width:100%;border:1px solid #eee}.good{color:#1a7f37}.bad{color:#b42318}
details{margin:.5em 0}summary{cursor:pointer;color:#444}code{background:#f4f4f4;padding:0 .2em}
"""


def esc(x) -> str:
    return html.escape(str(x))


def num(x, fmt: str = ".4g") -> str:
    """A number for a table cell ('-' when missing)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def pct(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f}%"


def mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def kv(d) -> str:
    """A small dict as 'key value, ...' (anything else as its string)."""
    if isinstance(d, dict):
        return ", ".join(f"{k} {kv(v)}" for k, v in d.items() if v is not None)
    return ", ".join(kv(v) for v in d) if isinstance(d, (list, tuple)) else str(d)


def transforms_summary(tf: dict) -> str:
    """The outlier transforms in one line: what was asked, what was done (counts, not the per-group
    choices and search errors, which stay in report.json), and the float check."""
    parts = [f"rotate {tf.get('rotate')}", f"smooth {tf.get('smooth')}"]
    if tf.get("online"):
        parts.append(f"online rotations on {tf['online']['layers']} layers (blocks {kv(tf['online']['blocks'])})")
    if tf.get("residual"):
        parts.append(f"residual rotation fused (block {tf['residual'].get('block')})")
    if tf.get("choice"):
        parts.append("chosen per group: " + kv(tf["choice"]["count"]))
    sm = tf.get("smoothing")
    if sm:
        parts.append(f"smoothed {sm.get('smoothed')} of {sm.get('groups')} groups")
    fc = tf.get("float_check")
    if fc:
        parts.append(f"float check max |diff| {fc['max_abs_diff']:.3g} (max |output| {fc['max_abs_output']:.3g})")
    return ", ".join(parts)


def table(header: Sequence[str], rows: Iterable[Sequence], highlight: Optional[int] = None) -> str:
    """An HTML table; cells are escaped; row ``highlight`` (an index) is emphasised."""
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for i, r in enumerate(rows):
        cls = ' class="hl"' if i == highlight else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
    return "\n".join(out) + "</table>"


def image(path) -> str:
    """The PNG at ``path`` embedded as base64 (an empty string when it was not written)."""
    p = Path(path)
    if not p.is_file():
        return ""
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f'<p><img alt="{esc(p.name)}" src="data:image/png;base64,{data}"></p>'


def collapsible(title: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{esc(title)}</summary>{body}</details>"


def page(title: str, subtitle: str, sections: List[str]) -> str:
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>" + esc(title) + "</title><style>"
            + CSS + "</style></head><body><h1>" + esc(title) + "</h1><p class=\"sub\">" + esc(subtitle)
            + "</p>\n" + "\n".join(s for s in sections if s) + "</body></html>\n")


# --- lowbit quantize ------------------------------------------------------------------------------

def _metric_rows(b: dict, q: dict, metrics=None) -> List[List[str]]:
    if "perplexity" in q:
        rel = q["perplexity"] / b["perplexity"] - 1
        return [["perplexity (lower is better)", num(b["perplexity"], ".3f"), num(q["perplexity"], ".3f"),
                 f"{rel * 100:+.2f}%"]]
    if metrics is not None:  # a user's model object (lowbit.module_job): its own metric names
        return [[k, num(b.get(k), ".6g"), num(q.get(k), ".6g"), ""] for k in metrics]
    if "cosine_mean" not in q:
        return []
    rows = [["cosine to fp32, mean", "1.0000", num(q.get("cosine_mean"), ".4f"), pct(1 - q["cosine_mean"], 2) + " loss"]]
    if "cosine_min" in q:
        rows.append(["cosine to fp32, min", "1.0000", num(q["cosine_min"], ".4f"), ""])
    if "spearman" in q:
        rows.append(["Spearman of similarities", "1.0000", num(q["spearman"], ".4f"), ""])
    return rows


def _kept(r: Optional[dict]) -> str:
    """A layer's retention record as 'kept (ratio) at format'."""
    if not r or not r.get("kept"):
        return ""
    return f"{r['kept']} ({r.get('ratio', 0) * 100:g}%) at {r.get('format')}"


def quantize_html(report: dict, out_dir) -> str:
    """The page for a ``lowbit quantize`` report (the dict written as report.json)."""
    out_dir = Path(out_dir)
    b, q = report["baseline"], report["quantized"]
    rows = _metric_rows(b, q, report.get("metrics"))
    rows.append(["bits per weight (quantized layers)", num(b.get("bits_per_weight"), "g"),
                 num(q.get("bits_per_weight"), ".3f"), ""])
    ratio = (f"{b['size_bytes'] / q['size_bytes']:.2f}x smaller"
             if b.get("size_bytes") and q.get("size_bytes") else "")
    rows.append(["size", mb(b.get("size_bytes")), mb(q.get("size_bytes")), ratio])
    rows.append(["time", "", f"{report.get('seconds', 0):.1f} s", f"quantize {q.get('quantize_seconds', 0):.1f} s"])
    summary = "<h2>Baseline vs quantized</h2>" + table(["", "baseline", "quantized", "change"], rows)
    settings = [["scheme", report.get("scheme", "")], ["method", report.get("method", "")],
                ["evaluation", kv(report.get("evaluation", ""))], ["layer error", report.get("layer_error", "")]]
    if report.get("calibration"):
        c = report["calibration"]
        settings.append(["calibration", f"{c.get('sequences')} x {c.get('seq_len')} tokens of {c.get('corpus')}"])
    if report.get("retain"):
        settings.append(["retention", kv({k: v for k, v in report["retain"].items()  # not the per-layer ratios
                                          if not isinstance(v, (dict, list))})])
    if report.get("transforms"):
        settings.append(["transforms", transforms_summary(report["transforms"])])
    if report.get("skipped"):
        settings.append(["left in full precision", ", ".join(report["skipped"])])
    sections = [summary, "<h2>Settings</h2>" + table(["", ""], settings)]
    layers = report.get("layers") or []
    if layers:
        worst = max(range(len(layers)), key=lambda i: layers[i].get("rel_error", 0))
        sections.append("<h2>Per-layer error</h2>" + image(out_dir / "layer_error.png"))
        lrows = [[i, l["name"], l.get("weight_spec") or "-", l.get("act_spec") or "-",
                  " x ".join(str(s) for s in l.get("shape", ())), num(l.get("bits_per_weight"), ".3f"),
                  num(l.get("rel_error"), ".3e"), num(l.get("seconds"), ".2f"), _kept(l.get("retain")),
                  l.get("note", "")]
                 for i, l in enumerate(layers)]
        sections.append(f"<p>Largest error: <b>{esc(layers[worst]['name'])}</b> "
                        f"({num(layers[worst].get('rel_error'), '.3e')}).</p>")
        sections.append(collapsible(f"All {len(layers)} layers", table(
            ["#", "layer", "weight", "activation", "shape", "bits/weight", "rel. error", "seconds", "retained",
             "note"],
            lrows, highlight=worst), open_=len(layers) <= 60))
    sub = f"{report.get('scheme', '')} · {report.get('method', '')} · {report.get('kind', '')}"
    return page(f"lowbit quantize: {report.get('model', '')}", sub, sections)


def write_quantize_html(report: dict, out_dir) -> Path:
    path = Path(out_dir) / "report.html"
    path.write_text(quantize_html(report, out_dir), encoding="utf-8")
    return path


# --- lowbit search --------------------------------------------------------------------------------

def search_html(report: dict, out_dir, points: Sequence[dict] = (), layers: Sequence[dict] = ()) -> str:
    """The page for a ``lowbit search`` run: ``report`` is search.json's dict, ``points`` the measured
    points (points.jsonl), ``layers`` one row per layer: name, spec, bits, sensitivity, at_choice."""
    out_dir = Path(out_dir)
    plan = report.get("plan")
    limit = (report.get("limit") or {}).get("max_loss")
    mode = (report.get("search") or {}).get("mode")
    sections = []
    if plan:
        rows = [["bits per weight", num(plan["bits_per_weight"], ".3f")],
                ["measured loss", f"{pct(plan['loss'])}" + (f" (limit {pct(limit, 2)})" if mode == "max-loss" else "")]]
        for k, v in (plan.get("measured") or {}).items():
            rows.append([f"{k} (baseline {num((plan.get('baseline') or {}).get(k), '.4f')})", num(v, ".4f")])
        small = report.get("smallest_uniform_within_limit")
        if mode == "max-loss":
            if small:
                saving = 1 - plan["bits_per_weight"] / small["bits"]
                rows.append(["smallest uniform within the limit",
                             f"{small['spec']}: {small['bits']:.3f} b/w, loss {pct(small['loss'])}"])
                rows.append(["plan vs that uniform", f"{saving * 100:.1f}% fewer bits"])
            else:
                rows.append(["smallest uniform within the limit", "none of the measured uniform configurations"])
        rows.append(["method / cost model / estimator",
                     f"{report.get('method')} / {report.get('cost_model')} / {report.get('estimator')}"
                     f" + {report.get('pairs', 0)} pairs"])
        sections.append("<h2>The plan</h2>" + table(["", ""], rows))
    else:
        note = (report.get("search") or {}).get("note", "")
        sections.append(f"<h2>No plan</h2><p class=\"bad\">{esc(note or 'the limit was not reached')}</p>")
    sections.append("<h2>Pareto: bits per weight vs measured loss</h2>" + image(out_dir / "pareto.png"))
    if layers:
        sections.append("<h2>Per-layer formats and sensitivities</h2>" + image(out_dir / "layers.png"))
        counts = {}
        for r in layers:
            counts[r["spec"]] = counts.get(r["spec"], 0) + 1
        sections.append(table(["format", "layers"], sorted(counts.items(), key=lambda kv: -kv[1])))
        sections.append(collapsible(f"All {len(layers)} layers", table(
            ["#", "layer", "chosen format", "bits/weight", "predicted loss at the choice", "sensitivity (largest)"],
            [[i, r["name"], r["spec"], num(r.get("bits"), ".3f"), num(r.get("at_choice"), ".3e"),
              num(r.get("sensitivity"), ".3e")] for i, r in enumerate(layers)]), open_=len(layers) <= 60))
    uni = report.get("uniform") or []
    if uni:
        within = [u for u in uni if limit is not None and u["loss"] <= limit]
        best = min(range(len(uni)), key=lambda i: uni[i]["bits"] if uni[i] in within else math.inf) if within else None
        sections.append("<h2>Uniform configurations</h2>" + table(
            ["format", "bits/weight", "measured loss", "within the limit"],
            [[u["spec"], num(u["bits"], ".3f"), pct(u["loss"]), "yes" if u in within else "no"] for u in uni],
            highlight=best))
    steps = (report.get("search") or {}).get("steps") or []
    if steps:
        sections.append("<h2>Search steps</h2>" + table(
            ["#", "step", "budget (b/w)", "cost (b/w)", "measured loss", "within"],
            [[i, s.get("how", ""), num(s.get("budget"), ".4f"), num(s.get("cost"), ".4f"), pct(s.get("loss")),
              "" if limit is None or s.get("loss") is None else ("yes" if s["loss"] <= limit else "no")]
             for i, s in enumerate(steps)]))
    pts = [p for p in points if p.get("kind") != "baseline"]
    if pts:
        keys = [k for k in ("perplexity", "cosine_mean", "cosine_min", "spearman") if any(k in p for p in pts)]
        sections.append(collapsible(f"All {len(pts)} measured points", table(
            ["kind", "label", "bits/weight", "loss"] + keys,
            [[p.get("kind", ""), p.get("label", ""), num(p.get("bits"), ".4f"), pct(p.get("loss"))]
             + [num(p.get(k), ".4f") for k in keys] for p in sorted(pts, key=lambda p: p.get("bits", 0))])))
    timing = [[k, f"{v:.1f} s"] for k, v in (report.get("sensitivity_seconds") or {}).items()]
    timing.append(["whole run (this invocation)", f"{report.get('seconds', 0):.1f} s"])
    sections.append("<h2>Time</h2>" + table(["part", "seconds"], timing))
    if report.get("dropped"):
        sections.append(collapsible(f"{len(report['dropped'])} dropped candidates",
                                    "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in report["dropped"]) + "</ul>"))
    lim = f"max loss {pct(limit, 2)} ({report.get('metric')})" if mode == "max-loss" else f"budget {report.get('search', {}).get('budget')} b/w"
    return page(f"lowbit search: {report.get('model', '')}", f"{lim} · {len(report.get('candidates', []))} candidates",
                sections)


def write_search_html(report: dict, out_dir, points: Sequence[dict] = (), layers: Sequence[dict] = ()) -> Path:
    path = Path(out_dir) / "report.html"
    path.write_text(search_html(report, out_dir, points, layers), encoding="utf-8")
    return path
