"""`lorafit plan`'s report: the plan as markdown (terminal and plan.md), plan.json, and plan.png, a stacked bar
of training memory per method."""

from __future__ import annotations

from pathlib import Path

from ..core.files import atomic_write, write_json, write_text
from .plan import METHODS
from .plan_devices import PARALLEL, PARTS, rows


def human(n: float) -> str:
    """Bytes in decimal units (1 GB = 1e9 bytes), as the papers quote them."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_plan(res: dict) -> str:
    """The plan as markdown for the terminal and plan.md: PEFT's line, the counts, the memory table, assumptions."""
    p, f, act, lora = res["params"], res["adapter_file"], res["activations"], res["lora"]
    ckpt = "gradient checkpointing" if act["checkpointing"] else "no checkpointing"
    lines = [
        p["peft_line"], "",
        f"## Plan: {res['source']} ({res['model_class']}, from {res['config']})", "",
        f"LoRA r={lora['r']}, alpha={lora['alpha']:g}, targets {', '.join(lora['targets'])}: "
        f"{lora['adapted']} weight matrices adapted.", "",
        "| quantity | value |", "|---|---|",
        f"| base model params | {p['base']:,} |",
        f"| LoRA (trainable) params | {p['trainable']:,} ({p['trainable_pct']:.4f}% of all) |",
        f"| adapter file ({f['dtype']}, safetensors) | {f['file_bytes']:,} bytes = {human(f['file_bytes'])} = "
        f"{f['file_bytes'] / 2**20:,.2f} MiB ({f['tensors']} tensors, {f['header_bytes']:,}-byte header) |",
        f"| base model file (fp16) | {human(res['base_file_fp16_bytes'])} |",
        f"| checkpoint size ratio (fp16 base / adapter) | {res['base_file_fp16_bytes'] / f['file_bytes']:,.0f}x |",
        "", f"### Training memory (batch {act['batch_size']}, sequence {act['seq_len']}, {ckpt})", "",
        "| method | weights | grads | optimizer | activations | total |", "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in res["memory"].items():
        cells = " | ".join(human(row[c]) for c in ("weights", "grads", "optimizer", "activations", "total"))
        lines.append(f"| {METHODS[key]} | {cells} |")
    if "devices" in res:
        lines += format_devices(res["devices"])
    lines += ["", "### Assumptions", ""] + [f"- {a}" for a in res["assumptions"]]
    return "\n".join(lines) + "\n"


def format_devices(dev: dict) -> list[str]:
    """The per-device section: a row per method and way of sharding, with the bytes each device sends per step."""
    n, block = dev["count"], dev["block"]
    lines = [
        "", f"### Per device on {n} devices (DDP / FSDP)", "",
        f"Global batch of {rows(dev['batch_size'])}: {rows(dev['rows_per_device'])} per device. FSDP's working "
        f"buffer: the largest block ({block['path']}, 1 of {block['count']}) gathered, twice.", "",
        "| method | parallel | " + " | ".join(PARTS) + " | total | sent per step |", "|---|---|" + "---:|" * 7,
    ]
    for key, ways in dev["memory"].items():
        for way, label in PARALLEL.items():
            row = ways[way]
            cells = " | ".join(human(row[c]) for c in (*PARTS, "total", "comm_bytes"))
            lines.append(f"| {METHODS[key]} | {label} | {cells} |")
    return lines


def _plot(res: dict, path: Path) -> None:
    """A stacked bar per method: weights, grads, optimizer states, activations (GB)."""
    import matplotlib  # heavy: imported only to draw the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only to draw the plot

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [METHODS[k].replace(", ", "\n") for k in res["memory"]]
    bottom = [0.0] * len(names)
    for part in ("weights", "grads", "optimizer", "activations"):
        values = [row[part] / 1e9 for row in res["memory"].values()]
        ax.bar(names, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:,.1f}", ha="center", va="bottom", fontsize=9)
    act = res["activations"]
    ax.set_ylabel("GB (1e9 bytes)")
    ax.set_title(f"{res['source']}: training memory, batch {act['batch_size']}, seq {act['seq_len']}"
                 f"{', checkpointing' if act['checkpointing'] else ''}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(res: dict, out_dir: str | Path) -> dict[str, str]:
    """Write plan.json, plan.md (tables + assumptions) and plan.png (memory per method) into `out_dir`."""
    out = Path(out_dir)
    paths = {"json": out / "plan.json", "md": out / "plan.md", "png": out / "plan.png"}
    write_json(paths["json"], res)
    write_text(paths["md"], format_plan(res))
    _plot(res, paths["png"])
    return {k: str(v) for k, v in paths.items()}
