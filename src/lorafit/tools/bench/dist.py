"""`lorafit bench dist`: what data parallelism costs on one machine, LoRA against full fine-tuning.

Each setup trains the same global batches with lorafit's training step: one process with every core's threads,
or N processes under torchrun (DDP, gloo on the CPU) sharing the cores, each on its shard of every batch. On a
machine of a few cores this measures overhead, not speed-up: N processes split the same cores, and every step
adds an all-reduce of the trainable gradients (kilobytes for LoRA, the whole model for full fine-tuning) and a
copy of the model per process.

Each setup runs as a fresh job (`python -m torch.distributed.run ... -m lorafit.tools.bench.dist`), `rounds`
times, in a rotating order so that a machine that speeds up or slows down touches every setup alike; warm-up
steps are dropped and the median of the timed steps is reported, with each process's peak RSS and the bytes DDP's
comm hook counted per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ...core.config import LoraConfig
from ...core.files import write_json, write_text
from ...core.surgery import inject
from ...training import distributed
from ...training.cpu.memory import peak_rss_mb, reset_peak
from ...training.loop import loss_of, train_step
from ...training.optim import make_optimizer
from ...training.runtime import bf16_supported, prepare
from .common import EXAMPLE_DATA, bench_inputs, machine, markdown, median

METHODS = ("lora", "full")


@dataclass
class DistBench:
    model: str = "smollm2-135m-instruct"  # preset, model folder or .gguf file
    data: str = str(EXAMPLE_DATA)  # JSONL whose text fields are cut into batch_size x seq_len token windows
    batch_size: int = 8  # the global batch: N processes take batch_size / N rows each
    seq_len: int = 128
    r: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    nproc: int = 2  # processes of the distributed setups
    cores: int = 0  # threads in all (0: every core); N processes get cores / N each
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    warmup: int = 2  # steps per job left out of the timing
    steps: int = 5  # timed steps per job
    rounds: int = 2  # jobs per setup
    out: str = "runs/bench-dist"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.nproc < 2 or self.batch_size < self.nproc:
            raise ValueError(f"nproc must be >= 2 and batch_size >= nproc, got {self.nproc} and {self.batch_size}")
        if min(self.seq_len, self.r, self.steps, self.rounds) < 1 or self.warmup < 0 or self.cores < 0:
            raise ValueError("seq_len, r, steps and rounds must be >= 1; warmup and cores >= 0")


def run(cfg: DistBench, log=print) -> dict:
    """Write the model folder and batches, run every setup's jobs interleaved, write bench.json and bench.md."""
    out = Path(cfg.out)
    folder, peaks = bench_inputs(cfg.model, cfg.data, cfg.warmup + cfg.steps, cfg.batch_size, cfg.seq_len, out,
                                 log=log)
    cores = cfg.cores or os.cpu_count() or 1
    setups = [(method, procs) for method in cfg.methods for procs in (1, cfg.nproc)]
    jobs: dict[tuple, list[dict]] = {setup: [] for setup in setups}
    for i in range(cfg.rounds * len(setups)):
        method, procs = setups[(i + i // len(setups)) % len(setups)]  # each round starts one setup later
        reply = _job(cfg, method, procs, max(1, cores // procs), folder, out)
        jobs[(method, procs)].append(reply)
        log(f"job {i + 1}/{cfg.rounds * len(setups)}: {method} {procs} x {max(1, cores // procs)} threads: "
            f"median step {median(reply['seconds']):.3f} s")
    return _report(cfg, jobs, peaks, cores, out)


def _job(cfg: DistBench, method: str, procs: int, threads: int, folder: Path, out: Path) -> dict:
    """One job of a setup: its processes' reply (step seconds, peak RSS per process, bytes per step)."""
    spec = json.dumps({"cfg": asdict(cfg), "method": method, "folder": str(folder), "batches": str(out / "batches.pt"),
                       "threads": threads})
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else []
    command = [sys.executable, *launcher, "-m", "lorafit.tools.bench.dist", spec]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                            str(threads)})
    replies = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not replies:
        raise RuntimeError(f"benchmark job {method} on {procs} process(es) failed (exit {done.returncode}); "
                           "its error is above")
    return json.loads(replies[-1])


def _report(cfg: DistBench, jobs: dict, peaks: dict, cores: int, out: Path) -> dict:
    tokens = cfg.batch_size * cfg.seq_len
    rows = []
    for (method, procs), replies in jobs.items():
        step = median([s for reply in replies for s in reply["seconds"]])
        rows.append({"method": method, "processes": procs, "threads_per_process": max(1, cores // procs),
                     "tokens_per_s": round(tokens / step, 1), "step_s": round(step, 4),
                     "peak_rss_mb_per_process": [round(max(r["peak_rss_mb"][k] for r in replies))
                                                 for k in range(procs)],
                     "bytes_per_step": replies[-1]["bytes_per_step"], "trainable_params": replies[-1]["trainable"],
                     "precision": replies[-1]["precision"]})
    config = {**asdict(cfg), "data": Path(cfg.data).name}
    result = {"machine": {**machine(), "matmul_peak_gflops": {k: round(v) for k, v in peaks.items()}},
              "config": config, "rows": rows}
    write_json(out / "bench.json", result)
    write_text(out / "bench.md", format_table(result))
    return result


def format_table(result: dict) -> str:
    rows, m = result["rows"], result["machine"]
    one = {r["method"]: r for r in rows if r["processes"] == 1}
    headers = ["method", "processes x threads", "tokens/s", "step s", "vs 1 process", "peak RSS MB per process",
               "bytes all-reduced per step", "trainable params"]
    table = [[r["method"], f"{r['processes']} x {r['threads_per_process']}", f"{r['tokens_per_s']:,.0f}",
              f"{r['step_s']:.3f}", f"{r['tokens_per_s'] / one[r['method']]['tokens_per_s']:.2f}x",
              " / ".join(f"{mb:,}" for mb in r["peak_rss_mb_per_process"]), f"{r['bytes_per_step']:,}",
              f"{r['trainable_params']:,}"] for r in rows]
    c = result["config"]
    return (markdown(headers, table) + f"\n\nGlobal batch {c['batch_size']} x {c['seq_len']} tokens; LoRA r={c['r']} "
            f"on {', '.join(c['targets'])} in {rows[0]['precision']}, full fine-tuning in fp32; DDP over gloo. "
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; matmul peak fp32 "
            f"{m['matmul_peak_gflops']['fp32']} / bf16 {m['matmul_peak_gflops']['bf16']} GFLOP/s.\n")


def worker(spec: dict) -> None:
    """One process of a job: load, train warmup + steps global batches on its shard, report from rank 0."""
    from transformers import AutoModelForCausalLM  # heavy: imported by the worker that needs it

    replies, sys.stdout = sys.stdout, sys.stderr  # whatever the libraries print must not garble the reply
    cfg, method = DistBench(**spec["cfg"]), spec["method"]
    world = distributed.start(torch.device("cpu"), timeout_s=600)
    torch.set_num_threads(spec["threads"])
    precision = "bf16" if method == "lora" and bf16_supported() else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=dtype)
    if method == "lora":
        inject(model, LoraConfig(r=cfg.r, alpha=2 * cfg.r, targets=list(cfg.targets)))
        prepare(model, precision, rows=cfg.batch_size * cfg.seq_len // world.size)
    else:
        model.requires_grad_(True)
    replicas = distributed.Replicas(model, loss_of, world, "ddp", precision)
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.0)
    reset_peak()
    seconds = []
    for ids in torch.load(spec["batches"], weights_only=True):
        distributed.barrier(world)  # every process starts the step together
        started = time.perf_counter()
        train_step(model, optimizer, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}],
                   clip=1.0, precision=precision, replicas=replicas)
        seconds.append(time.perf_counter() - started)
    peaks = [peak_rss_mb()] * world.size
    if world.size > 1:
        dist.all_gather_object(peaks, peak_rss_mb())
    if world.main:
        print(json.dumps({"seconds": seconds[cfg.warmup:], "peak_rss_mb": peaks, "precision": precision,
                          "bytes_per_step": replicas.communication()["bytes_per_step"],
                          "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}),
              file=replies, flush=True)
    distributed.stop()


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
