"""`lorafit sweep`: one training config, a grid of variants, one table and one plot.

Grids (Hu et al. 2021 sections 7.1-7.2 and the talks' method comparison):
    rank     r in {1, 2, 4, 8, 64} on the config's targets (alpha kept as configured, as the paper does)
    targets  LoRA on {q}, {k}, {v}, {o}, {q,k}, {q,v}, {q,k,v,o} at the config's rank
    budget   one parameter budget spent three ways (the paper's Table 5): r=8 on one matrix, r=4 on two, r=2 on four
    methods  LoRA beside full, freeze, bitfit, adapter, prefix, prompt, mezo and in-context
    quantize LoRA on the base as loaded in fp32 and bf16, and quantized: nf4, int8, the GGUF file's own blocks,
             and nf4 / gguf with gradient checkpointing (QLoRA's memory, Dettmers et al. 2023), with the
             embedding table quantized too (-emb)
    variants LoRA beside DoRA (Liu et al. 2024), each on the base as loaded and on an NF4 base (QLoRA, QDoRA)

Every cell is `lorafit train` in its own process (so each cell's peak memory is its own) writing to
out/cells/<cell>/. A cell whose results.json exists is not run again: an interrupted sweep resumes where it
stopped. A cell that fails is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..core.files import atomic_write, write_json, write_text
from ..methods import names

GRIDS = ("rank", "targets", "budget", "methods", "quantize", "variants")
RANKS = (1, 2, 4, 8, 64)
TARGET_SETS = ("q", "k", "v", "o", "qk", "qv", "qkvo")
BUDGET = (("q", 8), ("k", 8), ("v", 8), ("o", 8), ("qk", 4), ("qv", 4), ("qkvo", 2))
# Learning rates per method where LoRA's would be wrong (common values from each method's paper, not tuned here):
# updating every weight wants a far smaller step; virtual tokens a larger one. Extra options given to the sweep
# come after these and win.
QUANTIZE_CELLS = {
    "fp32": ["--train.precision", "fp32"], "bf16": ["--train.precision", "bf16"],
    "nf4": ["--model.quantize", "nf4"], "int8": ["--model.quantize", "int8"], "gguf": ["--model.quantize", "gguf"],
    "nf4-ckpt": ["--model.quantize", "nf4", "--train.checkpointing", "true"],
    "gguf-ckpt": ["--model.quantize", "gguf", "--train.checkpointing", "true"],
    "nf4-emb-ckpt": ["--model.quantize", "nf4", "--model.quantize_embeddings", "true", "--train.checkpointing", "true"],
    "gguf-emb-ckpt": ["--model.quantize", "gguf", "--model.quantize_embeddings", "true",
                      "--train.checkpointing", "true"],
}
VARIANT_CELLS = {
    "lora": [], "dora": ["--lora.use_dora", "true"],
    "qlora-nf4": ["--model.quantize", "nf4"], "qdora-nf4": ["--model.quantize", "nf4", "--lora.use_dora", "true"],
}
METHOD_LR = {"full": 5e-5, "freeze": 1e-4, "prefix": 1e-2, "prompt": 3e-2, "mezo": 1e-4}
# The attention projections by their short names, per naming family (Llama-style decoders, BERT encoders).
MODULE_NAMES = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    "bert": {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"},
}


def _targets(letters: str, family: str) -> str:
    return "[" + ",".join(MODULE_NAMES[family][c] for c in letters) + "]"


def cells(grid: str, family: str = "llama") -> dict[str, list[str]]:
    """{cell name: `--section.key value` overrides} for one grid."""
    if grid == "rank":
        return {f"r{r}": ["--lora.r", str(r)] for r in RANKS}
    if grid == "targets":
        return {f"lora-{s}": ["--lora.targets", _targets(s, family)] for s in TARGET_SETS}
    if grid == "budget":
        return {f"{s}-r{r}": ["--lora.targets", _targets(s, family), "--lora.r", str(r)] for s, r in BUDGET}
    if grid == "methods":
        return {m: ["--method", m, *(["--train.lr", str(METHOD_LR[m])] if m in METHOD_LR else [])] for m in names()}
    if grid == "quantize":
        return dict(QUANTIZE_CELLS)
    if grid == "variants":
        return dict(VARIANT_CELLS)
    raise ValueError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")


def run_cell(config: Path, name: str, overrides: list[str], out: Path, log: Callable[[str], None]) -> dict:
    """Train one cell in a subprocess (or read it back if it finished before); returns its summary row."""
    folder = out / "cells" / name
    results = folder / "results.json"
    if not results.is_file():
        log(f"[{name}] training ...")
        # --overwrite: a cell that stopped before its results.json starts again from scratch
        cmd = [sys.executable, "-m", "lorafit", "train", str(config), *overrides, "--out", str(folder), "--overwrite"]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            log(f"[{name}] failed: {reason}")
            return {"cell": name, "error": reason, "seconds": round(time.perf_counter() - started, 1)}
    else:
        log(f"[{name}] done before; reading {results}")
    return summarize(name, json.loads(results.read_text()))


def summarize(name: str, report: dict) -> dict:
    """The row a sweep table shows for one finished run."""
    tuned, base = report.get("tuned", {}), report.get("base", {})
    return {"cell": name, "method": report.get("method", "lora"), "metric": tuned.get("metric"),
            "value": tuned.get("value"), "base_value": base.get("value"), "loss": tuned.get("loss"),
            "trainable_params": report.get("trainable_params", 0), "train_seconds": report.get("train_seconds", 0),
            "peak_rss_mb": report.get("peak_rss_mb_train", report.get("peak_rss_mb_inference")),
            "file_bytes": (report.get("adapter") or {}).get("file_bytes", 0),
            "model_bytes": report.get("model_bytes", 0)}


def sweep(config: str | Path, grids: list[str], out: str | Path, extra: list[str] | None = None,
          family: str = "llama", only: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every cell of `grids` (or just those named in `only`), skipping finished ones; write sweep.json,
    sweep.md and sweep.png to `out`."""
    out = Path(out)
    plan = {name: overrides for grid in grids for name, overrides in cells(grid, family).items()}
    unknown = sorted(set(only or []) - set(plan))
    if unknown:
        raise ValueError(f"--only: no cell named {', '.join(unknown)} in grid {', '.join(grids)}; "
                         f"its cells: {', '.join(plan)}")
    plan = {name: overrides for name, overrides in plan.items() if not only or name in only}
    rows = [run_cell(Path(config), name, [*overrides, *(extra or [])], out, log) for name, overrides in plan.items()]
    result = {"config": str(config), "grids": grids, "extra": extra or [], "rows": rows}
    write_json(out / "sweep.json", result)
    write_text(out / "sweep.md", format_table(result))
    plot(result, out / "sweep.png")
    return result


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_table(result: dict) -> str:
    """The sweep as a markdown table, one row per cell."""
    head = ("| cell | metric | base | trainable params | train s | peak RSS MB | file | model in memory |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['cell']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        value = f"{r['value']:.2f} {r['metric']}" if r["value"] is not None else "-"
        base = f"{r['base_value']:.2f}" if r["base_value"] is not None else "-"
        rss = f"{r['peak_rss_mb']:,.0f}" if r["peak_rss_mb"] else "-"
        size = _size(r["file_bytes"]) if r["file_bytes"] else "-"
        model = f"{r['model_bytes'] / 1e6:,.0f} MB" if r.get("model_bytes") else "-"
        lines.append(f"| {r['cell']} | {value} | {base} | {r['trainable_params']:,} | {r['train_seconds']:.0f} | "
                     f"{rss} | {size} | {model} |")
    return head + "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Metric per cell (bars) with trainable parameters (log scale, dots) on a second axis."""
    import matplotlib  # heavy: imported only to draw the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only to draw the plot

    rows = [r for r in result["rows"] if r.get("value") is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4))
    ax.bar([r["cell"] for r in rows], [r["value"] for r in rows], color="tab:blue")
    ax.set_ylabel(rows[0]["metric"] if rows else "metric")
    ax.tick_params(axis="x", rotation=45)
    params = [r for r in rows if r["trainable_params"]]
    if params:
        twin = ax.twinx()
        twin.plot([r["cell"] for r in params], [r["trainable_params"] for r in params], "o", color="tab:red")
        twin.set_yscale("log")
        twin.set_ylabel("trainable parameters", color="tab:red")
    ax.set_title(", ".join(result["grids"]))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
