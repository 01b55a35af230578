"""Model surgery: swap a model's ``nn.Linear`` layers for ``LowpLinear`` by glob rules over module
names, as a quantization plan selects layers. Later rules override earlier ones; a rule whose
recipe is None (or ``"bf16"``) keeps matching layers in full precision. The output head and the
embeddings stay unquantized unless a rule names them (not ``*``)."""
from __future__ import annotations

import fnmatch
from typing import Dict, List, Optional, Union

from torch import nn

from ..quant.plan import DEFAULT_SKIP
from .linear import LowpLinear
from .recipe import LowpRecipe, parse_recipe

Rules = Union[str, LowpRecipe, Dict[str, Optional[Union[str, LowpRecipe]]]]


def _as_rules(rules: Rules, block: int, backend: str, grad_rounding: Optional[str]) -> Dict[str, Optional[LowpRecipe]]:
    if isinstance(rules, (str, LowpRecipe)):
        rules = {"*": rules}
    if not isinstance(rules, dict) or not rules:
        raise TypeError(f"rules must be a recipe ('fp8:2') or a dict of glob pattern -> recipe, got {rules!r}")
    out = {}
    for pat, r in rules.items():
        if not isinstance(pat, str):
            raise TypeError(f"rule patterns are glob strings over module names, got {pat!r}")
        out[pat] = None if r is None else parse_recipe(r, block=block, backend=backend, grad_rounding=grad_rounding)
    return out


def recipe_for(name: str, rules: Dict[str, Optional[LowpRecipe]]) -> Optional[LowpRecipe]:
    """The recipe of the layer ``name`` under ``rules`` (None: full precision)."""
    recipe, explicit = None, False
    for pat, r in rules.items():
        if fnmatch.fnmatchcase(name, pat):
            recipe, explicit = r, pat != "*"
    if not explicit and any(fnmatch.fnmatchcase(name, p) or name.endswith(p) for p in DEFAULT_SKIP):
        return None
    return recipe


def prepare_lowp(model: nn.Module, rules: Rules, *, block: int = 256, backend: str = "auto",
                 grad_rounding: Optional[str] = None) -> List[str]:
    """Replace every ``nn.Linear`` of ``model`` that ``rules`` select by a ``LowpLinear`` sharing its
    parameters, in place; returns the names of the replaced layers. ``block``, ``backend`` and
    ``grad_rounding`` apply to recipes given as text."""
    table = _as_rules(rules, block, backend, grad_rounding)
    swaps = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            r = recipe_for(name, table)
            if r is not None:
                swaps.append((name, r))
    if not swaps:
        raise ValueError(f"no nn.Linear of the model matches the rules {list(table)}; module names look like "
                         f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]}")
    for name, r in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowpLinear.from_linear(getattr(parent, child), r))
    return [n for n, _ in swaps]


def set_lowp(model: nn.Module, enabled: bool) -> int:
    """Turn the low-precision matmuls of every LowpLinear on or off (off: plain ``F.linear`` on the
    master weights); returns how many layers were switched."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, LowpLinear):
            mod.lowp = bool(enabled)
            n += 1
    return n
