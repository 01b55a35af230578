"""The task loss that sensitivities are measured and predicted on, over a fixed calibration set.

* causal LM: mean next-token cross-entropy (nats) over the calibration windows;
* encoder: mean over sentences of ||e_q - e_ref||^2 between L2-normalised mean-pooled embeddings of
  the model and of its fp32 self, which is 2 (1 - cosine): zero at the fp32 weights, its Hessian
  there is the Gauss-Newton matrix 2 J^T J, and it tracks the encoder metric 1 - cosine directly.

:class:`Objective` evaluates the loss either through the whole model (differentiable, for
Hessian-vector products and gradients) or, with some weights replaced, from cached block inputs so
that quantizing a layer of block i only re-runs blocks i..end (for measured sensitivities).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import capture_block_inputs, find_blocks, run_block


def calibration_sentences(n: int, seed: int = 0) -> List[str]:
    """``n`` sentences of the calibration split (encoders), taken evenly over the split."""
    import re

    from ..data.corpus import stdlib_corpus

    text = stdlib_corpus().calibration
    pool = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        s = " ".join(s.split())
        if s and s[0].isupper() and s[-1] in ".!?" and 6 <= len(s.split(" ")) <= 48:
            pool.append(s)
    pool = list(dict.fromkeys(pool))
    if n > len(pool):
        raise ValueError(f"asked for {n} calibration sentences; the calibration split has {len(pool)}")
    return [pool[(i * len(pool) + seed) // n] for i in range(n)]


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@contextmanager
def swapped(layers: Dict[str, nn.Linear], weights: Dict[str, torch.Tensor]):
    """Temporarily give the named layers other weight values."""
    old = {n: layers[n].weight.data for n in weights}
    try:
        for n, w in weights.items():
            layers[n].weight.data = w.to(old[n].dtype)
        yield
    finally:
        for n, w in old.items():
            layers[n].weight.data = w


class Objective:
    """Task loss of ``model`` (kind 'causal_lm' or 'encoder') on fixed calibration batches."""

    def __init__(self, model: nn.Module, kind: str, batches: List[dict]):
        if kind not in ("causal_lm", "encoder"):
            raise ValueError(f"kind must be 'causal_lm' or 'encoder', got {kind!r}")
        self.model, self.kind, self.batches = model, kind, batches
        self.blocks_path, self.blocks = find_blocks(model)
        self.ref: List[torch.Tensor] = []
        if kind == "encoder":
            with torch.inference_mode():
                self.ref = [_pool(self._hidden_out(b), b["attention_mask"]).clone() for b in batches]
        self._inputs = None  # per block: list over batches of its input hidden state (fp32 weights)
        self.input_power: Optional[Dict[str, torch.Tensor]] = None  # per layer E[x^2]: retention candidates

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for b in self.batches:
            for k in sorted(b):
                h.update(k.encode())
                h.update(b[k].cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # --- whole model ---------------------------------------------------------------------------
    def _hidden_out(self, batch: dict) -> torch.Tensor:
        out = self.model(**batch)
        h = getattr(out, "last_hidden_state", None)
        return h if h is not None else out[0]

    def _loss_from_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def batch_loss(self, i: int) -> torch.Tensor:
        """Differentiable loss on batch ``i`` through the whole model."""
        b = self.batches[i]
        if self.kind == "causal_lm":
            return self._loss_from_logits(self.model(**b, use_cache=False).logits, b)
        e = _pool(self._hidden_out(b), b["attention_mask"])
        return (e - self.ref[i]).pow(2).sum(-1).mean()

    def loss(self) -> float:
        with torch.inference_mode():
            return sum(float(self.batch_loss(i)) for i in range(len(self.batches))) / len(self.batches)

    # --- from cached block inputs -------------------------------------------------------------
    def _head(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        b = self.batches[i]
        if self.kind == "causal_lm":
            inner = getattr(self.model, "model", None)
            norm = getattr(inner, "norm", None)
            h = norm(hidden) if norm is not None else hidden
            return self._loss_from_logits(self.model.lm_head(h), b)
        e = _pool(hidden, b["attention_mask"])
        return (e - self.ref[i]).pow(2).sum(-1).mean()

    def _cache_inputs(self) -> None:
        with torch.inference_mode():
            caps = capture_block_inputs(self.model, self.blocks[0], self.batches)
            for c in caps:  # a captured KV cache would make re-runs attend to stale keys/values
                for k in ("cache", "past_key_values", "past_key_value", "use_cache"):
                    c.kwargs.pop(k, None)
            self._caps = caps
            hs = [c.hidden for c in caps]
            self._inputs = []
            for block in self.blocks:
                self._inputs.append(hs)
                hs = [run_block(block, c, h) for c, h in zip(caps, hs)]
            self._inputs.append(hs)  # the last block's output: the loss with nothing replaced

    def block_of(self, name: str) -> int:
        prefix = self.blocks_path + "."
        if not name.startswith(prefix):
            raise ValueError(f"{name} is not inside {self.blocks_path}")
        return int(name[len(prefix):].split(".")[0])

    def loss_with(self, layers: Dict[str, nn.Linear], weights: Dict[str, torch.Tensor]) -> float:
        """Loss with the named layers' weights replaced, re-running only the blocks from the first
        one touched. The cache holds the fp32 model's block inputs."""
        if self._inputs is None:
            self._cache_inputs()
        start = min((self.block_of(n) for n in weights), default=len(self.blocks))
        total = 0.0
        with torch.inference_mode(), swapped(layers, weights):
            for i, (cap, h) in enumerate(zip(self._caps, self._inputs[start])):
                for block in self.blocks[start:]:
                    h = run_block(block, cap, h)
                total += float(self._head(h, i))
        return total / len(self.batches)


def make_batches(loaded, n: int, seq_len: int, batch_size: int = 4) -> List[dict]:
    """Calibration batches for the objective: token windows (causal LM) or tokenised sentences."""
    dev = next(loaded.model.parameters()).device  # the batches live where the model runs
    if loaded.kind == "causal_lm":
        from ..data.corpus import calibration_batches

        ids = calibration_batches(loaded.tokenizer, n, seq_len, seed=0).to(dev)
        return [{"input_ids": ids[i:i + batch_size]} for i in range(0, n, batch_size)]
    sents = calibration_sentences(n)
    out = []
    for i in range(0, n, batch_size * 8):
        enc = loaded.tokenizer(sents[i:i + batch_size * 8], padding=True, truncation=True, max_length=seq_len,
                               return_tensors="pt")
        out.append({k: v.to(dev) for k, v in enc.items()})
    return out
