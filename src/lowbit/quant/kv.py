"""Fake quantization of attention key and value states, shaped (batch, heads, tokens, head_dim) as
they are cached. Pure functions on tensors; the model surgery lives in ``lowbit.models.kv_cache``.

Granularity of a KV spec (scales are dynamic, computed from the tensor itself):

* ``token``   one scale per (batch, head, token) over head_dim: what is fixed once a token is cached;
* ``gN``      groups of N along head_dim within each (batch, head, token);
* block formats (mxfp4, nvfp4, ...) their own blocks along head_dim (NVFP4's tensor scale is taken
  over the whole tensor);
* ``channel`` one scale per (batch, head, channel) over the tokens: KIVI's per-channel keys, whose
  outlier channels a per-token scale handles badly;
* ``head``    one scale per (batch, head) over tokens and head_dim;
* ``tensor``  one scale for the whole tensor.

``asym`` (zero point, integer formats only) is accepted, as KIVI uses it.

Named KV presets (``KV_SCHEMES``) map to plan rules over ``<attention module>.key`` and ``.value``.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch

from ..emulate import quantize
from ..kernels.scalar_div import div_scalar
from ..formats import BlockFormat, IntFormat
from .spec import QuantSpec

KV_GRANULARITIES = ("token", "group", "block", "channel", "head", "tensor")

# name -> plan rules (glob over "<attention>.key" / "<attention>.value"); later rules override.
KV_SCHEMES: Dict[str, Dict[str, str]] = {
    "kv8": {"*": "int8:token"},
    "kv4": {"*": "int4:token:asym"},
    "kv4g32": {"*": "int4:g32:asym"},
    "kv4c": {"*": "int4:token:asym", "*.key": "int4:channel:asym"},   # KIVI: keys per channel
    "kv2c": {"*": "int2:token:asym", "*.key": "int2:channel:asym"},
    "kvfp8": {"*": "e4m3fn:token"},
    "kvnvfp4": {"*": "nvfp4"},
    "kvmxfp4": {"*": "mxfp4"},
}


def check_kv_spec(spec: QuantSpec) -> QuantSpec:
    if spec.granularity not in KV_GRANULARITIES:
        raise ValueError(f"KV spec {spec}: granularity {spec.granularity!r} does not apply to key/value "
                         f"states; accepted: {', '.join(KV_GRANULARITIES)}")
    return spec


def _reduce_dims(granularity: str, ndim: int) -> Tuple[int, ...]:
    """Dimensions a scale is shared over, for a (..., heads, tokens, head_dim) tensor."""
    if granularity in ("token", "group"):
        return (-1,)
    if granularity == "channel":
        return (-2,)
    if granularity == "head":
        return (-2, -1)
    return tuple(range(ndim))  # tensor


def quantize_kv(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize key or value states ``x`` (batch, heads, tokens, head_dim) to ``spec``."""
    check_kv_spec(spec)
    if x.dim() < 2:
        raise ValueError(f"key/value states need at least (tokens, head_dim) dimensions, got shape {tuple(x.shape)}")
    fmt = spec.fmt
    if isinstance(fmt, BlockFormat):
        if x.shape[-1] % fmt.size:
            raise ValueError(f"{fmt} needs head_dim ({x.shape[-1]}) to be a multiple of {fmt.size}")
        if spec.scale_method in ("4over6", "mse"):  # per-block scale choice (quant/four_over_six.py)
            from .four_over_six import quantize_blocks_dynamic

            return quantize_blocks_dynamic(x, spec, ste=False)
        return quantize(x, fmt, spec.rounding, axis=-1)
    xf = x.float()
    shape = xf.shape
    if spec.granularity == "group":
        g = spec.group_size
        if shape[-1] % g:
            raise ValueError(f"KV groups of {g} do not divide head_dim {shape[-1]}")
        xf = xf.reshape(*shape[:-1], shape[-1] // g, g)
    dims = _reduce_dims(spec.granularity, xf.dim())
    if spec.symmetric:
        amax = xf.abs().amax(dim=dims, keepdim=True)
        s = torch.where(amax > 0, div_scalar(amax, fmt.max), torch.ones_like(amax))
        out = quantize(xf, fmt, spec.rounding, scale=s)
    else:
        assert isinstance(fmt, IntFormat)  # QuantSpec admits asym for integers only
        grid = IntFormat(fmt.width, is_signed=False)
        lo = xf.amin(dim=dims, keepdim=True).clamp(max=0)
        hi = xf.amax(dim=dims, keepdim=True).clamp(min=0)
        s = (hi - lo) / grid.qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        zero = torch.round(-lo / s)
        out = (quantize(xf / s + zero, grid, spec.rounding) - zero) * s
    return out.reshape(shape).to(x.dtype)


def kv_bits(spec: QuantSpec, head_dim: int, tokens: Optional[int] = None) -> float:
    """Storage bits per cached element, scales counted as fp16 (zero points at the element width);
    per-channel/head scales are amortised over ``tokens`` (ignored when None)."""
    fmt = spec.fmt
    if isinstance(fmt, BlockFormat):
        return float(fmt.bits)
    extra = 16 + (0 if spec.symmetric else fmt.bits)
    if spec.granularity == "token":
        return fmt.bits + extra / head_dim
    if spec.granularity == "group":
        return fmt.bits + extra / spec.group_size
    if tokens and spec.granularity == "channel":
        return fmt.bits + extra / tokens
    if tokens and spec.granularity == "head":
        return fmt.bits + extra / (tokens * head_dim)
    return float(fmt.bits)


def kv_scheme_rules(text: str) -> Dict[str, str]:
    """Plan rules of a KV scheme: a preset name (kv8, kv4c, kvfp8, ...), a spec string for both key
    and value, or 'KEY_SPEC/VALUE_SPEC'."""
    key = text.strip()
    if key.lower() in KV_SCHEMES:
        return dict(KV_SCHEMES[key.lower()])
    try:
        if "/" in key:
            k, v = key.split("/", 1)
            rules = {"*.key": str(check_kv_spec(QuantSpec.parse(k))),
                     "*.value": str(check_kv_spec(QuantSpec.parse(v)))}
        else:
            rules = {"*": str(check_kv_spec(QuantSpec.parse(key)))}
    except ValueError as e:
        raise ValueError(f"unknown KV scheme {text!r}: not one of {', '.join(KV_SCHEMES)}, nor a spec "
                         f"like int8:token or KEY_SPEC/VALUE_SPEC ({e})") from None
    return rules


_KV_SUFFIX = re.compile(r"^(.*?)(kv[a-z0-9]+)$", re.IGNORECASE)


def split_kv_scheme(name: str) -> Tuple[str, Optional[str]]:
    """(weight/input scheme, KV scheme or None) of a scheme string.

    ``w4a8kv4`` -> (``w4a8``, ``kv4``); ``int4:g64+int8:token+kv=int8:token`` -> (``int4:g64+int8:token``,
    ``int8:token``); ``kv8`` alone -> ('', ``kv8``) (weights left in full precision). A scheme without
    a KV part comes back unchanged."""
    text = name.strip()
    if "+kv=" in text.lower():
        i = text.lower().rindex("+kv=")
        return text[:i], text[i + 4:]
    if text.lower().startswith("kv="):
        return "", text[3:]
    m = _KV_SUFFIX.match(text)
    if m and m[2].lower() in KV_SCHEMES:
        return m[1], m[2].lower()
    return text, None
