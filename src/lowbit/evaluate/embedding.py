"""Sentence-embedding fidelity of an encoder against a reference (e.g. fp32 vs quantized MiniLM).

Embeddings follow the sentence-transformers recipe of all-MiniLM-L6-v2: the encoder's last hidden
state, mean-pooled over the real tokens (attention mask 1), then L2-normalised.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..models.embedding import last_hidden, mean_pool

__all__ = ["embed", "embedding_fidelity"]


def embed(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 32,
          max_length: int = 256, normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings ``(len(sentences), hidden)`` in float32 on the CPU.

    Each batch is tokenised with padding and truncation to ``max_length`` tokens (256, MiniLM's
    ``max_seq_length``), run through ``model`` under ``torch.inference_mode``, and the last hidden
    state is averaged over the positions whose attention mask is 1 (padding excluded); with
    ``normalize`` the result is divided by its L2 norm (sentence-transformers' Normalize step)."""
    if isinstance(sentences, str):
        raise TypeError("sentences must be a sequence of strings, not one string")
    if len(sentences) == 0:
        raise ValueError("no sentences to embed")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, len(sentences), batch_size):
                enc = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = last_hidden(model, enc).float()
                out.append(mean_pool(hidden, enc["attention_mask"], normalize=False).cpu())
    finally:
        model.train(was_training)
    emb = torch.cat(out)
    return F.normalize(emb, dim=-1) if normalize else emb


def _upper(sim: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(sim.shape[0], sim.shape[0], offset=1)
    return sim[i, j]


def embedding_fidelity(reference_model: Union[nn.Module, torch.Tensor], model: nn.Module, tokenizer,
                       sentences: Sequence[str], batch_size: int = 32, max_length: int = 256) -> Dict[str, float]:
    """How well ``model``'s sentence embeddings match ``reference_model``'s on ``sentences``.

    Returns ``cosine_mean`` and ``cosine_min``, the mean and minimum over sentences of the cosine
    between a sentence's embedding from ``model`` and from the reference; and ``spearman``, the
    Spearman rank correlation (scipy.stats.spearmanr) between the two models' pairwise cosine
    similarity matrices' strict upper triangles (all ``n(n-1)/2`` sentence pairs): 1.0 when the
    model ranks every pair's similarity as the reference does. ``reference_model`` may also be the
    reference embeddings themselves (from :func:`embed`), to compute them once. Needs 2 sentences
    or more."""
    from scipy.stats import spearmanr

    if len(sentences) < 2:
        raise ValueError("embedding_fidelity needs at least 2 sentences")
    if isinstance(reference_model, torch.Tensor):
        ref = F.normalize(reference_model.detach().float().cpu(), dim=-1)
        if ref.shape[0] != len(sentences):
            raise ValueError(f"reference embeddings hold {ref.shape[0]} rows for {len(sentences)} sentences")
    else:
        ref = embed(reference_model, tokenizer, sentences, batch_size, max_length)
    emb = embed(model, tokenizer, sentences, batch_size, max_length)
    ref64, emb64 = ref.double(), emb.double()
    cos = (ref64 * emb64).sum(-1)
    rho = spearmanr(_upper(ref64 @ ref64.T).numpy(), _upper(emb64 @ emb64.T).numpy()).statistic
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "spearman": float(rho),
            "n_sentences": len(sentences)}
