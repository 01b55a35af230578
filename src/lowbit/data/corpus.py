"""A deterministic corpus of real English prose: the Python standard library's own documentation.

Every machine with Python has it, offline. The text is built from the docstrings of a fixed list of
pure-Python stdlib modules (:data:`MODULES`) and is split, by top-level package name, into a
calibration part and a held-out evaluation part that share no module and no paragraph. Each part has
a SHA-256 checksum; the text depends only on the Python version's stdlib sources, so two machines with
the same Python version get the same bytes and the same checksum (:attr:`Corpus.python_version` is
recorded next to it). docs/corpus.md describes the construction in full.

How the text is built (the order matters for the checksum):

1. For each module of :data:`MODULES`, sorted by name, read its source file from the stdlib directory
   (``sysconfig.get_paths()["stdlib"]``; ``pkg/__init__.py`` for a package) and parse it with
   :mod:`ast`. Nothing is imported, so there are no import side effects, no platform- or
   accelerator-dependent objects, and ``python -OO`` (which strips runtime docstrings) does not matter.
   Modules missing from this Python version are skipped and listed in :attr:`Corpus.missing_modules`.
2. Collect docstrings in source order: the module's, then for each top-level public class or function
   (name not starting with ``_``) its docstring, and for a class also the docstrings of its public
   methods. Docstrings are cleaned with ``ast.get_docstring(clean=True)`` (the same
   ``inspect.cleandoc`` that ``inspect.getdoc`` applies).
3. Split each docstring into paragraphs at blank lines. Drop a paragraph that holds a doctest line
   (``>>>`` or ``...`` prompt); normalise the rest's whitespace (every run of whitespace becomes one
   space). Keep a paragraph only if it has at least :data:`MIN_WORDS` words, at least
   :data:`MIN_CHARS` characters, and at least :data:`MIN_PROSE_RATIO` of its non-space characters are
   letters (this drops code, tables and ASCII art).
4. De-duplicate exactly: a paragraph already seen (in the order above) is dropped, so no paragraph is
   in both splits.
5. A module belongs to the evaluation split iff ``int(sha256(top_level_package).hexdigest(), 16) %
   EVAL_MODULUS == 0`` (``email.message`` and ``email.utils`` go together), otherwise to calibration.
6. Each split's text is its paragraphs joined by a blank line (``"\\n\\n"``); its checksum is the
   SHA-256 of that text encoded as UTF-8.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import platform
import random
import re
import sysconfig
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Corpus", "MODULES", "stdlib_corpus", "calibration_batches", "evaluation_tokens",
           "evaluation_sentences", "tokenize", "cache_dir", "save_corpus", "CORPUS_ENV", "in_evaluation",
           "stdlib_dir"]

#: Bumped whenever the construction below changes (it is part of the on-disk cache key).
BUILD_VERSION = 1

#: The stdlib modules read, all pure Python, present in CPython 3.10 to 3.13. Fixed: changing it
#: changes the checksums.
MODULES: Tuple[str, ...] = tuple(sorted("""
abc argparse ast base64 bdb bisect bz2 calendar cmd code codecs codeop collections colorsys
compileall concurrent.futures._base configparser contextlib copy copyreg csv dataclasses
datetime difflib dis doctest email.headerregistry email.message email.parser email.policy
email.utils enum filecmp fileinput fnmatch fractions ftplib functools genericpath getopt getpass
gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client http.cookiejar
http.cookies http.server imaplib inspect ipaddress json json.decoder json.encoder keyword
linecache locale logging logging.config logging.handlers lzma mailbox mimetypes modulefinder
numbers operator optparse pathlib pdb pickle pickletools pkgutil platform plistlib poplib
posixpath pprint profile pstats py_compile pyclbr queue quopri random re reprlib rlcompleter
runpy sched secrets selectors shelve shlex shutil signal smtplib socket socketserver ssl stat
statistics string stringprep struct subprocess symtable tabnanny tarfile tempfile textwrap
threading timeit token tokenize trace traceback tracemalloc types typing unittest.case
unittest.loader unittest.mock unittest.result unittest.runner urllib.parse urllib.request
urllib.robotparser uuid warnings wave weakref webbrowser wsgiref.handlers wsgiref.validate
xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax.handler xml.sax.saxutils
xmlrpc.client xmlrpc.server zipapp zipfile zipimport
""".split()))

MIN_WORDS = 8
MIN_CHARS = 40
MIN_PROSE_RATIO = 0.80
EVAL_MODULUS = 4
#: Sentences offered by :func:`evaluation_sentences`: this many words at least and at most.
SENTENCE_WORDS = (6, 48)

_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass(frozen=True)
class Corpus:
    """The built corpus. ``calibration`` and ``evaluation`` are the two texts; ``sha256`` maps each
    split name to the SHA-256 of its UTF-8 text, valid for ``python_version``."""

    calibration: str
    evaluation: str
    sha256: Dict[str, str]
    python_version: str
    n_paragraphs: Dict[str, int]
    n_chars: Dict[str, int]
    modules: Dict[str, Tuple[str, ...]]
    missing_modules: Tuple[str, ...] = ()
    sentences: Tuple[str, ...] = field(default=(), repr=False)

    @property
    def checksum(self) -> str:
        """One line naming both checksums and the Python version they hold for."""
        return (f"python {self.python_version}: calibration sha256 {self.sha256['calibration']}, "
                f"evaluation sha256 {self.sha256['evaluation']}")

    def describe(self) -> dict:
        """A JSON-ready summary (for reports)."""
        return {"source": "python-stdlib-docstrings", "python_version": self.python_version,
                "sha256": dict(self.sha256), "n_paragraphs": dict(self.n_paragraphs),
                "n_chars": dict(self.n_chars), "n_modules": {k: len(v) for k, v in self.modules.items()},
                "n_sentences_evaluation": len(self.sentences)}

    def split(self, name: str) -> str:
        if name not in ("calibration", "evaluation"):
            raise ValueError(f"unknown split {name!r}: use 'calibration' or 'evaluation'")
        return getattr(self, name)

    # Convenience methods: the module-level functions with this corpus.
    def calibration_batches(self, tokenizer, n_sequences: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        return calibration_batches(tokenizer, n_sequences, seq_len, seed, corpus=self)

    def evaluation_tokens(self, tokenizer, max_tokens: Optional[int] = None) -> torch.Tensor:
        return evaluation_tokens(tokenizer, max_tokens, corpus=self)

    def evaluation_sentences(self, n: Optional[int] = None) -> List[str]:
        return evaluation_sentences(n, corpus=self)


def _source_path(stdlib: str, module: str) -> Optional[str]:
    base = os.path.join(stdlib, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _docstrings(tree: ast.Module) -> List[str]:
    """Docstrings of the module, its public top-level classes and functions and the public methods of
    those classes, in source order."""
    out = []

    def add(node):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)

    add(tree)
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs) and not node.name.startswith("_"):
            add(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            add(node)
            for member in node.body:
                if isinstance(member, funcs) and not member.name.startswith("_"):
                    add(member)
    return out


def _is_prose(paragraph: str) -> bool:
    if len(paragraph) < MIN_CHARS or len(paragraph.split(" ")) < MIN_WORDS:
        return False
    visible = paragraph.replace(" ", "")
    letters = sum(c.isalpha() for c in visible)
    return letters >= MIN_PROSE_RATIO * len(visible)


def _paragraphs(docstring: str) -> List[str]:
    out = []
    for raw in _PARAGRAPH_BREAK.split(docstring):
        if _DOCTEST.search(raw):
            continue
        text = " ".join(raw.split())
        if _is_prose(text):
            out.append(text)
    return out


def in_evaluation(module: str) -> bool:
    """Whether ``module`` (a dotted stdlib module name, any module, listed in :data:`MODULES` or not)
    is held out for evaluation: ``int(sha256(top_level_package).hexdigest(), 16) % EVAL_MODULUS ==
    0``. The one split of the project: such a module is never calibrated or trained on."""
    if not isinstance(module, str) or not module or module.startswith("."):
        raise ValueError(f"module must be a dotted module name such as 'json.decoder'; got {module!r}")
    top = module.split(".")[0]
    return int(hashlib.sha256(top.encode("utf-8")).hexdigest(), 16) % EVAL_MODULUS == 0


_in_evaluation = in_evaluation  # the name used before the split became public


def _sentences(paragraphs: Sequence[str]) -> Tuple[str, ...]:
    seen, out = set(), []
    lo, hi = SENTENCE_WORDS
    for p in paragraphs:
        for s in _SENTENCE_END.split(p):
            s = s.strip()
            if not s or s[-1] not in ".!?" or not s[0].isupper() or s in seen:
                continue
            if lo <= len(s.split(" ")) <= hi:
                seen.add(s)
                out.append(s)
    return tuple(out)


# Public names for the helpers the training corpus (lowbit.data.train_corpus) shares with this one.
prose_paragraphs = _paragraphs
sentences_of = _sentences
SENTENCE_BREAK = _SENTENCE_END


def stdlib_dir() -> str:
    """The directory both corpora read: ``sysconfig.get_paths()["stdlib"]``."""
    return sysconfig.get_paths()["stdlib"]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_dir() -> str:
    """Where lowbit keeps derived files: ``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit``, else
    ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lowbit")


def _build(stdlib: str, modules: Tuple[str, ...]) -> Corpus:
    """Build the corpus from the sources (about 4 s: parsing 150 files dominates)."""
    seen = set()
    parts: Dict[str, List[str]] = {"calibration": [], "evaluation": []}
    used: Dict[str, List[str]] = {"calibration": [], "evaluation": []}
    missing = []
    for module in sorted(modules):
        path = _source_path(stdlib, module)
        if path is None:
            missing.append(module)
            continue
        with open(path, "rb") as fh:  # ast decodes per PEP 263, as the interpreter does
            tree = ast.parse(fh.read(), filename=path)
        split = "evaluation" if _in_evaluation(module) else "calibration"
        used[split].append(module)
        for doc in _docstrings(tree):
            for p in _paragraphs(doc):
                if p not in seen:
                    seen.add(p)
                    parts[split].append(p)
    return _assemble(parts, used, missing)


def _assemble(parts: Dict[str, List[str]], used: Dict[str, List[str]], missing: Sequence[str]) -> Corpus:
    texts = {k: "\n\n".join(v) for k, v in parts.items()}
    return Corpus(
        calibration=texts["calibration"], evaluation=texts["evaluation"],
        sha256={k: _sha256(v) for k, v in texts.items()},
        python_version=platform.python_version(),
        n_paragraphs={k: len(v) for k, v in parts.items()},
        n_chars={k: len(v) for k, v in texts.items()},
        modules={k: tuple(v) for k, v in used.items()},
        missing_modules=tuple(missing),
        sentences=_sentences(parts["evaluation"]),
    )


def _cache_key(stdlib: str, modules: Tuple[str, ...]) -> str:
    """Changes when the Python version, the builder or any source file (size, mtime) changes."""
    h = hashlib.sha256(f"v{BUILD_VERSION}|{platform.python_implementation()}|{platform.python_version()}|"
                       f"{MIN_WORDS}|{MIN_CHARS}|{MIN_PROSE_RATIO}|{EVAL_MODULUS}|{SENTENCE_WORDS}".encode())
    for module in modules:
        path = _source_path(stdlib, module)
        if path is None:
            h.update(f"|{module}:missing".encode())
        else:
            st = os.stat(path)
            h.update(f"|{module}:{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _load_cached(path: str) -> Optional[Corpus]:
    try:
        with open(path, encoding="utf-8") as fh:
            blob = json.load(fh)
        corpus = _assemble(blob["parts"], blob["modules"], blob["missing"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if corpus.sha256 != blob.get("sha256"):  # damaged or edited file: rebuild
        return None
    return corpus


def _store_cached(path: str, corpus: Corpus) -> None:
    blob = {"python_version": corpus.python_version, "sha256": corpus.sha256,
            "modules": {k: list(v) for k, v in corpus.modules.items()},
            "missing": list(corpus.missing_modules),
            "parts": {k: corpus.split(k).split("\n\n") for k in ("calibration", "evaluation")}}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(blob, fh)
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    except OSError:
        pass  # a read-only home is no reason to fail


@functools.lru_cache(maxsize=None)
def _corpus(stdlib: str, modules: Tuple[str, ...], use_cache: bool) -> Corpus:
    if not use_cache:
        return _build(stdlib, modules)
    path = os.path.join(cache_dir(), "corpus", f"stdlib-{_cache_key(stdlib, modules)}.json")
    corpus = _load_cached(path)
    if corpus is None:
        corpus = _build(stdlib, modules)
        _store_cached(path, corpus)
    return corpus


#: Environment variable naming a frozen corpus file (written by :func:`save_corpus`) to use instead
#: of building from this Python's stdlib, so that machines with another Python version get the
#: same text (the stdlib docstrings change between versions).
CORPUS_ENV = "LOWBIT_CORPUS"


def save_corpus(path: str, corpus: Optional[Corpus] = None) -> str:
    """Write ``corpus`` (default: this machine's :func:`stdlib_corpus`) as a frozen JSON file that
    ``LOWBIT_CORPUS=path`` loads on another machine; returns ``path``."""
    corpus = corpus or stdlib_corpus()
    _store_cached(path, corpus)
    if not os.path.isfile(path):
        raise OSError(f"could not write the corpus file {path!r}")
    return path


@functools.lru_cache(maxsize=None)
def _frozen(path: str) -> Corpus:
    """The corpus saved in ``path``; its text must hash to the checksums stored with it."""
    try:
        with open(path, encoding="utf-8") as fh:
            blob = json.load(fh)
        corpus = _assemble(blob["parts"], blob["modules"], blob["missing"])
        stored, version = blob["sha256"], blob["python_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{CORPUS_ENV}={path}: not a readable corpus file written by "
                         f"lowbit.data.corpus.save_corpus ({type(e).__name__}: {e})") from e
    if corpus.sha256 != stored:
        raise ValueError(f"{CORPUS_ENV}={path}: the text does not match its stored checksums "
                         f"(stored {stored}, text {corpus.sha256}); the file is damaged or was edited")
    # The text is the saving machine's, so its Python version is what the checksums hold for.
    return dataclasses.replace(corpus, python_version=version)


def stdlib_corpus(modules: Optional[Sequence[str]] = None, cache: bool = True) -> Corpus:
    """The corpus built from this Python's stdlib sources.

    With the environment variable ``LOWBIT_CORPUS`` set to a file written by :func:`save_corpus`
    (and ``modules`` left None), that frozen corpus is returned instead, after checking that its
    text matches its stored SHA-256 checksums (a mismatch raises ValueError).

    Building parses 150 source files (about 4 s on 2 cores), so the result is kept in memory per
    process and, with ``cache=True``, on disk under ``cache_dir()/corpus`` keyed by the Python
    version, the build rules and every source file's size and mtime; a cached file whose checksums
    do not match its text is rebuilt. ``modules`` overrides :data:`MODULES` (for experiments; the
    documented checksums hold only for the default list)."""
    frozen = os.environ.get(CORPUS_ENV)
    if frozen and modules is None:
        return _frozen(os.path.abspath(frozen))
    mods = MODULES if modules is None else tuple(modules)
    return _corpus(sysconfig.get_paths()["stdlib"], tuple(sorted(set(mods))), bool(cache))


# ---------------------------------------------------------------------------------------------
# Tokenisation (cached per tokenizer object and text)

_TOKEN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The token ids of ``text`` as one 1-D LongTensor, without special tokens (no BOS/EOS/CLS).

    The whole text is tokenised in one call, so tokens may span paragraph breaks exactly as they
    would in running text. Results are cached per tokenizer object and text checksum."""
    key = _sha256(text)
    try:
        per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        per_tok = {}
    ids = per_tok.get(key)
    if ids is None:
        enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        per_tok[key] = ids
    return ids


def calibration_batches(tokenizer, n_sequences: int, seq_len: int, seed: int = 0,
                        corpus: Optional[Corpus] = None) -> torch.Tensor:
    """``n_sequences`` windows of ``seq_len`` consecutive tokens from the tokenised calibration text,
    as a LongTensor ``(n_sequences, seq_len)``.

    Window starts are drawn uniformly from ``[0, n_tokens - seq_len]`` by ``random.Random(seed)``
    (``start = int(rng.random() * (n_tokens - seq_len + 1))``, whose sequence Python guarantees
    across versions), so the same seed, tokenizer and corpus give the same batch on any machine.
    Windows may overlap when many are asked for. No special tokens are added."""
    if n_sequences < 1 or seq_len < 1:
        raise ValueError(f"n_sequences and seq_len must be positive (got {n_sequences}, {seq_len})")
    corpus = corpus or stdlib_corpus()
    ids = tokenize(tokenizer, corpus.calibration)
    n = ids.numel()
    if seq_len > n:
        raise ValueError(f"seq_len={seq_len} is longer than the calibration text ({n} tokens)")
    rng = random.Random(seed)
    starts = [int(rng.random() * (n - seq_len + 1)) for _ in range(n_sequences)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def evaluation_tokens(tokenizer, max_tokens: Optional[int] = None,
                      corpus: Optional[Corpus] = None) -> torch.Tensor:
    """The tokenised held-out evaluation text (1-D LongTensor, no special tokens), cut to its first
    ``max_tokens`` tokens when given."""
    corpus = corpus or stdlib_corpus()
    ids = tokenize(tokenizer, corpus.evaluation)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive (got {max_tokens})")
        ids = ids[:max_tokens]
    return ids


def evaluation_sentences(n: Optional[int] = None, corpus: Optional[Corpus] = None) -> List[str]:
    """``n`` distinct held-out sentences (all when ``n`` is None), for sentence encoders.

    Sentences come from the evaluation paragraphs, split after ``.``, ``!`` or ``?`` followed by
    whitespace and a capital letter; kept if they start with a capital, end with ``.``/``!``/``?``
    and have between 6 and 48 words. ``n`` of them are taken evenly spaced over the whole list
    (index ``i * len // n``), so they come from all evaluation modules."""
    corpus = corpus or stdlib_corpus()
    pool = corpus.sentences
    if n is None:
        return list(pool)
    if not 1 <= n <= len(pool):
        raise ValueError(f"n must be between 1 and {len(pool)} (the held-out sentences available); got {n}")
    return [pool[i * len(pool) // n] for i in range(n)]
