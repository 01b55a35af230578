"""The task loss that sensitivities are measured and predicted on, over a fixed calibration set.

* causal LM: mean next-token cross-entropy (nats) over the calibration windows; a *change* of the
  model is scored by :meth:`Objective.increase_with` as the mean per-token KL divergence
  KL(p_fp32 || p_changed) of the next-token distributions (>= 0, no first-order sampling noise, and
  its expectation is the expected cross-entropy increase);
* encoder: mean over sentences of ||e_q - e_ref||^2 between L2-normalised mean-pooled embeddings of
  the model and of its fp32 self, which is 2 (1 - cosine): zero at the fp32 weights, its Hessian
  there is the Gauss-Newton matrix 2 J^T J, and it tracks the encoder metric 1 - cosine directly.

:class:`Objective` evaluates the loss either through the whole model (differentiable, for
Hessian-vector products and gradients) or, with some weights replaced, from cached block inputs so
that quantizing a layer of block i only re-runs blocks i..end (for measured sensitivities).

The KL is computed from the change of the logits, dz = W_head (h - h_ref) (h the final-normed hidden
state), against the fp32 distributions p kept once per calibration token (tokens x vocabulary fp32:
200 MB for 1,024 tokens of a 49,152-word vocabulary): KL = log E_p[exp(dz)] - E_p[dz], see
:meth:`Objective._kl`.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import capture_block_inputs, find_blocks, run_block
from ..models.embedding import last_hidden, mean_pool


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


@dataclass
class _KLRef:
    """What the KL against the fp32 model needs per calibration batch (see the module docstring)."""
    p: torch.Tensor        # [B, T, V] float32: the fp32 next-token distributions
    lse: torch.Tensor      # [B, T] float64: logsumexp of the fp32 logits (for the overflow fallback)
    hidden: torch.Tensor   # [B, T, d]: the fp32 final-normed hidden state h_ref
    pw: torch.Tensor       # [B, T, d]: p @ W_head, so that E_p[dz] = pw . (h - h_ref)
    weight_ptr: int        # data_ptr of the head weight the reference was computed with


def _fast_bf16(device: torch.device) -> torch.dtype:
    """bfloat16 where matmuls in it are fast (CUDA, or a CPU with bf16 instructions), else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
        except (AttributeError, RuntimeError):
            pass
    return torch.float32


class Objective:
    """Task loss of ``model`` (kind 'causal_lm' or 'encoder') on fixed calibration batches."""

    def __init__(self, model: nn.Module, kind: str, batches: List[dict], kl_dtype: Optional[torch.dtype] = None):
        """``kl_dtype``: the dtype of the head product of the logit *change* dz = W (h - h_ref) in the
        KL (causal LMs); None picks bfloat16 where the hardware has fast bfloat16 matmuls (a
        relative error ~0.3% in dz, far below the calibration sample's noise, for ~2x on the
        vocabulary-wide product), else float32."""
        if kind not in ("causal_lm", "encoder"):
            raise ValueError(f"kind must be 'causal_lm' or 'encoder', got {kind!r}")
        if kl_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"kl_dtype must be None (auto), torch.float32 or torch.bfloat16, got {kl_dtype!r}")
        self.kl_dtype = kl_dtype
        self.model, self.kind, self.batches = model, kind, batches
        self.blocks_path, self.blocks = find_blocks(model)
        self.ref: List[torch.Tensor] = []
        if kind == "encoder":
            with torch.inference_mode():
                self.ref = [mean_pool(self._hidden_out(b), b["attention_mask"]).clone() for b in batches]
        self._inputs = None  # per block: list over batches of its input hidden state (fp32 weights)
        self._kl_ref: Optional[List[_KLRef]] = None
        self._dz_weight: Optional[torch.Tensor] = None  # the head weight in the dz product's dtype
        self._base: Optional[float] = None
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
        return last_hidden(self.model, batch)

    def _loss_from_logits(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def batch_loss(self, i: int) -> torch.Tensor:
        """Differentiable loss on batch ``i`` through the whole model."""
        b = self.batches[i]
        if self.kind == "causal_lm":
            return self._loss_from_logits(self.model(**b, use_cache=False).logits, b)
        e = mean_pool(self._hidden_out(b), b["attention_mask"])
        return (e - self.ref[i]).pow(2).sum(-1).mean()

    def loss(self) -> float:
        with torch.inference_mode():
            return sum(float(self.batch_loss(i)) for i in range(len(self.batches))) / len(self.batches)

    # --- from cached block inputs -------------------------------------------------------------
    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = getattr(self.model, "model", None)
        norm = getattr(inner, "norm", None)
        return norm(hidden) if norm is not None else hidden

    def _head(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        b = self.batches[i]
        if self.kind == "causal_lm":
            return self._loss_from_logits(self.model.lm_head(self._final_norm(hidden)), b)
        e = mean_pool(hidden, b["attention_mask"])
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

    def _reference_kl(self) -> List[_KLRef]:
        """Per batch: the fp32 distributions, logsumexp, normed hidden state and p @ W_head (once)."""
        if self._kl_ref is None:
            if self._inputs is None:
                self._cache_inputs()
            head = self.model.lm_head
            W = head.weight.detach()
            refs = []
            with torch.inference_mode():
                for h in self._inputs[-1]:
                    hn = self._final_norm(h).float()
                    z = head(hn).float()
                    lse = torch.logsumexp(z, -1)
                    p = torch.exp(z.sub_(lse.unsqueeze(-1)))       # in place: one vocabulary-wide buffer
                    pw = (p.flatten(0, 1) @ W.float()).view(*hn.shape[:-1], -1)
                    refs.append(_KLRef(p, lse.double(), hn, pw, W.data_ptr()))
            dtype = self.kl_dtype or _fast_bf16(W.device)
            self._dz_weight = W.to(dtype) if dtype != W.dtype else W
            self._kl_ref = refs
        return self._kl_ref

    def _kl(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        """Mean per-token KL(p_fp32 || p) of batch ``i`` from the last block's output ``hidden``.

        With dz = z - z_ref = W (h - h_ref) (the bias cancels) and m = E_p[dz]:
        KL = log E_p[exp(dz)] - E_p[dz] = log1p(E_p[expm1(dz - m)]). Every term is small and
        computed directly (no difference of two logsumexps of size ~10), so a KL of 1e-7 nats is
        still resolved in fp32; E_p[expm1(x)] >= E_p[x] = 0 keeps it >= 0 up to rounding."""
        ref = self._reference_kl()[i]
        head = self.model.lm_head
        if head.weight.data_ptr() != ref.weight_ptr:  # the head is never a search candidate (DEFAULT_SKIP)
            raise RuntimeError("the output head's weights changed after the fp32 reference was taken; "
                               "the KL objective scores changes to the repeated blocks only")
        dh = self._final_norm(hidden).float() - ref.hidden
        Wd = self._dz_weight
        if Wd.dtype == torch.float32:
            dz = F.linear(dh, Wd)
            m = (dh * ref.pw).sum(-1)
        else:  # m from these very dz: E_p[dz - m] = 0 holds exactly, the result is the KL of z_ref + dz
            dz = F.linear(dh.to(Wd.dtype), Wd).float()
            m = torch.linalg.vecdot(dz, ref.p)
        dz.sub_(m.unsqueeze(-1)).expm1_()
        kl = torch.log1p(torch.linalg.vecdot(dz, ref.p).double())
        bad = ~torch.isfinite(kl)
        if bad.any():  # exp overflowed (a change of tens of nats): the logsumexp form is exact enough there
            z = F.linear(ref.hidden[bad] + dh[bad], head.weight.float(),
                         None if head.bias is None else head.bias.float())
            m32 = (dh[bad] * ref.pw[bad]).sum(-1)
            kl[bad] = torch.logsumexp(z, -1).double() - ref.lse[bad] - m32.double()
        return kl.mean()

    def increase_with(self, layers: Dict[str, nn.Linear], weights: Dict[str, torch.Tensor]) -> float:
        """How much the model's output moves away from the fp32 model with the named layers' weights
        replaced: the mean per-token KL(p_fp32 || p) in nats for causal LMs (whose expectation is the
        expected cross-entropy increase), the objective itself (a distance to the fp32 self) for
        encoders. Re-runs only the blocks from the first one touched. A rounding residue below zero
        (a change too small to see in fp32) is returned as 0."""
        if self.kind != "causal_lm":
            return self.loss_with(layers, weights) - self.base_value()
        if self._inputs is None:
            self._cache_inputs()
        self._reference_kl()
        return max(self._replayed(layers, weights, self._kl), 0.0)

    def base_value(self) -> float:
        """The objective of the unchanged model (cached): what :meth:`increase_with` is relative to."""
        if self._base is None:
            self._base = self.loss()
        return self._base

    def loss_with(self, layers: Dict[str, nn.Linear], weights: Dict[str, torch.Tensor]) -> float:
        """Loss with the named layers' weights replaced, re-running only the blocks from the first
        one touched. The cache holds the fp32 model's block inputs."""
        if self._inputs is None:
            self._cache_inputs()
        return self._replayed(layers, weights, self._head)

    def _replayed(self, layers, weights, score) -> float:
        """Mean over batches of ``score(last hidden state, batch index)`` with the weights swapped in,
        re-running the blocks from the first one touched."""
        start = min((self.block_of(n) for n in weights), default=len(self.blocks))
        total = 0.0
        with torch.inference_mode(), swapped(layers, weights):
            for i, (cap, h) in enumerate(zip(self._caps, self._inputs[start])):
                for block in self.blocks[start:]:
                    h = run_block(block, cap, h)
                total += float(score(h, i))
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
