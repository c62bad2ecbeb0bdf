"""`lorafit bench latency`: forward latency of the base model, Houlsby adapters, unmerged LoRA and merged LoRA.

The LoRA paper's claims (Hu et al. 2021, section 3, Table 1): adapter layers add inference latency, most for small
batches and short sequences, because they are extra sequential layers that cannot be folded into the base; once
W0 + BA is folded into one weight, LoRA costs exactly what the base model costs. The unmerged adapter pays for
its extra low-rank products on every call.

All four models are in memory at once and timed interleaved in rotating order (base, adapter, unmerged, merged;
then adapter, unmerged, merged, base; ...), so a slow spell of the machine hits every row alike; the median is
reported. The adapter and unmerged-LoRA models share the base model's weight tensors (only the merged model
needs its own copy), which keeps a GPT-2-medium run at two copies of the weights.

Settings are (batch, seq_len) pairs; the lecture's are 32 × 512, 16 × 256 and 1 × 128 (`settings="lecture"`).
`shrink` K divides every batch size by K (at least 1 row) for small machines: one 32 × 512 forward pass of GPT-2
medium is about 12 TFLOP, some 80 s on a 2-core CPU in fp32. The overhead in % is comparable across machines;
the milliseconds are not.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...core.config import LoraConfig
from ...core.files import atomic_write, write_json, write_text
from ...core.merge import unload
from ...core.surgery import inject, lora_layers
from ...methods.houlsby import add_houlsby
from ...models import load_model
from .common import machine, markdown, median

ROWS = ("base", "adapter", "lora-unmerged", "lora-merged")
GPT2_MEDIUM = "gpt2-medium-random"  # GPT-2 medium's shape with random weights: built from a config, no download
LECTURE_SETTINGS = [(32, 512), (16, 256), (1, 128)]
# The lecture's table (LoRA paper Table 1): GPT-2 medium, one forward pass, ms averaged over 100 trials on an
# NVIDIA Quadro RTX8000. Fine-Tune/LoRA is the base model's cost (merged LoRA adds nothing). Adapter^H is
# Houlsby's design (two adapters per block, what `adapter` times here); Adapter^L is Lin et al.'s (one per block).
LECTURE = {
    "adapter params (Θ)": ["0.5M", "11M", "11M"],
    "Fine-Tune/LoRA": ["1449.4 ± 0.8", "338.0 ± 0.6", "19.8 ± 2.7"],
    "Adapter^L": ["1482.0 ± 1.0 (+2.2%)", "354.8 ± 0.5 (+5.0%)", "23.9 ± 2.1 (+20.7%)"],
    "Adapter^H": ["1492.2 ± 1.0 (+3.0%)", "366.3 ± 0.5 (+8.4%)", "25.8 ± 2.2 (+30.3%)"],
}
LECTURE_COLUMN = {  # measured row -> what the lecture reports for it, per lecture setting
    "base": ["1449.4 ms", "338.0 ms", "19.8 ms"],
    "adapter": ["Adapter^H +3.0% (^L +2.2%)", "Adapter^H +8.4% (^L +5.0%)", "Adapter^H +30.3% (^L +20.7%)"],
    "lora-merged": ["+0% (= Fine-Tune)"] * 3,
}
LECTURE_ADAPTER_PCT = [3.0, 8.4, 30.3]  # Adapter^H's overhead per lecture setting, for the plot


@dataclass
class LatencyBench:
    model: str = "smollm2-135m-instruct"  # preset, model folder, .gguf file, or "gpt2-medium-random"
    batch_size: int = 1  # rows per forward pass, when `settings` is None
    seq_len: int = 128  # tokens per row, when `settings` is None
    settings: list[tuple[int, int]] | None = None  # (batch, seq_len) pairs timed in turn; None: the two above
    shrink: int = 1  # divide every batch size by this (at least 1 row): the lecture's settings on a small machine
    r: int | None = None  # LoRA rank; None: 4 on GPT-2 (the paper's GPT-2 medium setting), 8 otherwise
    targets: list[str] | None = None  # LoRA targets; None: c_attn on GPT-2, else q_proj, k_proj, v_proj, o_proj
    bottleneck: int = 64  # Houlsby adapter width m (2·d·m + d + m parameters per adapter, two per block)
    precision: str = "fp32"  # "fp32" or "bf16": the dtype of all four models
    threads: int | None = None  # torch threads while timing (None: torch's default); 1 is steadier on a busy machine
    warmup: int = 3  # untimed rounds first (thread pool, allocator, kernels)
    repeats: int = 50  # timed forward passes per model and setting
    out: str = "runs/bench-latency"


def parse_settings(text: str) -> list[tuple[int, int]]:
    """"32x512,16x256,1x128" -> [(32, 512), (16, 256), (1, 128)]; "lecture" is those three."""
    if text.strip() == "lecture":
        return list(LECTURE_SETTINGS)
    pairs = []
    for item in text.split(","):
        batch, _, seq = item.strip().lower().partition("x")
        if not (batch.isdigit() and seq.isdigit() and int(batch) > 0 and int(seq) > 0):
            raise ValueError(f"settings: {item.strip()!r} in {text!r} is not BATCHxSEQ_LEN (e.g. 16x256), "
                             "nor is the whole 'lecture'")
        pairs.append((int(batch), int(seq)))
    return pairs


def planned(cfg: LatencyBench) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(asked, run) per setting: the run's batch is the asked one divided by `shrink`, at least 1."""
    if cfg.shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {cfg.shrink}")
    asked = [tuple(s) for s in cfg.settings] if cfg.settings else [(cfg.batch_size, cfg.seq_len)]
    return [((b, t), (max(1, b // cfg.shrink), t)) for b, t in asked]


def gpt2_medium_config():
    """GPT-2 medium's shape (24 layers, d=1024, 16 heads, vocab 50257, 1024 positions): 354.8M parameters."""
    from transformers import GPT2Config  # heavy (seconds to import): only this path needs it

    return GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)


def load_base(cfg: LatencyBench) -> nn.Module:
    """The base model in the benchmark's dtype: GPT-2 medium's shape with random weights, or a real model."""
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    if cfg.model == GPT2_MEDIUM:
        from transformers import GPT2LMHeadModel  # heavy: only this setting needs it

        with torch.random.fork_rng():  # seeded weights, without moving the caller's random state
            torch.manual_seed(0)
            return GPT2LMHeadModel(gpt2_medium_config()).to(dtype).eval()
    return load_model(cfg.model, dtype=dtype)[0]


def lora_setup(cfg: LatencyBench, base: nn.Module) -> tuple[int, list[str]]:
    """(r, targets) for the LoRA rows: the config's, or the paper's GPT-2 choice / lorafit's Llama default."""
    gpt2 = getattr(base.config, "model_type", None) == "gpt2"
    r = cfg.r if cfg.r is not None else (4 if gpt2 else 8)
    targets = cfg.targets or (["c_attn"] if gpt2 else ["q_proj", "k_proj", "v_proj", "o_proj"])
    return r, targets


def sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model` (no extra weight memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def models(cfg: LatencyBench, base: nn.Module | None = None) -> dict[str, nn.Module]:
    """The base; base + Houlsby adapters; base + unmerged LoRA; that LoRA merged and unloaded to plain layers.

    Adapter and LoRA weights are random and non-zero (as after training: a zero W_up or B would be the base)."""
    base = (base if base is not None else load_base(cfg)).eval()
    adapter = sharing_weights(base)
    add_houlsby(adapter, bottleneck=cfg.bottleneck)
    r, targets = lora_setup(cfg, base)
    unmerged = inject(sharing_weights(base), LoraConfig(r=r, alpha=2 * r, targets=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(unmerged):
            for update in layer.lora.values():
                update.lora_B.copy_(torch.randn(update.lora_B.shape, generator=gen) * 0.01)
        for name, param in adapter.named_parameters():
            if ".houlsby.up." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    merged = unload(copy.deepcopy(unmerged))  # its own weights: W0 + BA folded in, plain modules
    return {"base": base, "adapter": adapter.eval(), "lora-unmerged": unmerged.eval(), "lora-merged": merged.eval()}


def time_rows(nets: dict[str, nn.Module], ids: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward pass of each model on `ids`, interleaved in rotating order; warm-up rounds dropped."""
    names = list(nets)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for i in range(warmup + repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                started = time.perf_counter()
                nets[name](input_ids=ids)
                if i >= warmup:
                    times[name].append(time.perf_counter() - started)
    return times


def checks(nets: dict[str, nn.Module], vocab: int) -> dict[str, float]:
    """Largest logit gaps on a short input: merged vs unmerged (≈ 0: merging is exact), adapter vs base (> 0)."""
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = {name: net(input_ids=ids).logits.float() for name, net in nets.items()}
    return {"merged_vs_unmerged_max_abs_logit": (out["lora-merged"] - out["lora-unmerged"]).abs().max().item(),
            "adapter_vs_base_max_abs_logit": (out["adapter"] - out["base"]).abs().max().item()}


def measure(cfg: LatencyBench, nets: dict[str, nn.Module], log=print) -> list[dict]:
    """One row per (setting, model): median ms, ratio to the base, overhead in %; also by the fastest pass (other
    processes only ever slow a pass down, so on a shared machine the minimum is the steadier figure)."""
    vocab = nets["base"].config.vocab_size
    rows = []
    for asked, (batch, seq) in planned(cfg):
        log(f"timing {batch} x {seq} tokens ({cfg.warmup} + {cfg.repeats} rounds of {len(nets)} models)")
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        times = time_rows(nets, ids, cfg.warmup, cfg.repeats)
        base_ms, base_min = median(times["base"]) * 1e3, min(times["base"]) * 1e3
        for name in ROWS:
            ms, fastest = median(times[name]) * 1e3, min(times[name]) * 1e3
            rows.append({"setting": f"{batch}x{seq}", "asked": f"{asked[0]}x{asked[1]}", "batch_size": batch,
                         "seq_len": seq, "name": name, "ms": round(ms, 2), "vs_base": round(ms / base_ms, 3),
                         "overhead_pct": round(100 * (ms / base_ms - 1), 1), "ms_min": round(fastest, 2),
                         "overhead_min_pct": round(100 * (fastest / base_min - 1), 1)})
    return rows


def run(cfg: LatencyBench, log=print) -> dict:
    """Time every model at every setting; write latency.json, latency.md and latency.png to cfg.out."""
    planned(cfg)  # a bad shrink fails before the models load
    previous = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        nets = models(cfg)
        rows = measure(cfg, nets, log)
        gaps = checks(nets, nets["base"].config.vocab_size)
        about = machine()  # records the thread count the rows ran with
    finally:
        torch.set_num_threads(previous)
    r, targets = lora_setup(cfg, nets["base"])
    adapter_params = sum(p.numel() for n, p in nets["adapter"].named_parameters() if ".houlsby." in n)
    result = {"machine": about, "config": asdict(cfg), "lora": {"r": r, "targets": targets},
              "adapter_params": adapter_params, "rows": rows, **gaps}
    out = Path(cfg.out)
    write_json(out / "latency.json", result)
    write_text(out / "latency.md", format_table(result))
    plot(result, out / "latency.png")
    log(f"merged and unmerged logits differ by at most {gaps['merged_vs_unmerged_max_abs_logit']:.2e}")
    return result


def _lecture_cell(row: dict) -> str:
    """What the lecture's table says for this row at its asked setting ('' when it has no such figure)."""
    asked = tuple(int(v) for v in row["asked"].split("x"))
    if asked not in LECTURE_SETTINGS or row["name"] not in LECTURE_COLUMN:
        return ""
    return LECTURE_COLUMN[row["name"]][LECTURE_SETTINGS.index(asked)]


def format_table(result: dict) -> str:
    """Markdown: measured rows with their overhead vs the base (and the lecture's figure), then the lecture's table."""
    c, m, lora = result["config"], result["machine"], result["lora"]
    table = []
    for row in result["rows"]:
        setting = row["setting"].replace("x", " × ")
        if row["asked"] != row["setting"]:
            setting += f" (of {row['asked'].replace('x', ' × ')})"
        base = row["name"] == "base"
        overhead = "" if base else f"{row['overhead_pct']:+.1f}%"
        overhead_min = "" if base else f"{row['overhead_min_pct']:+.1f}%"
        table.append([setting, row["name"], f"{row['ms']:.2f}", overhead, f"{row['ms_min']:.2f}", overhead_min,
                      _lecture_cell(row)])
    headers = ["batch × seq", "model", "forward ms (median)", "overhead vs base", "ms (min)", "overhead (min)",
               "lecture (GPU)"]
    lecture = markdown(["", *(f"{b} × {t}" for b, t in LECTURE_SETTINGS)], [[k, *v] for k, v in LECTURE.items()])
    return (markdown(headers, table)
            + f"\n\n{c['model']}, {c['precision']}, median of {c['repeats']} after {c['warmup']} warm-up rounds; "
              f"adapter: Houlsby m={c['bottleneck']} ({result['adapter_params']:,} params); LoRA r={lora['r']} on "
              f"{', '.join(lora['targets'])}; merged vs unmerged logits within "
              f"{result['merged_vs_unmerged_max_abs_logit']:.1e}. {m['cpu']}, torch threads: {m['threads']}, "
              f"torch {m['torch']}.\n\n"
            + "The lecture's table (LoRA paper Table 1: GPT-2 medium, ms per forward pass, mean of 100 trials, "
              "NVIDIA Quadro RTX8000):\n\n" + lecture + "\n")


def plot(result: dict, png: Path) -> None:
    """Overhead vs the base in % per setting: one bar per model, the lecture's Adapter^H figure as a marker."""
    import matplotlib  # heavy: imported only to draw the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only to draw the plot

    settings = list(dict.fromkeys(row["setting"] for row in result["rows"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(ROWS[1:]):
        pct = [next(r["overhead_pct"] for r in result["rows"] if r["setting"] == s and r["name"] == name)
               for s in settings]
        ax.bar([x + (i - 1) * 0.27 for x in range(len(settings))], pct, width=0.27, label=name)
    asked = [next(r["asked"] for r in result["rows"] if r["setting"] == s) for s in settings]
    lecture = [(x - 0.27, LECTURE_ADAPTER_PCT[LECTURE_SETTINGS.index(tuple(int(v) for v in a.split("x")))])
               for x, a in enumerate(asked) if tuple(int(v) for v in a.split("x")) in LECTURE_SETTINGS]
    if lecture:
        ax.plot(*zip(*lecture), "k_", markersize=18, markeredgewidth=2, label="lecture: Adapter^H (GPU)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(settings)), [f"{s}\n(of {a})" if s != a else s for s, a in zip(settings, asked)])
    ax.set(ylabel="forward latency vs base (%)", title=f"{result['config']['model']}, {result['config']['precision']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)

