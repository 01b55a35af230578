"""Checking a lowbit checkpoint before anything is built from it.

A checkpoint directory holds ``lowbit.json`` (the manifest) and ``model.safetensors``. Every loader
calls :func:`read_manifest` and :func:`read_tensors`, which check, in this order:

1. the manifest: valid JSON, a known version, the keys of that version with the right types, every
   quant spec and retain format parses, and (version 2) its own SHA-256 over its content;
2. the tensor file: its size and streamed SHA-256 against the manifest (version 2; version 1
   checkpoints load with a warning that integrity could not be checked), then the safetensors header;
3. the tensors: every one the manifest records, with its shape and dtype (version 2), and for each
   quantized layer the packed tensors its spec and shape imply (``quant.packed.dense_layout`` and the
   retained side tensors), with nothing else under the layer's name.

Anything wrong raises :class:`CheckpointError` naming the file, the entry, what was expected and what
was found. See docs/checkpoints.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..ptq.retention import RetainFormat
from ..quant.activation import CLIP_MIN, check_clip_spec
from ..quant.packed import dense_layout, packed_bytes, unpack_bits
from ..quant.spec import QuantSpec
from ..quant.weight import WeightQuantizer

WEIGHTS_FILE = "model.safetensors"
META_FILE = "lowbit.json"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# keys save_quantized writes itself; a caller's ``extra`` cannot replace them
REQUIRED_KEYS = ("lowbit_checkpoint", "kind", "layers", "act_only", "tied", "files", "tensors", "extra",
                 "manifest_sha256")
OPTIONAL_KEYS = ("input_transforms", "act_clips")
RESERVED_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
LAYER_KEYS = ("weight", "act", "shape")
LAYER_OPTIONAL = ("retain",)
TRANSFORM_TYPES = {"features": (int,), "rotation": (bool,), "block": (int, type(None)),
                   "seed": (int, type(None)), "smooth_scale": (bool,)}
# caller-supplied keys that loaders read, with the JSON types they must have
EXTRA_TYPES = {"kv": (dict,), "evaluation": (dict,), "model_factory": (str,), "model_factory_dir": (str, type(None)),
               "data_factory": (str, type(None)), "data_factory_dir": (str, type(None)),
               "float_sha256": (str, type(None)), "model_spec": (str, type(None))}
RETAIN_TENSORS = ("retain_values", "retain_bitmap", "retain_cols", "retain_row_counts", "retain_scales")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file, the entry, what was
    expected and what was found."""


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _short(v, n: int = 60) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _want(where: str, entry: str, value, types: tuple, what: str) -> None:
    # bool is an int subclass in Python but never a valid count or shape in the manifest
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        found = "null" if value is None else f"{_type_name(value)} {_short(value)}"
        raise CheckpointError(f"{where}: {entry}: expected {what}, found {found}")


def _want_keys(where: str, entry: str, d: dict, required, optional=()) -> None:
    missing = [k for k in required if k not in d]
    unknown = sorted(set(d) - set(required) - set(optional))
    if missing or unknown:
        found = (f"missing {missing}" if missing else "") + ("; " if missing and unknown else "") \
            + (f"unknown {unknown}" if unknown else "")
        raise CheckpointError(f"{where}: {entry}: expected keys {list(required)}"
                              + (f" (optional {list(optional)})" if optional else "") + f", found {found}")


def parse_spec(where: str, entry: str, text) -> QuantSpec:
    """``text`` as a QuantSpec, or a CheckpointError naming the entry."""
    _want(where, entry, text, (str,), "a quant spec string such as 'int4:g64'")
    try:
        return QuantSpec.parse(text)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: {entry}: {text!r} is not a valid quant spec ({e})") from None


def parse_retain(where: str, entry: str, text) -> RetainFormat:
    """``text`` as a retain format, or a CheckpointError naming the entry."""
    _want(where, entry, text, (str,), "a retain format string such as 'int8'")
    try:
        return RetainFormat.parse(text)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: {entry}: {text!r} is not a valid retain format ({e})") from None


def matrix_shape(shape) -> Tuple[int, int]:
    """(rows, cols) a weight of ``shape`` is packed as: a convolution's (out, in/groups, *kernel)
    flattens to (out, in/groups * prod(kernel))."""
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def manifest_digest(meta: dict) -> str:
    """SHA-256 of the manifest's content without its own ``manifest_sha256`` (key order and
    whitespace do not count)."""
    body = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (model files do not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16: how the manifest records a tensor's dtype."""
    return str(dtype).removeprefix("torch.")


# --- the manifest ---------------------------------------------------------------------------------

def read_manifest(path) -> dict:
    """The checked manifest of the checkpoint directory ``path``, normalised to version 2's layout
    (version 1's ``layers["_tied"]`` becomes ``tied``)."""
    d = Path(path)
    where = str(d / META_FILE)
    if not d.is_dir() or not (d / META_FILE).is_file():
        raise CheckpointError(f"{d} is not a lowbit checkpoint (needs {META_FILE} and {WEIGHTS_FILE}); "
                              "create one with `lowbit quantize --out DIR`")
    try:
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: expected UTF-8 JSON, found undecodable bytes ({e.reason} at byte "
                              f"{e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: expected JSON, found a syntax error at line {e.lineno} column "
                              f"{e.colno}: {e.msg}") from None
    return check_manifest(meta, where)


def check_manifest(meta, where: str) -> dict:
    """Schema, version, specs and digest of a parsed manifest (``where`` names it in errors)."""
    _want(where, "top level", meta, (dict,), "a JSON object")
    version = meta.get("lowbit_checkpoint")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{where}: lowbit_checkpoint: expected a version this lowbit reads "
                              f"{list(READABLE_VERSIONS)}, found {_short(version)}")
    meta = dict(meta)
    if version == 1:
        missing = [k for k in ("kind", "layers") if k not in meta]
        if missing:
            raise CheckpointError(f"{where}: top level: expected keys kind and layers, found {missing} missing")
        _want(where, "layers", meta["layers"], (dict,), "an object of layer entries")
        layers = dict(meta["layers"])
        meta["tied"] = layers.pop("_tied", {})
        meta["layers"] = layers
        meta.setdefault("act_only", {})
    else:
        _want_keys(where, "top level", {k: 0 for k in REQUIRED_KEYS if k in meta}, REQUIRED_KEYS)
        _want(where, "extra", meta["extra"], (list,), "the list of caller-supplied keys")
        extra = meta["extra"]
        for k in extra:
            _want(where, "extra[]", k, (str,), "a key name")
            if k in RESERVED_KEYS:
                raise CheckpointError(f"{where}: extra: expected caller-supplied keys only, found the "
                                      f"manifest's own key {k!r}")
        _want_keys(where, "top level", meta, REQUIRED_KEYS + tuple(extra), OPTIONAL_KEYS)
    _want(where, "kind", meta["kind"], (str,), "a model kind such as 'causal_lm', 'encoder' or 'module'")
    if not meta["kind"]:
        raise CheckpointError(f"{where}: kind: expected a model kind such as 'causal_lm', found ''")
    _check_layers(where, meta["layers"])
    _check_names(where, "act_only", meta["act_only"], lambda e, v: parse_spec(where, e, v))
    _check_names(where, "tied", meta["tied"], lambda e, v: _want(where, e, v, (str,), "a tensor name"))
    both = sorted(set(meta["layers"]) & set(meta["act_only"]))
    if both:
        raise CheckpointError(f"{where}: act_only[{both[0]!r}]: expected layers without a quantized weight, "
                              "found one also listed in layers")
    if "input_transforms" in meta:
        _check_names(where, "input_transforms", meta["input_transforms"], lambda e, v: _check_transform(where, e, v))
    if "act_clips" in meta:
        acts = {n: i["act"] for n, i in meta["layers"].items() if i["act"] is not None} | dict(meta["act_only"])
        _want(where, "act_clips", meta["act_clips"], (dict,), "an object keyed by name")
        for name, clip in meta["act_clips"].items():
            _check_clip(where, f"act_clips[{name!r}]", clip, acts.get(name))
    for key, types in EXTRA_TYPES.items():
        if key in meta:
            _want(where, key, meta[key], types, " or ".join("null" if t is type(None) else t.__name__ for t in types))
    if "kv" in meta:
        _check_names(where, "kv", meta["kv"], lambda e, v: _check_kv(where, e, v))
    if version >= 2:
        _check_files(where, meta["files"])
        _check_names(where, "tensors", meta["tensors"], lambda e, v: _check_record(where, e, v))
        digest = meta["manifest_sha256"]
        _want(where, "manifest_sha256", digest, (str,), "a SHA-256 hex digest")
        if digest != manifest_digest(meta):
            raise CheckpointError(f"{where}: manifest_sha256: expected the digest of the manifest's content "
                                  f"{manifest_digest(meta)[:16]}..., found {digest[:16]}...: the manifest was "
                                  "edited after saving; re-create the checkpoint rather than editing it")
    return meta


def _check_names(where: str, key: str, d, check) -> None:
    _want(where, key, d, (dict,), "an object keyed by name")
    for name, v in d.items():
        check(f"{key}[{name!r}]", v)


def _check_layers(where: str, layers) -> None:
    _want(where, "layers", layers, (dict,), "an object of layer entries")
    for name, info in layers.items():
        entry = f"layers[{name!r}]"
        _want(where, entry, info, (dict,), "an object with weight, act, shape")
        _want_keys(where, entry, info, LAYER_KEYS, LAYER_OPTIONAL)
        spec = parse_spec(where, f"{entry}.weight", info["weight"])
        if info["act"] is not None:
            parse_spec(where, f"{entry}.act", info["act"])
        shape = info["shape"]
        _want(where, f"{entry}.shape", shape, (list,), "a list of 2 to 5 positive integers")
        if not 2 <= len(shape) <= 5 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise CheckpointError(f"{where}: {entry}.shape: expected 2 to 5 positive integers, found {_short(shape)}")
        why = WeightQuantizer(spec).check(matrix_shape(shape))
        if why:
            raise CheckpointError(f"{where}: {entry}: weight spec {info['weight']!r} does not fit shape {shape}: {why}")
        if "retain" in info:
            parse_retain(where, f"{entry}.retain", info["retain"])


def _check_clip(where: str, entry: str, clip, act) -> None:
    """A learned clipping ratio: a number in [CLIP_MIN, 1] of a layer whose input has an element format."""
    _want(where, entry, clip, (float, int), f"a clipping ratio in [{CLIP_MIN}, 1]")
    if not CLIP_MIN <= clip <= 1:
        raise CheckpointError(f"{where}: {entry}: expected a clipping ratio in [{CLIP_MIN}, 1], found {clip}")
    if act is None:
        raise CheckpointError(f"{where}: {entry}: expected a layer with quantized inputs (in layers with an act spec, "
                              "or in act_only), found none of that name")
    try:
        check_clip_spec(QuantSpec.parse(act))
    except ValueError as e:
        raise CheckpointError(f"{where}: {entry}: the layer's input spec {act!r} takes no clipping ratio ({e})") from None


def _check_transform(where: str, entry: str, d) -> None:
    _want(where, entry, d, (dict,), "an object with " + ", ".join(TRANSFORM_TYPES))
    _want_keys(where, entry, d, ("features",), tuple(k for k in TRANSFORM_TYPES if k != "features"))
    for k, v in d.items():
        _want(where, f"{entry}.{k}", v, TRANSFORM_TYPES[k], " or ".join(
            "null" if t is type(None) else t.__name__ for t in TRANSFORM_TYPES[k]))


def _check_kv(where: str, entry: str, d) -> None:
    _want(where, entry, d, (dict,), "an object with key, value (quant specs or null)")
    _want_keys(where, entry, d, (), ("key", "value", "head_dim"))
    for k in ("key", "value"):
        if d.get(k) is not None:
            parse_spec(where, f"{entry}.{k}", d[k])
    if "head_dim" in d:
        _want(where, f"{entry}.head_dim", d["head_dim"], (int,), "an integer")


def _check_files(where: str, files) -> None:
    _want(where, "files", files, (dict,), f"an object with {WEIGHTS_FILE}")
    _want_keys(where, "files", files, (WEIGHTS_FILE,))
    rec = files[WEIGHTS_FILE]
    entry = f"files[{WEIGHTS_FILE!r}]"
    _want(where, entry, rec, (dict,), "an object with sha256, bytes")
    _want_keys(where, entry, rec, ("sha256", "bytes"))
    _want(where, f"{entry}.sha256", rec["sha256"], (str,), "a SHA-256 hex digest")
    if not _HEX64.fullmatch(rec["sha256"]):
        raise CheckpointError(f"{where}: {entry}.sha256: expected 64 lowercase hex digits, found {_short(rec['sha256'])}")
    _want(where, f"{entry}.bytes", rec["bytes"], (int,), "a byte count")
    if rec["bytes"] < 0:
        raise CheckpointError(f"{where}: {entry}.bytes: expected a byte count >= 0, found {rec['bytes']}")


def _check_record(where: str, entry: str, rec) -> None:
    _want(where, entry, rec, (dict,), "an object with dtype, shape")
    _want_keys(where, entry, rec, ("dtype", "shape"))
    _want(where, f"{entry}.dtype", rec["dtype"], (str,), "a dtype name such as 'uint8'")
    if not isinstance(getattr(torch, rec["dtype"], None), torch.dtype):
        raise CheckpointError(f"{where}: {entry}.dtype: expected a torch dtype name such as 'uint8', "
                              f"found {rec['dtype']!r}")
    shape = rec["shape"]
    _want(where, f"{entry}.shape", shape, (list,), "a list of integers >= 0")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise CheckpointError(f"{where}: {entry}.shape: expected integers >= 0, found {_short(shape)}")


# --- the tensor file --------------------------------------------------------------------------------

def read_tensors(path, meta: dict) -> Dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` after checking the file against the (checked) manifest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    f = d / WEIGHTS_FILE
    if not f.is_file():
        raise CheckpointError(f"{d} is not a lowbit checkpoint (needs {META_FILE} and {WEIGHTS_FILE}); "
                              "create one with `lowbit quantize --out DIR`")
    rec = meta.get("files", {}).get(WEIGHTS_FILE)
    if rec is None:
        warnings.warn(f"{d} was written before lowbit recorded checksums (checkpoint version "
                      f"{meta['lowbit_checkpoint']}): the integrity of {WEIGHTS_FILE} could not be checked; "
                      "re-save it with this lowbit to add them", UserWarning, stacklevel=3)
    else:
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"{f}: expected {rec['bytes']} bytes as {META_FILE} records, found {size}: "
                                  "the file was truncated or replaced after saving")
        sha = file_sha256(f)
        if sha != rec["sha256"]:
            raise CheckpointError(f"{f}: expected SHA-256 {rec['sha256'][:16]}... as {META_FILE} records, "
                                  f"found {sha[:16]}...: the file was modified after saving")
    try:
        state = load_file(str(f))
    except SafetensorError as e:
        raise CheckpointError(f"{f}: expected a safetensors file, found one that does not parse ({e})") from None
    if "tensors" in meta:
        _match_records(f, meta["tensors"], state)
    check_layouts(f, meta, state)
    return state


def _match_records(f: Path, records: dict, state: Dict[str, torch.Tensor]) -> None:
    missing = sorted(set(records) - set(state))
    unknown = sorted(set(state) - set(records))
    if missing or unknown:
        raise CheckpointError(f"{f}: expected the {len(records)} tensors {META_FILE} records, found "
                              + (f"{missing[:3]} missing" if missing else "")
                              + ("; " if missing and unknown else "")
                              + (f"{unknown[:3]} not recorded" if unknown else ""))
    for name, rec in records.items():
        t = state[name]
        if list(t.shape) != rec["shape"] or dtype_name(t.dtype) != rec["dtype"]:
            raise CheckpointError(f"{f}: tensor {name!r}: expected {rec['dtype']} {rec['shape']} as {META_FILE} "
                                  f"records, found {dtype_name(t.dtype)} {list(t.shape)}")


def check_layouts(f: Path, meta: dict, state: Dict[str, torch.Tensor]) -> None:
    """The packed tensors of every quantized layer are those its spec and shape imply; tied names
    point at stored tensors."""
    quantized = set()
    for name, info in meta["layers"].items():
        if f"{name}.weight" in state:
            raise CheckpointError(f"{f}: layer {name!r}: expected its weight packed (listed in {META_FILE} "
                                  f"layers), found a plain tensor {name}.weight")
        prefix = f"{name}.weight."
        have = {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}
        quantized.update(prefix + k for k in have)
        rows, cols = matrix_shape(info["shape"])
        want = dense_layout(QuantSpec.parse(info["weight"]), (rows, cols))
        if info.get("retain"):
            want.update(_retained_layout(f, name, have, RetainFormat.parse(info["retain"]), rows, cols))
        missing = sorted(set(want) - set(have))
        unknown = sorted(set(have) - set(want))
        if missing or unknown:
            raise CheckpointError(f"{f}: layer {name!r} ({info['weight']}"
                                  + (f", retain {info['retain']}" if info.get("retain") else "")
                                  + f"): expected packed tensors {sorted(want)}, found "
                                  + (f"{missing} missing" if missing else "") + ("; " if missing and unknown else "")
                                  + (f"{unknown} not implied by its spec" if unknown else ""))
        for k, (shape, dtypes) in want.items():
            t = have[k]
            if (shape is not None and tuple(t.shape) != shape) or t.dtype not in dtypes:
                expected = " or ".join(dtype_name(x) for x in dtypes) + (f" {list(shape)}" if shape else "")
                raise CheckpointError(f"{f}: layer {name!r} {info['weight']} of shape {info['shape']}: tensor "
                                      f"{prefix}{k}: expected {expected}, found {dtype_name(t.dtype)} {list(t.shape)}")
    for name, source in meta["tied"].items():
        if source not in state or source in quantized:
            raise CheckpointError(f"{f}: tied[{name!r}]: expected the name of a stored tensor, found {source!r}")
        if name in state:
            raise CheckpointError(f"{f}: tied[{name!r}]: expected no stored tensor of that name (it is tied to "
                                  f"{source!r}), found one")


def _retained_layout(f: Path, name: str, have: dict, rfmt: RetainFormat, rows: int, cols: int) -> dict:
    """Expected retained side tensors of a layer, sized by the number of kept weights the stored
    positions say; {} where the layer kept none."""
    present = [k for k in RETAIN_TENSORS if k in have]
    if not present:
        return {}
    u8 = (torch.uint8,)
    col_bits, count_bits = max(1, math.ceil(math.log2(cols))), math.ceil(math.log2(cols + 1))
    if "retain_bitmap" in have:
        layout = {"retain_bitmap": ((packed_bytes(rows * cols, 1),), u8)}
        bitmap = have["retain_bitmap"]
        ok = bitmap.dtype == torch.uint8 and tuple(bitmap.shape) == layout["retain_bitmap"][0]
        k = int(unpack_bits(bitmap, 1, rows * cols).sum()) if ok else None
    else:
        layout = {"retain_row_counts": ((packed_bytes(rows, count_bits),), u8)}
        counts = have.get("retain_row_counts")
        ok = counts is not None and counts.dtype == torch.uint8 and tuple(counts.shape) == layout["retain_row_counts"][0]
        k = None
        if ok:
            per_row = unpack_bits(counts, count_bits, rows)
            if int(per_row.max()) > cols:
                raise CheckpointError(f"{f}: layer {name!r}: tensor {name}.weight.retain_row_counts: expected "
                                      f"counts of at most {cols} kept weights per row, found {int(per_row.max())}")
            k = int(per_row.sum())
    # with k unknown the names and dtypes are still checked; the sizes then follow from k
    layout["retain_values"] = (None if k is None else (packed_bytes(k, rfmt.bits),), u8)
    if "retain_bitmap" not in have:
        layout["retain_cols"] = (None if k is None else (packed_bytes(k, col_bits),), u8)
    if rfmt.scaled:
        layout["retain_scales"] = ((rows,) if rfmt.scale == "row" else (1,), (torch.float16,))
    return layout
