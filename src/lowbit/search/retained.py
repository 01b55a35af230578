""""With high-impact retention" candidates: ``SPEC+keepR@FMT`` (e.g. ``int3:g64+keep1%@int8``) is
``SPEC`` by RTN with the fraction R of the layer's weights that matter most kept in a sparse side
tensor at the element format FMT (see :mod:`lowbit.ptq.retention`, whose bit accounting is used:
the dense codes and scales plus the retained values, their positions and their scales).

Which weights: the diagonal form of retention's OBS saliency, (w_ij - q(w)_ij)^2 E[x_j^2], the
output error each weight's rounding adds with the input Hessian taken diagonal; E[x_j^2] is the mean
squared input feature j of the layer on the search's calibration set (:func:`input_power`, one
forward pass). Without it (no calibration data) the score is the squared rounding error alone.
plan.json asks ``lowbit quantize --plan`` for the same rule, retention's ``diag`` saliency
(rounding error squared times H_jj, H = 2 X^T X / n on its own calibration set: the same ranking up
to the data). The ``obs`` saliency, right for GPTQ, keeps the wrong weights for RTN: applied to the
MiniLM 3.5-bit plan it measured 14.24% against 12.41% with the search's rule.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ..ptq.retention import RetainFormat, parse_ratio, retained_bits, rtn_retained, top_mask
from ..quant.spec import QuantSpec
from ..quant.weight import WeightQuantizer

MARK = "+keep"


def split(spec: str) -> Tuple[str, Optional[float], Optional[RetainFormat]]:
    """(base spec, ratio, retain format); ratio and format are None for a plain spec."""
    s = str(spec).strip()
    if MARK not in s:
        return s, None, None
    base, _, rest = s.partition(MARK)
    ratio_text, at, fmt = rest.partition("@")
    if not at or not fmt:
        raise ValueError(f"retention candidate {spec!r}: expected SPEC+keepRATIO@FORMAT, e.g. int3:g64+keep1%@int8")
    ratio = parse_ratio(ratio_text)
    if not 0.0 < ratio < 0.5:
        raise ValueError(f"retention candidate {spec!r}: the kept fraction must be in (0, 50%), got {ratio_text}")
    return base, ratio, RetainFormat.parse(fmt)


def canonical(spec: str) -> str:
    """The spec string in canonical form (the base spec parsed, the ratio as a percentage)."""
    base, ratio, rfmt = split(spec)
    base = str(QuantSpec.parse(base))
    return base if ratio is None else f"{base}{MARK}{ratio * 100:g}%@{rfmt}"


def base_spec(spec: str) -> str:
    return split(spec)[0]


def kept(shape: tuple, ratio: float) -> int:
    return int(round(ratio * shape[0] * shape[1]))  # as retention.top_mask counts


def bits_per_weight(spec: str, shape: tuple) -> float:
    """True storage bits per weight, the side tensor included."""
    base, ratio, rfmt = split(spec)
    rows, cols = int(shape[0]), int(shape[1])
    dense = WeightQuantizer(QuantSpec.parse(base)).bits_per_weight(cols)
    if ratio is None:
        return dense
    return dense + retained_bits(rows, cols, kept(shape, ratio), rfmt) / (rows * cols)


def weight(W: torch.Tensor, spec: str, power: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight as stored by ``spec`` (RTN; retained weights at their format). ``power``: the
    layer's mean squared input per input feature, which weights the saliency (module doc)."""
    base, ratio, rfmt = split(spec)
    W = W.detach().float()
    q = WeightQuantizer(QuantSpec.parse(base))
    if ratio is None:
        return q.rtn(W)[0]
    score = (W - q.rtn(W)[0]).pow(2)
    if power is not None:
        score = score * power.to(score)[None, :]
    return rtn_retained(W, top_mask(score, ratio), q, rfmt).weight


def has_retained(specs: Sequence[str]) -> bool:
    return any(MARK in s for s in specs)


def input_power(run, layers: Dict[str, "torch.nn.Linear"], batches) -> Dict[str, torch.Tensor]:
    """Mean squared input per input feature of each layer: ``run(batch)`` is called on every batch
    with hooks on the layers (the fp32 model)."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def hook(name):
        def fn(_module, args, _out):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in layers.items()]
    try:
        with torch.inference_mode():
            for b in batches:
                run(b)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).cpu() for n in sums}


def check_retained(specs: Sequence[str], method: str) -> None:
    """Retention candidates are measured by RTN and share one retain format (one side-tensor format
    per plan, as ``lowbit quantize`` applies it)."""
    fmts = {str(split(s)[2]) for s in specs if split(s)[1] is not None}
    if fmts and method != "rtn":
        raise ValueError(f"retention candidates ({MARK}...) are measured with --method rtn, not {method}")
    if len(fmts) > 1:
        raise ValueError(f"retention candidates must share one retain format, got {', '.join(sorted(fmts))}")


def plan_layers(choice: Dict[str, str]) -> dict:
    """plan.json's ``layers`` (plain specs, which Plan reads) and, when some layer retains weights,
    ``retain``: {"format", "saliency", "ratios": layer -> kept fraction} for ``lowbit quantize --plan``."""
    layers, ratios, fmt = {}, {}, None
    for name, spec in choice.items():
        base, ratio, rfmt = split(spec)
        layers[name] = base
        if ratio is not None:
            ratios[name], fmt = ratio, str(rfmt)
    out = {"layers": layers}
    if ratios:
        out["retain"] = {"format": fmt, "saliency": "diag", "ratios": ratios}
    return out
