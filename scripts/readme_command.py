"""Print one command line of README.md's first code block (CI runs line 2, the test command, as written).

    python3 scripts/readme_command.py [--line N] [README]

Standard library only: CI calls it before any virtual environment exists.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class ReadmeError(ValueError):
    """README.md has no first code block, or the block has no such line."""


def first_code_block(text: str) -> list[str]:
    """The lines inside the first fenced (```) block, fences excluded."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("```")), None)
    if start is None:
        raise ReadmeError("no fenced code block (```) found")
    opening = lines[start].lstrip()
    fence = opening[: len(opening) - len(opening.lstrip("`"))]   # ``` or longer closes it
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == fence), None)
    if end is None:
        raise ReadmeError(f"the first code block (line {start + 1}) is never closed")
    return lines[start + 1:end]


def command(text: str, line: int) -> str:
    """Line `line` (1-based) of the first code block, stripped; an error if it is missing or blank."""
    block = first_code_block(text)
    if not 1 <= line <= len(block):
        raise ReadmeError(f"line {line} asked for, but the first code block has {len(block)} lines")
    cmd = block[line - 1].strip()
    if not cmd or cmd.startswith("#"):
        raise ReadmeError(f"line {line} of the first code block is blank or a comment")
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Command line; exit 2 with one line naming the problem on a missing or malformed README."""
    ap = argparse.ArgumentParser(prog="readme_command.py", description=__doc__.splitlines()[0])
    ap.add_argument("readme", nargs="?", type=Path, default=Path("README.md"))
    ap.add_argument("--line", type=int, default=2, help="1-based line of the first code block (default 2)")
    args = ap.parse_args(argv)
    try:
        print(command(args.readme.read_text(), args.line))
    except (ReadmeError, OSError) as exc:
        print(f"readme_command.py: error: {args.readme}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
