"""`lorafit export ...`: models and adapters in other runtimes' formats; `export gguf` writes llama.cpp's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import export_app, log


@export_app.command("gguf")
def gguf(out: Annotated[Path, typer.Option(help="the .gguf file to write")],
         model: Annotated[str | None, typer.Option(help="base model: preset, model folder or .gguf file (default: "
                                                   "the adapter's base)")] = None,
         adapter: Annotated[Path | None, typer.Option(help="adapter folder (merged in, or alone with --lora-only)")]
         = None,
         lora_only: Annotated[bool, typer.Option("--lora-only", help="write the adapter alone, as a GGUF LoRA adapter "
                                                 "llama.cpp applies to the base (--lora)")] = False,
         file_type: Annotated[str, typer.Option("--type", help="weights: f32, f16, bf16, q8_0 or q4_0 (an adapter: "
                                                "f32, f16 or bf16)")] = "f32",
         overwrite: Annotated[bool, typer.Option(help="replace an existing output file")] = False):
    """Write a GGUF file llama.cpp runs: the base model with the adapter merged in (or the base alone), or with
    --lora-only the adapter as a GGUF LoRA adapter. Llama-family models (e.g. SmolLM2)."""
    from ..models import check_file_type, check_gguf_target, export_gguf, export_lora_gguf, load_config, resolve

    if adapter is None and (lora_only or model is None):
        raise ValueError("--lora-only needs --adapter" if lora_only else "name a --model, an --adapter, or both")
    if lora_only:
        from ..inference.generate import base_model_of

        done = export_lora_gguf(adapter, load_config(model or base_model_of(adapter)), out, file_type, overwrite)
        log(f"GGUF LoRA adapter written to {done['path']} ({done['modules']} weights, alpha {done['alpha']:g}, "
            f"{done['bytes'] / 2**20:,.2f} MiB); apply it with llama.cpp's --lora")
        return
    from ..inference import generate as gen
    from ..methods import check_mergeable

    check_file_type(file_type)  # before the minutes of loading
    check_gguf_target(out, overwrite)
    if adapter is not None:
        check_mergeable(adapter)
    net, tokenizer, _ = gen.load_with_adapters(model, [str(adapter)] if adapter else [])
    where, gguf_file = resolve(model or gen.base_model_of(adapter))
    done = export_gguf(net, tokenizer, out, file_type, Path(where) / gguf_file if gguf_file else None, overwrite)
    types = ", ".join(f"{kind} {n}" for kind, n in sorted(done["types"].items()))
    merged = " with the adapter merged" if adapter else ""
    log(f"GGUF model written to {done['path']}{merged} ({done['bytes'] / 2**20:,.1f} MiB; tensors: {types})")
