"""`lorafit bench latency`: forward latency of the base model, base + unmerged LoRA, and the merged model.

The LoRA paper's claim: once W0 + BA is folded into one weight, inference costs exactly what the base model
costs. The unmerged adapter pays for its extra low-rank products on every call. All three models are in
memory at once and timed interleaved (base, unmerged, merged, base, ...); the median is reported.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..files import write_json, write_text
from .common import machine, markdown, median

ROWS = ("base", "lora-unmerged", "lora-merged")


@dataclass
class LatencyBench:
    model: str = "smollm2-135m-instruct"
    batch_size: int = 1
    seq_len: int = 128
    r: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    precision: str = "fp32"  # "fp32" or "bf16": the dtype of all three models
    warmup: int = 3
    repeats: int = 50
    out: str = "runs/bench-latency"


def models(cfg: LatencyBench) -> dict[str, torch.nn.Module]:
    """The base model, a copy with a (non-zero) LoRA adapter, and that copy merged and unloaded to plain layers."""
    import lorafit

    from ..models import load_model

    base, _ = load_model(cfg.model, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    adapted = lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(r=cfg.r, alpha=2 * cfg.r, targets=cfg.targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B is zero only at the start of training
        for _, layer in lorafit.lora_layers(adapted):
            for update in layer.lora.values():
                update.lora_B.copy_(torch.randn(update.lora_B.shape, generator=gen) * 0.01)
    merged = lorafit.unload(copy.deepcopy(adapted))  # plain modules, W0 + BA folded in
    return {"base": base.eval(), "lora-unmerged": adapted.eval(), "lora-merged": merged.eval()}


def run(cfg: LatencyBench, log=print) -> dict:
    nets = models(cfg)
    vocab = nets["base"].config.vocab_size
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    with torch.no_grad():
        outputs = {name: nets[name](input_ids=ids).logits.float() for name in ROWS}
        for i in range(cfg.warmup + cfg.repeats):
            for name in ROWS[i % 3:] + ROWS[:i % 3]:
                started = time.perf_counter()
                nets[name](input_ids=ids)
                if i >= cfg.warmup:
                    times[name].append(time.perf_counter() - started)
    base_ms = median(times["base"]) * 1e3
    rows = [{"name": name, "ms": round(median(times[name]) * 1e3, 2),
             "vs_base": round(median(times[name]) * 1e3 / base_ms, 3)} for name in ROWS]
    gap = (outputs["lora-merged"] - outputs["lora-unmerged"]).abs().max().item()
    result = {"machine": machine(), "config": asdict(cfg), "rows": rows, "merged_vs_unmerged_max_abs_logit": gap}
    out = Path(cfg.out)
    write_json(out / "latency.json", result)
    write_text(out / "latency.md", format_table(result))
    log(f"merged and unmerged logits differ by at most {gap:.2e}")
    return result


def format_table(result: dict) -> str:
    c = result["config"]
    table = [[r["name"], f"{r['ms']:.2f}", f"{r['vs_base']:.3f}"] for r in result["rows"]]
    m = result["machine"]
    return (markdown(["model", "forward ms (median)", "vs base"], table)
            + f"\n\n{c['model']}, batch {c['batch_size']} x {c['seq_len']} tokens, {c['precision']}, LoRA r={c['r']} "
              f"on {', '.join(c['targets'])}; {m['cpu']}, {m['threads']} threads, torch {m['torch']}.\n")
