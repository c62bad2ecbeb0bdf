"""Run outputs: metrics as JSONL (and optionally TensorBoard), the loss-curve PNG, atomic JSON files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..core.files import atomic_write, write_text


class MetricsLog:
    """Appends one JSON object per step to metrics.jsonl; mirrors scalars to TensorBoard when asked.

    `start_step`: the step the run starts from. 0 starts a new file; a resumed run keeps the rows up to its
    checkpoint's step and drops the later ones (steps it will run again), a line cut off by a kill and repeats of
    a step (the last one counts), so the file ends with exactly one row per step.
    """

    def __init__(self, path: Path | None, tensorboard: bool = False, start_step: int = 0):
        self.file = self.board = None
        if path is None:  # a process other than rank 0 of a distributed run: it writes nothing
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step and path.exists():
            rows = read_metrics(path, strict=False)
            kept = list({row["step"]: row for row in rows if row.get("step", start_step + 1) <= start_step}.values())
        write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
        self.file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: TensorBoard is used only when asked for
            except ImportError:
                raise RuntimeError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            purge = start_step + 1 if start_step else None  # TensorBoard hides earlier events from here (run again)
            self.board = SummaryWriter(str(path.parent / "tensorboard"), purge_step=purge)

    def write(self, row: dict, log: Callable[[str], None] | None = None) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in row.items():
                if key != "step":
                    self.board.add_scalar(key, value, row["step"])
        if log is not None:
            log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def read_metrics(path: Path, strict: bool = True) -> list[dict]:
    """The rows of a metrics.jsonl; `strict=False` skips lines that do not parse (one cut off by a kill)."""
    rows = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if strict:
                raise
    return rows


def _pyplot():
    import matplotlib  # heavy: imported only to draw the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only to draw the plot

    return plt


def _save(fig, png: Path) -> None:
    atomic_write(Path(png), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)


def plot_loss(metrics_path: Path, png: Path) -> None:
    """Training loss per step, with the validation loss where it was measured."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, png)


def plot_before_after(report: dict, png: Path) -> None:
    """Two bar pairs from a run's report: the metric and the validation loss, base model beside the adapter."""
    plt = _pyplot()
    runs = [(label, report[key]) for key, label in (("base", "base model"), ("tuned", "with adapter")) if key in report]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    for ax, field, title in ((axes[0], "value", report["metric"]), (axes[1], "loss", "validation loss")):
        values = [r[field] for _, r in runs]
        bars = ax.bar([label for label, _ in runs], values, color=["#999999", "#1f77b4"][-len(runs):])
        ax.bar_label(bars, fmt="%.2f")
        ax.set_title(title)
        ax.set_ylim(0, max(values) * 1.2 or 1)
    fig.suptitle(f"{report['model']}: {report['val_rows']} validation rows, {report.get('steps', '?')} steps")
    fig.tight_layout()
    _save(fig, png)
