"""Plan: which QuantSpec each linear layer of a model gets, for its weight and its input.

Rules are glob patterns over module names, applied in order; a later rule overrides an earlier one,
and a rule with spec ``None`` leaves matching layers in full precision::

    Plan(weight={"*": "int4:g64", "*.mlp.down_proj": "int8"}, act={"*": "int8:token"})

KV-cache rules (``kv``) match ``<attention module>.key`` and ``<attention module>.value``, e.g.
``kv={"*": "int4:token:asym", "*.key": "int4:channel:asym"}`` (see ``lowbit.quant.kv``).
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from .kv import check_kv_spec, kv_scheme_rules, split_kv_scheme
from .spec import QuantSpec, scheme

# The MLP's down projection (FC2): Llama-style decoders, BERT-style encoders (not attention.output)
FC2 = ("*.mlp.down_proj", "*.layer.?.output.dense", "*.layer.??.output.dense")

# Named schemes that need more than one rule. The QAT scaling-law work found FC2's inputs carry the
# outliers that dominate W4A4 error; 8-bit FC2 inputs remove most of it. w16a4 / w4a16 split W4A4's
# error into its activation and weight parts.
PLAN_SCHEMES = {
    "w4a4-fc2a8": {"weight": {"*": "int4:g64"}, "act": {"*": "int4:token", **{p: "int8:token" for p in FC2}}},
    "w16a4": {"act": {"*": "int4:token"}},
    "w16a4-fc2a8": {"act": {"*": "int4:token", **{p: "int8:token" for p in FC2}}},
    "w4a16": {"weight": {"*": "int4:g64"}},
}

# Never quantized unless a rule names them explicitly: the output head and embeddings.
DEFAULT_SKIP = ("lm_head", "*embed*")


@dataclass
class Plan:
    weight: Dict[str, Optional[str]] = field(default_factory=dict)
    act: Dict[str, Optional[str]] = field(default_factory=dict)
    name: Optional[str] = None
    kv: Dict[str, Optional[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rules in (self.weight, self.act):
            for pat, spec in rules.items():
                if spec is not None:
                    rules[pat] = str(QuantSpec.parse(spec))
                    if rules[pat].split(":")[1:2] == ["head"]:
                        raise ValueError(f"rule {pat!r}: granularity 'head' applies to KV states only")
        for pat, spec in self.kv.items():
            if spec is not None:
                self.kv[pat] = str(check_kv_spec(QuantSpec.parse(spec)))

    @classmethod
    def from_scheme(cls, name: str) -> "Plan":
        base, kv = split_kv_scheme(name)
        if base.strip().lower() in PLAN_SCHEMES:
            rules = PLAN_SCHEMES[base.strip().lower()]
            return cls(dict(rules.get("weight", {})), dict(rules.get("act", {})), name=name,
                       kv=kv_scheme_rules(kv) if kv else {})
        w, a = scheme(base) if base.strip() else (None, None)
        return cls({"*": str(w)} if w else {}, {"*": str(a)} if a else {}, name=name,
                   kv=kv_scheme_rules(kv) if kv else {})

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

    def kv_spec(self, attention: str, which: str) -> Optional[QuantSpec]:
        """Spec of the key (``which="key"``) or value states of the attention module ``attention``."""
        spec = None
        for pat, s in self.kv.items():
            if fnmatch.fnmatchcase(f"{attention}.{which}", pat):
                spec = s
        return QuantSpec.parse(spec) if spec else None

    def describe(self) -> str:
        if self.name:
            return self.name
        w = ", ".join(f"{k}={v}" for k, v in self.weight.items())
        a = ", ".join(f"{k}={v}" for k, v in self.act.items())
        kv = ", ".join(f"{k}={v}" for k, v in self.kv.items())
        return f"weights[{w}]" + (f" inputs[{a}]" if a else "") + (f" kv[{kv}]" if kv else "")

    def to_dict(self) -> dict:
        d = {"name": self.name, "weight": dict(self.weight), "act": dict(self.act)}
        if self.kv:
            d["kv"] = dict(self.kv)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if "layers" in d:  # the output of `lowbit search`: one spec per layer name
            layers = d["layers"]
            weight = {k: (v if isinstance(v, str) or v is None else v.get("weight")) for k, v in layers.items()}
            act = {k: v.get("act") for k, v in layers.items() if isinstance(v, dict) and v.get("act")}
            return cls(weight, act, name=d.get("name", "plan"))
        unknown = set(d) - {"name", "weight", "act", "kv"}
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)}; accepted: name, weight, act, kv, or layers")
        return cls(dict(d.get("weight", {})), dict(d.get("act", {})), name=d.get("name"), kv=dict(d.get("kv", {})))

    @classmethod
    def load(cls, path) -> "Plan":
        """The plan in a JSON file (this class's ``to_dict`` form, or ``layers`` as `lowbit search`
        writes it); a malformed file raises ValueError naming the file and the entry."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"plan file {p} does not exist")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"plan file {p} is not valid JSON: {e}") from None
        check_plan_dict(d, f"plan file {p}")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"plan file {p}: {e}") from None


def _spec_entry(where: str, entry: str, v) -> None:
    if v is None:
        return
    if not isinstance(v, str):
        raise ValueError(f"{where}: {entry}: expected a quant spec string such as 'int4:g64' or null, "
                         f"found {type(v).__name__} {v!r}")
    try:
        QuantSpec.parse(v)
    except ValueError as e:
        raise ValueError(f"{where}: {entry}: {v!r} is not a valid quant spec ({e})") from None


def _rules(where: str, key: str, rules) -> None:
    if not isinstance(rules, dict):
        raise ValueError(f"{where}: {key}: expected an object of pattern -> spec, found {type(rules).__name__}")
    for pat, spec in rules.items():
        _spec_entry(where, f"{key}[{pat!r}]", spec)


def check_plan_dict(d, where: str) -> None:
    """Types and specs of a parsed plan file, before a Plan is built from it (``where`` names the file)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object with weight/act/kv rules or layers, found "
                         f"{type(d).__name__}")
    if d.get("name") is not None and not isinstance(d["name"], str):
        raise ValueError(f"{where}: name: expected a string, found {type(d['name']).__name__}")
    if "layers" not in d:
        unknown = sorted(set(d) - {"name", "weight", "act", "kv"})
        if unknown:
            raise ValueError(f"{where}: unknown plan keys {unknown}; accepted: name, weight, act, kv, or layers")
        for key in ("weight", "act", "kv"):
            if key in d:
                _rules(where, key, d[key])
        return
    layers = d["layers"]
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: layers: expected an object of layer -> spec, found {type(layers).__name__}")
    for name, v in layers.items():
        entry = f"layers[{name!r}]"
        if isinstance(v, dict):  # {"weight": spec, "act": spec} (a lowbit.json entry also reads)
            unknown = sorted(set(v) - {"weight", "act", "shape", "retain"})
            if unknown:
                raise ValueError(f"{where}: {entry}: unknown keys {unknown}; accepted: weight, act")
            _spec_entry(where, f"{entry}.weight", v.get("weight"))
            _spec_entry(where, f"{entry}.act", v.get("act"))
        else:
            _spec_entry(where, entry, v)
    retain = d.get("retain")
    if retain is not None:
        if not isinstance(retain, dict) or not isinstance(retain.get("format"), str) \
                or not isinstance(retain.get("ratios"), dict):
            raise ValueError(f"{where}: retain: expected an object with format (a string) and ratios (layer -> "
                             f"kept fraction), found {retain!r:.80}")
        for name, r in retain["ratios"].items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ValueError(f"{where}: retain.ratios[{name!r}]: expected a fraction in [0, 1), found {r!r}")


def as_plan(scheme_or_plan) -> Plan:
    """A Plan from a scheme string (a named scheme or ``WEIGHT_SPEC[+ACT_SPEC][kv...]``), a plan dict
    (the ``to_dict`` form, or ``layers`` as `lowbit search` writes it) or a Plan."""
    if isinstance(scheme_or_plan, Plan):
        return scheme_or_plan
    if isinstance(scheme_or_plan, dict):
        return Plan.from_dict(scheme_or_plan)
    if not isinstance(scheme_or_plan, str):
        raise ValueError(f"expected a scheme string (e.g. 'w4g64', 'int4:g64+int8:token'), a plan dict or a lowbit "
                         f"Plan, got {type(scheme_or_plan).__name__}")
    if not scheme_or_plan.strip():
        raise ValueError("the scheme is empty; give one such as 'w4g64', 'nvfp4' or 'int4:g64+int8:token'")
    return Plan.from_scheme(scheme_or_plan)
