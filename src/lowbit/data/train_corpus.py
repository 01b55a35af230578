"""Training text for quantization-aware training, adapters and scaling sweeps: the Python standard
library's own source files, offline and deterministic.

The corpus is the full source (code, comments and docstrings) of every stdlib module that the one
project-wide split (:func:`lowbit.data.corpus.in_evaluation`) does not hold out for evaluation.
docs/corpus.md ("Training corpus") describes it; in short:

1. Walk ``<stdlib>`` (:func:`~lowbit.data.corpus.stdlib_dir`) in sorted order and take every ``.py``
   file whose path is a module name (each directory and the file stem are Python identifiers), except
   test suites (directories :data:`EXCLUDED_DIRS`), machine-specific files
   (:data:`EXCLUDED_PREFIXES`) and files that are not valid UTF-8. Directories such as
   ``site-packages``, ``lib-dynload`` or ``config-3.11-...`` are not identifiers, so never entered.
2. Drop every module whose top-level package is held out for evaluation (``logging.handlers`` goes
   with ``logging``).
3. Remove from each source every occurrence of an evaluation paragraph, or of one sentence of one,
   that is at least :data:`SHARED_MIN_CHARS` characters long, compared with whitespace runs collapsed
   (a docstring copied from a held-out module into a kept one); the removed spans are listed.
4. Modules of :data:`VALIDATION_PACKAGES` form the validation part (for monitoring loss), the rest
   the training part; both are documents of the corpus, in sorted module order.
5. The checksum is the SHA-256 of :attr:`TrainingCorpus.text`, the documents joined by ``"\\n\\n"``,
   in UTF-8.

Token batches (:func:`training_batches`, :func:`validation_batches`) come from the documents
tokenised once per tokenizer and cached on disk, next to the corpus, under ``cache_dir()``.

Another Python version has other stdlib sources, so another corpus: :func:`save_training_corpus`
freezes this one into a file, and ``LOWBIT_TRAIN_CORPUS=file`` makes :func:`training_corpus` (and
so the tokens, batches and sentences) use it on the other machine, as ``LOWBIT_CORPUS`` does for
the evaluation corpus.
"""
from __future__ import annotations

import ast
import bisect
import functools
import gzip
import hashlib
import json
import os
import platform
import random
import re
import time
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .corpus import (SENTENCE_BREAK, Corpus, cache_dir, in_evaluation, prose_paragraphs, sentences_of,
                     stdlib_corpus, stdlib_dir)

__all__ = ["Document", "TrainingCorpus", "DocumentTokens", "TokenBatches", "training_corpus", "training_tokens",
           "training_batches", "validation_batches", "training_sentences", "save_training_corpus",
           "TRAIN_CORPUS_ENV", "VALIDATION_PACKAGES", "SHARED_MIN_CHARS"]

#: Bumped whenever the construction changes (part of the on-disk cache keys).
BUILD_VERSION = 1

#: Directories never entered: test suites (``test/``, ``lib2to3/tests``, ``idlelib/idle_test``,
#: ``ctypes/test``, ``tkinter/test``, ``unittest/test``, ``distutils/tests``...) and byte code.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})

#: Module-name prefixes never read: ``_sysconfigdata_*`` records this machine's build paths and
#: compiler flags, so it differs between two installs of the same Python.
EXCLUDED_PREFIXES = ("_sysconfigdata_",)

#: Top-level packages whose modules are the validation part: text of the training distribution
#: that the training batches never show. Fixed by name, as the evaluation split is.
VALIDATION_PACKAGES: Tuple[str, ...] = ("calendar", "fractions", "graphlib", "ipaddress", "statistics",
                                        "textwrap", "tomllib", "zoneinfo")

#: Evaluation paragraphs and sentences at least this long are removed from the training text.
SHARED_MIN_CHARS = 80

SPLITS = ("train", "validation")

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Document:
    """One module's source file: ``path`` is relative to the stdlib directory; ``split`` is
    ``"train"`` or ``"validation"``."""

    module: str
    path: str
    text: str
    split: str


@dataclass(frozen=True)
class TrainingCorpus:
    """The built training corpus. ``sha256`` is the SHA-256 of :attr:`text` (UTF-8), valid for
    ``python_version``; ``evaluation_sha256`` names the evaluation split it was kept disjoint from."""

    documents: Tuple[Document, ...]
    sha256: str
    python_version: str
    evaluation_sha256: str
    held_out: Tuple[str, ...]                   # modules skipped because held out for evaluation
    not_utf8: Tuple[str, ...]                   # modules skipped because their file is not UTF-8
    removed: Tuple[Tuple[str, str], ...]        # (module, text) spans shared with the evaluation split

    @functools.cached_property
    def text(self) -> str:
        """All documents, in order, joined by a blank line (what :attr:`sha256` hashes)."""
        return "\n\n".join(d.text for d in self.documents)

    @property
    def modules(self) -> Tuple[str, ...]:
        return tuple(d.module for d in self.documents)

    def split_modules(self, split: str) -> Tuple[str, ...]:
        _check_split(split)
        return tuple(d.module for d in self.documents if d.split == split)

    @property
    def n_chars(self) -> Dict[str, int]:
        out = {s: sum(len(d.text) for d in self.documents if d.split == s) for s in SPLITS}
        out["total"] = len(self.text)
        return out

    @property
    def checksum(self) -> str:
        return f"python {self.python_version}: training corpus sha256 {self.sha256}"

    def describe(self) -> dict:
        """A JSON-ready summary (record it next to every training run)."""
        return {"source": "python-stdlib-sources", "python_version": self.python_version,
                "sha256": self.sha256, "evaluation_sha256": self.evaluation_sha256,
                "n_chars": self.n_chars,
                "n_modules": {s: len(self.split_modules(s)) for s in SPLITS},
                "validation_packages": list(VALIDATION_PACKAGES),
                "n_held_out_modules": len(self.held_out), "not_utf8": list(self.not_utf8),
                "n_removed_shared_spans": len(self.removed)}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'validation'")


# ---------------------------------------------------------------------------------------------
# Building

def _module_files(stdlib: str) -> List[Tuple[str, str]]:
    """(module, path relative to stdlib) of every candidate source file, sorted by module name."""
    out = []
    for root, dirs, files in os.walk(stdlib):
        rel = os.path.relpath(root, stdlib)
        parts = [] if rel == "." else rel.split(os.sep)
        dirs[:] = [d for d in dirs if d.isidentifier() and d not in EXCLUDED_DIRS
                   and not os.path.islink(os.path.join(root, d))]
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext != ".py" or not stem.isidentifier():
                continue
            module = ".".join(parts if stem == "__init__" else parts + [stem])
            if not module or module.startswith(EXCLUDED_PREFIXES):
                continue
            out.append((module, os.path.join(*parts, name) if parts else name))
    # A directory without __init__.py can hold a module whose name a top-level file also has; the
    # path breaks the tie so the order never depends on the file system.
    return sorted(out)


def _needles(evaluation: str) -> List[str]:
    """Evaluation paragraphs and their sentences of at least SHARED_MIN_CHARS characters."""
    out = set()
    for paragraph in evaluation.split("\n\n"):
        for piece in [paragraph] + SENTENCE_BREAK.split(paragraph):
            piece = piece.strip()
            if len(piece) >= SHARED_MIN_CHARS:
                out.add(piece)
    return sorted(out)


class _SharedText:
    """Finds evaluation paragraphs and sentences inside a source, whitespace runs counting as one
    space. A needle found in the collapsed text has whole words inside and possibly a partial
    word at each end, so four of its inner words (an anchor) locate candidates in one pass."""

    ANCHOR = 4

    def __init__(self, needles: Sequence[str]):
        self.anchored: Dict[Tuple[str, ...], List[List[str]]] = {}
        self.short: List[str] = []  # too few words for an anchor: plain search
        for needle in needles:
            words = needle.split(" ")
            if len(words) >= self.ANCHOR + 2:
                self.anchored.setdefault(tuple(words[1:1 + self.ANCHOR]), []).append(words)
            else:
                self.short.append(needle)
        self.first = {k[0] for k in self.anchored}

    def spans(self, text: str) -> List[Tuple[int, int]]:
        """Character spans of ``text`` holding a needle, merged, in order."""
        found = []
        matches = list(_WORD.finditer(text))
        words = [m.group() for m in matches]
        k = self.ANCHOR
        for j in range(1, len(words)):
            if words[j] not in self.first:
                continue
            for nw in self.anchored.get(tuple(words[j:j + k]), ()):
                m = len(nw)
                last = j + m - 2
                if (last < len(words) and words[j - 1].endswith(nw[0]) and words[last].startswith(nw[-1])
                        and words[j + k:last] == nw[1 + k:m - 1]):
                    found.append((matches[j - 1].end() - len(nw[0]), matches[last].start() + len(nw[-1])))
        if self.short:
            collapsed = " ".join(words)
            starts = [0]
            for w in words[:-1]:
                starts.append(starts[-1] + len(w) + 1)
            for needle in self.short:
                for hit in re.finditer(re.escape(needle), collapsed):
                    found.append(_raw_span(hit.start(), hit.end(), starts, matches))
        merged: List[Tuple[int, int]] = []
        for a, b in sorted(found):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged


def _raw_span(a: int, b: int, starts: List[int], matches) -> Tuple[int, int]:
    """Map a span of the collapsed text back to the raw text."""
    i = bisect.bisect_right(starts, a) - 1
    j = bisect.bisect_right(starts, b - 1) - 1
    return matches[i].start() + (a - starts[i]), matches[j].start() + (b - starts[j])


def _remove_shared(text: str, finder: _SharedText) -> Tuple[str, List[str]]:
    """``text`` without the evaluation text it shares, and the removed pieces. Repeated until none is
    left, since a removal could in principle join two halves into a new match."""
    removed = []
    while True:
        spans = finder.spans(text)
        if not spans:
            return text, removed
        removed += [text[a:b] for a, b in spans]
        pieces, pos = [], 0
        for a, b in spans:
            pieces.append(text[pos:a])
            pos = b
        pieces.append(text[pos:])
        text = "".join(pieces)


def _docstring_sentences(source: str) -> List[str]:
    """Sentences of every docstring (module, classes, functions, private ones too), by the rules of
    the evaluation sentences."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    paragraphs = []
    # Docstrings live only in statement lists, so expressions are not walked (ast.walk visits
    # every node and takes most of the build time).
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                paragraphs.append((getattr(node, "lineno", 0), doc))
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, name, None)
            if isinstance(children, list):
                todo.extend(c for c in children if isinstance(c, ast.AST))
    paragraphs.sort(key=lambda x: x[0])  # source order, whatever order the walk took
    return list(sentences_of([p for _, doc in paragraphs for p in prose_paragraphs(doc)]))


def _build(stdlib: str, evaluation: Corpus, only: Optional[Tuple[str, ...]]) -> TrainingCorpus:
    finder = _SharedText(_needles(evaluation.evaluation))
    docs, held_out, not_utf8, removed = [], [], [], []
    for module, rel in _module_files(stdlib):
        if only is not None and module not in only:
            continue
        if in_evaluation(module):
            held_out.append(module)
            continue
        with open(os.path.join(stdlib, rel), "rb") as fh:
            raw = fh.read()
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            not_utf8.append(module)
            continue
        split = "validation" if module.split(".")[0] in VALIDATION_PACKAGES else "train"
        text, gone = _remove_shared(source, finder)
        removed += [(module, g) for g in gone]
        docs.append(Document(module, rel.replace(os.sep, "/"), text, split))
    return _assemble(docs, evaluation.python_version, evaluation.sha256["evaluation"], held_out, not_utf8,
                     removed)


def _assemble(docs, python_version, evaluation_sha256, held_out, not_utf8, removed) -> TrainingCorpus:
    text = "\n\n".join(d.text for d in docs)
    corpus = TrainingCorpus(tuple(docs), hashlib.sha256(text.encode("utf-8")).hexdigest(), python_version,
                            evaluation_sha256, tuple(held_out), tuple(not_utf8),
                            tuple((m, t) for m, t in removed))
    corpus.__dict__["text"] = text  # the cached_property, filled now that it is computed anyway
    return corpus


def _cache_key(stdlib: str, evaluation_sha256: str, only: Optional[Tuple[str, ...]]) -> str:
    """Changes with the Python version, the build rules, the evaluation text and any source file."""
    h = hashlib.sha256(f"v{BUILD_VERSION}|{platform.python_implementation()}|{platform.python_version()}|"
                       f"{evaluation_sha256}|{SHARED_MIN_CHARS}|{VALIDATION_PACKAGES}|{sorted(EXCLUDED_DIRS)}|"
                       f"{EXCLUDED_PREFIXES}|{only}".encode())
    for module, rel in _module_files(stdlib):
        st = os.stat(os.path.join(stdlib, rel))
        h.update(f"|{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _write_json(path: str, blob: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(blob, fh)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only cache is no reason to fail


def _blob(corpus: TrainingCorpus) -> dict:
    """The JSON form of a corpus: what the disk cache and a frozen file hold."""
    return {"python_version": corpus.python_version, "sha256": corpus.sha256,
            "evaluation_sha256": corpus.evaluation_sha256,
            "documents": [[d.module, d.path, d.text, d.split] for d in corpus.documents],
            "held_out": list(corpus.held_out), "not_utf8": list(corpus.not_utf8),
            "removed": [list(r) for r in corpus.removed]}


def _from_blob(blob: dict) -> TrainingCorpus:
    """The corpus a blob of :func:`_blob` describes, its checksum computed afresh from the text."""
    return _assemble([Document(*d) for d in blob["documents"]], blob["python_version"],
                     blob["evaluation_sha256"], blob["held_out"], blob["not_utf8"],
                     [tuple(r) for r in blob["removed"]])


def _read_blob(path: str) -> dict:
    """A JSON file, gzip'd (a frozen corpus) or plain (the cache): told apart by the gzip magic."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return json.loads(raw.decode("utf-8"))


def _store(path: str, corpus: TrainingCorpus) -> None:
    _write_json(path, _blob(corpus))


def _load(path: str) -> Optional[TrainingCorpus]:
    try:
        blob = _read_blob(path)
        corpus = _from_blob(blob)
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        return None
    return corpus if corpus.sha256 == blob.get("sha256") else None  # damaged or edited: rebuild


#: Environment variable naming a frozen training corpus (written by :func:`save_training_corpus`)
#: to load instead of building from this Python's stdlib, whose sources differ between versions.
TRAIN_CORPUS_ENV = "LOWBIT_TRAIN_CORPUS"


def save_training_corpus(path: str, corpus: Optional[TrainingCorpus] = None) -> str:
    """Write ``corpus`` (default: :func:`training_corpus`) as a frozen, gzip'd JSON file that
    ``LOWBIT_TRAIN_CORPUS=path`` loads on another machine; returns ``path``. The bytes depend only
    on the corpus (no name or timestamp in the gzip header), so two saves of one corpus are identical."""
    corpus = corpus or training_corpus()
    data = json.dumps(_blob(corpus), separators=(",", ":")).encode("utf-8")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb",
                                                    compresslevel=9, mtime=0) as gz:
            gz.write(data)
        os.replace(tmp, path)  # a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _frozen(path: str) -> TrainingCorpus:
    """The corpus saved in ``path``, once its text is checked against the stored checksum. Kept in
    memory per file state, so a file replaced on disk is read again."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{TRAIN_CORPUS_ENV}={path}: no such file ({e})") from e
    return _frozen_at(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _frozen_at(path: str, mtime_ns: int, size: int) -> TrainingCorpus:
    try:
        blob = _read_blob(path)
        corpus = _from_blob(blob)
        stored = blob["sha256"]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:  # gzip raises EOFError when cut short
        raise ValueError(f"{TRAIN_CORPUS_ENV}={path}: not a readable training corpus file written by "
                         f"lowbit.data.train_corpus.save_training_corpus ({type(e).__name__}: {e})") from e
    if corpus.sha256 != stored:
        raise ValueError(f"{TRAIN_CORPUS_ENV}={path}: the text does not match its stored checksum "
                         f"(stored {stored}, text {corpus.sha256}); the file is damaged or was edited")
    return corpus


_MEMO: Dict[tuple, TrainingCorpus] = {}


def training_corpus(modules: Optional[Sequence[str]] = None, cache: bool = True,
                    evaluation: Optional[Corpus] = None) -> TrainingCorpus:
    """The training corpus of this Python's stdlib (see the module docstring for the rules).

    ``modules`` restricts it to those module names (for tests and experiments; the documented
    checksum holds only for None); held-out names among them are skipped like any other.
    ``evaluation`` is the corpus whose evaluation split it is kept disjoint from (default:
    :func:`~lowbit.data.corpus.stdlib_corpus`, so a frozen ``LOWBIT_CORPUS`` is honoured). The
    result is kept in memory and, with ``cache=True``, on disk under ``cache_dir()/corpus``, keyed
    by the Python version, the rules, the evaluation checksum and every source file's size and
    mtime; a cached file whose text does not hash to its checksum is rebuilt.

    With ``LOWBIT_TRAIN_CORPUS`` naming a file of :func:`save_training_corpus` (and ``modules``
    None), that frozen corpus is returned instead, after checking its text against its checksum
    and that it was kept disjoint from ``evaluation``'s split (ValueError otherwise)."""
    if modules is not None:
        if isinstance(modules, str) or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"modules must be a sequence of module names such as ['json', 'json.decoder']; "
                             f"got {modules!r}")
    evaluation = evaluation or stdlib_corpus()
    frozen = os.environ.get(TRAIN_CORPUS_ENV)
    if frozen and modules is None:
        corpus = _frozen(os.path.abspath(frozen))
        if corpus.evaluation_sha256 != evaluation.sha256["evaluation"]:
            # Its text was kept disjoint from another evaluation split: training on it could leak.
            raise ValueError(f"{TRAIN_CORPUS_ENV}={frozen}: this training corpus was kept disjoint from the "
                             f"evaluation text {corpus.evaluation_sha256[:12]}..., not from the one in use "
                             f"({evaluation.sha256['evaluation'][:12]}...); set LOWBIT_CORPUS to the "
                             f"evaluation corpus saved with it")
        return corpus
    only = None if modules is None else tuple(sorted(set(modules)))
    stdlib = stdlib_dir()
    memo_key = (stdlib, evaluation.sha256["evaluation"], only, bool(cache))
    corpus = _MEMO.get(memo_key)
    if corpus is not None:
        return corpus
    if cache:
        key = _cache_key(stdlib, evaluation.sha256["evaluation"], only)
        path = os.path.join(cache_dir(), "corpus", f"train-{key}.json")
        corpus = _load(path)
        if corpus is None:
            corpus = _build(stdlib, evaluation, only)
            _store(path, corpus)
    else:
        corpus = _build(stdlib, evaluation, only)
    _MEMO[memo_key] = corpus
    return corpus


# ---------------------------------------------------------------------------------------------
# Tokens

_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tokenizer_fingerprint(tokenizer) -> Optional[str]:
    """A hash of everything that decides a tokenizer's ids, or None when it cannot be read (then
    tokens are cached in memory only)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        # Set per call by the Python wrapper, so they say nothing about the ids.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        blob = json.dumps(spec, sort_keys=True)
    elif hasattr(tokenizer, "get_vocab"):
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        return None
    return hashlib.sha256(f"{type(tokenizer).__name__}|{blob}".encode()).hexdigest()


@dataclass(frozen=True, eq=False)  # tensors: compare their fields, not the objects
class DocumentTokens:
    """Every document's token ids, concatenated (``ids``), and where each starts and ends
    (``offsets``, one more than there are documents); ``seconds`` is the time tokenizing took
    (0 when read from the cache)."""

    ids: torch.Tensor
    offsets: torch.Tensor
    seconds: float

    def document(self, i: int) -> torch.Tensor:
        return self.ids[int(self.offsets[i]):int(self.offsets[i + 1])]


def _tokenize_documents(tokenizer, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)
    lists = enc["input_ids"]
    lengths = torch.tensor([0] + [len(x) for x in lists], dtype=torch.long)
    ids = torch.tensor([t for x in lists for t in x], dtype=torch.long)
    return ids, torch.cumsum(lengths, 0)


def training_tokens(tokenizer, corpus: Optional[TrainingCorpus] = None, cache: bool = True) -> DocumentTokens:
    """The token ids of every document of ``corpus`` (default :func:`training_corpus`), without
    special tokens, each document tokenised on its own. Cached in memory per tokenizer and on disk
    under ``cache_dir()/train_tokens`` per corpus checksum and tokenizer fingerprint."""
    corpus = corpus or training_corpus()
    try:
        per_tok = _TOKENS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memory cache
        per_tok = {}
    got = per_tok.get(corpus.sha256)
    if got is not None:
        return got
    fingerprint = _tokenizer_fingerprint(tokenizer) if cache else None
    path = None
    if fingerprint is not None:
        path = os.path.join(cache_dir(), "train_tokens", f"{corpus.sha256[:20]}-{fingerprint[:20]}.pt")
        got = _load_tokens(path, corpus.sha256, fingerprint, len(corpus.documents))
    if got is None:
        t0 = time.perf_counter()
        ids, offsets = _tokenize_documents(tokenizer, [d.text for d in corpus.documents])
        got = DocumentTokens(ids, offsets, time.perf_counter() - t0)
        if path is not None:
            _store_tokens(path, got, corpus.sha256, fingerprint)
    per_tok[corpus.sha256] = got
    return got


def _store_tokens(path: str, tokens: DocumentTokens, corpus_sha256: str, fingerprint: str) -> None:
    small = tokens.ids.numel() == 0 or int(tokens.ids.max()) < 2 ** 31
    ids = tokens.ids.to(torch.int32) if small else tokens.ids
    blob = {"ids": ids, "offsets": tokens.offsets, "corpus_sha256": corpus_sha256, "tokenizer": fingerprint,
            "ids_sha256": hashlib.sha256(tokens.ids.numpy().tobytes()).hexdigest()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError:
        pass


def _load_tokens(path: str, corpus_sha256: str, fingerprint: str, n_docs: int) -> Optional[DocumentTokens]:
    if not os.path.isfile(path):
        return None
    try:
        blob = torch.load(path, weights_only=True)
        ids, offsets = blob["ids"].to(torch.long), blob["offsets"].to(torch.long)
        ok = (blob["corpus_sha256"] == corpus_sha256 and blob["tokenizer"] == fingerprint
              and offsets.numel() == n_docs + 1 and int(offsets[-1]) == ids.numel()
              and hashlib.sha256(ids.numpy().tobytes()).hexdigest() == blob["ids_sha256"])
    except Exception:  # any unreadable file is simply rebuilt
        return None
    return DocumentTokens(ids, offsets, 0.0) if ok else None


def _separator(tokenizer, separator: Union[int, str, None]) -> Optional[int]:
    if separator is None:
        return None
    if separator == "auto":
        # SmolLM2 (and GPT-2-style vocabularies) separate pretraining documents with <|endoftext|>;
        # its Instruct tokenizer's EOS is the chat token <|im_end|>, so that comes second.
        # (SmolLM2's UNK is <|endoftext|> too, so the id is checked by converting it back.)
        if hasattr(tokenizer, "convert_tokens_to_ids") and hasattr(tokenizer, "convert_ids_to_tokens"):
            tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
            if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == "<|endoftext|>":
                return tid
        for attr in ("eos_token_id", "sep_token_id"):
            tid = getattr(tokenizer, attr, None)
            if isinstance(tid, int):
                return tid
        return None
    if isinstance(separator, bool) or not isinstance(separator, int) or separator < 0:
        raise ValueError(f"separator must be 'auto', None or a token id (int >= 0); got {separator!r}")
    return separator


def _stream(tokens: DocumentTokens, corpus: TrainingCorpus, split: str, sep: Optional[int]) -> torch.Tensor:
    """The documents of ``split`` in order, each followed by ``sep`` when given."""
    parts = []
    for i, doc in enumerate(corpus.documents):
        if doc.split == split:
            parts.append(tokens.document(i))
            if sep is not None:
                parts.append(torch.tensor([sep], dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _positive(**kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")


@dataclass(frozen=True, eq=False)
class TokenBatches:
    """Training batches: :meth:`batch` ``(step)`` is a pure function of ``(seed, step)``.

    The token stream is cut into ``n_chunks`` windows of ``seq_len`` tokens. Epoch ``e`` starts
    the windows at an offset in ``[0, seq_len)`` and visits them in a permutation, both drawn by
    ``random.Random(f"lowbit-train:{seed}:{e}")``; sample ``i = step * batch_size + b`` is window
    ``perm_e[i % n_chunks]`` of epoch ``e = i // n_chunks``. So each epoch shows every window once,
    and a run resumed at any step sees exactly the data an uninterrupted one would."""

    tokens: torch.Tensor
    seq_len: int
    batch_size: int
    seed: int
    corpus_sha256: str

    @property
    def n_chunks(self) -> int:
        return (self.tokens.numel() - self.seq_len + 1) // self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        return self.n_chunks / self.batch_size

    def _epoch(self, epoch: int) -> Tuple[int, List[int]]:
        return _epoch_order(self.seed, epoch, self.n_chunks, self.seq_len)

    def batch(self, step: int) -> torch.Tensor:
        """The LongTensor ``(batch_size, seq_len)`` of training step ``step`` (>= 0)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0; got {step!r}")
        rows = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            offset, perm = self._epoch(i // self.n_chunks)
            start = offset + perm[i % self.n_chunks] * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len])
        return torch.stack(rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1

    def describe(self) -> dict:
        return {"corpus_sha256": self.corpus_sha256, "n_tokens": self.tokens.numel(), "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed, "n_chunks": self.n_chunks,
                "steps_per_epoch": self.steps_per_epoch}


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n_chunks: int, seq_len: int) -> Tuple[int, List[int]]:
    # Only rng.random() is used: Python guarantees its sequence for a given seed across versions,
    # unlike shuffle()/randrange(), whose algorithms may change.
    rng = random.Random(f"lowbit-train:{seed}:{epoch}")
    offset = int(rng.random() * seq_len)
    perm = list(range(n_chunks))
    for i in range(n_chunks - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        perm[i], perm[j] = perm[j], perm[i]
    return offset, perm


def training_batches(tokenizer, seq_len: int, batch_size: int, seed: int = 0, *,
                     corpus: Optional[TrainingCorpus] = None, separator: Union[int, str, None] = "auto",
                     cache: bool = True) -> TokenBatches:
    """Batches of the training part (validation modules excluded) for next-token training.

    Documents are joined in corpus order, each followed by ``separator`` ("auto": the tokenizer's
    ``<|endoftext|>`` if it has one, else its EOS or SEP token; None: nothing; or a token id).
    See :class:`TokenBatches` for how ``batch(step)`` picks windows."""
    _positive(seq_len=seq_len, batch_size=batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    corpus = corpus or training_corpus()
    stream = _stream(training_tokens(tokenizer, corpus, cache), corpus, "train", _separator(tokenizer, separator))
    out = TokenBatches(stream, seq_len, batch_size, seed, corpus.sha256)
    if out.n_chunks < 1:
        raise ValueError(f"seq_len={seq_len} needs at least {2 * seq_len - 1} training tokens; the corpus "
                         f"has {stream.numel()}")
    return out


def validation_batches(tokenizer, seq_len: int, batch_size: int, max_batches: Optional[int] = None, *,
                       corpus: Optional[TrainingCorpus] = None, separator: Union[int, str, None] = "auto",
                       cache: bool = True) -> torch.Tensor:
    """The validation part (:data:`VALIDATION_PACKAGES`, never in the training batches) as a
    LongTensor ``(n_batches, batch_size, seq_len)`` of consecutive, non-overlapping windows from
    its start; the tokens after the last full batch are left out, as are batches past
    ``max_batches``. The same every call: for comparing losses during training."""
    _positive(seq_len=seq_len, batch_size=batch_size)
    if max_batches is not None:
        _positive(max_batches=max_batches)
    corpus = corpus or training_corpus()
    stream = _stream(training_tokens(tokenizer, corpus, cache), corpus, "validation",
                     _separator(tokenizer, separator))
    n = stream.numel() // (seq_len * batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    if n < 1:
        raise ValueError(f"the validation part has {stream.numel()} tokens, fewer than one batch of "
                         f"{batch_size} x {seq_len}; use a smaller batch_size or seq_len")
    return stream[:n * batch_size * seq_len].view(n, batch_size, seq_len).clone()


def _sentence_pool(corpus: TrainingCorpus, evaluation: Corpus, cache: bool) -> Dict[str, Tuple[str, ...]]:
    """Per split, the distinct docstring sentences of its documents (the training text, so with the
    shared spans already removed), minus any that occurs anywhere in the evaluation text (short
    boilerplate such as "Return the number of items." may be in both)."""
    key = hashlib.sha256(f"v{BUILD_VERSION}|{corpus.sha256}|{evaluation.sha256['evaluation']}".encode()).hexdigest()
    memo = _SENTENCES.get(key)
    if memo is not None:
        return memo
    path = os.path.join(cache_dir(), "corpus", f"train-sentences-{key[:20]}.json")
    pool = None
    if cache:
        try:
            with open(path, encoding="utf-8") as fh:
                blob = json.load(fh)
            if blob["sha256"] == hashlib.sha256(json.dumps(blob["pool"]).encode()).hexdigest():
                pool = {k: tuple(v) for k, v in blob["pool"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pool = None
    if pool is None:
        # Parsing 500 sources takes several seconds, hence the cache and doing it only on demand.
        seen, lists = set(), {s: [] for s in SPLITS}
        for doc in corpus.documents:
            for sentence in _docstring_sentences(doc.text):
                if sentence not in seen and sentence not in evaluation.evaluation:
                    seen.add(sentence)
                    lists[doc.split].append(sentence)
        pool = {k: tuple(v) for k, v in lists.items()}
        if cache:
            body = {k: list(v) for k, v in pool.items()}
            _write_json(path, {"sha256": hashlib.sha256(json.dumps(body).encode()).hexdigest(), "pool": body})
    _SENTENCES[key] = pool
    return pool


_SENTENCES: Dict[str, Dict[str, Tuple[str, ...]]] = {}


def training_sentences(n: Optional[int] = None, seed: int = 0, *, split: str = "train",
                       corpus: Optional[TrainingCorpus] = None, evaluation: Optional[Corpus] = None,
                       cache: bool = True) -> List[str]:
    """``n`` distinct docstring sentences of the training modules (all when None), for encoders.

    Sentences follow the rules of :func:`~lowbit.data.corpus.evaluation_sentences` (6 to 48 words,
    capitalised, ending in ``.``/``!``/``?``) and come from every docstring (private ones too) of
    the ``split`` documents; a sentence that occurs anywhere in the evaluation text is left out.
    The ``n`` returned are the first by ``sha256(f"{seed}:{sentence}")``: a seeded sample that is
    the same on every machine. The pool is cached on disk next to the corpus."""
    _check_split(split)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    evaluation = evaluation or stdlib_corpus()
    corpus = corpus or training_corpus(evaluation=evaluation)
    if corpus.evaluation_sha256 != evaluation.sha256["evaluation"]:
        raise ValueError(f"the training corpus was kept disjoint from evaluation text "
                         f"{corpus.evaluation_sha256[:12]}..., not from this one "
                         f"({evaluation.sha256['evaluation'][:12]}...); build it with training_corpus(evaluation=...)")
    pool = _sentence_pool(corpus, evaluation, cache)[split]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(pool)):
        raise ValueError(f"n must be between 1 and {len(pool)} (the {split} sentences available); got {n!r}")
    order = sorted(pool, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode("utf-8")).digest())
    return order if n is None else order[:n]
