#!/usr/bin/env bash
# Create .venv (once) and install lorafit into it. Usage: bash scripts/setup.sh [dev]
# torch is installed first, pinned to a CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAFIT_VENV:-.venv}
TORCH=${LORAFIT_TORCH:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q "$TORCH"
if [ "${1:-}" = "dev" ]; then
  "$VENV/bin/python" -m pip install -q -e ".[dev,llama]"  # llama: the `export gguf` tests run llama.cpp
else
  "$VENV/bin/python" -m pip install -q -e .
fi
