"""Build a model with a per-layer choice of specs (real quantization, RTN or GPTQ) and measure the
task metric on held-out data: relative perplexity increase (causal LM) or 1 - cosine / 1 - Spearman
against the fp32 embeddings (encoder)."""
from __future__ import annotations

import copy
import time
from typing import Dict, Optional

import torch
from torch import nn

from ..quant.plan import Plan
from .objective import swapped
from .sensitivity import rtn_weight

METRICS = {"causal_lm": ("perplexity",), "encoder": ("cosine", "spearman")}


class MetricEvaluator:
    """Measures ``loss(choice)``: the metric's loss relative to the fp32 model, where choice maps
    layer name -> spec string. Perplexity: ppl / ppl_fp32 - 1; cosine: 1 - mean cosine to the fp32
    embeddings; spearman: 1 - Spearman of pairwise similarities."""

    def __init__(self, loaded, layers: Dict[str, nn.Linear], metric: Optional[str] = None, method: str = "rtn",
                 eval_tokens: int = 4096, context: int = 512, sentences: int = 128, gptq_batches=None,
                 baseline: Optional[dict] = None, input_power: Optional[dict] = None):
        kind = loaded.kind
        metric = metric or METRICS[kind][0]
        metric = {"ppl": "perplexity", "cos": "cosine"}.get(metric, metric)
        if metric not in METRICS[kind]:
            raise ValueError(f"metric {metric!r} does not apply to a {kind}; accepted: {', '.join(METRICS[kind])}")
        if method not in ("rtn", "gptq"):
            raise ValueError(f"method must be rtn or gptq, got {method!r}")
        self.loaded, self.layers, self.metric, self.method = loaded, layers, metric, method
        self.kind = kind
        self.gptq_batches = gptq_batches or []
        if kind == "causal_lm":
            from ..data.corpus import evaluation_tokens

            self.tokens = evaluation_tokens(loaded.tokenizer, eval_tokens)
            self.context = context
            self.settings = {"metric": "perplexity", "eval_tokens": int(self.tokens.numel()), "context": context}
        else:
            from ..data.corpus import evaluation_sentences
            from ..evaluate.embedding import embed

            self.sentences = evaluation_sentences(sentences)
            self.ref = embed(loaded.model, loaded.tokenizer, self.sentences)
            self.settings = {"metric": metric, "sentences": len(self.sentences)}
        self.baseline = baseline  # the fp32 model's metrics; see measure_baseline
        self.input_power = input_power or {}  # retention candidates' saliency (search.retained)

    def measure_baseline(self) -> dict:
        self.baseline = self._raw(self.loaded.model)
        return self.baseline

    def _raw(self, model: nn.Module) -> dict:
        if self.kind == "causal_lm":
            from ..evaluate import perplexity

            return {"perplexity": float(perplexity(model, self.tokens, context=self.context))}
        from ..evaluate.embedding import embedding_fidelity

        fid = embedding_fidelity(self.ref, model, self.loaded.tokenizer, self.sentences)
        return {"cosine_mean": fid["cosine_mean"], "cosine_min": fid["cosine_min"], "spearman": fid["spearman"]}

    def loss_of(self, raw: dict) -> float:
        if self.metric == "perplexity":
            return raw["perplexity"] / self.baseline["perplexity"] - 1.0
        if self.metric == "cosine":
            return 1.0 - raw["cosine_mean"]
        return 1.0 - raw["spearman"]

    def measure(self, choice: Dict[str, str]) -> dict:
        """Quantize the named layers as chosen, measure, restore; returns metrics and 'loss'."""
        t = time.time()
        if self.method == "rtn":
            weights = {n: rtn_weight(self.layers[n].weight, s, self.input_power.get(n)) for n, s in choice.items()}
            with swapped(self.layers, weights):
                raw = self._raw(self.loaded.model)
        else:
            from ..ptq.pipeline import quantize_model

            model = copy.deepcopy(self.loaded.model)
            quantize_model(model, Plan(dict(choice)), self.gptq_batches, "gptq", progress=False)
            raw = self._raw(model)
            del model
        return {**raw, "loss": self.loss_of(raw), "seconds": time.time() - t}
