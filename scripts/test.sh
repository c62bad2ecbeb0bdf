#!/usr/bin/env bash
# The test command: set up .venv with the dev extras, lint, check the import layers, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
VENV=${LORAFIT_VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/lint-imports"
"$VENV/bin/python" -m pytest -q "$@"
