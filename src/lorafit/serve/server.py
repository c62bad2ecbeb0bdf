"""Starting `lorafit serve`: load the base model, its adapters (or one merged in), start the engine, run the app
under uvicorn until Ctrl-C or SIGTERM.

The process-wide settings of a server (torch's compute threads) are set here, by the entry point, and by the
engine on its own thread; nothing in the app changes them.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn

from ..core.merge import unload
from ..inference.engine import Engine
from ..inference.generate import adapter_name, load_any
from ..methods import check_mergeable
from ..models import load_model
from .app import create_app
from .confine import NAME, roots_of

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUANTIZE = ("none", "nf4", "int8", "gguf")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    """What `lorafit serve` was asked for (its options, one field each)."""

    model: str  # the base: a preset, a model folder, a .gguf file or a hub id; also its name in the API
    adapters: list[str] = field(default_factory=list)  # "NAME=PATH" (or "PATH", named after its folder)
    adapter_dirs: list[str] = field(default_factory=list)  # the only folders run-time loads read; none: off
    host: str = "127.0.0.1"  # loopback: only this machine can connect
    port: int = 8000
    max_batch: int = 8  # requests decoded together in one forward pass
    max_adapters: int = 8  # adapters in memory at once; the least recently used one not in use is evicted
    max_model_len: int | None = None  # context in tokens, prompt and completion (default: the model's)
    max_queue: int = 256  # requests waiting for a slot; one more is answered 429
    quantize: str = "none"  # the base's block weights: none, nf4, int8 or gguf (lorafit.quant)
    dtype: str = "bf16"  # weights and KV cache: bf16 (half the memory and bandwidth) or fp32
    threads: int | None = None  # torch compute threads of the engine (default: torch's own choice)
    merge: bool = False  # fold the one adapter into the base and serve that under the adapter's name
    api_key: str | None = None  # when set, every /v1 request needs "Authorization: Bearer <key>"

    def check(self) -> dict[str, Path]:
        """The adapters by name; ValueError naming the option for anything that cannot run."""
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        for option, value, least in (("--max-batch", self.max_batch, 1), ("--max-adapters", self.max_adapters, 1),
                                     ("--max-queue", self.max_queue, 1), ("--threads", self.threads, 1),
                                     ("--max-model-len", self.max_model_len, 2), ("--port", self.port, 0)):
            if value is not None and value < least:
                raise ValueError(f"{option} must be at least {least}, got {value}")
        adapters = parse_adapters(self.adapters)
        if self.merge and len(adapters) != 1:
            raise ValueError(f"--merge folds exactly one --adapter into the base; got {len(adapters)}")
        if self.merge and self.adapter_dirs:
            raise ValueError("--merge serves one merged model; it loads no adapters at run time (drop --adapter-dir)")
        if self.model in adapters:
            raise ValueError(f"--adapter {self.model}=...: the adapter's name is the base model's; rename it")
        roots_of(self.adapter_dirs)
        return adapters


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """{name: folder} from --adapter values, "NAME=PATH" or a bare "PATH" (named after its folder)."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = adapter_name(spec, list(adapters)), spec
        if not NAME.fullmatch(name) or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH, NAME being letters, digits or ._:@+-")
        if name in adapters:
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise ValueError(f"--adapter {spec!r}: {path} is not a folder")
        adapters[name] = Path(path)
    return adapters


def build_engine(options: ServeOptions, log: Callable[[str], None]) -> tuple[Engine, str]:
    """(engine with every adapter registered and loaded, not yet running; the base's name in the API)."""
    adapters = options.check()
    net, tokenizer = load_model(options.model, dtype=DTYPES[options.dtype], quantize=options.quantize)
    served = options.model
    if options.merge:
        (served, path), = adapters.items()
        check_mergeable(path)
        load_any(net, path, served)
        unload(net)  # merges the adapter, then plain modules again: the engine runs an ordinary model
        adapters = {}
    engine = Engine(net, tokenizer, max_batch=options.max_batch, max_adapters=options.max_adapters,
                    max_len=options.max_model_len, max_queue=options.max_queue,
                    threads=options.threads or torch.get_num_threads(), merged=options.merge)
    for name, path in adapters.items():  # the loop does not run yet: this thread may touch the model
        engine.adapters.register(name, path, load=True)
        log(f"adapter {name}: {path}")
    return engine, served


def serve(options: ServeOptions, log: Callable[[str], None]) -> None:
    """Run the server until it is stopped (Ctrl-C, SIGTERM); the engine stops with it."""
    engine, served = build_engine(options, log)
    try:
        app = create_app(engine, served, options.adapter_dirs, options.api_key)
        if options.host not in LOOPBACK and not options.api_key:
            log(f"warning: listening on {options.host} without --api-key: anyone who can reach this port can use "
                "the model" + (" and load adapters from --adapter-dir" if options.adapter_dirs else ""))
        log(f"serving {served} (context {engine.max_len} tokens, --threads {engine.threads}) on "
            f"http://{options.host}:{options.port}; OpenAI API at /v1, metrics at /metrics")
        config = uvicorn.Config(app, host=options.host, port=options.port, log_level="info", access_log=False,
                                timeout_graceful_shutdown=5)
        run_both(engine, uvicorn.Server(config))
    finally:
        engine.stop()


def run_both(engine: Engine, http: uvicorn.Server) -> None:
    """The HTTP server on a thread of its own, the engine on this (the main) thread until Ctrl-C or SIGTERM, or
    until the HTTP server ends; then both stop."""
    web = threading.Thread(target=http.run, name="lorafit-http", daemon=True)
    web.start()
    while not http.started:  # a port in use ends the thread before it starts serving
        if not web.is_alive():
            raise RuntimeError("the HTTP server did not start; see its message above (is the port in use?)")
        time.sleep(0.05)
    previous = {sig: signal.signal(sig, lambda *_: engine.request_stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        engine.run(until=lambda: not web.is_alive())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        http.should_exit = True
        web.join(10)
