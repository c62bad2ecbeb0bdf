#!/usr/bin/env bash
# lorafit's training step beside PEFT's and full fine-tuning's, then forward latency base / unmerged / merged.
# Writes runs/bench-train/bench.json + bench.md and runs/bench-latency/latency.json + latency.md.
# Needs the dev extras (PEFT is the peer): bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
LORAFIT="${LORAFIT_VENV:-.venv}/bin/lorafit"
"$LORAFIT" bench train --out runs/bench-train "$@"
"$LORAFIT" bench latency --out runs/bench-latency
