"""`lorafit bench serve`: one base, many adapters, served to concurrent clients, against the peers.

Rows (each a server on loopback, or PEFT in this process), measured at each client count, rounds interleaved
across rows so a slow stretch of the machine hits every row alike:

  lorafit, N adapters mixed  — request i uses adapter i mod N, all in one `lorafit serve`
  lorafit, one adapter       — the same server, every request on adapter 0
  lorafit, base              — the same server, no adapter
  lorafit, merged            — a second server on adapter 0 merged into the base (`--merge`)
  PEFT generate              — `generate(adapter_names=...)` in static batches of the client count
  transformers serve         — the merged model folder, continuous batching (when it runs here)
  llama.cpp                  — llama-cpp-python's server on the preset's GGUF, base only (when installed)

Every request is a greedy chat completion of `max_tokens` tokens (ignore_eos where the server has it). The
physical limit is reported beside: the bytes of weights one decode step reads over the memory bandwidth.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...core.adapter_io import save_adapter
from ...core.config import LoraConfig
from ...core.files import write_json, write_text
from ...core.surgery import delete_adapter, inject, lora_layers, set_adapter
from ...models import load_model
from ...models.load import save_merged
from ...models.presets import PRESETS, cached_path
from .common import machine, markdown, matmul_peak, median
from .load import PROMPTS, Result, run_clients, wait_ready
from .serve_report import plot, summarize


@dataclass
class ServeBench:
    model: str = "smollm2-135m-instruct"
    adapters: int = 8
    r: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    max_tokens: int = 32
    clients: list[int] = field(default_factory=lambda: [1, 8, 32])
    requests: int = 8  # per client count: at least this many, and two per client
    rounds: int = 2  # interleaved rounds; the medians are over these
    threads: int = 2
    max_model_len: int = 512
    peft: bool = True
    transformers_serve: bool = True
    llama_cpp: bool = True
    out: str = "runs/bench-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(cfg: ServeBench, work: Path) -> tuple[dict[str, Path], Path]:
    """cfg.adapters LoRA folders on the base (random non-zero B, seeded) and the base with adapter 0 merged."""
    model, tokenizer = load_model(cfg.model)
    paths = {}
    for i in range(cfg.adapters):
        name = f"adapter{i}"
        inject(model, LoraConfig(r=cfg.r, alpha=2 * cfg.r, targets=cfg.targets, base_model=cfg.model), name=name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.lora:
                    b = layer.lora[name].lora_B
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
        save_adapter(model, work / name, name=name)
        paths[name] = work / name
        if i:
            delete_adapter(model, name)
    set_adapter(model, "adapter0")
    merged = save_merged(model, tokenizer, work / "merged")
    return paths, merged


class Servers(ExitStack):
    """The server processes of a run, each stopped (SIGTERM, then SIGKILL) when the run ends."""

    def start(self, name: str, argv: list[str], ready_path: str = "/health", env: dict | None = None) -> str:
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in argv]
        log = open(Path(tempfile.gettempdir()) / f"lorafit-bench-{name}-{port}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.callback(_stop, proc, log)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, ready_path)
        return url


def _stop(proc: subprocess.Popen, log) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def lorafit_argv(cfg: ServeBench, model: str, adapters: dict[str, Path], merge: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "lorafit", "serve", model, "--port", "{port}", "--threads", str(cfg.threads),
            "--max-batch", str(max(cfg.clients)), "--max-adapters", str(max(len(adapters), 1)),
            "--max-model-len", str(cfg.max_model_len)]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    return argv + (["--merge"] if merge else [])


def start_rows(cfg: ServeBench, servers: Servers, adapters: dict[str, Path], merged: Path, log) -> tuple[dict, dict]:
    """{row: (url, model name for request i)} for every server row that started; {row: why not} for the rest."""
    names = list(adapters)
    rows, skipped = {}, {}
    log("starting lorafit serve (all adapters) and lorafit serve --merge")
    url = servers.start("lorafit", lorafit_argv(cfg, cfg.model, adapters))
    rows[f"lorafit, {len(names)} adapters mixed"] = (url, lambda i: names[i % len(names)])
    rows["lorafit, one adapter"] = (url, lambda i: names[0])
    rows["lorafit, base"] = (url, lambda i: cfg.model)
    url = servers.start("lorafit-merged", lorafit_argv(cfg, cfg.model, {names[0]: adapters[names[0]]}, merge=True))
    rows["lorafit, merged"] = (url, lambda i: names[0])
    if cfg.transformers_serve:
        argv = [str(Path(sys.executable).with_name("transformers")), "serve", str(merged), "--port", "{port}",
                "--device", "cpu", "--dtype", "bfloat16", "--continuous-batching"]
        _try_row(rows, skipped, "transformers serve, merged", log, lambda: (
            servers.start("transformers", argv, env={"OMP_NUM_THREADS": str(cfg.threads)}), lambda i: str(merged)))
    if cfg.llama_cpp:
        gguf = cached_path(cfg.model) if cfg.model in PRESETS else None
        kind = gguf.stem.rsplit(".", 1)[-1] if gguf is not None and "." in gguf.stem else "GGUF"  # e.g. Q4_1
        _try_row(rows, skipped, f"llama.cpp, base {kind}", log, lambda: _llama_cpp(cfg, servers))
    return rows, skipped


def _try_row(rows: dict, skipped: dict, name: str, log, start) -> None:
    try:
        rows[name] = start()
    except (RuntimeError, OSError, ValueError) as err:
        skipped[name] = str(err)
        log(f"{name}: not measured ({err})")


def _llama_cpp(cfg: ServeBench, servers: Servers):
    """llama-cpp-python's OpenAI server on the preset's own GGUF file (llama.cpp has no mixed-adapter batching)."""
    gguf = cached_path(cfg.model) if cfg.model in PRESETS else None
    if gguf is None or gguf.suffix != ".gguf":
        raise ValueError("the model is not a fetched GGUF preset")
    try:
        import llama_cpp.server  # noqa: F401  # optional: builds llama.cpp from source at install
    except ImportError:
        raise RuntimeError("llama-cpp-python[server] is not installed") from None
    url = servers.start("llama-cpp", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
                                      "{port}", "--n_threads", str(cfg.threads), "--n_ctx",
                                      str(cfg.max_model_len), "--interrupt_requests", "False"], ready_path="/v1/models")
    return url, lambda i: "model"


def peft_round(cfg: ServeBench, peft_model, tokenizer, names: list[str], clients: int,
               n: int) -> tuple[list[Result], float]:
    """The same `n` requests through PEFT's mixed-adapter generate, in static batches of `clients`."""
    from transformers import LogitsProcessor  # the step clock below; only this row needs it

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    results, started = [], time.perf_counter()
    for first in range(0, n, clients):
        batch = list(range(first, min(first + clients, n)))
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                               tokenize=False, add_generation_prompt=True) for i in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        clock, sent = Clock(), time.perf_counter()
        peft_model.generate(**enc, adapter_names=[names[i % len(names)] for i in batch], do_sample=False,
                            max_new_tokens=cfg.max_tokens, min_new_tokens=cfg.max_tokens, logits_processor=[clock],
                            pad_token_id=tokenizer.pad_token_id)
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
        results += [Result(ok=True, tokens=cfg.max_tokens, ttft=clock.times[0] - sent, gaps=gaps) for _ in batch]
    return results, time.perf_counter() - started


def load_peft(cfg: ServeBench, adapters: dict[str, Path]):
    """PEFT's model with every adapter loaded, in bf16 like the servers."""
    import peft  # the peer: a dev dependency, only this row needs it

    model, tokenizer = load_model(cfg.model, dtype=torch.bfloat16)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    names = list(adapters)
    peft_model = peft.PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    return peft_model.eval(), tokenizer


def memory_bandwidth(gib: float = 0.5, repeats: int = 5) -> float:
    """Best GB/s of copying a large tensor (bytes read + bytes written), on this process's threads."""
    a = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - started)
    return 2 * a.numel() * 4 / best / 1e9


def physical_limit(cfg: ServeBench) -> dict:
    """Weight bytes a bf16 decode step reads (every parameter once) against the measured memory bandwidth."""
    model, _ = load_model(cfg.model, dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.set_num_threads(cfg.threads)
    bandwidth = memory_bandwidth()
    step = weight_bytes / (bandwidth * 1e9)
    return {"weight_bytes": weight_bytes, "bandwidth_gbs": round(bandwidth, 1), "min_step_ms": round(step * 1e3, 2),
            "max_single_stream_tokens_s": round(1 / step, 1), "matmul_peak_gflops": {
                "fp32": round(matmul_peak(torch.float32)), "bf16": round(matmul_peak(torch.bfloat16))}}


def run(cfg: ServeBench, log=print) -> dict:
    """Measure every row at every client count, interleaved; write serve.json, serve.md and serve.png."""
    out = Path(cfg.out)
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-serve-") as tmp, Servers() as servers:
        log(f"making {cfg.adapters} adapters (r={cfg.r} on {', '.join(cfg.targets)}) and the merged model")
        adapters, merged = make_adapters(cfg, Path(tmp))
        rows, skipped = start_rows(cfg, servers, adapters, merged, log)
        peft = load_peft(cfg, adapters) if cfg.peft else None
        for url, model_of in rows.values():  # untimed: a server's first request loads and warms it
            run_clients(url, [(model_of(0), PROMPTS[0])], 1, 4)
        samples: dict[tuple[str, int], list[dict]] = {}
        for round_ in range(cfg.rounds):
            for clients in cfg.clients:
                n = max(cfg.requests, 2 * clients)
                for row, (url, model_of) in rows.items():
                    requests = [(model_of(i), PROMPTS[i % len(PROMPTS)]) for i in range(n)]
                    extra = {"ignore_eos": True} if row.startswith("lorafit") else {}  # the others refuse it
                    results, wall = run_clients(url, requests, clients, cfg.max_tokens, extra)
                    samples.setdefault((row, clients), []).append(summarize(results, wall))
                    log(f"round {round_ + 1}, {clients} clients, {row}: {samples[(row, clients)][-1]['tokens_s']} "
                        "tokens/s")
                if peft is not None:
                    results, wall = peft_round(cfg, *peft, list(adapters), clients, n)
                    samples.setdefault(("PEFT generate, mixed", clients), []).append(summarize(results, wall))
        limit = physical_limit(cfg)
    result = {"machine": machine(), "config": asdict(cfg), "limit": limit, "skipped": skipped,
              "rows": [_median_row(row, clients, runs) for (row, clients), runs in samples.items()]}
    result["goals"] = goals(result)
    write_json(out / "serve.json", result)
    write_text(out / "serve.md", format_table(result))
    plot(result, out / "serve.png")
    return result


def _median_row(row: str, clients: int, runs: list[dict]) -> dict:
    keys = ["tokens_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    return {"row": row, "clients": clients, **{k: round(median([r[k] for r in runs]), 2) for k in keys},
            "failed": sum(r["failed"] for r in runs), "rounds": [round(r["tokens_s"], 2) for r in runs],
            "errors": sorted({e for r in runs for e in r["errors"]})[:3]}


def goals(result: dict) -> dict:
    """The issue's goals as ratios of medians measured in this run."""
    def tps(row: str, clients: int) -> float | None:
        return next((r["tokens_s"] for r in result["rows"] if r["row"] == row and r["clients"] == clients), None)

    mixed = next((r["row"] for r in result["rows"] if "mixed" in r["row"] and r["row"].startswith("lorafit")), "")
    ratios = {}
    for clients in result["config"]["clients"]:
        pairs = {"mixed / one adapter": (mixed, "lorafit, one adapter"),
                 "mixed / PEFT": (mixed, "PEFT generate, mixed"),
                 "merged / base": ("lorafit, merged", "lorafit, base")}
        for goal, (a, b) in pairs.items():
            if tps(a, clients) and tps(b, clients):
                ratios[f"{goal} @ {clients}"] = round(tps(a, clients) / tps(b, clients), 3)
    return ratios


def format_table(result: dict) -> str:
    m, lim = result["machine"], result["limit"]
    rows = [[r["clients"], r["row"], f"{r['tokens_s']:.1f}", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}",
             f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}", r["failed"]]
            for r in sorted(result["rows"], key=lambda r: (r["clients"], -r["tokens_s"]))]
    table = markdown(["clients", "row", "output tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                      "failed"], rows)
    goals = "\n".join(f"- {k}: {v:.2f}x" for k, v in result["goals"].items())
    skipped = "".join(f"\n- {k}: not measured ({v})" for k, v in result["skipped"].items())
    c = result["config"]
    return (f"{table}\n\n{c['model']}, {c['adapters']} adapters r={c['r']} on {', '.join(c['targets'])}; "
            f"max({c['requests']}, 2 x clients) greedy chat requests of {c['max_tokens']} tokens per client count; "
            f"medians of {c['rounds']} interleaved rounds. {m['cpu']}, {c['threads']} threads per server.\n\n"
            f"Physical limit: a decode step reads {lim['weight_bytes'] / 1e6:.0f} MB of bf16 weights; at the "
            f"measured {lim['bandwidth_gbs']} GB/s that is {lim['min_step_ms']} ms a step, at most "
            f"{lim['max_single_stream_tokens_s']} tokens/s for one stream.{_peaks(lim)}\n\n"
            f"Goals (ratios of this run):\n{goals}"
            f"{skipped}\n")


def _peaks(limit: dict) -> str:
    peaks = limit.get("matmul_peak_gflops")
    return f" Matmul peak in the same run: fp32 {peaks['fp32']}, bf16 {peaks['bf16']} GFLOP/s." if peaks else ""
