"""KV-cache quantization on Hugging Face attention modules (transformers 5.x).

Where it hooks: transformers' attention modules (Llama/Mistral/Qwen2's ``*Attention``, BERT's
``BertSelfAttention`` ...) compute q/k/v, apply RoPE to q and k, update the cache, and then call the
function registered in ``AttentionInterface`` under ``config._attn_implementation`` as
``fn(module, query, key, value, mask, ...)``. lowbit registers a wrapper ``lowbit_kv_<inner>`` (with
the inner implementation's mask function) that fake-quantizes ``key`` and ``value`` (batch, kv_heads,
tokens, head_dim) with the module's specs and calls the inner implementation (sdpa, eager, ...).

So what is quantized is exactly what attention reads from the cache: keys after RoPE, values, before
grouped-query heads are repeated. Token-local granularities (token, gN, block formats) give the same
values as quantizing each token once as it enters the cache; per-channel / per-head / per-tensor
scales are taken over the tokens present at that call (the whole window in a prefill or perplexity
pass; during generation the cache keeps full precision and is re-quantized at each step, which is
what a KIVI-style cache with a full-precision residual approaches, not a bit-exact model of it).

BERT-style encoders have no cache, but their K/V are the same tensors: they are quantized the same
way, at the same place (after the projections, before attention).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

from ..quant.kv import quantize_kv
from ..quant.plan import Plan
from ..quant.spec import QuantSpec
from .loader import UnsupportedArchitectureError

PREFIX = "lowbit_kv_"


@dataclass(frozen=True)
class KVSpecs:
    key: Optional[QuantSpec]
    value: Optional[QuantSpec]


def _head_dim(m: nn.Module) -> Optional[int]:
    return getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)


def attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Attention modules that dispatch through transformers' AttentionInterface, by name."""
    out = {}
    for name, m in model.named_modules():
        has_kv = (isinstance(getattr(m, "k_proj", None), nn.Module) and isinstance(getattr(m, "v_proj", None), nn.Module)) \
            or (isinstance(getattr(m, "key", None), nn.Module) and isinstance(getattr(m, "value", None), nn.Module))
        if has_kv and hasattr(getattr(m, "config", None), "_attn_implementation") and _head_dim(m):
            out[name] = m
    return out


def _default_eager(module: nn.Module):
    """The model file's own eager attention (the default transformers falls back on)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _fake_kv(x, spec):
    """Quantized states; while training, with a straight-through gradient (the rounding has none)."""
    q = quantize_kv(x, spec)
    return x + (q - x).detach() if x.requires_grad else q


def _wrapper(inner: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def kv_attention(module, query, key, value, attention_mask, **kwargs):
        specs: Optional[KVSpecs] = getattr(module, "lowbit_kv", None)
        if specs is not None:
            if specs.key is not None:
                key = _fake_kv(key, specs.key)
            if specs.value is not None:
                value = _fake_kv(value, specs.value)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(inner, _default_eager(module))
        if fn is None:
            raise UnsupportedArchitectureError(f"no attention implementation {inner!r} for {type(module).__name__}")
        return fn(module, query, key, value, attention_mask, **kwargs)

    return kv_attention


def _register(inner: str) -> str:
    """Register ``lowbit_kv_<inner>`` (attention wrapper + the inner implementation's mask)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = PREFIX + inner
    if name not in ALL_ATTENTION_FUNCTIONS:
        if inner not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise UnsupportedArchitectureError(
                f"KV quantization wraps the attention implementation {inner!r}, which has no mask function; "
                f"supported: {', '.join(k for k in ALL_MASK_ATTENTION_FUNCTIONS if not k.startswith(PREFIX))}")
        AttentionInterface.register(name, _wrapper(inner))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _switch(configs) -> None:
    for cfg in configs:
        cur = cfg._attn_implementation or "eager"
        if not cur.startswith(PREFIX):
            cfg._attn_implementation = _register(cur)


def apply_kv_specs(model: nn.Module, specs: Dict[str, dict]) -> Dict[str, dict]:
    """Attach {attention module name: {"key": spec, "value": spec}} (as in ``lowbit.json``)."""
    mods = attention_modules(model)
    missing = sorted(set(specs) - set(mods))
    if missing:
        raise UnsupportedArchitectureError(
            f"KV specs name attention modules this model lacks: {missing[:3]}; it has {list(mods)[:3]} ...")
    for name, d in specs.items():
        k, v = (QuantSpec.parse(d[w]) if d.get(w) else None for w in ("key", "value"))
        mods[name].lowbit_kv = KVSpecs(k, v)
    _switch({id(mods[n].config): mods[n].config for n in specs}.values())
    return specs


def _fits(spec: Optional[QuantSpec], head_dim: int) -> Optional[str]:
    if spec is None:
        return None
    size = spec.group_size if spec.granularity in ("group", "block") else None
    if size and head_dim % size:
        return f"{spec} needs head_dim ({head_dim}) to be a multiple of {size}"
    return None


def apply_kv_plan(model: nn.Module, plan: Plan) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """Quantize the key/value states of every attention module the plan's ``kv`` rules name.

    Returns ({module: {"key", "value", "head_dim"}}, {module: why it was left in full precision})."""
    if not plan.kv:
        return {}, {}
    mods = attention_modules(model)
    if not mods:
        raise UnsupportedArchitectureError(
            f"found no attention module in {type(model).__name__} to quantize the KV cache of; supported: "
            "Hugging Face transformers models whose attention dispatches through AttentionInterface "
            "(Llama, Mistral, Qwen2, BERT, ...)")
    applied, skipped = {}, {}
    for name, m in mods.items():
        k, v = plan.kv_spec(name, "key"), plan.kv_spec(name, "value")
        why = _fits(k, _head_dim(m)) or _fits(v, _head_dim(m))
        if why:
            warnings.warn(f"{name} KV left in full precision: {why}", stacklevel=2)
            skipped[name] = why
            continue
        if k is None and v is None:
            continue
        applied[name] = {"key": str(k) if k else None, "value": str(v) if v else None}
    apply_kv_specs(model, applied)
    return applied, skipped


def remove_kv_quant(model: nn.Module) -> None:
    """Undo ``apply_kv_plan``: full-precision K/V, the original attention implementation."""
    for m in attention_modules(model).values():
        if hasattr(m, "lowbit_kv"):
            del m.lowbit_kv
        cur = m.config._attn_implementation or ""
        if cur.startswith(PREFIX):
            m.config._attn_implementation = cur[len(PREFIX):]
