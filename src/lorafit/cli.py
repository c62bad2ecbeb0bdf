"""The `lorafit` command. Each subcommand parses its options and calls one library function."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA fine-tuning: train small adapters, save them in PEFT's format, merge, generate.")
reproduce_app = typer.Typer(no_args_is_help=True, help="Reproduce the source talks' experiments.")
app.add_typer(reproduce_app, name="reproduce")
bench_app = typer.Typer(no_args_is_help=True, help="Measure speed and memory (results go to bench.json / bench.md).")
app.add_typer(bench_app, name="bench")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
Quantize = Annotated[str, typer.Option(help="none, nf4, int8 or gguf: hold the base's block weights quantized")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0: greedy; above 0: sampling, hotter as it grows")]
_debug = False  # --debug: errors show their traceback (set by the app's callback, read by main)


@app.callback()
def options(debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error (or set "
                                                "LORAFIT_DEBUG=1)")] = False) -> None:
    """Options of the `lorafit` command itself, before the subcommand."""
    global _debug
    _debug = debug


def log(message: str) -> None:
    """Progress and notes go to stderr, unwrapped; results (tables, generations) go to stdout."""
    print(message, file=sys.stderr, flush=True)


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
    from .core.files import check_writable
    from .tools.experiments.flip import FlipConfig, format_table, run

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
          quantize: Annotated[str | None, typer.Option(help="none, nf4, int8 or gguf (= --model.quantize)")] = None):
    """Fine-tune a LoRA adapter as CONFIG says; extra `--section.key value` options override the file."""
    from .training.config import load_run_config
    from .training.cpu.memory import keep_freed_memory
    from .training.recipe import train as run

    cfg = load_run_config(config, [*ctx.args, *(["--train.precision", precision] if precision else []),
                                   *(["--model.quantize", quantize] if quantize else [])])
    keep_freed_memory()  # this process only trains: each step reuses what the last one freed (the run reports it)
    report = run(cfg, resume=resume, overwrite=overwrite, force=force, log=log)
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
             base: Annotated[bool, typer.Option(help="score the base model too")] = True):
    """Score the base model and each adapter side by side on the config's validation split."""
    from .tools.compare import evaluate_adapters
    from .training.config import load_run_config

    cfg = load_run_config(config, ctx.args)
    rows = evaluate_adapters(cfg, [str(a) for a in adapter or [Path(cfg.out) / "adapter"]], base, log)
    table = Table(title=f"{cfg.model.name}: {rows[0]['metric']}")
    for column in ("model", rows[0]["metric"], "loss"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], f"{row['value']:.2f}", f"{row['loss']:.4f}")
    Console().print(table)


@app.command()
def generate(prompt: Annotated[list[str], typer.Argument(help="prompt(s); each is sent as a user message")],
             adapter: Annotated[list[Path] | None, typer.Option(help="adapter folder; repeat for several")] = None,
             model: Annotated[str | None, typer.Option(help="base model (default: the adapter's base)")] = None,
             no_adapter: Annotated[bool, typer.Option("--no-adapter", help="the base model alone")] = False,
             compare_base: Annotated[bool, typer.Option(help="also answer with the base model, first")] = False,
             max_new_tokens: Annotated[int, typer.Option(min=1, help="generation budget")] = 64,
             temperature: Temperature = 0.0,
             quantize: Quantize = "none"):
    """Generate, streaming tokens, with each adapter in turn (or none)."""
    from .core.surgery import disabled, set_adapter
    from .inference import generate as gen

    net, tokenizer, names = gen.load_with_adapters(model, [] if no_adapter else [str(a) for a in adapter or []],
                                                   quantize=quantize)

    def answer(name: str) -> None:
        for text in prompt:
            sys.stdout.write(f"[{name}] ")
            gen.stream(net, tokenizer, gen.render(tokenizer, text), max_new_tokens, temperature,
                       on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), log=log)
            sys.stdout.write("\n")

    if compare_base or not names:
        with disabled(net):
            answer("base")
    for name in names:
        set_adapter(net, name)
        answer(name)


@app.command()
def chat(adapter: Annotated[Path | None, typer.Option(help="adapter folder")] = None,
         model: Annotated[str | None, typer.Option(help="base model (default: the adapter's base)")] = None,
         max_new_tokens: Annotated[int, typer.Option(min=1, help="budget per answer")] = 256,
         temperature: Temperature = 0.0,
         quantize: Quantize = "none"):
    """Talk to the model in the terminal (empty line or Ctrl-D ends); answers stream as they are generated."""
    from .inference import generate as gen

    net, tokenizer, _ = gen.load_with_adapters(model, [str(adapter)] if adapter else [], quantize=quantize)
    history: list[dict] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        answer = gen.stream(net, tokenizer, gen.render(tokenizer, history), max_new_tokens, temperature,
                            on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), log=log)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": answer.strip()})


@app.command()
def merge(adapter: Annotated[Path, typer.Option(help="adapter folder")],
          out: Annotated[Path, typer.Option(help="folder for the merged Hugging Face model")],
          model: Annotated[str | None, typer.Option(help="base model (default: the adapter's base)")] = None,
          task: Annotated[str | None, typer.Option(help="causal-lm or classification (default: the adapter's)")] = None,
          overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
          quantize: Annotated[str, typer.Option(help="merge into the base as quantized in training (nf4, int8, "
                                                "gguf): W = dequant(Wq) + BA; default none: the full-precision base")]
          = "none",
          quantize_embeddings: Annotated[bool, typer.Option(help="the embedding table too, as quantized in training "
                                                            "(model.quantize_embeddings)")] = False):
    """Fold the adapter into the base weights and write a plain model folder (safetensors, config, tokenizer)."""
    from .inference import generate as gen
    from .methods import check_mergeable
    from .models import check_merge_target, save_merged

    check_merge_target(out, overwrite)  # before the minutes of loading: a full folder or a file in the way
    check_mergeable(adapter)
    net, tokenizer, _ = gen.load_with_adapters(model, [str(adapter)], task=task, quantize=quantize,
                                               quantize_embeddings=quantize_embeddings)
    path = save_merged(net, tokenizer, out, overwrite=overwrite)
    dequantized = f" (the {quantize} base weights dequantized, plus the adapter)" if quantize != "none" else ""
    log(f"merged model written to {path}{dequantized}")


@app.command()
def fetch(name: Annotated[str, typer.Argument(help="preset name (see `lorafit models`)")]):
    """Download a preset model ahead of time into the cache."""
    from .models import fetch as fetch_preset

    log(f"{name}: {fetch_preset(name, log=log)}")


@app.command()
def models():
    """List the built-in model presets and whether they are cached."""
    from .models import cache_dir, list_models

    rows = list_models()
    table = Table(title=f"presets (cache: {cache_dir()})")
    table.add_column("name", no_wrap=True, min_width=max(len(row["name"]) for row in rows))  # whole, to copy
    for column in ("task", "params", "cached"):
        table.add_column(column, no_wrap=True)
    table.add_column("description")  # the only column that wraps in a narrow terminal
    for row in rows:
        table.add_row(row["name"], row["task"], row["params"], "yes" if row["cached"] else "no", row["description"])
    Console().print(table)


@bench_app.command("train")
def bench_train(
    model: Annotated[str, typer.Option(help="preset, model folder or .gguf file")] = "smollm2-135m-instruct",
    data: Annotated[Path | None, typer.Option(help="JSONL file whose text is cut into token windows")] = None,
    batch_size: Annotated[int, typer.Option(help="rows per step")] = 8,
    seq_len: Annotated[int, typer.Option(help="tokens per row")] = 128,
    r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    targets: Annotated[str, typer.Option(help="comma-separated LoRA targets")] = "q_proj,v_proj",
    warmup: Annotated[int, typer.Option(help="untimed steps per setup")] = 2,
    steps: Annotated[int, typer.Option(help="timed steps per setup")] = 5,
    setups: Annotated[str, typer.Option(help="comma-separated subset of the setups")] = ",".join(
        ("lorafit-fast", "lorafit-fp32", "peft-best", "peft-fp32", "full-fp32")),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/bench-train"),
    device: Annotated[str, typer.Option(help="cpu, or cuda / cuda:N to run every setup on a GPU")] = "cpu",
    keep_freed_memory: Annotated[bool, typer.Option(
        help="every setup with glibc keeping freed memory for reuse (lorafit train does this)")] = False):
    """lorafit's training step against PEFT's (best and fp32) and full fine-tuning, interleaved, same batches."""
    from .tools.bench.train import TrainBench, format_table, run

    extra = {"data": str(data)} if data else {}
    cfg = TrainBench(model=model, batch_size=batch_size, seq_len=seq_len, r=r, targets=targets.split(","),
                     warmup=warmup, steps=steps, setups=setups.split(","), out=str(out), device=device,
                     keep_freed_memory=keep_freed_memory, **extra)
    print(format_table(run(cfg, log=log)))


@bench_app.command("latency")
def bench_latency(
    model: Annotated[str, typer.Option(help="preset, model folder, .gguf file, or gpt2-medium-random (GPT-2 medium's "
                                            "shape, random weights, no download)")] = "smollm2-135m-instruct",
    batch_size: Annotated[int, typer.Option(help="rows per forward pass (without --settings)")] = 1,
    seq_len: Annotated[int, typer.Option(help="tokens per row (without --settings)")] = 128,
    settings: Annotated[str | None, typer.Option(help="BATCHxSEQ pairs, e.g. 32x512,16x256,1x128; 'lecture' is "
                                                      "those three")] = None,
    shrink: Annotated[int, typer.Option(help="divide every batch size by this (at least 1 row), for small machines")]
    = 1,
    bottleneck: Annotated[int, typer.Option(help="Houlsby adapter width m")] = 64,
    r: Annotated[int | None, typer.Option(help="LoRA rank (default: 4 on GPT-2, 8 otherwise)")] = None,
    precision: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    threads: Annotated[int | None, typer.Option(help="torch threads while timing (default: torch's)")] = None,
    warmup: Annotated[int, typer.Option(help="untimed rounds first")] = 3,
    repeats: Annotated[int, typer.Option(help="timed forward passes per model and setting")] = 50,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/bench-latency")):
    """Forward latency: base, Houlsby adapters, unmerged and merged LoRA (interleaved medians, overhead in %)."""
    from .tools.bench.latency import LatencyBench, format_table, parse_settings, run

    cfg = LatencyBench(model=model, batch_size=batch_size, seq_len=seq_len,
                       settings=parse_settings(settings) if settings else None, shrink=shrink, r=r,
                       bottleneck=bottleneck, precision=precision, threads=threads, warmup=warmup, repeats=repeats,
                       out=str(out))
    print(format_table(run(cfg, log=log)))


@app.command()
def plan(source: Annotated[str, typer.Argument(help="preset (gpt2, gpt2-medium, ..., gpt3-175b, smollm2-135m, "
                                                    "minilm-l6, llama2-7b, llama-65b), config.json, folder or .gguf")],
         r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
         alpha: Annotated[float | None, typer.Option(help="LoRA alpha (recorded; counts do not depend on it)")] = None,
         targets: Annotated[str | None, typer.Option(help="comma-separated modules (q,k,v: slices of a fused c_attn); "
                                                          "default: the query and value projections")] = None,
         batch_size: Annotated[int, typer.Option(help="rows per step, for the activation estimate")] = 1,
         seq_len: Annotated[int, typer.Option(help="tokens per row, for the activation estimate")] = 512,
         adapter_dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16")] = "fp32",
         checkpointing: Annotated[bool, typer.Option(help="assume full gradient checkpointing")] = False,
         out: Annotated[Path, typer.Option(help="folder for plan.json, plan.md, plan.png")] = Path("runs/plan")):
    """Parameters, adapter file size and training memory (full, LoRA, QLoRA) from a model config; no weights."""
    from .core.files import check_writable
    from .tools.plan import plan as make_plan
    from .tools.plan_report import format_plan, write_report

    check_writable(out)
    result = make_plan(source, r=r, alpha=alpha, targets=targets.split(",") if targets else None,
                       batch_size=batch_size, seq_len=seq_len, adapter_dtype=adapter_dtype, checkpointing=checkpointing)
    print(format_plan(result))
    write_report(result, out)
    log(f"plan.json, plan.md and plan.png are in {out}")


@app.command()
def analyze(adapter: Annotated[Path, typer.Argument(help="adapter folder")],
            other: Annotated[Path | None, typer.Option(help="a second adapter on the same modules (another rank or "
                                                             "seed): subspace similarity")] = None,
            base: Annotated[str | None, typer.Option(help="base model for the amplification table (default: the "
                                                          "adapter's recorded base)")] = None,
            no_base: Annotated[bool, typer.Option("--no-base", help="skip amplification; load no model")] = False,
            seed: Annotated[int, typer.Option(help="seed of the random directions in the amplification table")] = 0,
            out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/analyze")):
    """What the adapter learned (Hu et al. 2021, section 7): ΔW spectra, subspace similarity, amplification."""
    from .core.files import check_writable
    from .tools.analyze import analyze as run
    from .tools.analyze_report import format_tables, write_report

    check_writable(out)
    weights = None
    if not no_base:
        from .inference.generate import base_model_of, task_of
        from .models import load_model

        name = base or base_model_of(adapter)
        task, labels = task_of(adapter)
        log(f"loading {name} for the amplification table (--no-base skips it)")
        weights = load_model(name, task=task, labels=labels)[0].state_dict()
    result = run(adapter, other, base_weights=weights, seed=seed)
    print(format_tables(result))
    written = write_report(result, out)
    log(f"{', '.join(p.name for p in written)} are in {out}")


@app.command(context_settings=EXTRA)
def sweep(ctx: typer.Context,
          config: Annotated[Path, typer.Argument(help="YAML training config every cell starts from")],
          grid: Annotated[list[str] | None, typer.Option(help="rank, targets, budget, methods, quantize (repeatable)")]
          = None,
          family: Annotated[str, typer.Option(help="module names for q/k/v/o: llama (q_proj...) or bert (query...)")]
          = "llama",
          only: Annotated[str | None, typer.Option(help="comma-separated cell names: run just these")] = None,
          out: Annotated[Path, typer.Option(help="output folder (cells/, sweep.json, sweep.md, sweep.png)")]
          = Path("runs/sweep")):
    """Ablation grid from one config: each cell trains in its own process; finished cells are not re-run.

    Extra `--section.key value` options apply to every cell (e.g. --train.steps 50)."""
    from .core.files import check_writable
    from .tools.sweep import format_table
    from .tools.sweep import sweep as run

    check_writable(out)
    result = run(config, grid or ["rank"], out, extra=list(ctx.args), family=family,
                 only=only.split(",") if only else None, log=log)
    print(format_table(result))
    log(f"sweep.json, sweep.md, sweep.png and every cell's run are in {out}")


@app.command("config")
def config_keys(markdown: Annotated[bool, typer.Option(help="print docs/config.md (a Markdown table per section)")]
                = False):
    """Every key of a run config (YAML section or --section.key flag) with its type, default and meaning."""
    from .tools.configdoc import config_keys as keys
    from .tools.configdoc import markdown as to_markdown

    rows = keys()
    if markdown:
        sys.stdout.write(to_markdown(rows))
        return
    table = Table(title="run config keys (YAML: section: {key: value}; command line: --section.key value)")
    table.add_column("key", no_wrap=True)
    for column in ("type", "default", "meaning"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["key"], row["type"], row["default"], row["meaning"])
    Console().print(table)


@app.command()
def inspect(adapter: Annotated[Path, typer.Argument(help="adapter folder")]):
    """Show an adapter's config and tensors (reads safetensors only)."""
    from .core.adapter_io import read_adapter

    cfg, tensors = read_adapter(adapter)
    log(f"r={cfg.r} alpha={cfg.alpha} scale={cfg.scale:g} targets={cfg.targets} base={cfg.base_model}")
    total = sum(t.numel() for t in tensors.values())
    log(f"{len(tensors)} tensors, {total:,} parameters, {sum(t.numel() * t.element_size() for t in tensors.values()):,}"
        " bytes")


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user-caused failure prints one line, `error: ...`, and exits with 2; a bug keeps its
    traceback. `lorafit --debug ...` or LORAFIT_DEBUG=1 shows the traceback of every error."""
    # bitsandbytes warns on import that an optional CPU kernel package is missing; lorafit never uses that kernel
    # (it dequantizes and multiplies itself), so the warning would only mislead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        code = app(args=argv, prog_name="lorafit", standalone_mode=False)
    except typer.Abort:
        log("Aborted!")
        raise SystemExit(1) from None
    except typer.TyperException as err:  # click's usage errors: an unknown option, a value out of range, ...
        if type(err).__name__ == "NoArgsIsHelpError":
            raise SystemExit(2) from None  # the help is printed already
        ctx = getattr(err, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        _fail(err, f"{err.format_message()}{hint}")
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        _fail(err, message)
    if isinstance(code, int) and code:
        raise SystemExit(code)


def _user_error(err: Exception) -> str | None:
    """The one line for a failure the user can fix (a bad value, file or path, a full disk), else None."""
    from .core.files import describe_os_error

    # ValueError: ConfigError, DataError, ModelError, AdapterFileError, TargetError, ... all name what to fix
    return str(err) if isinstance(err, ValueError) else describe_os_error(err)


def _fail(err: BaseException, message: str) -> None:
    if _debug or os.environ.get("LORAFIT_DEBUG", "") not in ("", "0"):
        raise err
    log("error: " + " ".join(message.split()))  # one line, whatever the message held
    raise SystemExit(2) from None
