"""The `lorafit` command. Each subcommand parses its options and calls one library function."""

from __future__ import annotations

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
    from .tools.experiments.flip import FlipConfig, format_table, run

    cfg = FlipConfig(data=data, flip=flip, rank=rank, fraction=fraction, seed=seed, base_epochs=base_epochs,
                     tune_epochs=tune_epochs, out=out, classes=tuple(int(c) for c in classes.split(",")))
    results = run(cfg, log=log)
    print(format_table(results))
    log(f"results.json, table.md, flip.png and the adapter are in {out}")


@app.command(context_settings=EXTRA)
def train(ctx: typer.Context,
          config: Annotated[Path, typer.Argument(help="YAML config (sections model, lora, data, train, eval, out)")],
          resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint in the out folder")] = False,
          precision: Annotated[str | None, typer.Option(help="auto, bf16 or fp32 (= --train.precision)")] = None,
          quantize: Annotated[str | None, typer.Option(help="none, nf4, int8 or gguf (= --model.quantize)")] = None):
    """Fine-tune a LoRA adapter as CONFIG says; extra `--section.key value` options override the file."""
    from .training.config import load_run_config
    from .training.cpu.memory import keep_freed_memory
    from .training.recipe import train as run

    cfg = load_run_config(config, [*ctx.args, *(["--train.precision", precision] if precision else []),
                                   *(["--model.quantize", quantize] if quantize else [])])
    keep_freed_memory()  # this process only trains: each step reuses what the last one freed (the run reports it)
    report = run(cfg, resume=resume, log=log)
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
             out: Annotated[Path | None, typer.Option(help="folder for eval.json, predictions and a classifier's "
                                                      "confusion matrix (default: the config's out/eval)")] = None):
    """Score the base model and each adapter side by side on the config's validation split."""
    from .tools.compare import evaluate_adapters
    from .tools.compare_report import format_per_class, write_eval_report
    from .training.config import load_run_config

    cfg = load_run_config(config, ctx.args)
    rows = evaluate_adapters(cfg, [str(a) for a in adapter or [Path(cfg.out) / "adapter"]], base, log)
    table = Table(title=f"{cfg.model.name}: {rows[0]['metric']}")
    for column in ("model", rows[0]["metric"], "loss"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], f"{row['value']:.2f}", f"{row['loss']:.4f}")
    Console().print(table)
    print("".join("\n" + format_per_class(row) for row in rows if "per_class" in row), end="")
    written = write_eval_report(rows, out or Path(cfg.out) / "eval")
    log(f"{', '.join(p.name for p in written)} are in {written[-1].parent}")


@app.command()
def generate(prompt: Annotated[list[str], typer.Argument(help="prompt(s); each is sent as a user message")],
             adapter: Annotated[list[Path] | None, typer.Option(help="adapter folder; repeat for several")] = None,
             model: Annotated[str | None, typer.Option(help="base model (default: the adapter's base)")] = None,
             no_adapter: Annotated[bool, typer.Option("--no-adapter", help="the base model alone")] = False,
             compare_base: Annotated[bool, typer.Option(help="also answer with the base model, first")] = False,
             max_new_tokens: Annotated[int, typer.Option(help="generation budget")] = 64,
             temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
             raw: Annotated[bool, typer.Option("--raw", help="send the text as it is, not laid out as the adapter's "
                                               "training rows were")] = False,
             quantize: Quantize = "none"):
    """Generate, streaming tokens, with each adapter in turn (or none). Each prompt is laid out as the adapter's
    training rows were (its saved instruction, system prompt and layout) unless --raw; the base, the first's."""
    from .core.surgery import disabled, set_adapter
    from .inference import generate as gen

    paths = [] if no_adapter else [str(a) for a in adapter or []]
    gen.require_generative(paths)
    records = [None if raw else gen.prompt_record_of(path) for path in paths]
    net, tokenizer, names = gen.load_with_adapters(model, paths, quantize=quantize)

    def answer(name: str, record: dict | None) -> None:
        for text in prompt:
            sys.stdout.write(f"[{name}] ")
            gen.stream(net, tokenizer, gen.prompt_ids(tokenizer, text, record), max_new_tokens, temperature,
                       on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            sys.stdout.write("\n")

    if compare_base or not names:
        with disabled(net):
            answer("base", records[0] if records else None)
    for name, record in zip(names, records, strict=True):
        set_adapter(net, name)
        answer(name, record)


@app.command()
def chat(adapter: Annotated[Path | None, typer.Option(help="adapter folder")] = None,
         model: Annotated[str | None, typer.Option(help="base model (default: the adapter's base)")] = None,
         max_new_tokens: Annotated[int, typer.Option(help="budget per answer")] = 256,
         temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
         raw: Annotated[bool, typer.Option("--raw", help="the first line as it is, not laid out as the adapter's "
                                           "training rows were")] = False,
         quantize: Quantize = "none"):
    """Talk to the model in the terminal (empty line or Ctrl-D ends); answers stream as they are generated.
    The first line is laid out as the adapter's training rows were, unless --raw."""
    from .data import user_messages
    from .inference import generate as gen

    paths = [str(adapter)] if adapter else []
    gen.require_generative(paths)
    record = gen.prompt_record_of(paths[0]) if paths and not raw else None
    net, tokenizer, _ = gen.load_with_adapters(model, paths, quantize=quantize)
    history: list[dict] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        first = not history and record is not None  # the first turn exactly as training laid its rows out
        prompt = gen.prompt_ids(tokenizer, text, record) if first else None
        history += user_messages(record, tokenizer, text) if first else [{"role": "user", "content": text}]
        sys.stdout.write("model> ")
        answer = gen.stream(net, tokenizer, prompt or gen.render(tokenizer, history), max_new_tokens, temperature,
                            on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": answer.strip()})


@app.command()
def predict(texts: Annotated[list[str] | None, typer.Argument(help="text(s) to label or answer")] = None,
            adapter: Annotated[Path, typer.Option(help="adapter folder (a classifier or a generator)")] = ...,
            input_file: Annotated[Path | None, typer.Option("--input", help=".txt (a text per line), .jsonl (text, or "
                                                            "instruction and input) or .csv (a text column)")] = None,
            output: Annotated[Path | None, typer.Option(help="file to write (default: stdout)")] = None,
            output_format: Annotated[str | None, typer.Option("--format", help="jsonl or csv (default: from "
                                                              "--output's suffix, else jsonl)")] = None,
            model: Annotated[str | None, typer.Option(help="base model (default: the adapter's base)")] = None,
            batch_size: Annotated[int, typer.Option(help="texts per batch")] = 16,
            max_new_tokens: Annotated[int, typer.Option(help="generation budget (generative adapters)")] = 64,
            raw: Annotated[bool, typer.Option("--raw", help="send texts as they are, not laid out as the adapter's "
                                              "training rows were")] = False,
            quantize: Quantize = "none"):
    """Apply an adapter to many texts: a classifier's label and class probabilities, or a generator's greedy answer
    (each text laid out as the training rows were), one JSONL or CSV row per input row."""
    from .core.files import write_text
    from .data import read_inputs
    from .inference import predict as pred

    fmt = pred.output_format(output_format, output)
    rows = pred.text_rows(texts or []) + (read_inputs(input_file) if input_file else [])
    records = pred.predict(str(adapter), rows, model=model, raw=raw, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, quantize=quantize, log=log)
    text = pred.render_predictions(records, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        write_text(output, text)
        log(f"{len(records)} predictions written to {output}")


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
    from .models import save_merged

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
    from .tools.plan import plan as make_plan
    from .tools.plan_report import format_plan, write_report

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
    from .tools.analyze import analyze as run
    from .tools.analyze_report import format_tables, write_report

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
    from .tools.sweep import format_table
    from .tools.sweep import sweep as run

    result = run(config, grid or ["rank"], out, extra=list(ctx.args), family=family,
                 only=only.split(",") if only else None, log=log)
    print(format_table(result))
    log(f"sweep.json, sweep.md, sweep.png and every cell's run are in {out}")


@app.command()
def inspect(adapter: Annotated[Path, typer.Argument(help="adapter folder")]):
    """Show an adapter's config and tensors (reads safetensors only)."""
    from .core.adapter_io import read_adapter

    cfg, tensors = read_adapter(adapter)
    log(f"r={cfg.r} alpha={cfg.alpha} scale={cfg.scale:g} targets={cfg.targets} base={cfg.base_model}")
    total = sum(t.numel() for t in tensors.values())
    log(f"{len(tensors)} tensors, {total:,} parameters, {sum(t.numel() * t.element_size() for t in tensors.values()):,}"
        " bytes")


def main() -> None:
    """Entry point: user mistakes print one clear line (set LORAFIT_DEBUG=1 for the traceback)."""
    from .core import AdapterFileError, ConfigError, TargetError

    try:
        app(prog_name="lorafit")
    except (ConfigError, AdapterFileError, TargetError, FileNotFoundError, ValueError) as err:
        if os.environ.get("LORAFIT_DEBUG"):
            raise
        log(f"error: {err}")
        raise SystemExit(2) from None
