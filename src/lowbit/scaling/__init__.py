"""QAT scaling laws (``lowbit scaling``): a sweep of small Llama models trained from scratch under
quantization (sweep.py), the law's robust fit (fit.py), its analyses and report (analysis.py,
plots.py). docs/scaling.md describes the method and the measured results."""
