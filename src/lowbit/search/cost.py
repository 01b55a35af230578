"""What a candidate costs on a layer, under one of four cost models:

* ``bits``: true storage bits (codes + scales + zero points, from WeightQuantizer.bits_per_weight)
  times the layer's weights; a budget is then given as average bits per weight;
* ``bytes``: the same in bytes; a budget is total bytes of the quantized layers;
* ``bops``: bit operations per token, MACs x weight bits x activation bits (16 by default);
* a latency table (JSON file): ``{"int4:g64": 1.2, ...}`` seconds (or any unit) per million
  weights, optionally ``{"layers": {"model.layers.0.mlp.up_proj": {"int4:g64": 0.03}}}`` measured
  per layer; a candidate the table does not price is dropped with a note.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import retained
from .candidates import LayerCandidates

COST_MODELS = ("bits", "bytes", "bops")


def true_bits(spec: str, shape: tuple) -> float:
    """Storage bits per weight of ``spec`` on a (rows, cols) weight (retained weights included)."""
    return retained.bits_per_weight(spec, shape)


@dataclass
class CostModel:
    kind: str = "bits"                 # bits | bytes | bops | latency
    act_bits: int = 16                 # bops: width of the (unquantized) activations
    table: Optional[dict] = None       # latency: spec -> per-million-weights, plus optional "layers"
    source: Optional[str] = None

    @classmethod
    def parse(cls, text: str, act_bits: int = 16) -> "CostModel":
        """'bits', 'bytes', 'bops' or a path to a latency-table JSON."""
        if text in COST_MODELS:
            return cls(text, act_bits)
        p = Path(text)
        if not p.is_file():
            raise ValueError(f"cost model must be one of {', '.join(COST_MODELS)} or a latency-table JSON file; "
                             f"{text!r} is neither")
        try:
            table = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"latency table {p} is not valid JSON: {e}") from None
        if not isinstance(table, dict):
            raise ValueError(f"latency table {p} must be a JSON object mapping spec -> cost per million weights")
        norm = {retained.canonical(k): float(v) for k, v in table.items() if k != "layers"}
        layers = {n: {retained.canonical(k): float(v) for k, v in d.items()}
                  for n, d in table.get("layers", {}).items()}
        return cls("latency", act_bits, {"specs": norm, "layers": layers}, str(p))

    def cost(self, spec: str, name: str, shape: tuple) -> Optional[float]:
        """Cost of ``spec`` on the layer; None if the model cannot price it."""
        n = shape[0] * shape[1]
        if self.kind == "bits":
            return true_bits(spec, shape) * n
        if self.kind == "bytes":
            return true_bits(spec, shape) * n / 8
        if self.kind == "bops":
            return true_bits(spec, shape) * self.act_bits * n
        per_layer = self.table["layers"].get(name, {})
        if spec in per_layer:
            return per_layer[spec]
        if spec in self.table["specs"]:
            return self.table["specs"][spec] * n / 1e6
        return None

    def unit(self) -> str:
        return {"bits": "bits/weight", "bytes": "bytes", "bops": "BOPs/token"}.get(self.kind, "latency")

    def budget_total(self, budget: float, cands: List[LayerCandidates]) -> float:
        """A user budget in this model's unit -> a total over layers (bits: average bits/weight)."""
        if self.kind == "bits":
            return budget * sum(c.numel for c in cands)
        return budget

    def per_unit(self, total: float, cands: List[LayerCandidates]) -> float:
        if self.kind == "bits":
            return total / sum(c.numel for c in cands)
        return total


def cost_matrix(cands: List[LayerCandidates], model: CostModel) -> List[np.ndarray]:
    """One cost vector per layer over its candidates; candidates the model cannot price are
    dropped from ``cands`` (in place) with a note."""
    out = []
    for c in cands:
        keep, costs = [], []
        for s in c.specs:
            v = model.cost(s, c.name, c.shape)
            if v is None:
                c.dropped[s] = f"the latency table {model.source} has no cost for it"
            else:
                keep.append(s)
                costs.append(v)
        if not keep:
            raise ValueError(f"no candidate of {c.name} has a cost in {model.source}")
        c.specs = keep
        out.append(np.asarray(costs, dtype=float))
    return out


def bits_per_weight(choice: Dict[str, str], cands: List[LayerCandidates]) -> float:
    """True average bits per weight of a per-layer choice over the layers it names."""
    n = b = 0.0
    for c in cands:
        if c.name in choice:
            n += c.numel
            b += true_bits(choice[c.name], c.shape) * c.numel
    return b / n if n else 16.0
