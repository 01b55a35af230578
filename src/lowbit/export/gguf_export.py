"""``lowbit export DIR --to gguf``: a lowbit checkpoint of a Llama-architecture causal LM as one
GGUF file that llama.cpp and transformers (``gguf_file=``) read, written with the ``gguf`` package.

Each quantized layer goes in the GGUF type that holds its spec exactly (``export.gguf_blocks``):
codes and scales are copied, not re-quantized, so a per-layer plan exports per layer. A layer with no
exact type is refused with the reason; with ``allow_requantize`` it is re-quantized by gguf's own
quantizer to ``requantize_type`` and the error is reported. Float tensors keep their stored 16-bit
dtype (F16/BF16; norms F32, as llama.cpp stores them). After writing, every tensor is read back
with ``gguf.GGUFReader`` and decoded with ``gguf.quants.dequantize``; a tensor that does not decode
to lowbit's values is an error unless it was re-quantized on request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .gguf_blocks import encode, exact_type
from .stored import StoredCheckpoint, read_checkpoint

FLOAT_TYPES = ("auto", "f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q4_0", "q4_1")
TENSOR_TYPES = FLOAT_TYPES + QUANT_TYPES
ARCHITECTURES = ("llama",)
_TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """An export that cannot be written as asked: the message says what and what is accepted."""


@dataclass
class GGUFOptions:
    embedding_type: str = "auto"   # token_embd: auto keeps the stored 16-bit values
    output_type: str = "auto"      # an unquantized, untied lm_head
    float_type: str = "auto"       # other unquantized 2-D weights
    allow_requantize: bool = False
    requantize_type: Optional[str] = None  # for layers with no exact type; None: q4_0 (<= 4 bits) or q8_0
    tokenizer_pre: Optional[str] = None    # llama.cpp's pre-tokenizer name; None: from the model name

    def __post_init__(self) -> None:
        for key in ("embedding_type", "output_type", "float_type"):
            v = getattr(self, key)
            if v not in TENSOR_TYPES:
                raise ExportError(f"{key} {v!r}: accepted {', '.join(TENSOR_TYPES)}")
        if self.requantize_type is not None and self.requantize_type not in QUANT_TYPES:
            raise ExportError(f"requantize_type {self.requantize_type!r}: accepted {', '.join(QUANT_TYPES)}")


@dataclass
class TensorRecord:
    name: str            # the GGUF tensor name
    source: str          # lowbit's tensor or layer name
    gguf_type: str
    lossless: bool
    rel_error: float = 0.0  # ||decoded - lowbit|| / ||lowbit|| (0 when lossless)
    note: str = ""


@dataclass
class GGUFReport:
    path: str
    bytes: int
    tensors: List[TensorRecord] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def lossless(self) -> bool:
        return all(t.lossless for t in self.tensors)

    def to_dict(self) -> dict:
        types: Dict[str, int] = {}
        for t in self.tensors:
            types[t.gguf_type] = types.get(t.gguf_type, 0) + 1
        return {"path": self.path, "bytes": self.bytes, "lossless": self.lossless, "types": types,
                "requantized": [vars(t) for t in self.tensors if not t.lossless], "notes": self.notes}


def _config(ck: StoredCheckpoint):
    from transformers import AutoConfig

    if ck.meta["kind"] != "causal_lm":
        raise ExportError(f"{ck.path}: GGUF export takes causal LMs; this checkpoint holds a {ck.meta['kind']!r} model")
    try:
        cfg = AutoConfig.from_pretrained(ck.path)
    except (OSError, ValueError) as e:
        raise ExportError(f"{ck.path}: expected the model's config.json beside the checkpoint ({e})") from None
    if cfg.model_type not in ARCHITECTURES:
        raise ExportError(f"{ck.path}: GGUF export writes {', '.join(ARCHITECTURES)} models; this is a "
                          f"{cfg.model_type!r} model")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"{ck.path}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not exported "
                          "(plain RoPE only)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ExportError(f"{ck.path}: Llama models with attention or MLP biases are not exported")
    return cfg


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _unsupported(ck: StoredCheckpoint, allow: bool) -> List[str]:
    """What the checkpoint holds that a GGUF file cannot: refused, or dropped with a note."""
    found = []
    acts = {n: i["act"] for n, i in ck.meta["layers"].items() if i["act"]} | dict(ck.meta["act_only"])
    if acts:
        found.append(f"activation quantization ({len(acts)} layers, e.g. {next(iter(acts.values()))}): llama.cpp "
                     "picks its own activation precision")
    if ck.meta.get("kv"):
        found.append("KV-cache quantization: set llama.cpp's cache type instead (--cache-type-k/-v)")
    if ck.meta.get("input_transforms"):
        raise ExportError(f"{ck.path}: online input transforms (rotation/smoothing) have no GGUF equivalent; "
                          "quantize without --rotate online / --smooth to export")
    if found and not allow:
        raise ExportError(f"{ck.path}: not representable in GGUF: {'; '.join(found)}. Re-run with "
                          "--allow-requantize to export the weights without it")
    return [f"dropped {f}" for f in found]


def _qk_row_order(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp stores q_proj/k_proj in (rotary pairs interleaved per head), the
    inverse of what GGUF readers undo."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _gguf_qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def _requantize(W: torch.Tensor, gtype: str) -> np.ndarray:
    from gguf.quants import quantize

    return quantize(W.float().numpy(), _gguf_qtype(gtype))


def _float_type(t: torch.Tensor, choice: str) -> str:
    """F32/F16/BF16 for a float tensor: ``auto`` keeps 16-bit values as they are stored."""
    if choice != "auto":
        return choice
    if t.dtype == torch.bfloat16:
        return "bf16"
    if t.dtype == torch.float16:
        return "f16"
    from .float_storage import exactly_in

    for name in ("bf16", "f16"):
        if exactly_in(t.float(), _TORCH[name]):
            return name
    return "f32"


def _float_data(t: torch.Tensor, gtype: str) -> np.ndarray:
    if gtype == "f32":
        return t.float().numpy()
    if gtype == "f16":
        return t.to(torch.float16).numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()  # bytes, with raw_dtype BF16


def _tokenizer(writer, ck: StoredCheckpoint, vocab_size: int, pre: Optional[str]) -> None:
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(ck.path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"{ck.path}: GGUF export writes GPT-2 style BPE tokenizers (tokenizer.json with a "
                          f"byte-level BPE model); found none usable ({e})") from None
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > vocab_size:
        raise ExportError(f"{ck.path}: the tokenizer has {len(tokens)} tokens, the model's embedding {vocab_size} rows")
    for i in range(len(tokens), vocab_size):  # llama.cpp needs one token per embedding row
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    name = str(ck.meta.get("model", "")).lower()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or ("smollm" if "smollm" in name else "default"))
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(ck.path, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def export_gguf(checkpoint, out, options: Optional[GGUFOptions] = None) -> GGUFReport:
    """Write the checkpoint directory ``checkpoint`` as the GGUF file ``out``; returns what was
    written (per tensor: type, lossless or re-quantized with its error)."""
    import gguf

    opts = options or GGUFOptions()
    ck = read_checkpoint(checkpoint)
    cfg = _config(ck)
    notes = _unsupported(ck, opts.allow_requantize)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    planned = []  # (gguf name, source, data, gguf type, lossless, expected float32 values or None, note)
    problems = []
    sources = list(ck.layers) + [n for n in ck.floats if n.endswith((".weight", ".bias"))]
    if cfg.tie_word_embeddings:
        sources = [n for n in sources if not n.startswith("lm_head")]
    for src in sources:
        base, suffix = src.rsplit(".", 1) if src not in ck.layers else (src, "weight")
        gname = names.get_name(base)
        if gname is None:
            problems.append(f"{src}: no GGUF tensor name for this Llama tensor")
            continue
        gname = f"{gname}.{suffix}"
        order = None
        if base.endswith("self_attn.q_proj"):
            order = _qk_row_order(n_head * head_dim, n_head)
        elif base.endswith("self_attn.k_proj"):
            order = _qk_row_order(n_kv * head_dim, n_kv)
        if src in ck.layers:
            planned.append(_plan_layer(ck.layers[src], gname, order, opts, problems))
        else:
            planned.append(_plan_float(src, ck.floats[src], gname, order, opts, problems))
    if problems:
        raise ExportError(f"{ck.path}: cannot export losslessly to GGUF: {'; '.join(problems)}. Re-run with "
                          "--allow-requantize to re-quantize these with gguf's quantizer (the error is reported), "
                          "or quantize with a spec GGUF holds exactly")

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(str(ck.meta.get("model", "lowbit")))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_file_type([p[3] for p in planned]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, ck, cfg.vocab_size, opts.tokenizer_pre)
    for gname, _src, data, gtype, _lossless, _expected, _note in planned:
        raw = None if gtype in ("f32", "f16") else _gguf_qtype(gtype)
        writer.add_tensor(gname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = GGUFReport(str(out), out.stat().st_size, notes=notes)
    report.tensors = _check_read_back(out, planned)
    return report


def _plan_layer(layer, gname: str, order, opts: GGUFOptions, problems: List[str]):
    gtype, why = exact_type(layer.spec, layer.shape[1])
    expected = layer.weight()
    if order is not None:
        expected = expected[order]
    if layer.retain:
        gtype, why = None, f"{layer.name}: retained high-impact weights ({layer.retain}) have no GGUF equivalent"
    if gtype is not None:
        levels, zeros = layer.levels(), layer.zeros()
        scales = layer.tensors["scales"]
        if order is not None:
            levels, scales = levels[order], scales[order]
            zeros = zeros[order] if zeros is not None else None
        try:
            data = encode(gtype, levels, scales, zeros, layer.name)
            return gname, layer.name, data, gtype.lower(), True, expected, ""
        except ValueError as e:
            why = str(e)
        if gtype == "Q4_1" and opts.allow_requantize and opts.requantize_type is None:
            # the codes and scales fit; only the float16 offsets round: the closest Q4_1 there is
            data = encode(gtype, levels, scales, zeros, layer.name, round_offset=True)
            return gname, layer.name, data, "q4_1", False, expected, f"offsets rounded to float16: {why}"
    if not opts.allow_requantize:
        problems.append(why if why.startswith(layer.name) else f"{layer.name}: {why}")
        return gname, layer.name, None, None, False, None, why
    target = opts.requantize_type or ("q4_0" if layer.spec.fmt.bits <= 4 else "q8_0")
    return gname, layer.name, _requantize(expected, target), target, False, expected, f"re-quantized: {why}"


def _plan_float(src: str, t: torch.Tensor, gname: str, order, opts: GGUFOptions, problems: List[str]):
    if order is not None:
        t = t[order]
    expected = t.float()
    if t.dim() == 1:
        return gname, src, _float_data(t, "f32"), "f32", True, expected, ""
    choice = opts.embedding_type if gname.startswith("token_embd") else \
        opts.output_type if gname.startswith("output.") else opts.float_type
    gtype = _float_type(t, choice)
    if gtype in _TORCH:
        from .float_storage import exactly_in

        lossless = exactly_in(expected, _TORCH[gtype])
        data = _float_data(t, gtype)
    else:
        lossless, data = False, _requantize(expected, gtype)
    if not lossless and not opts.allow_requantize:
        problems.append(f"{src}: stored as {str(t.dtype).removeprefix('torch.')}, {gtype.upper()} does not hold "
                        "it exactly")
    return gname, src, data, gtype, lossless, expected, "" if lossless else f"converted to {gtype.upper()}"


def _file_type(types: List[str]) -> int:
    """GGUF's general.file_type: the most common weight type of the file."""
    from gguf import LlamaFileType

    mains = [t for t in types if t != "f32"] or ["f32"]
    main = max(set(mains), key=mains.count)
    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
            "q4_1": LlamaFileType.MOSTLY_Q4_1}[main]


def _check_read_back(path: Path, planned) -> List[TensorRecord]:
    """Decode every tensor of the written file with gguf's reader and compare with lowbit's values."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    records = []
    for gname, src, _data, gtype, lossless, expected, note in planned:
        t = stored.get(gname)
        if t is None:
            raise ExportError(f"{path}: tensor {gname} is missing after writing")
        got = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        got = got.reshape(expected.shape)
        same = torch.equal(got, expected)
        if lossless and not same:
            bad = int((got != expected).sum())
            raise ExportError(f"{path}: {gname} ({src}) does not decode to lowbit's values ({bad} differ)")
        err = 0.0 if same else float((got - expected).norm() / expected.norm().clamp_min(1e-30))
        records.append(TensorRecord(gname, src, gtype.upper(), same, err, note))
    return records
