"""`lorafit eval`'s report: the per-class table, and into the output folder eval.json, every model's predictions
(JSONL) and, for a classifier, its confusion matrix as a PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.files import atomic_write, write_json, write_text


def format_per_class(result: dict) -> str:
    """A classifier's per-class precision, recall, F1 and support as a markdown table (macro average last)."""
    rows = result["per_class"]
    lines = [f"## {result['name']}: per class ({len(rows)} classes, accuracy {result['value']:.2f}%)", "",
             "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |")
    present = [s for s in rows.values() if s["support"]] or list(rows.values())
    macro = [sum(s[key] for s in present) / max(1, len(present)) for key in ("precision", "recall", "f1")]
    lines.append(f"| macro average (classes present) | {macro[0]:.3f} | {macro[1]:.3f} | {macro[2]:.3f} | "
                 f"{sum(s['support'] for s in rows.values())} |")
    return "\n".join(lines) + "\n"


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def _plot_confusion(result: dict, path: Path) -> None:
    """Counts of (true class, predicted class), one row per true class; the diagonal is right."""
    import matplotlib  # heavy: imported only to draw the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only to draw the plot

    names, counts = list(result["per_class"]), result["confusion"]
    side = min(20.0, 2.5 + 0.45 * len(names))
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{result['name']}: accuracy {result['value']:.2f}%")
    top = max(max(row) for row in counts) if counts else 0
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > top / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_eval_report(results: list[dict], out: str | Path) -> list[Path]:
    """eval.json (every score, without the predictions), and per model predictions-NAME.jsonl (a classifier's:
    text, label, prediction, probabilities; a generator's: prompt, answer, prediction) and, for a classifier,
    confusion-NAME.png. Returns the files written."""
    out = Path(out)
    written = []
    for result in results:
        name = _file_name(result["name"])
        rows = result.get("predictions") or result.get("samples")
        if rows:
            path = out / f"predictions-{name}.jsonl"
            write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            written.append(path)
        if "confusion" in result:
            written.append(out / f"confusion-{name}.png")
            _plot_confusion(result, written[-1])
    summary = [{k: v for k, v in result.items() if k not in ("predictions", "samples")} for result in results]
    write_json(out / "eval.json", {"results": summary})
    return [*written, out / "eval.json"]
