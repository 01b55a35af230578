"""The adaptation tasks: docstrings vs code of the stdlib, training modules vs held-out ones."""
import pytest

from lowbit.adapters import tasks
from lowbit.data.corpus import in_evaluation
from lowbit.data.train_corpus import VALIDATION_PACKAGES

MODULES = ["json", "json.decoder", "string", "calendar", "textwrap", "fractions", "logging", "shlex"]


@pytest.fixture(scope="module", params=tasks.TASKS)
def task(request):
    return request.param, tasks.stdlib_task(request.param, MODULES)


def test_splits_are_disjoint_by_module_and_content(task):
    name, corpus = task
    train = set(corpus.split_modules("train"))
    held = set(corpus.split_modules("validation"))
    assert train and held and not train & held
    assert all(m.split(".")[0] in VALIDATION_PACKAGES for m in held)
    assert not any(m.split(".")[0] in VALIDATION_PACKAGES for m in train)
    assert not any(in_evaluation(m) for m in train | held)  # lowbit's evaluation modules are in neither
    train_text, held_text = tasks.split_texts(corpus)
    # no held-out passage appears in the training text (every 200-character window, stepping 100)
    windows = [held_text[i:i + 200] for i in range(0, len(held_text) - 200, 100)]
    assert windows and not any(w in train_text for w in windows)


def test_docs_are_docstrings_and_code_has_none():
    docs = tasks.docs_text('"""Module doc."""\nimport os\n\nclass A:\n    """Class doc."""\n    def f(self):\n'
                           '        """Method doc.\n\n        More."""\n        return 1  # keep\n')
    assert docs == "Module doc.\n\nClass doc.\n\nMethod doc.\n\nMore."
    code = tasks.code_text('"""Module doc."""\nimport os\n\ndef f():\n    """Doc\n    two."""\n    return 1  # keep\n'
                           'def g(): "inline"\n')
    assert code == 'import os\n\ndef f():\n    return 1  # keep\ndef g(): "inline"\n'


def test_file_task_splits_at_a_line(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("".join(f"line {i}\n" for i in range(100)))
    corpus = tasks.file_task(p)
    train, held = tasks.split_texts(corpus)
    assert train + held == p.read_text() and train.endswith("\n") and len(held) < len(train) / 5
    with pytest.raises(ValueError, match="neither"):
        tasks.load_task(str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("one line")
    with pytest.raises(ValueError, match="too short"):
        tasks.file_task(tmp_path / "short.txt")
