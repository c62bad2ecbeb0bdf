"""Tools on top of the library: plan (memory and sizes before a run), analyze (what ΔW learned), sweep (grids of
runs), compare (`lorafit eval`), bench (speed and memory), experiments (the talks' reproductions). Only the CLI
imports them."""
