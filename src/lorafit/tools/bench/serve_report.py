"""Summaries and the plot of `lorafit bench serve`."""

from __future__ import annotations

import math
from pathlib import Path

from ...core.files import atomic_write
from .load import Result


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(results: list[Result], wall: float) -> dict:
    """One round of one row: aggregate output tokens/s, TTFT and inter-token latency percentiles, failures."""
    ok = [r for r in results if r.ok]
    gaps = [g for r in ok for g in r.gaps]
    ttft = [r.ttft for r in ok]
    return {"tokens_s": sum(r.tokens for r in ok) / wall, "ttft_p50_ms": percentile(ttft, 50) * 1e3,
            "ttft_p99_ms": percentile(ttft, 99) * 1e3, "itl_p50_ms": percentile(gaps, 50) * 1e3,
            "itl_p99_ms": percentile(gaps, 99) * 1e3, "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:3]}


def plot(result: dict, png: Path) -> None:
    """Aggregate output tokens/s per row, one group of bars per client count."""
    import matplotlib  # heavy: imported only to draw the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only to draw the plot

    clients = result["config"]["clients"]
    names = list(dict.fromkeys(r["row"] for r in result["rows"]))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, name in enumerate(names):
        values = [next((r["tokens_s"] for r in result["rows"] if r["row"] == name and r["clients"] == c), 0)
                  for c in clients]
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(clients))], values, width=width,
               label=name)
    ax.set_xticks(range(len(clients)), [f"{c} client{'s' if c > 1 else ''}" for c in clients])
    ax.set(ylabel="output tokens/s (aggregate)", title=f"{result['config']['model']} on {result['machine']['cpu']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
