"""The `lorafit` command's app, its sub-apps and what every command shares."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA fine-tuning: train small adapters, save them in PEFT's format, merge, generate.")
reproduce_app = typer.Typer(no_args_is_help=True, help="Reproduce the source talks' experiments.")
app.add_typer(reproduce_app, name="reproduce")
bench_app = typer.Typer(no_args_is_help=True, help="Measure speed and memory (results go to bench.json / bench.md).")
app.add_typer(bench_app, name="bench")
export_app = typer.Typer(no_args_is_help=True, help="Write models and adapters in other runtimes' formats.")
app.add_typer(export_app, name="export")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
Quantize = Annotated[str, typer.Option(help="none, nf4, int8 or gguf: hold the base's block weights quantized")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0: greedy; above 0: sampling, hotter as it grows")]
debug = False  # --debug: errors show their traceback (set by the app's callback, read by main)


@app.callback()
def options(traceback: Annotated[bool, typer.Option("--debug", help="show the traceback of an error (or set "
                                                "LORAFIT_DEBUG=1)")] = False) -> None:
    """Options of the `lorafit` command itself, before the subcommand."""
    global debug
    debug = traceback


def debugging() -> bool:
    """Whether `--debug` was given (commands that start other lorafit processes pass it on)."""
    return debug


def log(message: str) -> None:
    """Progress and notes go to stderr, unwrapped; results (tables, generations) go to stdout."""
    print(message, file=sys.stderr, flush=True)
