#!/usr/bin/env bash
# Lint (ruff) and the whole test suite (slow tests included); pytest's exit code 5 (no tests collected) fails.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
lint=$?
python3 -m pytest tests "$@"
status=$?
if [ "$status" -eq 5 ]; then echo "pytest collected no tests" >&2; status=1; fi
if [ "$lint" -ne 0 ]; then echo "ruff found problems (see above)" >&2; [ "$status" -eq 0 ] && status=1; fi
exit "$status"
