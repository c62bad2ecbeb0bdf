"""`lorafit analyze`'s report: markdown tables (means per module type, or per layer) and the PNG plots of
spectra, subspace similarity φ and amplification, from the result dict of `analyze.analyze`."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ..core.files import atomic_write, write_json, write_text


def _by_module(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by module type, in order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["module"], []).append(row)
    return groups


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _spectra_table(rows: list[dict], per_layer: bool) -> str:
    if per_layer:
        lines = ["| module | layer | ‖ΔW‖_F | σ (largest first) | 90%-energy rank | entropy rank |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['module']} | {r['layer']} | {r['fro']:.4g} | {' '.join(f'{s:.3g}' for s in r['sigma'][:8])}"
                  f"{' …' if len(r['sigma']) > 8 else ''} | {r['energy90_rank']} | {r['entropy_rank']:.2f} |"
                  for r in rows]
        return "\n".join(lines)
    lines = ["| module | layers | r | ‖ΔW‖_F | σ1 | σ1² share | 90%-energy rank (min-max) | entropy rank |",
             "|---|---|---|---|---|---|---|---|"]
    for module, group in _by_module(rows).items():
        ranks = [r["energy90_rank"] for r in group]
        share = _mean([r["sigma"][0] ** 2 / r["fro"] ** 2 if r["fro"] else None for r in group])
        lines.append(f"| {module} | {len(group)} | {group[0]['r']} | {_mean([r['fro'] for r in group]):.4g} | "
                     f"{_mean([r['sigma'][0] for r in group]):.4g} | {100 * share:.1f}% | {_mean(ranks):.2f} "
                     f"({min(ranks)}-{max(ranks)}) | {_mean([r['entropy_rank'] for r in group]):.2f} |")
    return "\n".join(lines)


def _phi_table(sim: dict, per_layer: bool) -> str:
    lines = ["| module | layer(s) | k1 × k2 | d | φ(1,1) | φ(1,k2) | φ(k1,k2) | random φ(k1,k2) |",
             "|---|---|---|---|---|---|---|---|"]
    ins = {m["module"]: m["in"] for m in sim["modules"]}
    rows = sim["modules"] if per_layer else [{"module": k, "layer": f"mean of {v['layers']}", "in": ins[k], **v}
                                             for k, v in sim["mean"].items()]
    for r in rows:
        k1, k2 = len(r["phi"]), len(r["phi"][0])
        lines.append(f"| {r['module']} | {r['layer']} | {k1} × {k2} | {r['in']} | {r['phi_11']:.3f} | "
                     f"{r['phi_1_all']:.3f} | {r['phi_all']:.3f} | {r['random_all']:.3f} |")
    return "\n".join(lines)


def _amplification_table(rows: list[dict], per_layer: bool) -> str:
    keys = ("proj_delta", "proj_w", "proj_random", "w_fro", "delta_fro", "factor")
    lines = ["| module | layer(s) | r | ‖UᵀWV‖_F: ΔW | W | random | ‖W‖_F | ‖ΔW‖_F | ‖ΔW‖_F / ‖UᵀWV‖_F |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = [(r["module"], r["layer"], [r]) for r in rows] if per_layer else \
        [(m, f"mean of {len(g)}", g) for m, g in _by_module(rows).items()]
    for module, layer, group in groups:
        cells = " | ".join(f"{_mean([r[k] for r in group]):.4g}" for k in keys)
        fused = " (fused q,k,v)" if group[0]["fused"] else ""
        lines.append(f"| {module}{fused} | {layer} | {group[0]['r']} | {cells} |")
    return "\n".join(lines)


def format_tables(result: dict, per_layer: bool = False) -> str:
    """The analysis as markdown: means over layers per module type, or one row per layer with `per_layer`."""
    a = result["adapter"]
    parts = [f"## ΔW spectra: {a['path']} (r={a['r']}, scale={a['scale']:g})", _spectra_table(result["spectra"],
                                                                                             per_layer)]
    if "similarity" in result:
        o = result["other"]
        parts += [f"## Subspace similarity φ of A: {a['path']} (r={a['r']}) against {o['path']} (r={o['r']})",
                  "φ(i,j) = ‖U1_iᵀU2_j‖²_F / min(i,j) over the top right-singular vectors of A (Hu et al. 2021, "
                  "section 7.2); random subspaces give max(i,j)/d.", _phi_table(result["similarity"], per_layer)]
        if result["similarity"]["only_first"] or result["similarity"]["only_other"]:
            parts.append(f"Adapted in one only: {len(result['similarity']['only_first'])} modules in the first, "
                         f"{len(result['similarity']['only_other'])} in the other (left out).")
    if "amplification" in result:
        parts += ["## Amplification (Hu et al. 2021, section 7.3, Table 7)",
                  "W projected on the top-r directions of ΔW, of W itself and of a random pair. The paper (GPT-3 "
                  "layer 48, W_q, r=4): 0.32 / 21.67 / 0.02, ‖W‖_F 61.95, ‖ΔW‖_F 6.91, factor 21.5.",
                  _amplification_table(result["amplification"], per_layer)]
    return "\n\n".join(parts) + "\n"


def _pyplot():
    import matplotlib  # heavy: imported only to draw the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only to draw the plot

    return plt


def _save(fig, png: Path) -> None:
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)


def _layer_label(row: dict) -> str:
    return row["path"] if row["layer"] is None else str(row["layer"])


def plot_spectra(rows: list[dict], png: Path, title: str) -> None:
    """Per module type: σ_i of every layer (top, log scale) and both effective ranks per layer (bottom)."""
    plt = _pyplot()
    groups = _by_module(rows)
    fig, axes = plt.subplots(2, len(groups), figsize=(4 * len(groups), 6.5), squeeze=False)
    for col, (module, group) in enumerate(groups.items()):
        colors = plt.cm.viridis([i / max(1, len(group) - 1) for i in range(len(group))])
        for row, color in zip(group, colors):
            axes[0, col].semilogy(range(1, len(row["sigma"]) + 1), [max(s, 1e-12) for s in row["sigma"]], color=color,
                                  marker=".", linewidth=1)
        axes[0, col].set(title=f"{module} ({len(group)} layers)", xlabel="i", ylabel="σ_i of ΔW")
        x = range(len(group))
        axes[1, col].plot(x, [r["energy90_rank"] for r in group], "o-", label="90%-energy rank")
        axes[1, col].plot(x, [r["entropy_rank"] for r in group], "s-", label="entropy rank")
        axes[1, col].set_xticks(list(x), [_layer_label(r) for r in group], fontsize=7)
        axes[1, col].set(xlabel="layer", ylabel="effective rank", ylim=(0, group[0]["r"] + 0.5))
        axes[1, col].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, png)


def plot_phi(sim: dict, module: str, png: Path) -> None:
    """φ(i, j) heatmaps of one module type: the mean over layers, then each layer (Figure 3's layout)."""
    plt = _pyplot()
    panels = [("mean over layers", sim["mean"][module]["phi"])]
    panels += [(f"layer {_layer_label(m)}", m["phi"]) for m in sim["modules"] if m["module"] == module]
    cols = min(6, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 1.2, 2.2 * rows + 0.6), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, phi) in zip(axes.flat, panels):
        k1, k2 = len(phi), len(phi[0])
        image = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower",
                          extent=(0.5, k2 + 0.5, 0.5, k1 + 0.5))
        ax.set_title(title, fontsize=8)
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7)
    fig.supxlabel("j (second adapter)", fontsize=8)
    fig.supylabel("i (first adapter)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j)")
    fig.suptitle(f"subspace similarity of A: {module}")
    _save(fig, png)


def plot_amplification(rows: list[dict], png: Path) -> None:
    """Per module type and layer: ‖UᵀWV‖_F for ΔW's, W's own and random directions (log scale)."""
    plt = _pyplot()
    groups = _by_module(rows)
    width = max(6.0, 0.35 * max(map(len, groups.values())) + 2)
    fig, axes = plt.subplots(len(groups), 1, figsize=(width, 3 * len(groups)), squeeze=False)
    for ax, (module, group) in zip(axes[:, 0], groups.items()):
        x = list(range(len(group)))
        for offset, key, label in ((-0.27, "proj_delta", "ΔW's directions"), (0, "proj_w", "W's own"),
                                   (0.27, "proj_random", "random")):
            ax.bar([i + offset for i in x], [max(r[key], 1e-12) for r in group], width=0.27, label=label)
        ax.set_yscale("log")
        ax.set_xticks(x, [_layer_label(r) for r in group], fontsize=7)
        ax.set(xlabel="layer", ylabel="‖UᵀWV‖_F",
               title=f"{module}: mean factor {_mean([r['factor'] for r in group]):.3g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, png)


def write_report(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """analyze.json, analyze.md (summary and per-layer tables) and the PNGs into `out_dir`; returns the paths."""
    out = Path(out_dir)
    written = [out / "analyze.json", out / "analyze.md", out / "spectra.png"]
    write_json(written[0], result)
    write_text(written[1], format_tables(result) + "\n# Per layer\n\n" + format_tables(result, per_layer=True))
    plot_spectra(result["spectra"], written[2], f"ΔW spectra: {result['adapter']['path']}")
    if "similarity" in result:
        written.append(out / "spectra_other.png")
        plot_spectra(result["spectra_other"], written[-1], f"ΔW spectra: {result['other']['path']}")
        for module in result["similarity"]["mean"]:
            written.append(out / f"phi_{re.sub(r'[^A-Za-z0-9_-]+', '_', module)}.png")
            plot_phi(result["similarity"], module, written[-1])
    if "amplification" in result:
        written.append(out / "amplification.png")
        plot_amplification(result["amplification"], written[-1])
    return written
