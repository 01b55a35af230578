"""The training corpus (lowbit.data.train_corpus): deterministic, disjoint from the evaluation split,
and batches that are a pure function of (seed, step)."""
import hashlib
import json
import os
import time

import pytest
import torch

from lowbit.data import corpus as corpus_mod
from lowbit.data import stdlib_corpus
from lowbit.data import train_corpus as tc
from lowbit.data.corpus import SENTENCE_BREAK, in_evaluation

# Builds in about a second; aifc shares docstring sentences with the held-out wave module, and
# fractions, graphlib, textwrap are validation packages.
SMALL = ("aifc", "bisect", "fractions", "graphlib", "json", "json.decoder", "logging", "textwrap", "wave")


class CharTokenizer:
    """One token per character (its code point); takes a string or a list of strings. Its EOS, the
    document separator, is 0 (NUL, which no source holds)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True, verbose=True):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        return {"input_ids": [ord(c) for c in text]}


class VocabCharTokenizer(CharTokenizer):
    """The same, with a vocabulary, so its tokens may be cached on disk."""

    def get_vocab(self):
        return {chr(i): i for i in range(128)}


def _decode(ids):
    return "".join(chr(int(t)) for t in ids)


@pytest.fixture(scope="module")
def evaluation():
    return stdlib_corpus()


@pytest.fixture(scope="module")
def full(evaluation):
    return tc.training_corpus(evaluation=evaluation)


@pytest.fixture(scope="module")
def small(evaluation):
    return tc.training_corpus(SMALL, cache=False, evaluation=evaluation)


def _needles(evaluation):
    """Every evaluation paragraph and sentence of at least 80 characters, found independently of
    the builder's own list."""
    out = set(s for s in evaluation.sentences if len(s) >= 80)
    for p in evaluation.evaluation.split("\n\n"):
        out.update(x for x in [p] + SENTENCE_BREAK.split(p) if len(x) >= 80)
    return out


# ---------------------------------------------------------------------------------------------
# the corpus

def test_in_evaluation_is_the_split_of_the_evaluation_corpus(evaluation):
    for split in ("evaluation", "calibration"):
        assert all(in_evaluation(m) == (split == "evaluation") for m in evaluation.modules[split])
    assert in_evaluation("logging.handlers") == in_evaluation("logging") is True
    assert corpus_mod._in_evaluation is in_evaluation
    for bad in ("", None, ".json"):
        with pytest.raises(ValueError, match="dotted module name"):
            in_evaluation(bad)


def test_full_build_is_deterministic_fast_and_checksummed(full, evaluation):
    tc._MEMO.clear()
    t0 = time.perf_counter()
    fresh = tc.training_corpus(cache=False, evaluation=evaluation)  # from the sources, no cache
    seconds = time.perf_counter() - t0
    print(f"\nfull training corpus build: {seconds:.1f}s; {full.describe()}")
    assert seconds < 60
    assert fresh.sha256 == full.sha256 and fresh.text == full.text and fresh.documents == full.documents
    assert full.sha256 == hashlib.sha256(full.text.encode("utf-8")).hexdigest()
    assert full.text == "\n\n".join(d.text for d in full.documents)
    assert list(full.modules) == sorted(full.modules)
    assert full.evaluation_sha256 == evaluation.sha256["evaluation"]
    assert full.n_chars["total"] == len(full.text) > 6_000_000  # several million tokens of source
    assert not full.not_utf8
    paths = {d.path for d in full.documents}
    for excluded in ("test/", "idlelib/idle_test/", "lib2to3/tests/", "site-packages/", "_sysconfigdata"):
        assert not any(p.startswith(excluded) for p in paths), excluded
    assert "idlelib/editor.py" in paths and "argparse.py" in paths  # real sources with code and comments


def test_no_evaluation_module_source_is_used(full, evaluation):
    assert not any(in_evaluation(m) for m in full.modules)
    assert set(evaluation.modules["evaluation"]) <= set(full.held_out)
    assert not set(evaluation.modules["evaluation"]) & set(full.modules)
    assert set(evaluation.modules["calibration"]) <= set(full.modules)
    # by content too: no held-out source file (with something in it) is a document
    stdlib = corpus_mod.stdlib_dir()
    held = {}
    for module, rel in tc._module_files(stdlib):
        if module in full.held_out:
            text = open(os.path.join(stdlib, rel), encoding="utf-8").read()
            if len(text) > 200:
                held[hashlib.sha256(text.encode()).hexdigest()] = module
    assert len(held) > 100
    assert not {hashlib.sha256(d.text.encode()).hexdigest() for d in full.documents} & set(held)


def test_no_evaluation_paragraph_or_sentence_is_in_the_training_text(full, evaluation):
    needles = _needles(evaluation)
    assert len(needles) > 500
    collapsed = " ".join(full.text.split())  # sources wrap docstrings over indented lines
    assert [n for n in needles if n in collapsed] == []
    # ...and that took removing text: the sources of these modules did hold evaluation sentences
    assert {m for m, _ in full.removed} >= {"aifc", "sunau"}
    stdlib = corpus_mod.stdlib_dir()
    for module in {m for m, _ in full.removed}:
        rel = dict(tc._module_files(stdlib))[module]
        raw = " ".join(open(os.path.join(stdlib, rel), encoding="utf-8").read().split())
        assert any(n in raw for n in needles), module
    for module, piece in full.removed:
        assert any(" ".join(piece.split()) == n for n in tc._needles(evaluation.evaluation)), (module, piece)


def test_shared_text_is_removed_across_line_breaks_and_word_edges():
    needle = "The close() method is called automatically when the class instance is destroyed right now."
    finder = tc._SharedText([needle, "x" * 90])
    src = ('    def f():\n        """Intro.\n\n        The close() method is called automatically\n'
           '        when the class instance is destroyed right now.  Kept.\n        """\n'
           + "y = '" + "x" * 90 + "'\n")
    text, removed = tc._remove_shared(src, finder)
    assert "close()" not in text and "x" * 90 not in text
    assert 'Intro.\n\n        ' in text and ".  Kept." not in text and "  Kept." in text and "y = ''" in text
    assert [" ".join(r.split()) for r in removed] == [needle, "x" * 90]
    # a needle whose first word is the tail of a longer word still matches (substring semantics)
    text, removed = tc._remove_shared("Xthe close() method is called automatically when the class "
                                      "instance is destroyed right now.", tc._SharedText([needle[2:]]))
    assert text == "Xth" and len(removed) == 1


def test_small_build_splits_and_disk_cache(small, tmp_path, monkeypatch, evaluation):
    assert small.split_modules("validation") == ("fractions", "graphlib", "textwrap")
    assert small.split_modules("train") == ("aifc", "bisect", "json", "json.decoder")
    assert set(small.held_out) == {"logging", "wave"}  # held out even when asked for
    assert small.removed and {m for m, _ in small.removed} == {"aifc"}
    assert small.n_chars["train"] + small.n_chars["validation"] + 2 * (len(small.documents) - 1) == len(small.text)
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    tc._MEMO.clear()
    first = tc.training_corpus(SMALL, evaluation=evaluation)
    assert first == small
    files = [f for f in (tmp_path / "corpus").iterdir() if f.name.startswith("train-")]
    assert len(files) == 1
    tc._MEMO.clear()
    assert tc.training_corpus(SMALL, evaluation=evaluation) == small  # read back
    blob = json.loads(files[0].read_text())
    blob["documents"][0][2] = "tampered"
    files[0].write_text(json.dumps(blob))
    tc._MEMO.clear()
    again = tc.training_corpus(SMALL, evaluation=evaluation)  # checksum mismatch: rebuilt
    assert again.sha256 == small.sha256 and "tampered" not in again.text
    tc._MEMO.clear()
    with pytest.raises(ValueError, match="sequence of module names"):
        tc.training_corpus("json")


# ---------------------------------------------------------------------------------------------
# batches

def test_batches_shape_and_windows_of_the_training_stream(small):
    tok = CharTokenizer()
    b = tc.training_batches(tok, 64, 4, seed=0, corpus=small)
    x = b.batch(0)
    assert x.shape == (4, 64) and x.dtype == torch.long
    train_text = "".join(d.text + chr(0) for d in small.documents if d.split == "train")
    assert b.tokens.numel() == len(train_text)  # only training documents, each closed by the separator
    for row in torch.cat([b.batch(s) for s in range(20)]):
        assert _decode(row) in train_text
    none = tc.training_batches(tok, 64, 4, corpus=small, separator=None)
    assert none.tokens.numel() == small.n_chars["train"]
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        tc.training_batches(tok, 0, 4, corpus=small)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        b.batch(-1)
    with pytest.raises(ValueError, match="separator must be"):
        tc.training_batches(tok, 64, 4, corpus=small, separator="eos")
    with pytest.raises(ValueError, match="needs at least"):
        tc.training_batches(tok, 10 ** 7, 1, corpus=small)


def test_batch_is_a_pure_function_of_seed_and_step(small):
    tok = CharTokenizer()
    a = tc.training_batches(tok, 128, 8, seed=3, corpus=small)
    late = a.batch(1234)  # far into the run, before anything else: as a resumed run would start
    early = [a.batch(s) for s in range(5)]
    tc._epoch_order.cache_clear()
    b = tc.training_batches(tok, 128, 8, seed=3, corpus=small)
    assert torch.equal(b.batch(1234), late)
    assert all(torch.equal(b.batch(s), e) for s, e in zip(range(5), early))
    assert torch.equal(b.batch(2), b.batch(2))
    other = tc.training_batches(tok, 128, 8, seed=4, corpus=small)
    assert not torch.equal(other.batch(0), early[0])
    assert not torch.equal(early[0], early[1])


def test_an_epoch_shows_every_window_once(small):
    tok = CharTokenizer()
    b = tc.training_batches(tok, 512, 1, seed=0, corpus=small)
    n = b.n_chunks
    assert b.steps_per_epoch == n
    rows = [tuple(b.batch(s)[0].tolist()) for s in range(n)]
    assert len(set(rows)) == n  # no window twice within an epoch
    offset, perm = tc._epoch_order(0, 0, n, 512)
    starts = sorted(offset + p * 512 for p in perm)
    assert starts == [offset + i * 512 for i in range(n)]  # windows tile the stream
    nxt = [tuple(b.batch(s)[0].tolist()) for s in range(n, n + 5)]
    assert nxt != rows[:5]  # the next epoch is reshuffled


def test_validation_is_disjoint_from_training(small):
    tok = CharTokenizer()
    v = tc.validation_batches(tok, 64, 2, corpus=small)
    assert v.dim() == 3 and v.shape[1:] == (2, 64) and v.dtype == torch.long
    valid_text = "".join(d.text + chr(0) for d in small.documents if d.split == "validation")
    assert _decode(v.reshape(-1)) == valid_text[:v.numel()]
    assert torch.equal(v, tc.validation_batches(tok, 64, 2, corpus=small))
    assert tc.validation_batches(tok, 64, 2, max_batches=3, corpus=small).shape == (3, 2, 64)
    b = tc.training_batches(tok, 64, 2, corpus=small)
    train_text = _decode(b.tokens)
    for mod in small.split_modules("validation"):
        doc = next(d for d in small.documents if d.module == mod)
        assert doc.text not in train_text and doc.text[:300] not in train_text
    assert not set(small.split_modules("validation")) & set(small.split_modules("train"))
    with pytest.raises(ValueError, match="fewer than one batch"):
        tc.validation_batches(tok, 4096, 64, corpus=small)


def test_token_disk_cache_roundtrip_and_damage(small, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    first = tc.training_tokens(VocabCharTokenizer(), small)
    assert first.offsets[-1] == first.ids.numel() == sum(len(d.text) for d in small.documents)
    assert _decode(first.document(1)) == small.documents[1].text
    files = list((tmp_path / "train_tokens").iterdir())
    assert len(files) == 1
    again = tc.training_tokens(VocabCharTokenizer(), small)  # another object: read from disk
    assert again.seconds == 0.0 and torch.equal(again.ids, first.ids)
    blob = torch.load(files[0], weights_only=True)
    blob["ids"][0] += 1
    torch.save(blob, files[0])
    rebuilt = tc.training_tokens(VocabCharTokenizer(), small)
    assert rebuilt.seconds > 0 and torch.equal(rebuilt.ids, first.ids)
    tc.training_tokens(CharTokenizer(), small)  # no vocabulary to fingerprint: memory only
    assert len(list((tmp_path / "train_tokens").iterdir())) == 1


# ---------------------------------------------------------------------------------------------
# sentences (encoders)

def test_training_sentences_are_seeded_and_disjoint_from_evaluation(full, evaluation):
    pool = tc.training_sentences(corpus=full, evaluation=evaluation)
    assert len(pool) > 5000 and len(set(pool)) == len(pool)
    assert not set(pool) & set(evaluation.sentences)
    some = tc.training_sentences(200, seed=1, corpus=full, evaluation=evaluation)
    assert some == tc.training_sentences(200, seed=1, corpus=full, evaluation=evaluation)
    assert some != tc.training_sentences(200, seed=2, corpus=full, evaluation=evaluation)
    collapsed = " ".join(full.text.split())
    for s in some:
        assert s not in evaluation.evaluation and s in collapsed
        assert s[0].isupper() and s[-1] in ".!?" and 6 <= len(s.split()) <= 48
    valid = tc.training_sentences(split="validation", corpus=full, evaluation=evaluation)
    assert valid and not set(valid) & set(pool)
    with pytest.raises(ValueError, match="n must be between 1 and"):
        tc.training_sentences(len(pool) + 1, corpus=full, evaluation=evaluation)
    with pytest.raises(ValueError, match="unknown split"):
        tc.training_sentences(3, split="test", corpus=full, evaluation=evaluation)


# ---------------------------------------------------------------------------------------------
# the real tokenizer

@pytest.mark.slow
def test_smollm2_tokens_of_the_full_corpus(full):
    pytest.importorskip("transformers")
    from lowbit.models import MissingModelPackageError, load_model
    try:
        tok = load_model().tokenizer
    except MissingModelPackageError as e:
        pytest.skip(str(e))
    tokens = tc.training_tokens(tok, full)
    print(f"\nSmolLM2 tokens: {tokens.ids.numel()} (tokenizing took {tokens.seconds:.1f}s; 0 = from cache)")
    assert tokens.ids.numel() > 1_500_000 and int(tokens.ids.max()) < len(tok)
    doc = full.modules.index("json.decoder")
    assert tok.decode(tokens.document(doc)) == full.documents[doc].text
    b = tc.training_batches(tok, 2048, 4, seed=0, corpus=full)
    assert b.batch(10).shape == (4, 2048)
    assert int((b.tokens == 0).sum()) == len(full.split_modules("train"))  # <|endoftext|> closes each document
    v = tc.validation_batches(tok, 2048, 4, corpus=full)
    assert v.shape[0] >= 8


# ---------------------------------------------------------------------------------------------
# frozen corpus (LOWBIT_TRAIN_CORPUS), for machines with another Python

def test_frozen_corpus_roundtrip_gives_the_same_text_batches_and_sentences(small, tmp_path, monkeypatch,
                                                                           evaluation):
    path = tc.save_training_corpus(str(tmp_path / "train.json.gz"), small)
    assert open(path, "rb").read(2) == b"\x1f\x8b"
    again = tc.save_training_corpus(str(tmp_path / "again.json.gz"), small)
    assert open(path, "rb").read() == open(again, "rb").read()  # no timestamp: same corpus, same bytes
    assert os.path.getsize(path) < len(small.text.encode()) / 2
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(tc.TRAIN_CORPUS_ENV, path)
    tc._MEMO.clear()
    frozen = tc.training_corpus(evaluation=evaluation)  # the default corpus is now the file's
    assert frozen.sha256 == small.sha256 and frozen.documents == small.documents
    assert frozen.checksum == small.checksum and frozen.describe() == small.describe()
    assert not (tmp_path / "cache" / "corpus").exists()  # loaded, not built
    tok = CharTokenizer()
    a = tc.training_batches(tok, 64, 4, seed=7)  # no corpus given: the frozen one
    b = tc.training_batches(tok, 64, 4, seed=7, corpus=small)
    assert a.corpus_sha256 == small.sha256
    assert all(torch.equal(a.batch(s), b.batch(s)) for s in (0, 3, 99))
    assert torch.equal(tc.validation_batches(tok, 64, 2), tc.validation_batches(tok, 64, 2, corpus=small))
    assert torch.equal(tc.training_tokens(VocabCharTokenizer()).ids, tc.training_tokens(VocabCharTokenizer(), small).ids)
    assert tc.training_sentences(evaluation=evaluation) == tc.training_sentences(corpus=small, evaluation=evaluation)
    assert tc.training_corpus(SMALL[:2], cache=False, evaluation=evaluation).modules == ("aifc", "bisect")  # subsets build


def test_damaged_frozen_corpus_is_a_clear_error(small, tmp_path, monkeypatch, evaluation):
    import gzip

    good = tc.save_training_corpus(str(tmp_path / "good.json.gz"), small)
    blob = json.loads(gzip.decompress(open(good, "rb").read()))
    blob["documents"][1][2] += "# edited\n"
    edited = tmp_path / "edited.json.gz"
    edited.write_bytes(gzip.compress(json.dumps(blob).encode()))
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(open(good, "rb").read()[:5000])
    plain = tmp_path / "evaluation.json"
    corpus_mod.save_corpus(str(plain), evaluation)  # the evaluation corpus's file, not a training corpus
    cases = [(edited, "does not match its stored checksum"), (cut, "not a readable training corpus file"),
             (plain, "not a readable training corpus file"), (tmp_path / "missing.json.gz", "no such file")]
    for path, message in cases:
        monkeypatch.setenv(tc.TRAIN_CORPUS_ENV, str(path))
        tc._MEMO.clear()
        with pytest.raises(ValueError, match=message):
            tc.training_corpus(evaluation=evaluation)
    # a corpus kept disjoint from another evaluation split must not be trained on beside this one
    other = corpus_mod.stdlib_corpus(("json", "logging", "wave"), cache=False)
    monkeypatch.setenv(tc.TRAIN_CORPUS_ENV, good)
    with pytest.raises(ValueError, match="kept disjoint from the evaluation text"):
        tc.training_corpus(evaluation=other)
    assert tc.training_corpus(evaluation=evaluation).sha256 == small.sha256
