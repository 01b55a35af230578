"""LOWBIT_CORPUS: a corpus frozen on one machine is used verbatim on another (other Python version)."""
import json

import pytest

from lowbit.data import corpus as corpus_mod
from lowbit.data.corpus import CORPUS_ENV, save_corpus, stdlib_corpus

SMALL = ("abc", "bisect", "json", "queue", "textwrap")  # a few modules: builds in well under a second


@pytest.fixture
def frozen(tmp_path, monkeypatch):
    monkeypatch.delenv(CORPUS_ENV, raising=False)
    corpus_mod._frozen.cache_clear()
    small = stdlib_corpus(modules=SMALL, cache=False)
    path = save_corpus(str(tmp_path / "corpus.json"), small)
    yield small, path
    corpus_mod._frozen.cache_clear()


def test_frozen_corpus_is_used_with_its_own_python_version(frozen, monkeypatch):
    small, path = frozen
    blob = json.load(open(path))
    blob["python_version"] = "3.99.0"  # as if frozen elsewhere: the saver's version is kept
    json.dump(blob, open(path, "w"))
    monkeypatch.setenv(CORPUS_ENV, path)
    got = stdlib_corpus()
    assert got.calibration == small.calibration and got.evaluation == small.evaluation
    assert got.sha256 == small.sha256 and got.sentences == small.sentences
    assert got.python_version == "3.99.0" and "3.99.0" in got.checksum
    # an explicit module list still builds from this Python's stdlib
    assert stdlib_corpus(modules=("abc",), cache=False).sha256 != small.sha256


def test_damaged_or_unreadable_frozen_corpus_is_refused(frozen, monkeypatch, tmp_path):
    _, path = frozen
    blob = json.load(open(path))
    blob["parts"]["evaluation"][0] += " edited"
    json.dump(blob, open(path, "w"))
    monkeypatch.setenv(CORPUS_ENV, path)
    with pytest.raises(ValueError, match="does not match its stored checksums"):
        stdlib_corpus()
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    monkeypatch.setenv(CORPUS_ENV, str(bad))
    with pytest.raises(ValueError, match="not a readable corpus file"):
        stdlib_corpus()
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="not a readable corpus file"):
        stdlib_corpus()
