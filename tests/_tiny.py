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
