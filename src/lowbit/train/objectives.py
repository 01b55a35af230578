"""Training objectives: distillation from a full-precision teacher (KL of next-token
distributions, optionally plus hidden-state MSE), plain next-token loss, and hidden-state matching
for encoders. Each returns ``(loss, seconds spent in the teacher's forward)``."""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("kl", "ce", "kl+ce")


def _teacher_forward(teacher: nn.Module, batch: Dict[str, torch.Tensor], hidden: bool):
    t = time.perf_counter()
    with torch.no_grad():
        out = teacher(**batch, output_hidden_states=hidden)
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize(batch["input_ids"].device)
    return out, time.perf_counter() - t


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions, in float32."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    if mask is not None:
        m = mask.reshape(-1).to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp(min=1) * temperature ** 2
    return kl.mean() * temperature ** 2


def causal_lm_objective(kind: str = "kl", temperature: float = 1.0, hidden_mse: float = 0.0):
    """Distillation (``kl``), next-token cross-entropy (``ce``) or their sum (``kl+ce``); with
    ``hidden_mse`` > 0, that weight times the MSE of every hidden state to the teacher's (relative
    to the teacher's mean square) is added."""
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective {kind!r}; accepted: {', '.join(OBJECTIVES)}")
    needs_teacher = kind != "ce" or hidden_mse > 0

    def objective(student: nn.Module, teacher: Optional[nn.Module], batch: Dict[str, torch.Tensor]):
        if needs_teacher and teacher is None:
            raise ValueError(f"objective {kind!r}{' with hidden-state MSE' if hidden_mse else ''} needs a teacher")
        t_out, t_sec = (_teacher_forward(teacher, batch, hidden_mse > 0) if needs_teacher else (None, 0.0))
        labels = batch["input_ids"] if "ce" in kind else None
        out = student(**batch, labels=labels, output_hidden_states=hidden_mse > 0)
        loss = out.loss if labels is not None else 0.0
        if "kl" in kind:
            loss = loss + token_kl(out.logits, t_out.logits, temperature, batch.get("attention_mask"))
        if hidden_mse > 0:
            loss = loss + hidden_mse * sum(relative_mse(s, t) for s, t in zip(out.hidden_states[1:],
                                                                                t_out.hidden_states[1:]))
        return loss, t_sec

    return objective


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 over the (masked) tokens, float32."""
    d = (student.float() - teacher.float()).pow(2).sum(-1)
    n = teacher.float().pow(2).sum(-1)
    if mask is not None:
        m = mask.to(d.dtype)
        d, n = d * m, n * m
    return d.sum() / n.sum().clamp(min=1e-12)


def _pooled(h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return h.float().mean(1)
    m = mask.unsqueeze(-1).to(torch.float32)
    return (h.float() * m).sum(1) / m.sum(1).clamp(min=1)


def encoder_objective():
    """Encoders: 1 - cosine to the teacher of each real token's last hidden state, plus 1 - cosine of
    the mean-pooled sentence embeddings (what embedding fidelity measures). Cosines rather than
    squared errors: BERT-style hidden states have a few huge channels that would otherwise carry
    the whole loss."""

    def objective(student: nn.Module, teacher: Optional[nn.Module], batch: Dict[str, torch.Tensor]):
        if teacher is None:
            raise ValueError("training an encoder matches its teacher's hidden states: it needs a teacher")
        t_out, t_sec = _teacher_forward(teacher, batch, False)
        out = student(**batch)
        mask = batch.get("attention_mask")
        s, t = out.last_hidden_state.float(), t_out.last_hidden_state.float()
        tok = 1 - F.cosine_similarity(s, t, dim=-1)
        tok = (tok * mask).sum() / mask.sum().clamp(min=1) if mask is not None else tok.mean()
        sent = 1 - F.cosine_similarity(_pooled(s, mask), _pooled(t, mask), dim=-1).mean()
        return tok + sent, t_sec

    return objective
