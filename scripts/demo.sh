#!/usr/bin/env bash
# Run the demo on the bundled sample (sets everything up first on a fresh clone):
#     bash scripts/demo.sh [--run-dir runs/demo]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/alpagasus demo "$@"
