#!/usr/bin/env bash
# Run the whole test suite (slow tests included); exit code 5 (no tests collected) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest tests "$@"
status=$?
if [ "$status" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$status"
