"""report.html of ``lowbit scaling report``: the fitted law with intervals, the held-out checks,
the paper's trends, the FC2 comparison, the figures and every run (all numbers are in report.json)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from ..report_html import collapsible, image, num, page, table


def _iv(iv) -> str:
    return "-" if not iv else f"[{iv[0]:.3g}, {iv[1]:.3g}]"


def _fit_tables(fit: dict) -> str:
    b = fit["base"]
    rows = [[k, num(v), _iv(b.get("intervals", {}).get(k))] for k, v in b["params"].items()]
    out = [f"<h2>L(N, D) = A/N^alpha + B/D^beta + E ({b['n_runs']} bf16 runs, N {fit['n_count']}, "
           f"rms log residual {b['rms_log_residual']:.4f})</h2>",
           table(["parameter", "value", f"{int(fit['interval'] * 100)}% bootstrap ({fit['bootstrap']})"], rows)]
    rows = []
    for p, e in fit["penalty"].items():
        for k, v in e["params"].items():
            fixed = k == "gamma_G" and e["gamma_G_fixed"]
            rows.append([p, k, num(v), "held at 0 (one group size)" if fixed else _iv(e.get("intervals", {}).get(k)),
                         e["n_runs"], f"{e['rms_log_residual']:.4f}"])
    out += ["<h2>delta_p(N, D, G) = k D^gamma_D (log2 G)^gamma_G / N^gamma_N</h2>",
            table(["precision", "parameter", "value", "interval", "runs", "rms log residual"], rows)]
    return "\n".join(out)


def _holdout(fit: dict) -> str:
    rows = []
    for name, h in fit["holdout"].items():
        if "error" in h:
            rows.append([h["held_out"], "-", "-", "-", h["error"]])
            continue
        rows.append([h["held_out"], f"{h['n_test']} (fit on {h['n_train']})",
                     f"{h['loss_rel_error_mean']:.2%} / {h['loss_rel_error_max']:.2%}",
                     "-" if h["delta_p_rel_error_median"] is None else
                     f"{h['delta_p_rel_error_median']:.1%} / {h['delta_p_rel_error_max']:.1%}", ""])
    return "<h2>Held-out runs (fit without them, predict them)</h2>" + table(
        ["held out", "runs", "loss rel. error mean / max", "delta_p rel. error median / max", "note"], rows)


def _trends(report: dict) -> str:
    rows = [[t["precision"], t["paper"], f"{t['parameter']} = {t['value']:.3g} {_iv(t['interval'])}", t["verdict"]]
            for t in report["trends"]]
    dec = report["fit"].get("decomposition")
    if dec:
        share = dec.get("weight_faster_share")
        rows.append(["w4a16 vs w16a4", "weight part grows faster with D",
                     f"gamma_D {dec['gamma_D_weight']:.3g} vs {dec['gamma_D_activation']:.3g}"
                     + ("" if share is None else f" (faster in {share:.0%} of the resamples)"),
                     _share_verdict(share, dec["weight_grows_faster_with_D"])])
    fc2 = report["fc2"]
    if fc2.get("pairs"):
        rows.append(["w4a4 vs w4a4-fc2a8", "8-bit FC2 inputs remove most of W4A4's penalty",
                     f"mean delta_p {fc2['mean_delta_w4a4']:.4f} -> {fc2['mean_delta_fc2a8']:.4f} "
                     f"(lower in {fc2['fc2a8_lower_in']}/{fc2['n']})",
                     "-" if fc2["share_removed"] is None else f"{fc2['share_removed']:.0%} removed"])
    for p, d in report["fc2_dominates"].items():
        if d:
            rows.append([p, "FC2 inputs have the largest quantization error",
                         f"largest: {d['largest']}; down_proj {d['down_proj']:.3g} = "
                         f"{d['ratio_to_mean_of_others']:.2f} x mean of the others",
                         "agrees" if d["largest"] == "down_proj" else "disagrees"])
    return "<h2>Against the paper</h2>" + table(["runs", "paper", "here", "verdict"], rows)


def _trend_check(report: dict) -> str:
    rows = [[r["precision"], r["paper"], f"{r['k']}/{r['n']}" + (f" ({r['ties']} ties)" if r["ties"] else ""),
             "-" if r["share"] is None else f"{r['share']:.0%}", num(r["median_change"], "+.4f"),
             "-" if r["p_value"] is None else f"{r['p_value']:.3g}",
             "-" if r["p_other_side"] is None else f"{r['p_other_side']:.3g}", r["verdict"]]
            for r in report["trend_check"]]
    return ("<h2>Model-free trends (no law: observed delta_p of runs adjacent along one axis)</h2>"
            "<p>Pairs of runs that differ in one of N, D, G only (same seed); k of n move delta_p = L_q - L_bf16 "
            "the paper's way; p: one-sided sign test toward the paper, p other: toward the opposite. Pairs "
            "along one axis share runs, so p is a guide, not an exact level.</p>"
            + table(["runs", "paper", "k/n", "share", "median change", "p", "p other", "verdict"], rows))


def _share_verdict(share, point: bool) -> str:
    """agrees / disagrees when at least 97.5% of the bootstrap resamples say so, else inconclusive."""
    if share is None:
        return ("agrees" if point else "disagrees") + " (no interval)"
    if share >= 0.975:
        return "agrees"
    return "disagrees" if share <= 0.025 else "inconclusive"


def _runs(report: dict) -> str:
    rows = [[r["precision"], r["width"], f"{r['N']:,}", f"{r['N_no_emb']:,}", f"{r['D']:,}", num(r["G"]),
             f"{r['loss']:.4f}", num(r["delta_p"], "+.4f"), f"{r['seconds']:.1f}"] for r in report["table"]]
    return collapsible(f"All {len(rows)} runs", table(["precision", "width", "N", "N no emb", "D", "G",
                                                      "val loss", "delta_p", "train s"], rows))


def write_html(out: Path, report: dict, images: List[Path]) -> Path:
    cost = report["cost"]
    sections = [_fit_tables(report["fit"]), _holdout(report["fit"]), _trends(report), _trend_check(report),
                "<h2>Figures</h2>" + "".join(image(p) for p in images), _runs(report)]
    sub = (f"{cost['runs']} runs, {cost['train_seconds']:.0f} s of training on {', '.join(cost['devices'])}"
           + (f"; runs of D >= {report['fit']['min_tokens']:,} tokens" if report["fit"].get("min_tokens") else "")
           + (f"; runs of D / N >= {report['fit']['min_tokens_per_param']:g}"
              if report["fit"].get("min_tokens_per_param") else ""))
    path = out / "report.html"
    path.write_text(page("lowbit scaling: QAT scaling law", sub, sections), encoding="utf-8")
    return path
