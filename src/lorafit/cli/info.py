"""Commands that look things up or measure: `fetch`, `models`, `inspect`, `config`, `plan`, `analyze`, `bench`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .app import app, bench_app, log


@app.command()
def fetch(name: Annotated[str, typer.Argument(help="preset name (see `lorafit models`)")]):
    """Download a preset model ahead of time into the cache."""
    from ..models import fetch as fetch_preset

    log(f"{name}: {fetch_preset(name, log=log)}")

@app.command()
def models():
    """List the built-in model presets and whether they are cached."""
    from ..models import cache_dir, list_models

    rows = list_models()
    table = Table(title=f"presets (cache: {cache_dir()})")
    table.add_column("name", no_wrap=True, min_width=max(len(row["name"]) for row in rows))  # whole, to copy
    for column in ("task", "params", "cached"):
        table.add_column(column, no_wrap=True)
    table.add_column("description")  # the only column that wraps in a narrow terminal
    for row in rows:
        table.add_row(row["name"], row["task"], row["params"], "yes" if row["cached"] else "no", row["description"])
    Console().print(table)

@app.command()
def inspect(adapter: Annotated[Path, typer.Argument(help="adapter folder")]):
    """Show an adapter's config and tensors (reads safetensors only)."""
    from ..core.adapter_io import read_adapter

    cfg, tensors = read_adapter(adapter)
    log(f"r={cfg.r} alpha={cfg.alpha} scale={cfg.scale:g} targets={cfg.targets} base={cfg.base_model}")
    for label, value in (("variant", cfg.variant if cfg.variant != "lora" else None),
                         ("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        if value:
            log(f"{label}: {value}")
    total = sum(t.numel() for t in tensors.values())
    log(f"{len(tensors)} tensors, {total:,} parameters, {sum(t.numel() * t.element_size() for t in tensors.values()):,}"
        " bytes")

@app.command("config")
def config_keys(markdown: Annotated[bool, typer.Option(help="print docs/config.md (a Markdown table per section)")]
                = False):
    """Every key of a run config (YAML section or --section.key flag) with its type, default and meaning."""
    from ..tools.configdoc import config_keys as keys
    from ..tools.configdoc import markdown as to_markdown

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
def plan(source: Annotated[str, typer.Argument(help="preset (gpt2, gpt2-medium, ..., gpt3-175b, smollm2-135m, "
                                                    "minilm-l6, llama2-7b, llama-65b), config.json, folder or .gguf")],
         r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
         alpha: Annotated[float | None, typer.Option(help="LoRA alpha (recorded; counts do not depend on it)")] = None,
         targets: Annotated[str | None, typer.Option(help="comma-separated modules (q,k,v: slices of a fused c_attn); "
                                                          "default: the query and value projections")] = None,
         batch_size: Annotated[int, typer.Option(help="rows per step (the global batch with --devices), for the "
                                                      "activation estimate")] = 1,
         seq_len: Annotated[int, typer.Option(help="tokens per row, for the activation estimate")] = 512,
         adapter_dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16")] = "fp32",
         checkpointing: Annotated[bool, typer.Option(help="assume full gradient checkpointing")] = False,
         devices: Annotated[int, typer.Option(min=1, help="data-parallel processes: adds each device's memory and "
                                                          "traffic under DDP and FSDP")] = 1,
         out: Annotated[Path, typer.Option(help="folder for plan.json, plan.md, plan.png")] = Path("runs/plan")):
    """Parameters, adapter file size and training memory (full, LoRA, QLoRA) from a model config; no weights."""
    from ..core.files import check_writable
    from ..tools.plan import plan as make_plan
    from ..tools.plan_report import format_plan, write_report

    check_writable(out)
    result = make_plan(source, r=r, alpha=alpha, targets=targets.split(",") if targets else None,
                       batch_size=batch_size, seq_len=seq_len, adapter_dtype=adapter_dtype, checkpointing=checkpointing,
                       devices=devices)
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
    from ..core.files import check_writable
    from ..tools.analyze import analyze as run
    from ..tools.analyze_report import format_tables, write_report

    check_writable(out)
    weights = None
    if not no_base:
        from ..inference.generate import base_model_of, task_of
        from ..models import load_model

        name = base or base_model_of(adapter)
        task, labels = task_of(adapter)
        log(f"loading {name} for the amplification table (--no-base skips it)")
        weights = load_model(name, task=task, labels=labels)[0].state_dict()
    result = run(adapter, other, base_weights=weights, seed=seed)
    print(format_tables(result))
    written = write_report(result, out)
    log(f"{', '.join(p.name for p in written)} are in {out}")


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
    from ..tools.bench.train import TrainBench, format_table, run

    extra = {"data": str(data)} if data else {}
    cfg = TrainBench(model=model, batch_size=batch_size, seq_len=seq_len, r=r, targets=targets.split(","),
                     warmup=warmup, steps=steps, setups=setups.split(","), out=str(out), device=device,
                     keep_freed_memory=keep_freed_memory, **extra)
    print(format_table(run(cfg, log=log)))

@bench_app.command("dist")
def bench_dist(
    model: Annotated[str, typer.Option(help="preset, model folder or .gguf file")] = "smollm2-135m-instruct",
    nproc: Annotated[int, typer.Option(help="processes of the distributed setups (DDP under torchrun)")] = 2,
    batch_size: Annotated[int, typer.Option(help="rows per step: the global batch")] = 8,
    seq_len: Annotated[int, typer.Option(help="tokens per row")] = 128,
    methods: Annotated[str, typer.Option(help="lora, full or both (comma-separated)")] = "lora,full",
    warmup: Annotated[int, typer.Option(help="untimed steps per job")] = 2,
    steps: Annotated[int, typer.Option(help="timed steps per job")] = 5,
    rounds: Annotated[int, typer.Option(help="jobs per setup, interleaved")] = 2,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/bench-dist")):
    """1 process x all cores against N processes sharing them (DDP): tokens/s, RSS per process, bytes per step."""
    from ..tools.bench.dist import DistBench, format_table, run

    cfg = DistBench(model=model, nproc=nproc, batch_size=batch_size, seq_len=seq_len, methods=methods.split(","),
                    warmup=warmup, steps=steps, rounds=rounds, out=str(out))
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
    from ..tools.bench.latency import LatencyBench, format_table, parse_settings, run

    cfg = LatencyBench(model=model, batch_size=batch_size, seq_len=seq_len,
                       settings=parse_settings(settings) if settings else None, shrink=shrink, r=r,
                       bottleneck=bottleneck, precision=precision, threads=threads, warmup=warmup, repeats=repeats,
                       out=str(out))
    print(format_table(run(cfg, log=log)))


@bench_app.command("serve")
def bench_serve(
    model: Annotated[str, typer.Option(help="preset, model folder or .gguf file")] = "smollm2-135m-instruct",
    adapters: Annotated[int, typer.Option(help="distinct adapters (random non-zero B)")] = 8,
    r: Annotated[int, typer.Option(help="their LoRA rank")] = 8,
    targets: Annotated[str, typer.Option(help="comma-separated LoRA targets")] = "q_proj,k_proj,v_proj,o_proj",
    max_tokens: Annotated[int, typer.Option(help="tokens per completion (run to the end: ignore_eos)")] = 32,
    clients: Annotated[str, typer.Option(help="comma-separated concurrent client counts")] = "1,8,32",
    requests: Annotated[int, typer.Option(help="requests per client count and row: at least this many, and two "
                                              "per client")] = 8,
    rounds: Annotated[int, typer.Option(help="interleaved rounds; tables show their medians")] = 2,
    threads: Annotated[int, typer.Option(help="compute threads of each server")] = 2,
    peft: Annotated[bool, typer.Option(help="the PEFT generate(adapter_names=...) row")] = True,
    transformers_serve: Annotated[bool, typer.Option(help="the `transformers serve` row")] = True,
    llama_cpp: Annotated[bool, typer.Option(help="the llama.cpp row (needs llama-cpp-python[server])")] = True,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/bench-serve")):
    """Serving many adapters: aggregate tokens/s, time to first token and inter-token latency at 1..N clients,
    lorafit serve (mixed, one adapter, base, merged) against PEFT, transformers serve and llama.cpp."""
    from ..tools.bench.serve import ServeBench, format_table, run

    cfg = ServeBench(model=model, adapters=adapters, r=r, targets=targets.split(","), max_tokens=max_tokens,
                     clients=[int(c) for c in clients.split(",")], requests=requests, rounds=rounds, threads=threads,
                     peft=peft, transformers_serve=transformers_serve, llama_cpp=llama_cpp, out=str(out))
    print(format_table(run(cfg, log=log)))
