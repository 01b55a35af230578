import hashlib
import json
import os
import platform
import re

import pytest
import torch

from lowbit.data import corpus as corpus_mod
from lowbit.data import (MODULES, calibration_batches, evaluation_sentences, evaluation_tokens,
                         stdlib_corpus)


class CharTokenizer:
    """A stand-in tokenizer: one token per character (its code point mod 5000)."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True, verbose=True):
        return {"input_ids": [ord(c) % 5000 for c in text]}


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_build_is_deterministic_and_checksums_match_text(corpus):
    fresh = corpus_mod._build(corpus_mod.sysconfig.get_paths()["stdlib"], MODULES)  # no caches at all
    assert fresh.sha256 == corpus.sha256
    assert fresh.calibration == corpus.calibration and fresh.evaluation == corpus.evaluation
    for split in ("calibration", "evaluation"):
        text = getattr(corpus, split)
        assert corpus.sha256[split] == hashlib.sha256(text.encode("utf-8")).hexdigest()
        assert corpus.n_chars[split] == len(text)
        assert corpus.n_paragraphs[split] == len(text.split("\n\n"))
    assert corpus.python_version == platform.python_version()
    assert corpus.python_version in corpus.checksum and corpus.sha256["evaluation"] in corpus.checksum
    assert corpus.describe()["sha256"] == corpus.sha256


def test_splits_are_disjoint_and_nontrivial(corpus):
    cal = corpus.calibration.split("\n\n")
    ev = corpus.evaluation.split("\n\n")
    assert not set(cal) & set(ev)
    assert len(set(cal)) == len(cal) and len(set(ev)) == len(ev)  # de-duplicated
    assert not set(corpus.modules["calibration"]) & set(corpus.modules["evaluation"])
    tops = [{m.split(".")[0] for m in corpus.modules[s]} for s in ("calibration", "evaluation")]
    assert not tops[0] & tops[1]  # split by top-level package
    assert corpus.n_chars["calibration"] > 300_000 and corpus.n_chars["evaluation"] > 80_000
    assert corpus.n_paragraphs["evaluation"] > 500
    assert not corpus.missing_modules  # every listed module exists on this Python


def test_paragraphs_are_normalised_prose(corpus):
    for p in (corpus.calibration + "\n\n" + corpus.evaluation).split("\n\n"):
        assert p == " ".join(p.split())
        assert len(p.split()) >= corpus_mod.MIN_WORDS
        assert ">>>" not in p
    # well-known prose from a calibration and an evaluation module
    assert "harmonic mean" in corpus.calibration  # statistics
    assert corpus.modules["evaluation"] and "logging" in corpus.modules["evaluation"]


def test_paragraph_filters():
    doc = ("Short line.\n\n"
           "This paragraph has enough words to count as real English prose for the corpus.\n\n"
           ">>> print('doctest')\n'doctest'\n\n"
           "x = foo(bar[1], baz={2: 3}) + qux(4, 5, 6) * 7 - 8 / 9 ## 10 11 12\n\n"
           "Another   paragraph,\n   spread over\tlines, that should be joined into one single line.")
    assert corpus_mod._paragraphs(doc) == [
        "This paragraph has enough words to count as real English prose for the corpus.",
        "Another paragraph, spread over lines, that should be joined into one single line."]


def test_disk_cache_roundtrip_and_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    mods = ("colorsys", "fnmatch", "shlex", "textwrap")
    corpus_mod._corpus.cache_clear()
    try:
        first = stdlib_corpus(mods)
        files = list((tmp_path / "corpus").iterdir())
        assert len(files) == 1
        corpus_mod._corpus.cache_clear()
        assert stdlib_corpus(mods) == first  # read back from disk
        blob = json.loads(files[0].read_text())
        blob["parts"]["calibration"][0] = "tampered " + blob["parts"]["calibration"][0]
        files[0].write_text(json.dumps(blob))
        corpus_mod._corpus.cache_clear()
        again = stdlib_corpus(mods)  # checksum mismatch -> rebuilt from source
        assert again.sha256 == first.sha256 and not again.calibration.startswith("tampered")
    finally:
        corpus_mod._corpus.cache_clear()


def test_calibration_batches_shape_content_and_determinism(corpus):
    tok = CharTokenizer()
    a = calibration_batches(tok, 8, 64, seed=0)
    b = calibration_batches(tok, 8, 64, seed=0)
    c = calibration_batches(tok, 8, 64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = torch.tensor(tok(corpus.calibration)["input_ids"])
    for row in a:  # each row is a window of the calibration stream
        assert "".join(chr(int(t)) for t in row) in corpus.calibration
    assert len({tuple(r.tolist()) for r in a}) == 8
    assert stream.numel() == corpus.n_chars["calibration"]
    with pytest.raises(ValueError, match="longer than the calibration text"):
        calibration_batches(tok, 1, stream.numel() + 1)


def test_evaluation_tokens_prefix_and_limit(corpus):
    tok = CharTokenizer()
    full = evaluation_tokens(tok)
    assert full.numel() == corpus.n_chars["evaluation"]
    head = evaluation_tokens(tok, max_tokens=100)
    assert torch.equal(head, full[:100])
    assert evaluation_tokens(tok) is full  # cached per tokenizer and text


def test_evaluation_sentences(corpus):
    sents = evaluation_sentences(50)
    assert len(sents) == 50 and len(set(sents)) == 50
    assert sents == evaluation_sentences(50)
    for s in sents:
        assert s in corpus.evaluation and s not in corpus.calibration
        assert re.match(r"[A-Z]", s) and s[-1] in ".!?"
        assert 6 <= len(s.split()) <= 48
    assert len(evaluation_sentences()) == len(corpus.sentences) > 500
    with pytest.raises(ValueError):
        evaluation_sentences(len(corpus.sentences) + 1)


def test_module_list_is_sorted_and_importable_names():
    assert list(MODULES) == sorted(set(MODULES))
    assert all(re.fullmatch(r"[a-z_][a-zA-Z0-9_.]*", m) for m in MODULES)
    assert os.path.isdir(corpus_mod.sysconfig.get_paths()["stdlib"])
