#!/usr/bin/env bash
# Rewrite requirements.lock from a clean resolve: a fresh virtual environment, no constraints, so
# every package is the newest release that lowbit's ranges allow. Review the diff, run the suite
# (bash .ci/run), and commit the lock with whatever the new releases needed.
#   bash scripts/refresh_lock.sh
source "$(dirname "$0")/unlocked_env.sh"
platform=$("$py" -c 'import platform; print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")')
"$py" scripts/lockfile.py write "$tmp/freeze.txt" requirements.lock --platform "$platform"
