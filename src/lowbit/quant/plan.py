"""Plan: which QuantSpec each linear layer of a model gets, for its weight and its input.

Rules are glob patterns over module names, applied in order; a later rule overrides an earlier one,
and a rule with spec ``None`` leaves matching layers in full precision::

    Plan(weight={"*": "int4:g64", "*.mlp.down_proj": "int8"}, act={"*": "int8:token"})
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from .spec import QuantSpec, scheme

# Never quantized unless a rule names them explicitly: the output head and embeddings.
DEFAULT_SKIP = ("lm_head", "*embed*")


@dataclass
class Plan:
    weight: Dict[str, Optional[str]] = field(default_factory=dict)
    act: Dict[str, Optional[str]] = field(default_factory=dict)
    name: Optional[str] = None

    def __post_init__(self) -> None:
        for rules in (self.weight, self.act):
            for pat, spec in rules.items():
                if spec is not None:
                    rules[pat] = str(QuantSpec.parse(spec))

    @classmethod
    def from_scheme(cls, name: str) -> "Plan":
        w, a = scheme(name)
        return cls({"*": str(w)}, {"*": str(a)} if a else {}, name=name)

    @staticmethod
    def _lookup(rules: Dict[str, Optional[str]], layer: str) -> Optional[QuantSpec]:
        spec = None
        explicit = False
        for pat, s in rules.items():
            if fnmatch.fnmatchcase(layer, pat):
                spec = s
                explicit = pat == layer or pat != "*"
        if not explicit and any(fnmatch.fnmatchcase(layer, p) or layer.endswith(p) for p in DEFAULT_SKIP):
            return None
        return QuantSpec.parse(spec) if spec else None

    def weight_spec(self, layer: str) -> Optional[QuantSpec]:
        return self._lookup(self.weight, layer)

    def act_spec(self, layer: str) -> Optional[QuantSpec]:
        return self._lookup(self.act, layer)

    def describe(self) -> str:
        if self.name:
            return self.name
        w = ", ".join(f"{k}={v}" for k, v in self.weight.items())
        a = ", ".join(f"{k}={v}" for k, v in self.act.items())
        return f"weights[{w}]" + (f" inputs[{a}]" if a else "")

    def to_dict(self) -> dict:
        return {"name": self.name, "weight": dict(self.weight), "act": dict(self.act)}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if "layers" in d:  # the output of `lowbit search`: one spec per layer name
            layers = d["layers"]
            weight = {k: (v if isinstance(v, str) or v is None else v.get("weight")) for k, v in layers.items()}
            act = {k: v.get("act") for k, v in layers.items() if isinstance(v, dict) and v.get("act")}
            return cls(weight, act, name=d.get("name", "plan"))
        unknown = set(d) - {"name", "weight", "act"}
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)}; accepted: name, weight, act, or layers")
        return cls(dict(d.get("weight", {})), dict(d.get("act", {})), name=d.get("name"))

    @classmethod
    def load(cls, path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"plan file {p} does not exist")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"plan file {p} is not valid JSON: {e}") from None
