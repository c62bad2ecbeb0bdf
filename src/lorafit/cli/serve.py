"""The command that serves adapters over HTTP: `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import Quantize, app, log


@app.command()
def serve(model: Annotated[str, typer.Argument(help="base model: a preset, a model folder, a .gguf file or a hub "
                                               "id; its name in the API")],
          adapter: Annotated[list[str] | None, typer.Option(help="NAME=PATH: serve the adapter folder PATH as model "
                                                            "NAME; repeat for several")] = None,
          adapter_dir: Annotated[list[Path] | None, typer.Option(help="a folder that POST /v1/load_lora_adapter "
                                                                 "may load adapters from; repeat for several "
                                                                 "(without it, run-time loading is off)")] = None,
          host: Annotated[str, typer.Option(help="address to listen on (default: this machine only)")]
          = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
          max_batch: Annotated[int, typer.Option(min=1, help="requests decoded together")] = 8,
          max_adapters: Annotated[int, typer.Option(min=1, help="adapters in memory at once (least recently used "
                                                    "evicted)")] = 8,
          max_model_len: Annotated[int | None, typer.Option(min=2, help="context in tokens, prompt and completion "
                                                            "(default: the model's)")] = None,
          max_queue: Annotated[int, typer.Option(min=1, help="waiting requests; one more is answered 429")] = 256,
          quantize: Quantize = "none",
          dtype: Annotated[str, typer.Option(help="bf16 or fp32: weights and KV cache")] = "bf16",
          threads: Annotated[int | None, typer.Option(min=1, help="compute threads of the engine (default: "
                                                      "torch's)")] = None,
          merge: Annotated[bool, typer.Option("--merge", help="fold the one --adapter into the base and serve it "
                                              "under the adapter's name")] = False,
          api_key: Annotated[str | None, typer.Option(envvar="LORAFIT_API_KEY", help="require 'Authorization: "
                                                      "Bearer KEY' on /v1 (or set LORAFIT_API_KEY, which ps does "
                                                      "not show)")] = None):
    """Serve the model and its adapters over an OpenAI-compatible HTTP API (as vLLM does): /v1/models,
    /v1/completions, /v1/chat/completions (streaming), /v1/load_lora_adapter, /health, /metrics."""
    from ..serve.server import ServeOptions
    from ..serve.server import serve as run

    run(ServeOptions(model=model, adapters=adapter or [], adapter_dirs=[str(d) for d in adapter_dir or []],
                     host=host, port=port, max_batch=max_batch, max_adapters=max_adapters,
                     max_model_len=max_model_len, max_queue=max_queue, quantize=quantize, dtype=dtype,
                     threads=threads, merge=merge, api_key=api_key), log=log)
