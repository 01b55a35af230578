"""Sentence embeddings of encoder models: the last hidden state, mean-pooled over real tokens."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


def last_hidden(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder's last hidden state (batch, tokens, width) for one tokenised batch."""
    out = model(**batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    return hidden


def mean_pool(hidden: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """Mean of ``hidden`` over the tokens ``mask`` marks (all tokens without a mask), L2-normalised
    unless ``normalize`` is False."""
    m = (torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask).unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled
