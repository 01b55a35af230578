"""Llama-architecture models trained from scratch, by width: ``model_shape(d)`` fixes the depth,
heads and MLP width from ``d`` alone, so a sweep names its sizes by width, and ``peak_lr(d)`` is the
learning-rate rule (docs/scaling.md, "Models").

- layers ``max(2, d // 64)``, heads of 32 dimensions (``d / 32`` heads, full multi-head attention),
  SwiGLU MLP of width ``8d/3`` rounded up to a multiple of 64, tied input/output embeddings,
  RMSNorm, RoPE, no biases (the Llama recipe).
- peak learning rate ``2e-3 * sqrt(256 / d)`` (wider models want smaller steps; the square root sits
  between the 1/d of muP's hidden layers and a constant), linear warm-up over the first 10% of steps,
  cosine decay to 10% of the peak.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

HEAD_DIM = 32
MLP_MULTIPLE = 64
LR_BASE, LR_WIDTH = 2e-3, 256
WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class ModelShape:
    d: int
    layers: int
    heads: int
    mlp: int
    vocab: int
    seq_len: int

    def params(self) -> dict:
        """Parameter counts: ``total`` (the tied embedding once), ``no_emb`` (without it) and
        ``linear`` (the weights of the linear layers a QAT scheme quantizes)."""
        attn = 4 * self.d * self.d
        mlp = 3 * self.d * self.mlp
        norms = 2 * self.d
        per_layer = attn + mlp + norms
        no_emb = self.layers * per_layer + self.d  # + final norm
        return {"total": no_emb + self.vocab * self.d, "no_emb": no_emb, "linear": self.layers * (attn + mlp)}

    def to_dict(self) -> dict:
        return asdict(self)


def check_width(d) -> int:
    if isinstance(d, bool) or not isinstance(d, int) or d < HEAD_DIM or d % HEAD_DIM:
        raise ValueError(f"model width must be a positive multiple of {HEAD_DIM} (the head size); got {d!r}")
    return d


def mlp_width(d: int) -> int:
    return MLP_MULTIPLE * math.ceil(8 * check_width(d) / 3 / MLP_MULTIPLE)


def model_shape(d: int, vocab: int, seq_len: int) -> ModelShape:
    """The shape of the width-``d`` model (``d`` a positive multiple of 32)."""
    check_width(d)
    mlp = mlp_width(d)
    return ModelShape(d=d, layers=max(2, d // 64), heads=d // HEAD_DIM, mlp=mlp, vocab=vocab, seq_len=seq_len)


def build_model(shape: ModelShape, seed: int, eot_id: int) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` of ``shape`` (fp32; weights a function of ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.d, intermediate_size=shape.mlp,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, max_position_embeddings=shape.seq_len,
                      tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
                      attention_dropout=0.0, initializer_range=0.02)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    counted = sum(p.numel() for p in model.parameters())
    if counted != shape.params()["total"]:  # the formula in params() is what the fits use: keep them equal
        raise AssertionError(f"model has {counted} parameters, ModelShape.params() says {shape.params()['total']}")
    return model


def peak_lr(d: int) -> float:
    return LR_BASE * math.sqrt(LR_WIDTH / d)


def warmup_steps(steps: int) -> int:
    return min(max(1, int(WARMUP_FRACTION * steps)), steps - 1) if steps > 1 else 0
