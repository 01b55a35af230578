"""Metrics of any model on evaluation batches: top-1 accuracy against labels, agreement with the
float model's top-1, and the output error relative to the float model's outputs."""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn


def _call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _tensor(out) -> torch.Tensor:
    """The main output: the tensor itself, ``.logits``, or the first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned a {type(out).__name__}; expected a tensor, an object with .logits, or a "
                    "tuple whose first item is a tensor")


@torch.no_grad()
def model_outputs(model: nn.Module, batches: List[Any]) -> List[torch.Tensor]:
    """The model's main output on each batch (float32, on the CPU)."""
    return [_tensor(_call(model, b)).detach().float().cpu() for b in batches]


def output_metrics(outputs: List[torch.Tensor], labels: Optional[List[torch.Tensor]] = None,
                   reference: Optional[List[torch.Tensor]] = None) -> dict:
    """accuracy (with labels), agreement and output_rel_error (with the float model's outputs)."""
    res = {"samples": sum(int(o.shape[0]) for o in outputs) if outputs and outputs[0].dim() else len(outputs)}
    if labels is not None:
        correct = sum(int((o.argmax(-1) == l.to(o.device)).sum()) for o, l in zip(outputs, labels))
        res["accuracy"] = correct / sum(int(l.numel()) for l in labels)
    if reference is not None:
        if labels is not None:
            same = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in zip(outputs, reference))
            res["agreement"] = same / sum(int(l.numel()) for l in labels)
        num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outputs, reference))
        den = sum(float(r.double().pow(2).sum()) for r in reference)
        res["output_rel_error"] = num / den if den > 0 else float("nan")
    return res


def callable_metrics(fn, model: nn.Module) -> dict:
    """A user's evaluation callable: a float becomes {"metric": value}, a dict is kept (values as floats)."""
    with torch.no_grad():
        v = fn(model)
    if isinstance(v, dict):
        try:
            return {str(k): float(x) for k, x in v.items()}
        except (TypeError, ValueError):
            raise TypeError(f"the evaluation callable returned {v!r}; expected a float or a dict of floats") from None
    try:
        return {"metric": float(v)}
    except (TypeError, ValueError):
        raise TypeError(f"the evaluation callable returned a {type(v).__name__}; expected a float or a dict of "
                        "floats") from None
