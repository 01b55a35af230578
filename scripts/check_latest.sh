#!/usr/bin/env bash
# Early warning: install without requirements.lock (the newest releases a new user would get from
# pyproject's ranges alone) into a fresh virtual environment, list the packages that moved relative
# to the lock, and run the test suite against them. Exits with pytest's status.
#   bash scripts/check_latest.sh
# If it passes and packages moved, `bash scripts/refresh_lock.sh` takes the new versions into the lock.
source "$(dirname "$0")/unlocked_env.sh"
"$py" scripts/lockfile.py diff requirements.lock "$tmp/freeze.txt" > "$tmp/moved.txt"

report_moved() {
    echo "== packages that moved relative to requirements.lock (lock -> newest): $(wc -l < "$tmp/moved.txt")"
    sed 's/^/   /' "$tmp/moved.txt"
}
report_moved
set +e
# the venv's bin first, as an activated environment would have it (tests run the lowbit script)
PATH="$tmp/venv/bin:$PATH" "$py" -m pytest -q -n 2 -p no:cacheprovider --tb=short -rfE tests 2>&1 \
    | tee "$tmp/pytest.log"
rc=${PIPESTATUS[0]}
set -e
echo
report_moved
echo "== pytest (exit $rc): $(grep -E '^(=+ )?[0-9]+ (passed|failed|error)|no tests ran' "$tmp/pytest.log" | tail -1)"
grep -E '^(FAILED|ERROR) ' "$tmp/pytest.log" | sed 's/^/   /' || true
if [ "$rc" -eq 5 ]; then
    echo "check_latest.sh: error: pytest collected no tests (exit 5)" >&2
fi
exit "$rc"
