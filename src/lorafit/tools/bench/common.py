"""What every benchmark shares: the machine's description, matmul peaks, FLOP counts, medians, the data."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ...models import load_model, save_merged
from ...training.runtime import bf16_supported

EXAMPLE_DATA = Path(__file__).resolve().parents[4] / "examples" / "wordnet" / "category_train.jsonl"


def machine() -> dict:
    """CPU model, cores, threads, torch version, bf16 support, allocator: enough to compare figures honestly."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "bf16_native": bf16_supported(),
            "allocator": os.environ.get("LD_PRELOAD") or "default (glibc malloc)"}


def matmul_peak(dtype: torch.dtype, device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of a square matrix product in `dtype` on this machine (a ceiling for the model's matmuls)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    gpu = torch.device(device).type == "cuda"
    a @ b  # warm-up: thread pool, kernels
    best = float("inf")
    for _ in range(repeats):
        if gpu:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if gpu:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def forward_flops(config, tokens: int, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass of a decoder over `tokens` tokens in rows of `seq_len`.

    2 x tokens x (linear weights in the blocks + the output layer), plus attention's two products
    (Q K^T and A V: 4 x tokens x seq_len x hidden per layer).
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o, and the (grouped) k, v projections
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    linear = layers * (attn + mlp) + config.vocab_size * hidden
    return 2.0 * tokens * linear + 4.0 * tokens * seq_len * heads * head_dim * layers


def model_folder(model: str, out: Path, log=print) -> tuple[Path, object]:
    """(out/model, its tokenizer): `model` written once as a plain model folder, which the benchmark's worker
    processes read in seconds (a GGUF file takes ~20 s to dequantize, every time)."""
    folder = out / "model"
    if not (folder / "config.json").is_file():
        log(f"writing {model} as a plain model folder for the workers ...")
        loaded, tokenizer = load_model(model)
        save_merged(loaded, tokenizer, folder, overwrite=True)
        return folder, tokenizer
    from transformers import AutoTokenizer  # heavy (seconds to import): only this path needs it

    return folder, AutoTokenizer.from_pretrained(folder)


def bench_inputs(model: str, data: str, count: int, batch_size: int, seq_len: int, out: Path, device: str = "cpu",
                 log=print) -> tuple[Path, dict[str, float]]:
    """(the model folder, the matmul peaks) for a training benchmark's workers: `model` as a plain folder,
    `count` batches of tokens from `data` in out/batches.pt, and this machine's fp32 and bf16 matmul peaks."""
    folder, tokenizer = model_folder(model, out, log)
    torch.save(text_batches(tokenizer, Path(data), count, batch_size, seq_len), out / "batches.pt")
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    log(f"matmul peak here: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    return folder, peaks


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def text_batches(tokenizer, path: Path, count: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """`count` batches (count, batch_size, seq_len) of consecutive tokens from a JSONL file's text fields."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    text = "\n".join(" ".join(str(v) for v in row.values()) for row in rows)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = count * batch_size * seq_len
    if ids.numel() < need:
        ids = ids.repeat(need // ids.numel() + 1)  # a small file is read again from the top
    return ids[:need].view(count, batch_size, seq_len)


def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
