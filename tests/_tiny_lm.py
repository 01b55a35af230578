"""A tiny random Llama with a byte-level tokenizer, saved as a Hugging Face directory: runnable end to
end through ``lowbit quantize MODEL_DIR`` and the Python API (calibration and perplexity on lowbit's
stdlib corpus) without any packaged model."""
from pathlib import Path

import torch


def byte_tokenizer():
    """A 256-token byte-level tokenizer (no merges): every text encodes, one token per UTF-8 byte."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def byte_llama(blocks=2, hidden_size=64, intermediate_size=96, seed=0):
    """A LlamaForCausalLM over the 256 byte tokens, weights drawn from ``seed``, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_hidden_layers=blocks, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def save_byte_llama(path, **kw) -> str:
    """Write ``byte_llama(**kw)`` and its tokenizer to ``path``; returns the directory."""
    path = Path(path)
    byte_llama(**kw).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)
