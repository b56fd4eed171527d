#!/usr/bin/env bash
# Run the test suite (sets everything up first on a fresh clone):
#     bash scripts/test.sh [pytest args]
# Prints how long each phase took: the setup, the import contract (`lint-imports`), the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
echo "test.sh: setup took $((SECONDS - started)) s"
started=$SECONDS
.venv/bin/lint-imports --no-cache --no-logo
echo "test.sh: the import contract took $((SECONDS - started)) s"
started=$SECONDS
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@" || status=$?
echo "test.sh: the tests took $((SECONDS - started)) s"
exit $status
