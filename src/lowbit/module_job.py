"""The main job for a user's own model object (a CNN, an MLP, any nn.Module), named by Python factories:
``lowbit quantize --model-factory M:F --data-factory M:F``. Builds the model and the data, measures the
float model, quantizes (layer by layer for models without transformer blocks, resuming from
OUT/.progress), measures again, writes the checkpoint and report.json. The checkpoint records the
factory strings, so ``lowbit eval DIR`` rebuilds the architecture and reproduces the metrics."""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .job_common import clear_progress, dense_bytes, estimated_bytes, log as _log, reported_bits
from .quant.plan import Plan


def _state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def measure(model: nn.Module, data, reference=None) -> tuple:
    """(metrics, outputs): the data's evaluation on ``model``; ``reference``: the float model's outputs."""
    from .evaluate.outputs import callable_metrics, model_outputs, output_metrics

    if data.metric_fn is not None:
        return callable_metrics(data.metric_fn, model), None
    if data.inputs is None:
        return {}, None
    outs = model_outputs(model, data.inputs)
    return output_metrics(outs, data.labels, reference if reference is not None else outs), outs


def _metric_names(metrics: dict) -> list:
    return [k for k in metrics if k != "samples"]


def run_quantize_module(
    model_factory: str,
    data_factory: Optional[str] = None,
    scheme: Optional[str] = "w4",
    method: str = "gptq",
    out: Optional[str] = None,
    *,
    plan: Optional[Plan] = None,
    act_order: bool = True,
    percdamp: float = 0.01,
    quiet: bool = False,
) -> dict:
    """Quantize the model built by ``model_factory`` (MODULE:FUNCTION or FILE.py:FUNCTION), calibrated
    and evaluated on what ``data_factory`` returns; returns the report and, with ``out``, writes
    report.json, layer_error.png and the checkpoint there."""
    from .export.checkpoint import save_quantized
    from .models.factory import build_data, build_model, resolve_factory
    from .ptq.pipeline import quantize_model
    from .report import plot_layer_errors

    t_start = time.time()
    plan = plan or Plan.from_scheme(scheme)
    mf = resolve_factory(model_factory, "--model-factory")
    df = resolve_factory(data_factory, "--data-factory") if data_factory else None
    if df is None and method == "gptq":
        raise ValueError("GPTQ needs calibration data: pass --data-factory MODULE:FUNCTION (or use --method rtn)")
    _log(f"building the model ({mf.spec}) ...", quiet)
    model = build_model(mf)
    float_sha = _state_sha256(model)
    data = build_data(df) if df else None
    if data is not None and method == "gptq" and not data.calibration:
        raise ValueError(f"data factory {df.spec} returned no calibration batches; GPTQ needs some")
    _log("evaluating the float model ...", quiet)
    baseline, ref_outputs = measure(model, data) if data is not None else ({}, None)
    base_bytes = dense_bytes(model)
    float_bits = 8 * next(model.parameters()).element_size()
    _log(f"{method} with {plan.describe()}" + (f": calibrating on {len(data.calibration)} batches" if method == "gptq"
                                               else ": no data needed"), quiet)
    progress_dir = Path(out) / ".progress" if out else None
    t_q = time.time()
    res = quantize_model(model, plan, data.calibration if data and method == "gptq" else [], method,
                         act_order=act_order, percdamp=percdamp, progress_dir=progress_dir, progress=not quiet)
    q_seconds = time.time() - t_q
    from .export.float_storage import round_to_storage

    round_to_storage(model, {f"{n}.weight" for n in res.packed})  # measured as it will be stored
    _log("evaluating the quantized model ...", quiet)
    quant = measure(model, data, ref_outputs)[0] if data is not None else {}
    name = type(model).__name__
    report = {
        "model": f"{name} from {mf.spec}",
        "model_source": mf.spec,
        "kind": "module",
        "scheme": plan.describe(),
        "plan": plan.to_dict(),
        "method": method,
        "method_options": {"act_order": act_order, "percdamp": percdamp, "block_size": 128},
        "calibration": ({"batches": len(data.calibration), "source": df.spec}
                        if data is not None and method == "gptq" else None),
        "layer_error": ("output space on the calibration data: ||X(W-Q)^T||^2 / ||XW^T||^2"
                        if method == "gptq" else "weight space: ||W-Q||^2 / ||W||^2"),
        "evaluation": {**(data.describe() if data is not None else {"metric": None}),
                       "source": df.spec if df else None},
        "metrics": _metric_names(baseline),
        "baseline": {**baseline, "size_bytes": base_bytes, "bits_per_weight": float_bits},
        "quantized": {**quant, "quantize_seconds": q_seconds,
                      "bits_per_weight": res.bits_per_weight() if res.layers else float_bits},
        "layers": [vars(l) for l in res.layers],
        "skipped": res.skipped,
        "groups": sorted({l.groups for l in res.layers}),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if out:
        meta = {"model": report["model"], "model_factory": mf.spec, "data_factory": df.spec if df else None,
                "model_factory_dir": mf.search_dir, "data_factory_dir": df.search_dir if df else None,
                "float_sha256": float_sha, "scheme": plan.describe(), "method": method}
        size = save_quantized(model, res.packed, out, kind="module", extra=meta)
        report["quantized"]["size_bytes"] = size
        report["quantized"]["checkpoint"] = str(Path(out) / "model.safetensors")
        if res.layers:
            plot_layer_errors(res.layers, Path(out) / "layer_error.png",
                              title=f"{name} {plan.describe()} {method}", output_space=method == "gptq")
    else:
        report["quantized"]["size_bytes"] = estimated_bytes(model, res)
    report["seconds"] = time.time() - t_start
    if out:
        (Path(out) / "report.json").write_text(json.dumps(report, indent=1))
        from .report_html import write_quantize_html

        write_quantize_html(report, out)  # report.html: the same numbers and the plot, one page
        clear_progress(progress_dir)
    return report


def _factory_manifest(path) -> dict:
    """The checked manifest of a checkpoint written by :func:`run_quantize_module`."""
    from .export.validate import META_FILE, CheckpointError, read_manifest

    meta = read_manifest(path)
    if not meta.get("model_factory"):
        raise CheckpointError(f"{Path(path) / META_FILE}: model_factory: expected the factory that builds the "
                              "model (a checkpoint of `lowbit quantize --model-factory`), found none; load "
                              "Hugging Face checkpoints with lowbit.export.checkpoint.load_quantized(DIR)")
    return meta


def _factory_model(meta: dict, quiet: bool):
    """A fresh float model from the model factory recorded in lowbit.json."""
    from .models.factory import build_model, resolve_factory

    mf = resolve_factory(meta["model_factory"], "model factory (recorded in lowbit.json)",
                         meta.get("model_factory_dir"))
    _log(f"building the model ({mf.spec}) ...", quiet)
    return build_model(mf), mf.spec


def load_factory_checkpoint(path, quiet: bool = True):
    """(quantized model, meta) from a checkpoint written by :func:`run_quantize_module`: the
    architecture from the recorded model factory, every tensor from the checkpoint."""
    from .export.module_checkpoint import load_quantized_into

    meta = _factory_manifest(path)
    model, _ = _factory_model(meta, quiet)
    load_quantized_into(model, path)
    return model, meta


def run_eval_module(path, quiet: bool = False) -> dict:
    """``lowbit eval DIR`` for a checkpoint written by :func:`run_quantize_module`: the quantized
    fields of its report, measured again."""
    from .export.module_checkpoint import load_quantized_into
    from .models.factory import build_data, resolve_factory

    d = Path(path)
    meta = _factory_manifest(d)
    model, spec = _factory_model(meta, quiet)
    data = None
    if meta.get("data_factory"):
        data = build_data(resolve_factory(meta["data_factory"], "data factory (recorded in lowbit.json)",
                                          meta.get("data_factory_dir")))
    ref = None
    if data is not None and data.metric_fn is None and data.inputs is not None:
        if _state_sha256(model) != meta.get("float_sha256"):
            warnings.warn(f"{spec} built other float weights than when {d} was quantized: agreement and "
                          "output error are measured against the new float model", stacklevel=2)
        ref = measure(model, data)[1]
    load_quantized_into(model, d)
    res = measure(model, data, ref)[0] if data is not None else {}
    res["bits_per_weight"] = reported_bits(d)
    res["size_bytes"] = os.path.getsize(d / "model.safetensors")
    return res
