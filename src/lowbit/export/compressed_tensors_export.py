"""``lowbit export DIR --to compressed-tensors``: a lowbit checkpoint as a Hugging Face directory in
the compressed-tensors format (what llm-compressor writes and vLLM and transformers load), packed
and described by the ``compressed-tensors`` package itself.

Which lowbit specs map exactly (the codes are recovered from lowbit's weight and scale: the weight
is ``level * scale`` exactly, so the package's ``round(w / scale)`` gives the level back):

- integer weights of 1..8 bits, group-wise (``int4:g64``), per channel or per tensor, symmetric or
  asymmetric, -> ``pack-quantized`` (asymmetric levels 0..2^b-1 and zero points shift to the
  package's signed range);
- FP8 ``e4m3fn`` weights per channel, per tensor or per group -> ``float-quantized``;
- dynamic per-token activations ``int8:token`` / ``e4m3fn:token`` -> the scheme's
  ``input_activations`` (quantized at run time by the reader, with its own rounding: logits agree
  to a tolerance, not bit for bit).

Scales are stored in float32: the package dequantizes in the scale's dtype, and a float16 scale
times a level rounds in float16. Each layer is decompressed again by the package after packing and
compared with lowbit's weight bit for bit. Anything else (block formats such as NVFP4/MXFP4,
retained weights, online transforms, KV rules) is refused with the reason.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..formats import FloatFormat, IntFormat
from ..quant.spec import QuantSpec
from .dense import copy_side_files
from .stored import StoredLayer, read_checkpoint

STRATEGIES = {"group": "group", "channel": "channel", "tensor": "tensor"}


class CompressedTensorsError(ValueError):
    """A checkpoint the compressed-tensors export cannot write exactly."""


def weight_args(spec: QuantSpec, cols: int) -> Tuple[Optional[dict], str]:
    """(QuantizationArgs fields and the compression format, "") for a weight spec, or (None, why)."""
    fmt = spec.fmt
    accepted = "integer 1..8-bit (group/channel/tensor, sym or asym) or e4m3fn (group/channel/tensor) weights"
    if spec.granularity not in STRATEGIES:
        return None, (f"{spec}: granularity {spec.granularity!r} has no compressed-tensors strategy "
                      f"(accepted: {accepted})")
    args = {"strategy": STRATEGIES[spec.granularity], "symmetric": spec.symmetric}
    if spec.granularity == "group":
        if cols % spec.group_size:
            return None, f"{spec}: rows of {cols} do not split into groups of {spec.group_size}"
        args["group_size"] = spec.group_size
    if not spec.symmetric:
        # the package packs zero points along the rows, and transformers' loader (5.25 with
        # compressed-tensors 0.20) allocates them unpacked: such a file does not load
        return None, (f"{spec}: asymmetric (zero-point) weights are not exported: transformers cannot load "
                      "compressed-tensors' packed zero points (accepted: symmetric specs)")
    if isinstance(fmt, IntFormat) and fmt.is_signed and fmt.frac == 0 and 1 <= fmt.width <= 8 and not fmt.narrow:
        return {**args, "num_bits": fmt.width, "type": "int", "format": "pack-quantized"}, ""
    if isinstance(fmt, FloatFormat) and str(fmt) == "e4m3fn":
        return {**args, "num_bits": 8, "type": "float", "format": "float-quantized"}, ""
    return None, f"{spec} has no exact compressed-tensors layout (accepted: {accepted})"


def act_args(spec: Optional[QuantSpec]) -> Tuple[Optional[dict], str]:
    """QuantizationArgs fields of a dynamic per-token activation spec, or (None, why)."""
    if spec is None:
        return None, ""
    fmt = spec.fmt
    if spec.granularity == "token" and spec.symmetric:
        if isinstance(fmt, IntFormat) and fmt.is_signed and fmt.width == 8 and fmt.frac == 0:
            return {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}, ""
        if isinstance(fmt, FloatFormat) and str(fmt) == "e4m3fn":
            return {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}, ""
    return None, f"activation spec {spec}: compressed-tensors runs int8:token or e4m3fn:token dynamically"


def _compressed(layer: StoredLayer, scheme) -> Dict[str, torch.Tensor]:
    """The package's tensors for one layer, checked by decompressing them again."""
    from compressed_tensors.compressors import BaseCompressor

    W = layer.weight()
    rows, _ = layer.shape
    scale = layer.tensors["scales"].float()
    if scheme.weights.strategy == "tensor":
        scale = scale[:1, :1].reshape(1)
    state = {"weight": W, "weight_scale": scale}
    zeros = layer.zeros()
    if zeros is not None:  # lowbit: (u - z) * s with u, z in 0..2^b-1; the package's levels are signed
        state["weight_zero_point"] = (zeros - 2 ** (scheme.weights.num_bits - 1)).to(torch.int8)
        if scheme.weights.strategy == "tensor":
            state["weight_zero_point"] = state["weight_zero_point"][:1, :1].reshape(1)
    compressor = BaseCompressor.load_from_registry(scheme.format)
    out = compressor.compress(state, scheme)
    back = compressor.decompress(dict(out), scheme)["weight"]
    if not torch.equal(back.float().reshape(W.shape), W):
        bad = int((back.float().reshape(W.shape) != W).sum())
        raise CompressedTensorsError(f"{layer.name}: compressed-tensors decodes {bad} values differently from "
                                     "lowbit's weight")
    return out


def export_compressed_tensors(checkpoint, out, allow_drop: bool = False) -> dict:
    """Write ``checkpoint`` as a compressed-tensors directory ``out``; returns what was written."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    ck = read_checkpoint(checkpoint)
    if ck.meta["kind"] == "module":
        raise CompressedTensorsError(f"{ck.path}: a user's own module has no Hugging Face config to export with")
    problems, dropped = [], []
    if ck.meta.get("input_transforms"):
        problems.append("online input transforms (rotation/smoothing) have no compressed-tensors equivalent")
    if ck.meta.get("kv"):
        (dropped if allow_drop else problems).append("KV-cache quantization rules")
    if ck.meta.get("act_clips"):  # compressed-tensors' dynamic activation scales are the plain absmax
        (dropped if allow_drop else problems).append(f"learned input clipping ratios of {len(ck.meta['act_clips'])} "
                                                     "layers")
    if ck.meta["act_only"]:
        n_act = len(ck.meta["act_only"])
        (dropped if allow_drop else problems).append(f"activation-only quantization of {n_act} layers")
    groups: Dict[str, dict] = {}  # one scheme per distinct (weight, activation) spec pair
    for name, layer in ck.layers.items():
        w, why = weight_args(layer.spec, layer.shape[1])
        act_spec = ck.meta["layers"][name]["act"]
        a, why_a = act_args(QuantSpec.parse(act_spec) if act_spec else None)
        if layer.retain:
            why = f"retained high-impact weights ({layer.retain}) have no compressed-tensors equivalent"
        if w is None or layer.retain:
            problems.append(f"{name}: {why}")
            continue
        if why_a:
            if not allow_drop:
                problems.append(f"{name}: {why_a}")
                continue
            dropped.append(f"{name}: {why_a}")
        key = json.dumps([w, a], sort_keys=True)
        groups.setdefault(key, {"weights": w, "act": a, "targets": []})["targets"].append(name)
    if problems:
        raise CompressedTensorsError(f"{ck.path}: cannot export exactly to compressed-tensors: {'; '.join(problems)}"
                                     + ("" if allow_drop else ". Activation/KV rules can be dropped with "
                                        "--allow-requantize"))
    schemes, state = {}, {n: t for n, t in ck.floats.items() if n not in ck.meta["tied"]}
    formats = sorted({g["weights"]["format"] for g in groups.values()})
    for i, g in enumerate(groups.values()):
        wargs = {k: v for k, v in g["weights"].items() if k != "format"}
        scheme = QuantizationScheme(targets=g["targets"], weights=QuantizationArgs(**wargs),
                                    input_activations=QuantizationArgs(**g["act"]) if g["act"] else None,
                                    format=g["weights"]["format"])
        schemes[f"group_{i}"] = scheme
        for name in g["targets"]:
            for k, v in _compressed(ck.layers[name], scheme).items():
                state[f"{name}.{k}"] = v.contiguous()
    config = QuantizationConfig(config_groups=schemes, quantization_status="compressed",
                                format=formats[0] if len(formats) == 1 else "mixed-precision")
    dst = Path(out)
    copy_side_files(ck.path, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = config.to_dict()
    cfg_path.write_text(json.dumps(cfg, indent=2))
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return {"path": str(dst), "bytes": (dst / "model.safetensors").stat().st_size, "lossless": True,
            "formats": formats, "schemes": {k: {"targets": len(s.targets), "weights": g["weights"], "act": g["act"]}
                                            for (k, s), g in zip(schemes.items(), groups.values())},
            "dropped": dropped}
