"""Commands that train and score: `reproduce flip`, `train`, `eval`, `sweep`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .app import EXTRA, app, debugging, log, reproduce_app


@reproduce_app.command("flip")
def reproduce_flip(
    data: Annotated[str, typer.Option(help="digits (bundled with scikit-learn) or fashion-mnist (Debian)")] = "digits",
    flip: Annotated[str | None, typer.Option(help="lr or ud (default: lr for digits, ud for clothes)")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank on fc1, fc2, fc3")] = 4,
    fraction: Annotated[float, typer.Option(help="share of the chosen classes' images flipped")] = 0.3,
    classes: Annotated[str, typer.Option(help="comma-separated classes to flip")] = "2,3",
    seed: Annotated[int, typer.Option(help="seed for split, flips, init and order")] = 0,
    base_epochs: Annotated[int | None, typer.Option(help="base training epochs")] = None,
    tune_epochs: Annotated[int | None, typer.Option(help="fine-tuning epochs")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/flip"),
):
    """The first talk's experiment: base vs LoRA vs full vs last-layer fine-tuning on flipped images."""
    from ..core.files import check_writable
    from ..tools.experiments.flip import FlipConfig, format_table, run

    check_writable(out)
    cfg = FlipConfig(data=data, flip=flip, rank=rank, fraction=fraction, seed=seed, base_epochs=base_epochs,
                     tune_epochs=tune_epochs, out=out, classes=tuple(int(c) for c in classes.split(",")))
    results = run(cfg, log=log)
    print(format_table(results))
    log(f"results.json, table.md, flip.png and the adapter are in {out}")

@app.command(context_settings=EXTRA)
def train(ctx: typer.Context,
          config: Annotated[Path, typer.Argument(help="YAML config (sections model, lora, data, train, eval, out)")],
          resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint in the out folder")] = False,
          overwrite: Annotated[bool, typer.Option(help="clear an earlier run in the out folder, then start anew")]
          = False,
          force: Annotated[bool, typer.Option(help="with --resume: accept config changes that change no step's "
                                                   "maths (train.steps, save_every, log_every, eval.*)")] = False,
          precision: Annotated[str | None, typer.Option(help="auto, bf16 or fp32 (= --train.precision)")] = None,
          quantize: Annotated[str | None, typer.Option(help="none, nf4, int8 or gguf (= --model.quantize)")] = None,
          nproc: Annotated[int, typer.Option(min=1, help="train in N processes on this machine: starts `torchrun "
                                                          "--standalone --nproc-per-node N` for you")] = 1):
    """Fine-tune a LoRA adapter as CONFIG says; extra `--section.key value` options override the file."""
    from ..training.config import load_run_config
    from ..training.cpu.memory import keep_freed_memory
    from ..training.distributed import launch_local
    from ..training.recipe import train as run

    overrides = [*ctx.args, *(["--train.precision", precision] if precision else []),
                 *(["--model.quantize", quantize] if quantize else [])]
    cfg = load_run_config(config, overrides)  # a bad config fails here, once, before any process starts
    if nproc > 1:
        flags = [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--force", force)) if on]
        raise SystemExit(launch_local(nproc, ["train", str(config), *flags, *overrides], debug=debugging()))
    keep_freed_memory()  # this process only trains: each step reuses what the last one freed (the run reports it)
    report = run(cfg, resume=resume, overwrite=overwrite, force=force, log=log)
    if report is not None:  # None: a process of a distributed run other than rank 0, which reports
        _print_before_after(report)

def _print_before_after(report: dict) -> None:
    table = Table(title=f"{report['model']} on {report['val_rows']} validation rows ({report['metric']})")
    for column in ("model", report["metric"], "loss"):
        table.add_column(column)
    for key, label in (("base", "base model"), ("tuned", "with adapter")):
        if key in report:
            loss = report[key].get("loss")  # the in-context baseline generates only: no loss
            table.add_row(label, f"{report[key]['value']:.2f}", "-" if loss is None else f"{loss:.4f}")
    Console().print(table)
    for sample in report["tuned"].get("samples", [])[:5]:
        log(f"  answer {sample['answer']!r:<28} prediction {sample['prediction'].strip()!r}")

@app.command("eval", context_settings=EXTRA)
def evaluate(ctx: typer.Context,
             config: Annotated[Path, typer.Argument(help="the training config (its data, model and eval sections)")],
             adapter: Annotated[list[Path] | None, typer.Option(help="adapter folder(s); default: OUT/adapter")] = None,
             base: Annotated[bool, typer.Option(help="score the base model too")] = True,
             report: Annotated[Path | None, typer.Option(help="folder for eval.json, predictions and a classifier's "
                                                         "confusion matrix (default: the config's out/eval)")] = None):
    """Score the base model and each adapter side by side on the config's validation split; extra `--section.key
    value` options override the file (`--out` too, which moves the default adapter and report folders)."""
    from ..tools.compare import evaluate_adapters
    from ..tools.compare_report import format_per_class, write_eval_report
    from ..training.config import load_run_config

    cfg = load_run_config(config, ctx.args)
    rows = evaluate_adapters(cfg, [str(a) for a in adapter or [Path(cfg.out) / "adapter"]], base, log)
    table = Table(title=f"{cfg.model.name}: {rows[0]['metric']}")
    for column in ("model", rows[0]["metric"], "loss"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], f"{row['value']:.2f}", f"{row['loss']:.4f}")
    Console().print(table)
    print("".join("\n" + format_per_class(row) for row in rows if "per_class" in row), end="")
    written = write_eval_report(rows, report or Path(cfg.out) / "eval")
    log(f"{', '.join(p.name for p in written)} are in {written[-1].parent}")


@app.command(context_settings=EXTRA)
def sweep(ctx: typer.Context,
          config: Annotated[Path, typer.Argument(help="YAML training config every cell starts from")],
          grid: Annotated[list[str] | None, typer.Option(
              help="rank, targets, budget, methods, quantize, variants (repeatable)")] = None,
          family: Annotated[str, typer.Option(help="module names for q/k/v/o: llama (q_proj...) or bert (query...)")]
          = "llama",
          only: Annotated[str | None, typer.Option(help="comma-separated cell names: run just these")] = None,
          out: Annotated[Path, typer.Option(help="output folder (cells/, sweep.json, sweep.md, sweep.png)")]
          = Path("runs/sweep")):
    """Ablation grid from one config: each cell trains in its own process; finished cells are not re-run.

    Extra `--section.key value` options apply to every cell (e.g. --train.steps 50)."""
    from ..core.files import check_writable
    from ..tools.sweep import format_table
    from ..tools.sweep import sweep as run

    check_writable(out)
    result = run(config, grid or ["rank"], out, extra=list(ctx.args), family=family,
                 only=only.split(",") if only else None, log=log)
    print(format_table(result))
    log(f"sweep.json, sweep.md, sweep.png and every cell's run are in {out}")
