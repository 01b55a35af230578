import copy
import math
import time

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lowbit.data import evaluation_sentences, evaluation_tokens, stdlib_corpus  # noqa: E402
from lowbit.evaluate import embed, embedding_fidelity, perplexity, perplexity_stats, windows  # noqa: E402
from lowbit.models import MissingModelPackageError, load_model  # noqa: E402


def tiny_llama(seed=0, vocab=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_recipe_nll(model, tokens, context, stride):
    """Independent reference: the usual Hugging Face sliding-window recipe, using the model's own
    `labels=` loss (mean over non-ignored shifted labels), masking already-scored tokens with -100."""
    n = tokens.numel()
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        ids = tokens[begin:end].unsqueeze(0)
        labels = ids.clone()
        labels[:, :-trg_len] = -100
        scored = int((labels[:, 1:] != -100).sum())
        if scored:
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels).loss
            total += loss.item() * scored
            count += scored
        prev_end = end
        if end == n:
            break
    return total / count, count


def test_windows_rule():
    assert windows(10, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert windows(9, 4) == [(0, 4, 1), (4, 8, 5)]  # a one-token last window scores nothing
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(3, 8) == [(0, 3, 1)]
    with pytest.raises(ValueError):
        windows(10, 4, 5)  # would skip tokens
    with pytest.raises(ValueError):
        windows(10, 1)


@pytest.mark.parametrize("n,context,stride,batch", [(37, 8, None, 3), (37, 8, 3, 2), (40, 8, None, 4),
                                                     (20, 64, None, 4)])
def test_perplexity_matches_hf_recipe(n, context, stride, batch):
    model = tiny_llama(seed=1)
    torch.manual_seed(2)
    tokens = torch.randint(0, 64, (n,))
    stats = perplexity_stats(model, tokens, context=context, stride=stride, batch_size=batch)
    ref_nll, ref_count = hf_recipe_nll(model, tokens, context, stride or context)
    assert stats["n_tokens"] == ref_count
    assert stats["nll"] == pytest.approx(ref_nll, rel=1e-5)
    assert perplexity(model, tokens, context, stride, batch_size=1) == pytest.approx(math.exp(ref_nll), rel=1e-5)


def test_perplexity_counts_tokens():
    model = tiny_llama()
    tokens = torch.randint(0, 64, (100,))
    assert perplexity_stats(model, tokens, context=16)["n_tokens"] == 100 - math.ceil(100 / 16)
    assert perplexity_stats(model, tokens, context=16, stride=4)["n_tokens"] == 99


class UniformLM(nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab) + self.dummy


class CopyLM(nn.Module):
    """Puts probability p on repeating the current token, the rest spread evenly."""

    def __init__(self, vocab, p):
        super().__init__()
        self.vocab, self.p = vocab, p
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        probs = torch.full((*input_ids.shape, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs.scatter_(-1, input_ids.unsqueeze(-1), self.p)
        return probs.log() + self.dummy


def test_perplexity_of_known_distributions():
    tokens = torch.randint(0, 50, (300,))
    assert perplexity(UniformLM(50), tokens, context=32) == pytest.approx(50.0, rel=1e-6)
    # a constant sequence under CopyLM: every scored token has probability p
    const = torch.full((100,), 7)
    assert perplexity(CopyLM(50, 0.8), const, context=10) == pytest.approx(1 / 0.8, rel=1e-6)
    # alternating tokens never repeat: probability (1-p)/(V-1) each
    alt = torch.arange(100) % 2
    assert perplexity(CopyLM(50, 0.8), alt, context=10) == pytest.approx(49 / 0.2, rel=1e-6)


def test_perplexity_restores_training_mode_and_rejects_bad_input():
    model = tiny_llama().train()
    perplexity(model, torch.randint(0, 64, (20,)), context=8)
    assert model.training
    with pytest.raises(ValueError):
        perplexity(model, torch.randint(0, 64, (2, 20)), context=8)
    with pytest.raises(ValueError):
        perplexity(model, torch.tensor([3]), context=8)


# ---------------------------------------------------------------------------------------------
# real models (offline, from their PyPI packages)

@pytest.fixture(scope="module")
def minilm():
    try:
        return load_model("minilm")
    except MissingModelPackageError as e:
        pytest.skip(str(e))


def test_minilm_embeddings_and_fidelity(minilm):
    assert minilm.kind == "encoder" and minilm.config["n_parameters"] == pytest.approx(22.7e6, rel=0.01)
    model, tok = minilm.model, minilm.tokenizer
    sents = evaluation_sentences(24)
    emb = embed(model, tok, sents, batch_size=8)
    assert emb.shape == (24, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(24), atol=1e-5)
    # padding does not leak into the mean: a sentence alone == the same sentence in a padded batch
    short, long = "A short sentence.", " ".join(sents[:3])
    alone = embed(model, tok, [short])
    padded = embed(model, tok, [short, long])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    # meaning: a paraphrase is much closer than an unrelated sentence
    a, b, c = embed(model, tok, ["The cat sits on the mat.", "A cat is sitting on a mat.",
                                 "Stock prices fell sharply on Monday."])
    assert float(a @ b) > 0.8 and float(a @ c) < 0.3

    same = embedding_fidelity(model, model, tok, sents[:8])  # reference given as a model
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["spearman"] == pytest.approx(1.0, abs=1e-12)
    same = embedding_fidelity(emb, model, tok, sents)  # reference given as embeddings
    assert same["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert same["spearman"] == pytest.approx(1.0, abs=1e-12) and same["n_sentences"] == 24

    noisy = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.add_(torch.randn_like(p) * p.std() * 0.3)
    worse = embedding_fidelity(emb, noisy, tok, sents)
    assert worse["cosine_mean"] < 0.99 and worse["cosine_min"] < worse["cosine_mean"]
    assert worse["spearman"] < 0.99
    assert worse["cosine_mean"] > 0.3 and worse["spearman"] > 0.2  # perturbed, not destroyed


@pytest.mark.slow
def test_smollm2_loads_offline_and_has_sensible_perplexity():
    try:
        t0 = time.perf_counter()
        lm = load_model()
        load_s = time.perf_counter() - t0
    except MissingModelPackageError as e:
        pytest.skip(str(e))
    assert lm.kind == "causal_lm" and lm.name == "SmolLM2-135M-Instruct"
    assert lm.config["n_parameters"] == 134_515_008 and lm.config["hidden_size"] == 576
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        nxt = lm.model(ids).logits[0, -1].argmax()
    assert lm.tokenizer.decode(nxt).strip() == "Paris"
    tokens = evaluation_tokens(lm.tokenizer, max_tokens=1024)
    assert tokens.numel() == 1024
    stats = perplexity_stats(lm.model, tokens, context=512, batch_size=2)
    print(f"\nSmolLM2-135M: load {load_s:.1f}s (cached copy: {lm.cached}); evaluation slice of "
          f"{stats['n_tokens']} scored tokens, context 512: perplexity {stats['perplexity']:.3f} "
          f"in {stats['seconds']:.1f}s; corpus {stdlib_corpus().checksum}")
    assert stats["n_tokens"] == 1022
    assert 5.0 < stats["perplexity"] < 60.0
