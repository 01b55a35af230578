"""Which QuantSpecs each quantizable layer may take. A candidate that cannot apply to a layer (a
block format whose block does not divide the layer's input width) is dropped with a note."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from torch import nn

from ..quant.plan import DEFAULT_SKIP, Plan
from ..quant.spec import QuantSpec
from ..quant.weight import WeightQuantizer
from .retained import base_spec, canonical

#: INT at two group sizes and widths, FP4 (plain, MX, NV) and 8-bit: ten candidates.
DEFAULT_CANDIDATES = ("int2:g64", "int3:g64", "int3:g128", "int4:g64", "int4:g128",
                      "e2m1fn:g32", "mxfp4", "nvfp4", "int8:g128", "e4m3fn:channel")
#: The integer subset of the default, for INT-only searches.
INT_CANDIDATES = ("int2:g64", "int3:g64", "int3:g128", "int4:g64", "int4:g128", "int8:g128")

CANDIDATE_SETS = {"default": DEFAULT_CANDIDATES, "int": INT_CANDIDATES}


@dataclass
class LayerCandidates:
    """One quantizable linear layer: its name, weight shape and the specs it may take."""
    name: str
    shape: tuple
    specs: List[str]
    dropped: Dict[str, str] = field(default_factory=dict)  # spec -> why it cannot apply

    @property
    def numel(self) -> int:
        return int(self.shape[0] * self.shape[1])


def parse_candidates(specs) -> List[str]:
    """Canonical spec strings from a name in CANDIDATE_SETS, a comma-separated string or a list."""
    if isinstance(specs, str):
        specs = CANDIDATE_SETS.get(specs.strip().lower(), specs.split(","))
    out: List[str] = []
    for s in specs:
        try:
            c = canonical(s)
        except ValueError as e:
            raise ValueError(f"bad candidate {s!r}: {e}") from None
        if c not in out:
            out.append(c)
    if not out:
        raise ValueError(f"no candidates given; accepted: {', '.join(CANDIDATE_SETS)} or specs like int4:g64,mxfp4")
    return out


def quantizable_layers(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> Dict[str, nn.Linear]:
    """Every nn.Linear of the model inside its repeated blocks, minus the default skips (lm_head,
    embeddings): the layers `lowbit quantize` would touch."""
    from ..models.blocks import find_blocks, linear_layers

    path, blocks = find_blocks(model)
    probe = Plan({"*": "int8"})
    out = {}
    for i, block in enumerate(blocks):
        for name, lin in linear_layers(block, f"{path}.{i}").items():
            if probe.weight_spec(name) is not None:
                out[name] = lin
    if not out:
        raise ValueError(f"{type(model).__name__} has no quantizable linear layers in its blocks")
    return out


def layer_candidates(layers: Dict[str, nn.Linear], specs: Sequence[str]) -> List[LayerCandidates]:
    """The candidates that apply to each layer; a layer left with none is an error naming it."""
    out = []
    for name, lin in layers.items():
        shape = tuple(lin.weight.shape)
        ok, dropped = [], {}
        for s in specs:
            why = WeightQuantizer(QuantSpec.parse(base_spec(s))).check(shape)
            if why:
                dropped[s] = why
            else:
                ok.append(s)
        if not ok:
            raise ValueError(f"no candidate applies to {name} {shape}: " + "; ".join(f"{k}: {v}" for k, v in dropped.items()))
        out.append(LayerCandidates(name, shape, ok, dropped))
    return out


def dropped_notes(cands: List[LayerCandidates]) -> List[str]:
    return [f"{c.name}: {s} dropped ({why})" for c in cands for s, why in c.dropped.items()]


def union_specs(cands: List[LayerCandidates]) -> List[str]:
    seen: List[str] = []
    for c in cands:
        seen += [s for s in c.specs if s not in seen]
    return seen


def spec_index(cands: List[LayerCandidates], layer: int, spec: str) -> Optional[int]:
    specs = cands[layer].specs
    return specs.index(spec) if spec in specs else None


def restrict(cands: List[LayerCandidates], costs, specs: Sequence[str]):
    """The candidates (and their cost vectors) limited to ``specs``; layers keep at least one."""
    keep = set(parse_candidates(list(specs)))
    out_c, out_k = [], []
    for c, k in zip(cands, costs):
        idx = [i for i, s in enumerate(c.specs) if s in keep]
        if not idx:
            raise ValueError(f"{c.name} has none of the candidates {sorted(keep)}")
        out_c.append(LayerCandidates(c.name, c.shape, [c.specs[i] for i in idx], dict(c.dropped)))
        out_k.append(k[idx])
    return out_c, out_k
