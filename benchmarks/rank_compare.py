"""Spearman of several sensitivity tables' predictions against one run's measured random configurations.

`lowbit search ... --rank-configs N` measures N random mixed configurations (seed 0) and stores them in
search.json; this script scores the predictions of other sensitivity caches (e.g. one computed by an
older estimator) on exactly those configurations, so estimators can be compared on one target.

    python3 benchmarks/rank_compare.py RUN/search.json old=OLD/sensitivity.json new=RUN/sensitivity.json
"""
from __future__ import annotations

import json
import sys

import numpy as np
from scipy.stats import spearmanr

from lowbit.search.candidates import LayerCandidates
from lowbit.search.sensitivity import SensitivityTable, random_configs


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    ra = json.load(open(sys.argv[1]))["rank_agreement"]
    print(f"{ra['configs']} random configurations of {sys.argv[1]}\n\n| table | estimator | Spearman |\n|---|---|---|")
    for arg in sys.argv[2:]:
        label, path = arg.split("=", 1)
        t = SensitivityTable.from_json(json.load(open(path)))
        cands = [LayerCandidates(n, (1, 1), t.specs[n]) for n in t.layers]
        cfgs = random_configs(cands, None, ra["configs"], 0)
        zero = [np.zeros(len(c.specs)) for c in cands]
        for est in t.values:
            for pairs in ([False, True] if t.pairs else [False]):
                p = t.problem(est, zero, pairs)
                pred = [p.evaluate(c)[0] for c in cfgs]
                rho = spearmanr(pred, ra["measured"]).statistic
                neg = sum(v < 0 for r in t.values[est].values() for v in r.values())
                print(f"| {label} | {est}{'+pairs' if pairs else ''} ({neg} negative values) | {rho:.3f} |")


if __name__ == "__main__":
    main()
