"""Data that lowbit needs offline: a deterministic text corpus for calibration and evaluation."""
from .corpus import (MODULES, Corpus, calibration_batches, evaluation_sentences, evaluation_tokens,
                     cache_dir, stdlib_corpus, tokenize)

__all__ = ["Corpus", "MODULES", "stdlib_corpus", "calibration_batches", "evaluation_tokens",
           "evaluation_sentences", "tokenize", "cache_dir"]
