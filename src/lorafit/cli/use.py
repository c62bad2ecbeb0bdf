"""Commands that use adapters: `generate`, `chat`, `predict`, `merge`, `combine`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .app import Quantize, Temperature, app, log


@app.command()
def generate(prompt: Annotated[list[str], typer.Argument(help="prompt(s); each is sent as a user message")],
             adapter: Annotated[list[Path] | None, typer.Option(help="adapter folder; repeat for several")] = None,
             model: Annotated[str | None, typer.Option(help="base model (default: the adapter's base)")] = None,
             no_adapter: Annotated[bool, typer.Option("--no-adapter", help="the base model alone")] = False,
             compare_base: Annotated[bool, typer.Option(help="also answer with the base model, first")] = False,
             max_new_tokens: Annotated[int, typer.Option(min=1, help="generation budget")] = 64,
             temperature: Temperature = 0.0,
             raw: Annotated[bool, typer.Option("--raw", help="send the text as it is, not laid out as the adapter's "
                                               "training rows were")] = False,
             quantize: Quantize = "none"):
    """Generate, streaming tokens, with each adapter in turn (or none). Each prompt is laid out as the adapter's
    training rows were (its saved instruction, system prompt and layout) unless --raw; the base, the first's."""
    from ..core.surgery import disabled, set_adapter
    from ..inference import generate as gen

    paths = [] if no_adapter else [str(a) for a in adapter or []]
    gen.require_generative(paths)
    records = [None if raw else gen.prompt_record_of(path) for path in paths]
    net, tokenizer, names = gen.load_with_adapters(model, paths, quantize=quantize)

    def answer(name: str, record: dict | None) -> None:
        for text in prompt:
            sys.stdout.write(f"[{name}] ")
            gen.stream(net, tokenizer, gen.prompt_ids(tokenizer, text, record), max_new_tokens, temperature,
                       on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), log=log)
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
         max_new_tokens: Annotated[int, typer.Option(min=1, help="budget per answer")] = 256,
         temperature: Temperature = 0.0,
         raw: Annotated[bool, typer.Option("--raw", help="the first line as it is, not laid out as the adapter's "
                                           "training rows were")] = False,
         quantize: Quantize = "none"):
    """Talk to the model in the terminal (empty line or Ctrl-D ends); answers stream as they are generated.
    The first line is laid out as the adapter's training rows were, unless --raw."""
    from ..data import user_messages
    from ..inference import generate as gen

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
                            on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), log=log)
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
    from ..core.files import write_text
    from ..data import read_inputs
    from ..inference import predict as pred

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
    from ..inference import generate as gen
    from ..methods import check_mergeable
    from ..models import check_merge_target, save_merged

    check_merge_target(out, overwrite)  # before the minutes of loading: a full folder or a file in the way
    check_mergeable(adapter)
    net, tokenizer, _ = gen.load_with_adapters(model, [str(adapter)], task=task, quantize=quantize,
                                               quantize_embeddings=quantize_embeddings)
    path = save_merged(net, tokenizer, out, overwrite=overwrite)
    dequantized = f" (the {quantize} base weights dequantized, plus the adapter)" if quantize != "none" else ""
    log(f"merged model written to {path}{dequantized}")

@app.command()
def combine(adapters: Annotated[list[Path], typer.Argument(help="adapter folders to combine")],
            out: Annotated[Path, typer.Option(help="folder for the combined adapter")],
            weights: Annotated[list[str] | None, typer.Option(help="one weight per adapter, comma-separated "
                                                              "(0.7,0.3; negative subtracts); default 1 each")]
            = None,
            method: Annotated[str, typer.Option(help="linear, cat, svd, ties or dare_linear (PEFT's "
                                                "add_weighted_adapter combination types)")] = "linear",
            density: Annotated[float | None, typer.Option(help="ties, dare_linear: fraction of entries kept")] = None,
            majority_sign: Annotated[str, typer.Option(help="ties: total or frequency")] = "total",
            rank: Annotated[int | None, typer.Option(help="svd: rank of the result (default: the largest input's)")]
            = None,
            svd_clamp: Annotated[float | None, typer.Option(help="svd: clamp the factors to this quantile")] = None,
            seed: Annotated[int, typer.Option(help="dare_linear: seed of the random drop masks")] = 0):
    """Combine LoRA adapters into one adapter folder, weighted (as PEFT's add_weighted_adapter), without the base
    model: e.g. `lorafit combine a b --weights 0.7,0.3 --method cat --out ab`."""
    from ..core.combine import CombineError, CombineSpec, combine_adapters

    for path in adapters:
        if not path.exists() and _number(str(path)):
            raise CombineError(f"{path}: no such adapter folder; weights go in one option, comma-separated: "
                               "--weights 0.7,0.3")
    parsed = None
    if weights:
        parts = [w for option in weights for w in option.split(",") if w.strip()]
        if not all(_number(w) for w in parts):
            raise CombineError(f"--weights must be numbers, comma-separated (e.g. 0.7,0.3), got {','.join(weights)}")
        parsed = [float(w) for w in parts]
    spec = CombineSpec(method=method, density=density, majority_sign=majority_sign, rank=rank, svd_clamp=svd_clamp,
                       seed=seed)
    done = combine_adapters(adapters, out, parsed, spec)
    plural = "s" if len(adapters) > 1 else ""
    log(f"{len(adapters)} adapter{plural} combined ({done['method']}): r={done['r']}, {done['modules']} modules, "
        f"{done['file_bytes']:,} bytes, written to {done['path']}")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
