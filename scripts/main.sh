#!/usr/bin/env bash
# The main job: set up .venv, then reproduce the flipped-digits experiment on the embedded data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${LORAFIT_VENV:-.venv}
"$VENV/bin/lorafit" reproduce flip --out runs/flip "$@"
