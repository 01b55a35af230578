"""How much the model's loss cares about each output channel of each linear layer: the diagonal of
the Fisher information of the loss with respect to the layer's output, measured on calibration data
with the float model.

For a layer y = x W^T, a weight error dW changes the output by dy_t = x_t dW^T at token t. To second
order, with the Fisher (expected squared gradient) standing in for the Hessian of the summed loss
L = sum_t l_t and taken diagonal over (token, channel):

    dL ~= 1/2 sum_t sum_i g_ti^2 dy_ti^2,        g_ti = dL / dy_ti.

Assuming g_ti^2 and x_t x_t^T are uncorrelated over tokens (the Kronecker factorisation of K-FAC
with its output factor taken diagonal), sum_t g_ti^2 (x_t . dW_i)^2 ~= G_i sum_t (x_t . dW_i)^2 with
G_i = mean_t g_ti^2. With the GPTQ Hessian H = (2/N) sum_t x_t x_t^T over N tokens this is

    d(mean loss) = dL / N ~= 1/4 sum_i G_i [dW H dW^T]_ii,

the layer's output error tr(dW H dW^T) with each output row weighted by how much the loss cares
about that channel. The weights carry everything downstream of the layer (depth, residual stream,
attention, the head), so errors of different layers are comparable in loss units.

The loss: causal LMs, the summed next-token cross-entropy (its gradients at the float model are the
per-position empirical Fisher); encoders, whose embedding loss ||e' - e||^2 has zero gradient at the
float model, the projections u . e of the L2-normalised mean-pooled embedding on Gaussian u, whose
squared gradients have expectation diag(J^T J), the Gauss-Newton matrix of that loss (up to the
constant 2 / sentences, the same for every layer).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.embedding import mean_pool


def _losses(model: nn.Module, batch: dict, draws: int, gen: torch.Generator) -> List[torch.Tensor]:
    """One forward: [summed causal-LM cross-entropy], or ``draws`` random projections of the pooled
    embeddings (encoders)."""
    out = model(**batch)
    logits = getattr(out, "logits", None)
    if logits is not None and "input_ids" in batch:
        ids = batch["input_ids"]
        return [F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")]
    hidden = getattr(out, "last_hidden_state", None)
    e = mean_pool(hidden if hidden is not None else out[0], batch.get("attention_mask"))
    # drawn on the CPU: the same probes on any device
    return [(e * torch.randn(e.shape, generator=gen).to(e)).sum() for _ in range(draws)]


def _first_sequences(batches: List[dict], n: int) -> List[dict]:
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        k = min(left, next(iter(b.values())).shape[0])
        out.append({key: v[:k] for key, v in b.items()})
        left -= k
    return out


def output_fisher(model: nn.Module, batches: List[dict], names: Sequence[str], seqs: int = 8,
                  draws: int = 4, seed: int = 0) -> Dict[str, torch.Tensor]:
    """G per named linear layer: a float64 vector (out_features,) with G_i = mean over tokens of
    (dL/dy_i)^2, from the first ``seqs`` calibration sequences (``draws`` projections each for
    encoders). The model is not changed and no parameter gradient is computed."""
    if seqs < 1:
        raise ValueError(f"output Fisher needs at least one calibration sequence, got seqs={seqs}")
    mods = {n: model.get_submodule(n) for n in names}
    acc = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in mods.items()}
    tokens = {n: 0 for n in mods}

    def hook(name):
        def fwd(mod, args, out):
            if not out.requires_grad:  # nothing upstream needs a gradient: make this output a leaf that does
                out.requires_grad_(True)

            def grad(g):
                g2 = g.detach().double().pow(2).reshape(-1, g.shape[-1])
                acc[name] += g2.sum(0).cpu()
                tokens[name] += g2.shape[0]
            out.register_hook(grad)
            return out
        return fwd

    was_training = model.training
    model.eval()
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for b in _first_sequences(batches, seqs):
                losses = _losses(model, b, draws, gen)
                for k, loss in enumerate(losses):
                    if not loss.requires_grad:
                        raise ValueError(f"the loss does not depend on any of the layers {list(names)[:3]}...: "
                                         "their output Fisher cannot be measured")
                    loss.backward(retain_graph=k < len(losses) - 1)
    finally:
        for h in hooks:
            h.remove()
        for p, r in saved.items():
            p.requires_grad_(r)
        model.train(was_training)
    return {n: acc[n] / max(tokens[n], 1) for n in mods}

