"""`lorafit bench train`: one LoRA training step, lorafit against PEFT + transformers and full fine-tuning.

Each setup lives in its own worker process (so its peak RSS is its own), all loaded from the same model folder
and fed the same token batches. The driver then runs their steps interleaved, one setup at a time in a rotating
order, so that a machine that speeds up or slows down during the run touches every setup alike. Warm-up steps
are dropped; the median of the timed steps is reported.

Setups (the peer's rows are the ones it documents as its best and its default):
  lorafit-fast  lorafit's training step as `lorafit train` runs it with precision bf16
  lorafit-fp32  the same with precision fp32 (exact)
  peft-best     PEFT on a bf16 base, fp32 LoRA weights, bf16 autocast, transformers' loss
  peft-fp32     PEFT, everything fp32
  full-fp32     full fine-tuning, fp32, no LoRA
and on request (--setups): lorafit-compile, the fast path with every block compiled (train.compile; the compile
falls in the untimed warm-up steps); lorafit-fast-ckpt, the fast path with gradient checkpointing; lorafit-nf4,
the fast path on a base whose block weights are NF4 (QLoRA); lorafit-gguf, the fast path on the GGUF file's own
blocks (needs --model to be a .gguf file or a GGUF preset); lorafit-dora and lorafit-qdora-nf4, the fast path
with DoRA (Liu et al. 2024) on the bf16 and on the NF4 base, beside peft-dora-best, PEFT's DoRA set up as
peft-best.

`--device cuda` runs every setup on the GPU instead (CUDA autocast for the bf16 rows; each step's time waits for
the GPU to finish, and rows add the GPU's peak of allocated memory). The CPU is the default: the speed goals
are set for it.

Peak RSS is the peak during the steps (the window opens after the model is loaded): loading a GGUF file
dequantizes it whole before its blocks are kept, and that transient is not what training needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...core.config import LoraConfig
from ...core.files import write_json, write_text
from ...core.surgery import inject
from ...models import load_model
from ...quant import quantize_model, release_freed_memory
from ...training.cpu.memory import KEEP_BELOW, TRIM_ABOVE, keep_freed_memory, peak_rss_mb, reset_peak
from ...training.cpu.rowsplit import describe
from ...training.loop import train_step
from ...training.optim import make_optimizer
from ...training.runtime import prepare, resolve_device
from .common import EXAMPLE_DATA, bench_inputs, forward_flops, machine, markdown, median

SETUPS = ("lorafit-fast", "lorafit-fp32", "peft-best", "peft-fp32", "full-fp32")
EXTRA_SETUPS = ("lorafit-compile", "lorafit-fast-ckpt", "lorafit-nf4", "lorafit-gguf", "lorafit-dora",
                "lorafit-qdora-nf4", "peft-dora-best")  # on request


@dataclass
class TrainBench:
    model: str = "smollm2-135m-instruct"  # preset, model folder or .gguf file
    data: str = str(EXAMPLE_DATA)  # JSONL whose text fields are cut into batch_size x seq_len token windows
    batch_size: int = 8
    seq_len: int = 128
    r: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    warmup: int = 2  # steps per setup left out of the timing
    steps: int = 5  # timed steps per setup
    threads: int = 0  # torch threads per worker (0: torch's default)
    setups: list[str] = field(default_factory=lambda: list(SETUPS))
    out: str = "runs/bench-train"
    device: str = "cpu"  # "cuda" / "cuda:N": every setup on the GPU, with CUDA autocast for the bf16 rows
    keep_freed_memory: bool = False  # every setup with glibc keeping freed memory for reuse, as lorafit train does

    def __post_init__(self) -> None:
        unknown = sorted(set(self.setups) - set(SETUPS) - set(EXTRA_SETUPS))
        if unknown or not self.setups:
            raise ValueError(f"unknown setup(s) {unknown}; choose from {', '.join(SETUPS + EXTRA_SETUPS)}")
        resolve_device(self.device)  # a clear error for a device this machine does not have
        if min(self.batch_size, self.seq_len, self.r, self.steps) < 1 or self.warmup < 0:
            raise ValueError("batch_size, seq_len, r and steps must be >= 1, warmup >= 0")


def run(cfg: TrainBench, log=print) -> dict:
    """Prepare the model folder and batches, run the interleaved benchmark, write bench.json and bench.md."""
    out = Path(cfg.out)
    folder, peaks = bench_inputs(cfg.model, cfg.data, cfg.warmup + cfg.steps, cfg.batch_size, cfg.seq_len, out,
                                 cfg.device, log)

    workers = {name: _start(name, cfg, folder, out, log) for name in cfg.setups}
    times: dict[str, list[float]] = {name: [] for name in cfg.setups}
    losses: dict[str, float] = {}
    try:
        for i in range(cfg.warmup + cfg.steps):
            order = cfg.setups[i % len(cfg.setups):] + cfg.setups[:i % len(cfg.setups)]
            for name in order:
                reply = _ask(workers[name], {"step": i})
                losses[name] = reply["loss"]
                if i >= cfg.warmup:
                    times[name].append(reply["seconds"])
            log(f"round {i + 1}/{cfg.warmup + cfg.steps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s"
                                                                         for n in order if times[n]))
        memory = {name: _ask(workers[name], {"end": True}) for name in cfg.setups}  # peak RSS (and GPU) MB
    finally:
        for proc in workers.values():
            proc.kill()
    return _report(cfg, folder, peaks, times, losses, memory, out)


def _report(cfg, folder, peaks, times, losses, memory, out: Path) -> dict:
    from transformers import AutoConfig  # heavy (seconds to import): only this path needs it

    tokens = cfg.batch_size * cfg.seq_len
    fwd = forward_flops(AutoConfig.from_pretrained(folder), tokens, cfg.seq_len)
    rows = []
    for name in cfg.setups:
        step = median(times[name])
        flops = fwd * (3 if name.startswith("full") else 2)  # LoRA: forward + activation gradients only
        peak = peaks["bf16" if _bf16(name) else "fp32"]
        rows.append({"name": name, "tokens_per_s": round(tokens / step, 1), "step_s": round(step, 4),
                     "peak_rss_mb": round(memory[name]["peak_rss_mb"]), "peak_gpu_mb": memory[name]["peak_gpu_mb"],
                     "final_loss": round(losses[name], 4),
                     "gflops": round(flops / step / 1e9, 1), "peak_share": round(flops / step / 1e9 / peak, 3)})
    config = {**asdict(cfg), "data": _shown(cfg.data), "out": _shown(cfg.out)}
    where = machine()
    if cfg.keep_freed_memory:  # every row ran so
        where["allocator"] += (f", freed memory kept for reuse (mmap threshold {KEEP_BELOW >> 20} MB, "
                               f"trim threshold {TRIM_ABOVE >> 20} MB)")
    result = {"machine": {**where, "matmul_peak_gflops": {k: round(v) for k, v in peaks.items()}},
              "config": config, "rows": rows}
    write_json(out / "bench.json", result)
    write_text(out / "bench.md", format_table(result))
    return result


def _shown(path: str) -> str:
    """A path as the report shows it: relative to the working folder (or the repository) when inside it."""
    for root in (Path.cwd(), EXAMPLE_DATA.parents[2]):
        try:
            return str(Path(path).resolve().relative_to(root.resolve()))
        except ValueError:
            continue
    return str(path)


def format_table(result: dict) -> str:
    rows = result["rows"]
    by = {r["name"]: r for r in rows}
    ref = by.get("peft-best")
    headers = ["setup", "tokens/s", "step s", "vs peft-best", "peak RSS MB", "GFLOP/s", "of matmul peak",
               "loss (last step)"]
    table = [[r["name"], f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f}",
              f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-", f"{r['peak_rss_mb']:,}",
              f"{r['gflops']:.0f}", f"{100 * r['peak_share']:.0f}%", f"{r['final_loss']:.4f}"] for r in rows]
    device = result["config"].get("device", "cpu")
    if device != "cpu":  # the GPU's own peak beside the process's
        headers.insert(5, "peak GPU MB")
        for line, r in zip(table, rows):
            line.insert(5, f"{r.get('peak_gpu_mb') or 0:,}")
    m = result["machine"]
    on = f"device {device} ({m['gpu']}), " if device != "cpu" else ""
    return (markdown(headers, table) + f"\n\nMachine: {on}{m['cpu']}, {m['cores']} cores, {m['threads']} threads, "
            f"torch {m['torch']}, allocator {m['allocator']}; matmul peak fp32 {m['matmul_peak_gflops']['fp32']} "
            f"/ bf16 {m['matmul_peak_gflops']['bf16']} GFLOP/s.\n")


def _start(name: str, cfg: TrainBench, folder: Path, out: Path, log) -> subprocess.Popen:
    log(f"starting worker {name} ...")
    proc = subprocess.Popen([sys.executable, "-m", "lorafit.tools.bench.train", name, json.dumps(asdict(cfg)),
                             str(folder), str(out / "batches.pt")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    _read(proc)  # {"ready": true} once the model is loaded
    return proc


def _ask(proc: subprocess.Popen, message: dict) -> dict:
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()
    return _read(proc)


def _read(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark worker {proc.args[3]} died (exit {proc.wait()}); its error is above")
    return json.loads(line)


def build_step(name: str, cfg: TrainBench, folder: str):
    """The setup's model and a function batch -> (seconds, loss) doing one full optimizer step."""
    from transformers import AutoModelForCausalLM  # heavy: imported by the worker that needs it

    bf16 = _bf16(name)
    if name == "lorafit-gguf":  # the file's blocks, not the folder's dequantized copy
        model = load_model(cfg.model, dtype=torch.bfloat16, quantize="gguf")[0]
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if bf16 else torch.float32)
    if name in ("lorafit-nf4", "lorafit-qdora-nf4"):
        quantize_model(model, "nf4")
    model.to(cfg.device)
    if name.startswith("lorafit"):
        return _lorafit_step(model, cfg, "bf16" if bf16 else "fp32", checkpointing=name.endswith("-ckpt"),
                             compile_blocks=name == "lorafit-compile", dora="dora" in name)
    if name.startswith("peft"):
        import peft  # a test-time dependency (the peer), imported only for its setups

        lora = peft.LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=cfg.targets, task_type="CAUSAL_LM",
                               use_dora="dora" in name)
        model = peft.get_peft_model(model, lora)  # adapter weights in fp32 (PEFT's autocast_adapter_dtype)
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # transformers' Trainer default, as lorafit's

    def step(batch: dict) -> tuple[float, float]:
        started = time.perf_counter()
        model.train()
        batch = {key: value.to(cfg.device) for key, value in batch.items()}
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return _finished(started, cfg.device), loss.item()

    return step


def _lorafit_step(model, cfg: TrainBench, precision: str, checkpointing: bool, compile_blocks: bool = False,
                  dora: bool = False):
    inject(model, LoraConfig(r=cfg.r, alpha=2 * cfg.r, targets=list(cfg.targets), use_dora=dora))
    halved = prepare(model, precision, checkpointing, compile_blocks, rows=cfg.batch_size * cfg.seq_len)
    if halved:  # the worker's log (stderr) says which frozen products run in halves of rows
        print(f"frozen products in halves of rows: {describe(halved)}", file=sys.stderr)
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.0)

    def step(batch: dict) -> tuple[float, float]:
        started = time.perf_counter()
        loss, _ = train_step(model, optimizer, [batch], clip=1.0, precision=precision)  # batches follow the model
        return _finished(started, cfg.device), loss

    return step


def _finished(started: float, device: str) -> float:
    """Seconds since `started`, once the device has done all it was asked (GPU kernels run asynchronously)."""
    if _on_gpu(device):
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _on_gpu(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _bf16(name: str) -> bool:
    """Whether the setup runs the bf16 path (and is measured against the bf16 matmul peak)."""
    return name.startswith(("lorafit-fast", "lorafit-compile", "peft-best", "lorafit-nf4", "lorafit-gguf",
                            "lorafit-dora", "lorafit-qdora", "peft-dora-best"))


def worker(name: str, cfg_json: str, folder: str, batches_path: str) -> None:
    """Load one setup, then answer {"step": i} with {"seconds", "loss"} and {"end": true} with peak RSS."""
    replies, sys.stdout = sys.stdout, sys.stderr  # whatever the libraries print must not garble the replies
    cfg = TrainBench(**json.loads(cfg_json))
    if cfg.keep_freed_memory:
        keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    batches = torch.load(batches_path, weights_only=True)
    step = build_step(name, cfg, folder)
    release_freed_memory()  # what loading freed goes back to the OS before the window opens
    reset_peak()
    if _on_gpu(cfg.device):
        torch.cuda.reset_peak_memory_stats(cfg.device)
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("end"):
            gpu = round(torch.cuda.max_memory_allocated(cfg.device) / 2**20) if _on_gpu(cfg.device) else None
            print(json.dumps({"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu}), file=replies, flush=True)
            return
        ids = batches[message["step"]]
        seconds, loss = step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        print(json.dumps({"seconds": seconds, "loss": loss}), file=replies, flush=True)


if __name__ == "__main__":
    worker(*sys.argv[1:5])
