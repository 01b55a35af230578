"""Adaptation tasks, offline and deterministic, built from lowbit's stdlib training corpus
(:mod:`lowbit.data.train_corpus`):

- ``docs``: the docstrings (module, class and function; cleaned as ``inspect.cleandoc`` does) of
  each module, joined by blank lines;
- ``code``: the same sources with those docstrings cut out (code and comments).

Each task keeps the corpus's split by module: its training text comes from the training modules
and its held-out text from the validation packages (:data:`~lowbit.data.train_corpus.VALIDATION_PACKAGES`),
which no training batch shows; modules held out for lowbit's evaluation are in neither. A task
is itself a :class:`~lowbit.data.train_corpus.TrainingCorpus`, so training batches, token caches
and held-out windows come from the same functions ``lowbit train`` uses.

A user's text file is a task too: its first 90% (cut at a line break) is the training part and
the rest the held-out part.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..data.train_corpus import Document, TrainingCorpus, training_batches, training_corpus, validation_batches

TASKS = ("docs", "code")
FILE_TRAIN_FRACTION = 0.9


def _docstring_nodes(tree: ast.Module) -> List[ast.Expr]:
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append(body[0])
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, name, None)
            if isinstance(children, list):
                todo.extend(c for c in children if isinstance(c, ast.AST))
    return sorted(out, key=lambda n: n.lineno)


def docs_text(source: str) -> str:
    """The module's docstrings in source order, cleaned, joined by blank lines ('' if it does not parse)."""
    import inspect

    try:
        nodes = _docstring_nodes(ast.parse(source))
    except SyntaxError:
        return ""
    return "\n\n".join(d for d in (inspect.cleandoc(n.value.value) for n in nodes) if d.strip())


def code_text(source: str) -> str:
    """The source without its docstrings: each docstring's lines are dropped when it stands on
    lines of its own (nearly always), else kept."""
    try:
        nodes = _docstring_nodes(ast.parse(source))
    except SyntaxError:
        return source
    lines = source.splitlines(keepends=True)
    drop = set()
    for n in nodes:
        first, last = n.lineno - 1, n.end_lineno - 1
        alone = lines[first][:n.col_offset].strip() == "" and lines[last][n.end_col_offset:].strip() in ("", ";")
        if alone:
            drop.update(range(first, last + 1))
    return "".join(line for i, line in enumerate(lines) if i not in drop)


def stdlib_task(name: str, modules: Optional[Sequence[str]] = None) -> TrainingCorpus:
    """The ``docs`` or ``code`` task as a corpus of one document per module (empty ones left out);
    ``modules`` restricts it as :func:`~lowbit.data.train_corpus.training_corpus` does (tests)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(TASKS)} or a text file's path")
    base = training_corpus(modules)
    make = docs_text if name == "docs" else code_text
    docs = []
    for d in base.documents:
        text = make(d.text)
        if text.strip():
            docs.append(Document(d.module, d.path, text, d.split))
    return _corpus(docs, base)


def file_task(path) -> TrainingCorpus:
    """A text file as a task: the first 90% of its lines for training, the rest held out."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--task {path!r} is neither one of {', '.join(TASKS)} nor a readable text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--task {path}: not UTF-8 text") from None
    cut = text.rfind("\n", 0, int(len(text) * FILE_TRAIN_FRACTION)) + 1
    if cut <= 0 or cut >= len(text):
        raise ValueError(f"--task {path}: too short to split into training and held-out parts (needs several lines)")
    docs = [Document(p.name, str(p), text[:cut], "train"), Document(p.name + ":held-out", str(p), text[cut:],
                                                                    "validation")]
    return _corpus(docs, training_corpus())


def _corpus(docs: List[Document], base: TrainingCorpus) -> TrainingCorpus:
    text = "\n\n".join(d.text for d in docs)
    return TrainingCorpus(tuple(docs), hashlib.sha256(text.encode("utf-8")).hexdigest(), base.python_version,
                          base.evaluation_sha256, base.held_out, base.not_utf8, ())


def load_task(task: str) -> TrainingCorpus:
    return stdlib_task(task) if task in TASKS else file_task(task)


def task_batches(corpus: TrainingCorpus, tokenizer, seq_len: int, batch_size: int, seed: int = 0):
    """``batches(step)`` of the task's training part, a pure function of (seed, step)."""
    source = training_batches(tokenizer, seq_len, batch_size, seed, corpus=corpus)
    return lambda step: {"input_ids": source.batch(step)}


def heldout_tokens(corpus: TrainingCorpus, tokenizer, max_tokens: Optional[int], context: int) -> torch.Tensor:
    """The held-out part as one token stream (whole windows of ``context``), at most ``max_tokens``."""
    windows = validation_batches(tokenizer, context, 1, None, corpus=corpus).reshape(-1)
    return windows[:max_tokens] if max_tokens else windows


def describe(corpus: TrainingCorpus, name: str) -> dict:
    d = corpus.describe()
    return {"task": name, "sha256": corpus.sha256, "n_chars": d["n_chars"], "n_modules": d["n_modules"]}


def split_texts(corpus: TrainingCorpus) -> Tuple[str, str]:
    """(training text, held-out text) of a task."""
    return ("\n\n".join(d.text for d in corpus.documents if d.split == "train"),
            "\n\n".join(d.text for d in corpus.documents if d.split == "validation"))
