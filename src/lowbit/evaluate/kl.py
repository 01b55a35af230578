"""KL divergence of a model's next-token distributions to a reference model's, on held-out tokens:
how far quantization (or training) moved the model, free of the in-domain drift that perplexity
alone cannot tell apart."""
from __future__ import annotations

import torch
from torch import nn

from .perplexity import windows


@torch.no_grad()
def token_kl_divergence(model: nn.Module, reference: nn.Module, tokens: torch.Tensor, context: int = 512) -> float:
    """Mean over predicted tokens of KL(reference || model), in nats, over non-overlapping windows
    of ``context`` tokens (the windows perplexity uses)."""
    from ..train.objectives import token_kl

    dev = next(model.parameters()).device
    ref_dev = next(reference.parameters()).device
    total, count = 0.0, 0
    for start, end, _ in windows(int(tokens.numel()), context):
        ids = tokens[start:end].reshape(1, -1)
        p = reference(input_ids=ids.to(ref_dev)).logits.to(dev)
        q = model(input_ids=ids.to(dev)).logits
        n = ids.shape[1]
        total += float(token_kl(q, p)) * n
        count += n
    return total / max(count, 1)
