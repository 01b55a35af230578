"""A user's own model and data named from the command line by a Python factory.

A factory string is ``MODULE:FUNCTION`` (``mypkg.models:make_model``; the current directory is
searched first, as ``python -m`` does) or ``FILE.py:FUNCTION`` (``benchmarks/digits_cnn.py:make_model``).
The model factory returns an ``nn.Module``; the data factory returns the calibration batches and
the evaluation data (see :func:`build_data`). Checkpoints record the canonical string (file paths
made absolute) and the directory it was resolved from, so ``lowbit eval`` can rebuild the model.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

FORMAT_HELP = "MODULE:FUNCTION (e.g. mypkg.models:make_model) or FILE.py:FUNCTION (e.g. models.py:make_model)"
DATA_HELP = ("a dict {'calibration': [batches], 'evaluation': EVAL} or a pair (calibration, EVAL), where EVAL is "
             "(inputs, labels), (inputs, None), inputs, a callable model -> float or {name: float}, or None")


class FactoryError(ValueError):
    """A factory string that does not name a usable callable, or a factory that returned the wrong thing."""


@dataclass
class Factory:
    spec: str             # canonical: FILE paths absolute
    fn: Callable
    search_dir: str       # where a MODULE:FUNCTION string was resolved from


def _split(spec: str, flag: str):
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise FactoryError(f"{flag} {spec!r}: expected {FORMAT_HELP}")
    where, _, attr = spec.rpartition(":")
    if not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise FactoryError(f"{flag} {spec!r}: expected {FORMAT_HELP}")
    return where, attr


def _import_file(path: str, flag: str, spec: str):
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FactoryError(f"{flag} {spec!r}: file {p} does not exist; expected {FORMAT_HELP}")
    name = f"lowbit_factory_{p.stem}_{abs(hash(str(p))) % 10**8}"
    if name in sys.modules:
        return sys.modules[name], str(p)
    sys.path.insert(0, str(p.parent))  # so that the file may import its siblings, as a script would
    mod_spec = importlib.util.spec_from_file_location(name, p)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise FactoryError(f"{flag} {spec!r}: importing {p} failed: {type(e).__name__}: {e}") from e
    return module, str(p)


def _import_module(name: str, flag: str, spec: str, search_dirs: Sequence[str]):
    for d in search_dirs:
        if d and d not in sys.path:
            sys.path.insert(0, d)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise FactoryError(f"{flag} {spec!r}: no module named {e.name!r} (searched the current directory and "
                               f"sys.path); expected {FORMAT_HELP}") from None
        raise FactoryError(f"{flag} {spec!r}: importing {name} failed: {e}") from e
    except Exception as e:
        raise FactoryError(f"{flag} {spec!r}: importing {name} failed: {type(e).__name__}: {e}") from e


def resolve_factory(spec: str, flag: str = "factory", search_dir: Optional[str] = None) -> Factory:
    """The callable named by ``spec``; ``flag`` names the option in error messages."""
    where, attr = _split(spec, flag)
    if where.endswith(".py") or os.sep in where or "/" in where:
        module, path = _import_file(where, flag, spec)
        canonical, found_in = f"{path}:{attr}", str(Path(path).parent)
    else:
        dirs = [os.getcwd()] + ([search_dir] if search_dir else [])
        module = _import_module(where, flag, spec, dirs)
        canonical = spec
        found_in = next((d for d in dirs if getattr(module, "__file__", None)
                         and Path(module.__file__).resolve().is_relative_to(Path(d).resolve())), os.getcwd())
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise FactoryError(f"{flag} {spec!r}: {where} has no attribute {attr!r}; its callables: "
                               f"{', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"{flag} {spec!r}: {attr} is of type {type(obj).__name__}, not a callable; expected "
                           f"{FORMAT_HELP}")
    return Factory(canonical, obj, found_in)


def build_model(factory: Factory) -> nn.Module:
    """Call the model factory; the model comes back in eval mode."""
    model = factory.fn()
    if not isinstance(model, nn.Module):
        raise FactoryError(f"model factory {factory.spec} returned an object of type {type(model).__name__}; expected a "
                           "torch.nn.Module")
    return model.eval()


@dataclass
class ModelData:
    """What a data factory returned, normalised."""
    calibration: List[Any]                       # batches, each passed to the model as in layerwise.run_batch
    inputs: Optional[List[Any]] = None           # evaluation batches
    labels: Optional[List[torch.Tensor]] = None  # one tensor per evaluation batch, or None
    metric_fn: Optional[Callable] = None         # callable evaluation: model -> float | {name: float}

    def describe(self) -> dict:
        if self.metric_fn is not None:
            return {"metric": "the data factory's evaluation callable",
                    "callable": getattr(self.metric_fn, "__qualname__", repr(self.metric_fn))}
        if self.inputs is None:
            return {"metric": None}
        n = sum(_batch_len(b) for b in self.inputs)
        d = {"samples": n, "batches": len(self.inputs),
             "output_rel_error": "||y_q - y||^2 / ||y||^2 over the evaluation outputs, y from the float model"}
        if self.labels is not None:
            d["metric"] = "top-1 accuracy (argmax of the last output dimension vs the labels)"
            d["agreement"] = "share of samples whose top-1 class equals the float model's"
        else:
            d["metric"] = "output error relative to the float model"
        return d


def _batch_len(b) -> int:
    if isinstance(b, torch.Tensor):
        return int(b.shape[0])
    if isinstance(b, dict):
        return _batch_len(next(iter(b.values())))
    if isinstance(b, (tuple, list)) and b:
        return _batch_len(b[0])
    return 1


def _batches(x, what: str, spec: str, size: int = 256) -> List[Any]:
    """A tensor is cut into batches of ``size`` along dim 0; a list/iterable is taken as batches."""
    if isinstance(x, torch.Tensor):
        return list(x.split(size)) if x.dim() else [x]
    if isinstance(x, (dict, str, bytes)) or not hasattr(x, "__iter__"):
        raise FactoryError(f"data factory {spec}: {what} is of type {type(x).__name__}; expected a tensor or a list of "
                           "batches (tensors, tuples or dicts)")
    return list(x)


def build_data(factory: Factory) -> ModelData:
    """Call the data factory and normalise what it returned (see DATA_HELP)."""
    out = factory.fn()
    spec = factory.spec
    if isinstance(out, ModelData):
        return out
    if isinstance(out, dict):
        unknown = set(out) - {"calibration", "evaluation"}
        if unknown or "calibration" not in out:
            raise FactoryError(f"data factory {spec} returned a dict with keys {sorted(out)}; expected {DATA_HELP}")
        calib, ev = out["calibration"], out.get("evaluation")
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        calib, ev = out
    else:
        raise FactoryError(f"data factory {spec} returned an object of type {type(out).__name__}; expected {DATA_HELP}")
    data = ModelData(_batches(calib, "calibration", spec, 64) if calib is not None else [])
    if ev is None:
        return data
    if callable(ev) and not isinstance(ev, (torch.Tensor, nn.Module)):
        data.metric_fn = ev
        return data
    if isinstance(ev, tuple) and len(ev) == 2:
        inputs, labels = ev
    else:
        inputs, labels = ev, None
    data.inputs = _batches(inputs, "evaluation inputs", spec)
    if labels is not None:
        if isinstance(labels, torch.Tensor):
            sizes = [_batch_len(b) for b in data.inputs]
            if labels.shape[0] != sum(sizes):
                raise FactoryError(f"data factory {spec}: {labels.shape[0]} labels for {sum(sizes)} evaluation "
                                   "inputs; expected one label per input")
            data.labels = list(labels.split(sizes))
        else:
            data.labels = [torch.as_tensor(t) for t in labels]
            if len(data.labels) != len(data.inputs):
                raise FactoryError(f"data factory {spec}: {len(data.labels)} label batches for {len(data.inputs)} "
                                   "input batches; expected one per batch")
    return data
