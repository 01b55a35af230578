"""Causal-LM perplexity over a token stream, with the windowing spelled out.

Definitions (``N`` tokens ``t[0..N-1]``, window length ``context``, step ``stride``):

* Windows start at ``b_k = k * stride`` and end at ``e_k = min(b_k + context, N)`` (exclusive); the
  last window is the first one that reaches ``e_k = N``, so it may be shorter than ``context`` (a
  *partial* window; it is kept, and it sees only its own tokens as context).
* Each window is one independent forward pass over ``t[b_k:e_k]`` (no cache carried between
  windows). Window ``k`` *scores* (counts the negative log-likelihood of) the targets
  ``t[p]`` for ``p`` in ``[max(e_{k-1}, b_k + 1), e_k)`` (with ``e_{-1} = 0``), each predicted from
  ``t[b_k:p]``. Thus a token is scored at most once, and never a window's first token, which has
  no context in its window.
* ``stride == context`` (the default): non-overlapping windows; every token except the first token
  of each window is scored, i.e. ``N - n_windows`` tokens (a last window of a single token scores
  nothing and is skipped).
* ``stride < context``: overlapping (sliding) windows; the first window scores its tokens
  ``1..context-1``, every later window scores only the tokens not scored before (its last
  ``e_k - e_{k-1}`` tokens), each with at least ``context - stride`` tokens of context. Every token
  but ``t[0]`` is scored exactly once.
* The result is ``exp(sum of NLL / number of scored tokens)``, the NLL in natural log, computed from
  float32 (or wider) log-softmax of the logits; accumulated in float64.

No BOS or other special token is added: pass the tokens you want scored.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["perplexity", "perplexity_stats", "windows"]


def windows(n_tokens: int, context: int, stride: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """The windows as ``(begin, end, first_scored)``: the forward pass runs on ``tokens[begin:end]``
    and scores targets ``tokens[first_scored:end]`` (see the module docstring). Windows that would
    score nothing are left out."""
    stride = context if stride is None else stride
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens (got {context})")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}] so that no token is skipped (got {stride})")
    out, prev_end, begin = [], 0, 0
    while prev_end < n_tokens:
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        begin += stride
    return out


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    try:
        out = model(input_ids=ids, use_cache=False)
    except TypeError:  # a plain module taking the ids positionally
        out = model(ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def perplexity_stats(model: nn.Module, tokens: torch.Tensor, context: int = 512, stride: Optional[int] = None,
                     batch_size: int = 4, progress: bool = False) -> Dict[str, float]:
    """Like :func:`perplexity`, returning ``{"perplexity", "nll", "n_tokens", "n_windows", "context",
    "stride", "seconds"}`` (``nll`` is the mean NLL per scored token, nats; ``n_tokens`` how many
    tokens were scored)."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D (got shape {tuple(tokens.shape)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive (got {batch_size})")
    stride = context if stride is None else stride
    wins = windows(tokens.numel(), context, stride)
    if not wins:
        raise ValueError(f"{tokens.numel()} tokens: nothing to score (need at least 2)")
    device = _device(model)
    tokens = tokens.to(device=device, dtype=torch.long)
    # Batch windows of equal length (all but possibly the last); each batch is one forward pass.
    groups: List[List[Tuple[int, int, int]]] = []
    for w in wins:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0]):
            groups[-1].append(w)
        else:
            groups.append([w])
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(wins), desc="perplexity", unit="window")
    t0 = time.perf_counter()
    total_nll, total_n = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for group in groups:
                ids = torch.stack([tokens[b:e] for b, e, _ in group])
                logits = _logits(model, ids)
                # position j predicts token j+1: targets ids[:, 1:], predictions logits[:, :-1]
                pred = logits[:, :-1].float()
                target = ids[:, 1:]
                nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                      reduction="none").view(target.shape)
                for row, (b, e, first) in enumerate(group):
                    # target index i (into ids[:, 1:]) is token position b + 1 + i
                    total_nll += nll[row, first - b - 1:].double().sum().item()
                    total_n += e - first
                if bar is not None:
                    bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    mean = total_nll / total_n
    return {"perplexity": math.exp(mean), "nll": mean, "n_tokens": total_n, "n_windows": len(wins),
            "context": context, "stride": stride, "seconds": time.perf_counter() - t0}


def perplexity(model: nn.Module, tokens: torch.Tensor, context: int = 512, stride: Optional[int] = None,
               batch_size: int = 4, progress: bool = False) -> float:
    """Perplexity of a causal LM on a 1-D token tensor: ``exp`` of the mean token NLL.

    Windows of ``context`` tokens start every ``stride`` tokens (default ``stride = context``:
    non-overlapping windows). Each window is a separate forward pass; it scores the tokens after its
    first one that no earlier window scored, so with non-overlapping windows the first token of
    each window is not scored, and with ``stride < context`` every token but the very first is
    scored once with at least ``context - stride`` tokens of context. The last window may be
    partial (shorter than ``context``) and is evaluated as is. Equal-length windows are batched
    ``batch_size`` at a time under ``torch.inference_mode``; the NLL is taken from float32
    log-probabilities and summed in float64. The model is called as ``model(input_ids=ids,
    use_cache=False)`` and its ``.logits`` used (a plain module's tensor output works too). See the
    module docstring for the exact rule and :func:`perplexity_stats` for the counts."""
    return perplexity_stats(model, tokens, context, stride, batch_size, progress)["perplexity"]
