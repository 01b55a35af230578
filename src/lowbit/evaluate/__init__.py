"""Evaluation: perplexity of causal LMs, embedding fidelity of encoders.

``lowbit.evaluate.perplexity`` is the function (its module is importable as
``from lowbit.evaluate.perplexity import perplexity_stats, windows``)."""
from .embedding import embed, embedding_fidelity
from .perplexity import perplexity, perplexity_stats, windows

__all__ = ["perplexity", "perplexity_stats", "windows", "embed", "embedding_fidelity"]
