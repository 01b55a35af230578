"""report.html for `lowbit quantize` and `lowbit search`, written by the jobs on a tiny random BERT
(MiniLM's tokenizer, so the real evaluation code runs): one file, figures embedded, key numbers."""
import json
import re

import pytest
import torch
from _tiny import tiny_bert_loader

from lowbit.report_html import quantize_html, search_html, table


@pytest.fixture(scope="module")
def tiny_loaded():
    return tiny_bert_loader()


def _images(text):
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)


def test_quantize_writes_report_html(tiny_loaded, tmp_path):
    from lowbit.jobs import EvalSettings, run_quantize

    rep = run_quantize(None, "w4g32", "rtn", str(tmp_path), settings=EvalSettings(sentences=8), quiet=True,
                       loaded=tiny_loaded())
    page = (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["quantized"]["cosine_mean"] == rep["quantized"]["cosine_mean"]
    imgs = _images(page)
    assert len(imgs) == 1 and len(imgs[0]) > 1000 and "<script" not in page and 'src="http' not in page
    q = rep["quantized"]
    for text in (f"{q['cosine_mean']:.4f}", f"{q['bits_per_weight']:.3f}", f"{q['size_bytes'] / 1e6:.1f} MB",
                 f"{rep['baseline']['size_bytes'] / 1e6:.1f} MB", "w4g32", "Per-layer error"):
        assert text in page, text
    for l in rep["layers"]:
        assert f"<td>{l['name']}</td>" in page and f"{l['rel_error']:.3e}" in page


def test_transforms_are_summarised_not_dumped(tiny_loaded, tmp_path):
    """report.html says what the transforms did in counts; the per-group choices and search errors
    stay in report.json."""
    from lowbit.jobs import EvalSettings, run_quantize

    rep = run_quantize(None, "w4a8", "gptq", str(tmp_path), calib=4, seq_len=16, settings=EvalSettings(sentences=8),
                       quiet=True, loaded=tiny_loaded(), rotate="auto", smooth="auto")
    tf = rep["transforms"]
    page = (tmp_path / "report.html").read_text()
    row = re.search(r"<td>transforms</td><td>([^<]*)</td>", page).group(1)
    assert "rotate auto" in row and "smooth auto" in row and "chosen per group" in row
    assert f"smoothed {tf['smoothing']['smoothed']} of {tf['smoothing']['groups']} groups" in row
    assert "float check" in row and len(row) < 600
    first = next(iter(tf["choice"]["chosen"]))
    assert first not in row and tf["choice"]["search_error"][first]


def test_search_writes_report_html(tiny_loaded, tmp_path):
    from lowbit.jobs import run_search

    rep = run_search(None, str(tmp_path), max_loss="60%", candidates="int2:g32,int8:g32", pairs=False,
                     calib=2, seq_len=16, sentences=8, tol=1.0, quiet=True, loaded=tiny_loaded())
    page = (tmp_path / "report.html").read_text()
    assert len(_images(page)) == (2 if rep.get("plan") else 1)
    for u in rep["uniform"]:
        assert f"<td>{u['spec']}</td>" in page and f"{u['loss'] * 100:.3f}%" in page
    plan = rep["plan"]
    assert f"{plan['bits_per_weight']:.3f}" in page and f"{plan['loss'] * 100:.3f}%" in page
    for name, spec in plan["layers"].items():
        assert re.search(rf"<td>{re.escape(name)}</td><td>{re.escape(spec)}</td>", page)
    for step in rep["search"]["steps"]:
        assert f"<td>{step['how']}</td>" in page


def test_pages_escape_and_survive_missing_figures(tmp_path):
    assert "<td>&lt;b&gt;</td>" in table(["x"], [["<b>"]])
    rep = {"model": "m<1>", "scheme": "w4", "method": "rtn", "baseline": {"perplexity": 10.0, "size_bytes": 4e6},
           "quantized": {"perplexity": 10.5, "bits_per_weight": 4.25, "size_bytes": 1e6}, "layers": []}
    page = quantize_html(rep, tmp_path)
    assert "m&lt;1&gt;" in page and "+5.00%" in page and "4.00x smaller" in page and not _images(page)
    mod = {**rep, "metrics": ["accuracy"], "baseline": {"accuracy": 0.91, "size_bytes": 4e6},
           "quantized": {"accuracy": 0.875, "bits_per_weight": 4.25, "size_bytes": 1e6}}
    page = quantize_html(mod, tmp_path)
    assert "<td>accuracy</td><td>0.91</td><td>0.875</td>" in page
    s = search_html({"model": "m", "search": {"mode": "max-loss", "note": "over the limit", "steps": []},
                     "limit": {"max_loss": 0.01}}, tmp_path)
    assert "No plan" in s and "over the limit" in s


def test_search_with_gptq_measures_gptq_models(tiny_loaded, tmp_path):
    from lowbit.jobs import run_search

    rep = run_search(None, str(tmp_path), budget=5.0, candidates="int2:g32,int8:g32", pairs=False,
                     calib=2, seq_len=16, sentences=8, method="gptq", uniform=False, quiet=True,
                     loaded=tiny_loaded())
    points = [json.loads(l) for l in (tmp_path / "points.jsonl").read_text().splitlines() if l.strip()]
    assert rep["plan"]["bits_per_weight"] <= 5.0 and any(p.get("kind") == "budget" for p in points)
