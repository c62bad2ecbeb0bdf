#!/usr/bin/env bash
# lorafit's training step beside PEFT's and full fine-tuning's, then forward latency base / unmerged / merged.
# Writes runs/bench-train/bench.json + bench.md and runs/bench-latency/latency.json + latency.md + latency.png.
# The train rows are the default setups plus lorafit-compile (blocks compiled; its compile is in the warm-up).
# Needs the dev extras (PEFT is the peer): bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
LORAFIT="${LORAFIT_VENV:-.venv}/bin/lorafit"
"$LORAFIT" bench train --out runs/bench-train \
    --setups lorafit-fast,lorafit-compile,lorafit-fp32,peft-best,peft-fp32,full-fp32 "$@"
"$LORAFIT" bench latency --out runs/bench-latency
