"""The model-free trend check (lowbit.scaling.trends) on synthetic sweeps whose trends are known, and
the regime filter of ``lowbit scaling fit/report`` (--min-tokens-per-param, --min-tokens 2m)."""
import json
import math

import pytest

from lowbit.cli import main
from lowbit.scaling.sweep import RUNS_FILE, select_runs
from lowbit.scaling.trends import (PARTS, adjacent_pairs, matched_penalties, pair_trend, sign_test, trend_checks,
                                   trend_lines)

from test_scaling_fit import synthetic_runs

WIDTHS, TOKENS, GROUPS, SEEDS = (32, 64, 96, 128), (2_000_000, 4_000_000, 8_000_000, 16_000_000), (32, 64, 128), (0, 1)


def sweep(penalty, widths=WIDTHS, tokens=TOKENS, groups=GROUPS, seeds=SEEDS):
    """bf16 runs with a loss falling in N and D, and quantized runs (w4a4, w4a16 with groups; w16a4
    without) at bf16 + penalty(precision, width index, D index, G index or None, seed)."""
    runs = []
    for iw, w in enumerate(widths):
        for i_d, d in enumerate(tokens):
            for s in seeds:
                base = 2.0 + 100 / w ** 0.5 + 50 / d ** 0.3 + 0.01 * s
                cells = [("bf16", None, None), ("w16a4", None, None)]
                cells += [(p, g, ig) for p in ("w4a4", "w4a16") for ig, g in enumerate(groups)]
                for p, g, ig in cells:
                    loss = base if p == "bf16" else base + penalty(p, iw, i_d, ig, s)
                    runs.append({"key": f"d{w}-t{d}-g{g}-{p}-s{s}", "precision": p, "width": w, "seed": s,
                                 "N": 1000 * w * w + 50_000, "N_no_emb": 1000 * w * w, "D": d, "G": g, "loss": loss})
    return runs


def paper_like(p, iw, i_d, ig, s):
    """Falls with N, rises with D and G; the weight part (w4a16) grows faster with D than w16a4."""
    if p == "w16a4":
        return 0.05 * (1 + 0.1 * i_d) / (1 + iw)
    return 0.02 * (1 + ig) * (1 + (0.5 if p == "w4a16" else 0.3) * i_d) / (1 + iw)


def opposite(p, iw, i_d, ig, s):
    """Rises with N, falls with D and G; the weight part grows slower with D."""
    if p == "w16a4":
        return 0.05 * (1 + iw) * (2 - 0.1 * i_d)
    return 0.02 * (1 + iw) * (4 - ig) * (4 - (0.5 if p == "w4a16" else 0.3) * i_d)


def zigzag(p, iw, i_d, ig, s):
    """No trend: the penalty alternates along every axis, so exactly half of the pairs rise."""
    return 0.05 + 0.01 * (-1) ** (iw + i_d + (ig or 0) + s)


def _rows(runs):
    return {(r["precision"], r["axis"]): r for r in trend_checks(runs)}


def test_sign_test_matches_the_binomial_tail():
    for k, n in ((0, 5), (7, 10), (10, 10), (18, 36), (25, 36)):
        tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
        other = sum(math.comb(n, i) for i in range(0, k + 1)) / 2 ** n
        got = sign_test(k, n)
        assert got["p_value"] == pytest.approx(tail, rel=1e-9) and got["p_other_side"] == pytest.approx(other, rel=1e-9)
    assert sign_test(0, 0) == {"p_value": None, "p_other_side": None, "verdict": "no pairs"}
    assert sign_test(9, 10)["verdict"].startswith("agrees") and sign_test(1, 10)["verdict"].startswith("disagrees")
    assert sign_test(7, 10)["verdict"] == "inconclusive"  # p = 0.17


def test_pairs_are_neighbours_with_everything_else_equal():
    pts = matched_penalties(sweep(paper_like))
    w4a4 = [p for p in pts if p["precision"] == "w4a4"]
    # N: 3 neighbour pairs per (D, G, seed) line; D: 3 per (width, G, seed); G: 2 per (width, D, seed)
    assert len(adjacent_pairs(w4a4, "N")) == 3 * 4 * 3 * 2
    assert len(adjacent_pairs(w4a4, "D")) == 3 * 4 * 3 * 2
    assert len(adjacent_pairs(w4a4, "G")) == 2 * 4 * 4 * 2
    for axis, moved in (("N", "width"), ("D", "D"), ("G", "G")):
        for a, b in adjacent_pairs(w4a4, axis):
            assert a[moved] < b[moved] and a["seed"] == b["seed"]
            assert all(a[k] == b[k] for k in ("width", "D", "G") if k != moved)
    # w16a4 has no group size: no G pairs; a missing run joins its neighbours
    assert adjacent_pairs([p for p in pts if p["precision"] == "w16a4"], "G") == []
    gap = [p for p in w4a4 if not (p["width"] == 64 and p["D"] == 4_000_000 and p["G"] == 32 and p["seed"] == 0)]
    assert sum(a["width"] == 32 and b["width"] == 96 for a, b in adjacent_pairs(gap, "N")) == 1
    with pytest.raises(ValueError, match="axis must be one of N, D, G"):
        adjacent_pairs(w4a4, "seed")


def test_a_sweep_that_follows_the_paper_agrees_everywhere():
    rows = _rows(sweep(paper_like))
    assert set(rows) == {("w4a4", "N"), ("w4a4", "D"), ("w4a4", "G"), ("w4a16", "N"), ("w4a16", "D"), ("w4a16", "G"),
                         ("w16a4", "N"), ("w16a4", "D"), (PARTS, "D")}
    for key, r in rows.items():
        assert r["k"] == r["n"] > 0 and r["share"] == 1.0 and r["verdict"] == "agrees (p<0.05)", key
        assert r["p_value"] == pytest.approx(0.5 ** r["n"])
    assert rows[("w4a4", "N")]["median_change"] < 0 < rows[("w4a4", "D")]["median_change"]
    assert rows[(PARTS, "D")]["n"] == 3 * 4 * 3 * 2


def test_a_sweep_against_the_paper_disagrees_and_no_trend_is_inconclusive():
    for key, r in _rows(sweep(opposite)).items():
        assert r["k"] == 0 and r["verdict"] == "disagrees (p<0.05, other side)", key
    for key, r in _rows(sweep(zigzag)).items():
        assert r["share"] == 0.5 and r["verdict"] == "inconclusive", key
    # runs without their bf16 partner give no penalty, so no pairs; equal penalties are ties
    runs = [r for r in sweep(paper_like) if not (r["precision"] == "bf16" and r["seed"] == 1)]
    assert all(p["seed"] == 0 for p in matched_penalties(runs))
    flat = pair_trend([({"delta_p": 0.1}, {"delta_p": 0.1}), ({"delta_p": 0.1}, {"delta_p": 0.2})], +1)
    assert (flat["k"], flat["n"], flat["ties"]) == (1, 1, 1)
    lines = trend_lines(trend_checks(sweep(paper_like)))
    assert len(lines) == 2 + 9 and lines[2].startswith("w16a4 ") and " 24/24 " in lines[2]


def _write(tmp_path, runs):
    with open(tmp_path / RUNS_FILE, "w") as fh:
        for r in runs:
            fh.write(json.dumps({**r, "seconds": 1.0, "device": "synthetic"}) + "\n")


def test_tokens_per_parameter_filter():
    runs = synthetic_runs(noise=0.0)
    kept = select_runs(runs, min_tokens_per_param=30)
    assert kept and all(r["D"] / r["N_no_emb"] >= 30 for r in kept)
    assert len(kept) == sum(r["D"] >= 30 * r["N_no_emb"] for r in runs) < len(runs)
    total = select_runs(runs, min_tokens_per_param=30, n_count="total")
    assert {r["key"] for r in total} < {r["key"] for r in kept}  # N with the embedding is larger
    assert select_runs(runs, 10**7, 30) == [r for r in kept if r["D"] >= 10**7]
    for bad in (-1, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="min_tokens_per_param"):
            select_runs(runs, min_tokens_per_param=bad)


def test_fit_and_report_with_the_regime_filter(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lowbit.scaling.plots.write_plots", lambda *a, **k: [])  # plotted in test_scaling_sweep
    runs = synthetic_runs(noise=0.0, extra={"w4a16": (32, 128), "w16a4": (None,)})
    _write(tmp_path, runs)
    assert main(["scaling", "fit", str(tmp_path), "--bootstrap", "0", "--min-tokens", "20m",
                 "--min-tokens-per-param", "5", "--out", str(tmp_path / "f")]) == 0
    # D >= 20m leaves D = 3e7, 1e8, 3e8; D / N >= 5 then drops N = 1e7 at 3e7: 11 of 16 (N, D) cells, 6 runs each
    assert "fitted 66 of 96 runs (D >= 20,971,520, D / N >= 5)" in capsys.readouterr().out
    fit = json.loads((tmp_path / "f" / "fit.json").read_text())
    assert (fit["min_tokens"], fit["min_tokens_per_param"], fit["runs_left_out"], fit["n_runs"]) == (20 * 2**20, 5, 30, 66)
    # too strict: D / N >= 200 leaves 3 cells (3 bf16 runs), a one-line error says what the filter kept
    assert main(["scaling", "fit", str(tmp_path), "--min-tokens-per-param", "200", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 5 unquantized runs, got 3" in err[0] and "kept 18 of 96 runs" in err[0]
    assert main(["scaling", "fit", str(tmp_path), "--min-tokens", "lots"]) == 2
    assert "--min-tokens" in capsys.readouterr().err
    # the report reuses the fit made with the same selection
    (tmp_path / "f" / "fit.json").write_text(json.dumps({**fit, "marker": 1}))
    assert main(["scaling", "report", str(tmp_path), "--bootstrap", "0", "--min-tokens", "20m",
                 "--min-tokens-per-param", "5", "--out", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out
    assert "model-free trends" in out and "weight part grows faster with D" in out
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert report["fit"]["marker"] == 1 and report["cost"]["runs"] == 66
    rows = {(r["precision"], r["axis"]): r for r in report["trend_check"]}
    assert rows[("w4a4", "N")]["verdict"] == rows[("w4a4", "G")]["verdict"] == "agrees (p<0.05)"
    html = (tmp_path / "f" / "report.html").read_text()
    assert "Model-free trends" in html and "runs of D / N &gt;= 5" in html
