"""A small byte-level BPE tokenizer trained on the training part of the stdlib training corpus, for
models trained from scratch: deterministic (the same corpus and vocabulary size give the same
``tokenizer.json``), cached on disk, and saved with every sweep so another machine uses the very
same ids (``load_tokenizer(path)``)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from ..data.corpus import cache_dir
from ..data.train_corpus import TrainingCorpus, training_corpus

#: Document separator (found by lowbit.data.train_corpus's ``separator="auto"``).
EOT = "<|endoftext|>"
MIN_VOCAB, MAX_VOCAB = 300, 65536


def _check_vocab(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be an int in [{MIN_VOCAB}, {MAX_VOCAB}] (256 bytes + merges); "
                         f"got {vocab_size!r}")
    return vocab_size


def train_bpe_json(corpus: TrainingCorpus, vocab_size: int) -> str:
    """The ``tokenizer.json`` text of a byte-level BPE with ``vocab_size`` ids (``EOT`` included)
    trained on the corpus's training documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = [d.text for d in corpus.documents if d.split == "train"]
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    # sort_keys: the vocabulary and merges keep their order (lists), only object keys are sorted
    return json.dumps(json.loads(tok.to_str()), sort_keys=True)


def _wrap(spec: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec), eos_token=EOT)


def corpus_tokenizer(vocab_size: int = 4096, corpus: Optional[TrainingCorpus] = None, cache: bool = True):
    """The BPE tokenizer of ``corpus`` (default: the training corpus) as a transformers fast
    tokenizer; trained once (seconds) and cached under ``cache_dir()/scaling`` by corpus checksum
    and vocabulary size."""
    _check_vocab(vocab_size)
    corpus = corpus or training_corpus()
    path = os.path.join(cache_dir(), "scaling", f"bpe-{corpus.sha256[:20]}-{vocab_size}.json")
    spec = None
    if cache and os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            spec = fh.read()
    if spec is None:
        spec = train_bpe_json(corpus, vocab_size)
        if cache:
            _write_text(path, spec)
    return _wrap(spec)


def save_tokenizer(tokenizer, path: str) -> str:
    """Write the tokenizer's ``tokenizer.json`` to ``path`` (atomically); returns ``path``."""
    spec = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()), sort_keys=True)
    _write_text(path, spec)
    return path


def load_tokenizer(path: str):
    """The tokenizer saved by :func:`save_tokenizer` (or any ``tokenizer.json`` holding ``EOT``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            spec = fh.read()
        tok = _wrap(spec)
    except OSError as e:
        raise ValueError(f"tokenizer file {path}: cannot be read ({e})") from None
    except Exception as e:  # tokenizers raises its own Exception subclass on a malformed file
        raise ValueError(f"tokenizer file {path}: not a tokenizer.json ({type(e).__name__}: {e})") from None
    if tok.convert_tokens_to_ids(EOT) is None or tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(EOT)) != EOT:
        raise ValueError(f"tokenizer file {path}: has no {EOT} token to separate documents")
    return tok


def tokenizer_sha256(tokenizer) -> str:
    """Checksum of the tokenizer's canonical JSON (what a sweep records with each run)."""
    spec = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()), sort_keys=True)
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
