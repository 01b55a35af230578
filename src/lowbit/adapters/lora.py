"""LoRA on a frozen (quantized or float) base: ``y = base(x) + (alpha / r) * B A x`` with the
adapter matrices ``A`` (r x in) and ``B`` (out x r) trained, optionally under a low-precision
:class:`~.adapter_quant.AdapterFormat`, and the base left exactly as it was.

Which linears get an adapter, and at which rank and alpha, is a list of glob rules over module
names, like a plan's: ``"*q_proj=16:32"`` (rank 16, alpha 32), ``"*proj"`` (the defaults); the last
rule that matches a layer wins, and a plain ``"*"`` skips ``lm_head`` and embeddings as plans do.
"""
from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import replace_module
from ..quant.plan import DEFAULT_SKIP
from .adapter_quant import AdapterFormat

DEFAULT_RANK = 16
DEFAULT_ALPHA = 32.0


@dataclass(frozen=True)
class TargetRule:
    pattern: str
    rank: int
    alpha: float

    def __str__(self) -> str:
        return f"{self.pattern}={self.rank}:{self.alpha:g}"


def parse_targets(rules: Sequence[str], rank: int = DEFAULT_RANK, alpha: Optional[float] = None) -> List[TargetRule]:
    """``["*q_proj=8:16", "*v_proj"]`` -> rules (rank and alpha default to ``rank`` and ``alpha``,
    itself 2 x rank when None)."""
    if isinstance(rules, str):
        rules = [r for r in rules.split(",") if r.strip()]
    out = []
    for text in rules:
        pat, _, rest = str(text).strip().partition("=")
        r, a = rank, alpha
        if rest:
            r_s, _, a_s = rest.partition(":")
            try:
                r = int(r_s)
                a = float(a_s) if a_s else None
            except ValueError:
                raise ValueError(f"adapter target {text!r}: expected PATTERN, PATTERN=RANK or PATTERN=RANK:ALPHA "
                                 "(e.g. '*q_proj=16:32')") from None
        if not pat or isinstance(r, bool) or r < 1:
            raise ValueError(f"adapter target {text!r}: needs a glob pattern and a rank >= 1")
        out.append(TargetRule(pat, r, float(a) if a is not None else 2.0 * r))
    if not out:
        raise ValueError("no adapter targets given; e.g. '*q_proj,*v_proj' or '*' (every linear but lm_head)")
    return out


def rule_for(name: str, rules: Sequence[TargetRule]) -> Optional[TargetRule]:
    """The last rule matching ``name``; a bare ``*`` never picks ``lm_head`` or embeddings."""
    picked = None
    for rule in rules:
        if fnmatch.fnmatchcase(name, rule.pattern):
            if rule.pattern == "*" and any(fnmatch.fnmatchcase(name, p) or name.endswith(p) for p in DEFAULT_SKIP):
                continue
            picked = rule
    return picked


class LoRALinear(nn.Module):
    """A frozen ``base`` linear plus a rank-``rank`` update ``(alpha/rank) * B A`` whose matrices are
    stored (and, in training, fake-quantized) in ``fmt``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, fmt: Optional[AdapterFormat] = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.fmt = fmt or AdapterFormat.parse(None)
        dev = next(itertools.chain(base.parameters(), base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default: B = 0, so the start is the base
        # a loaded adapter: the stored matrices as they are (fixed_A/B) and their packed tensors (``stored``)
        self.register_buffer("fixed_A", None, persistent=False)
        self.register_buffer("fixed_B", None, persistent=False)
        self.stored: Optional[Dict[str, torch.Tensor]] = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def adapter_matrices(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the forward uses them: quantized per rank component (rows of A, columns of B)."""
        if self.fixed_A is not None:
            return self.fixed_A, self.fixed_B
        a = self.fmt.fake(self.lora_A)
        b = self.fmt.fake(self.lora_B.t()).t()
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.adapter_matrices()
        upd = F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling
        return y + upd.to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, adapter={self.fmt.name}"


def linear_targets(model: nn.Module, rules: Sequence[TargetRule]) -> Dict[str, TargetRule]:
    """Layer name -> its rule, for every ``nn.Linear`` a rule matches."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            rule = rule_for(name, rules)
            if rule is not None:
                out[name] = rule
    return out


def add_lora(model: nn.Module, rules: Sequence[TargetRule], fmt: Optional[AdapterFormat] = None,
             seed: int = 0) -> Dict[str, LoRALinear]:
    """Freeze ``model`` and wrap every targeted linear in a :class:`LoRALinear` (in place); the
    initial A matrices are drawn from ``seed``. Returns the new layers by name."""
    if lora_layers(model):
        raise ValueError("this model already carries LoRA adapters; remove them (remove_lora) before adding others")
    targets = linear_targets(model, rules)
    if not targets:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]
        raise ValueError(f"no linear layer matches the adapter targets {[str(r) for r in rules]}; "
                         f"layers look like {names}")
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        made = {}
        for name, rule in targets.items():
            layer = LoRALinear(model.get_submodule(name), rule.rank, rule.alpha, fmt)
            replace_module(model, name, layer)
            made[name] = layer
    finally:
        torch.random.set_rng_state(gen_state)
    return made


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model: nn.Module) -> nn.Module:
    """Put every base layer back (the adapters are dropped); swapping adapters is remove + load."""
    for name, layer in lora_layers(model).items():
        replace_module(model, name, layer.base)
    return model
