#!/usr/bin/env bash
# Run the test suite (sets everything up first on a fresh clone):
#     bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
