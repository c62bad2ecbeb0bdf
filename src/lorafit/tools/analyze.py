"""What an adapter learned: the analyses of Hu et al. 2021, section 7 ("Understanding the low-rank updates").

- Spectra: the singular values of ΔW = B A · scale per layer and module, with two effective ranks: how many
  singular values hold 90% of the energy Σσ², and the entropy effective rank exp(H(p)), p = σ / Σσ
  (Roy & Vetterli 2007). Needs only the adapter files.
- Subspace similarity (section 7.2, Figures 3-4): φ(A1, A2, i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j) in [0, 1], U_i the
  top-i right-singular vectors of an adapter's A (rows of A live in the input space), for two adapters on the
  same modules (rank 8 against rank 64, or two seeds). Two random subspaces give φ ≈ max(i, j) / d on average.
- Amplification (section 7.3, Table 7): with ΔW = U S Vᵀ, ‖U_rᵀ W V_r‖_F projects the frozen W onto ΔW's top-r
  directions; set beside W's own top-r directions, random ones, ‖W‖_F and ‖ΔW‖_F. The paper (GPT-3, layer 48,
  W_q, r = 4): 0.32 / 21.67 / 0.02 with ‖W_q‖_F = 61.95, ‖ΔW_q‖_F = 6.91, factor ‖ΔW‖_F / 0.32 ≈ 21.5: ΔW
  amplifies directions that W holds but does not emphasise.

Everything is float64. Orientation: ΔW is always (out, in), as PEFT stores A (r, in) and B (out, r); a base weight
stored (in, out) (GPT-2's Conv1D, flagged `fan_in_fan_out` in adapter_config.json, and embedding tables, whose
"input" is the vocabulary) is transposed to (out, in) before any projection. A fused module (GPT-2's c_attn:
q|k|v stacked on the output side) is analysed as the one matrix the adapter updates.

The tables and plots of a result are in `analyze_report.py`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.adapter_io import CONFIG_FILE, PREFIX, WEIGHTS_FILE, AdapterFileError, read_adapter
from ..core.surgery import lora_layers

ENERGY_SHARE = 0.9  # the share of Σσ² the "energy" effective rank must reach
FUSED = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv")  # module names that stack q, k and v


@dataclass
class Update:
    """One adapted module's ΔW = B @ A * scale, (out, in), in float64."""

    path: str  # module path in the model, e.g. model.layers.3.self_attn.q_proj
    layer: int | None  # block index (the first integer in the path); None outside the blocks
    module: str  # the path after the block index (self_attn.q_proj): the paper's "weight type"
    A: torch.Tensor  # (r, in): rows live in the input space
    B: torch.Tensor  # (out, r)
    scale: float  # alpha / r (alpha / sqrt(r) with rslora)
    transposed: bool  # the base weight is stored (in, out): Conv1D (fan_in_fan_out) or an embedding table


def _split(path: str) -> tuple[int | None, str]:
    """(block index, module name after it): model.layers.3.self_attn.q_proj -> (3, self_attn.q_proj)."""
    match = re.search(r"(?:^|\.)(\d+)\.(.+)$", path)
    return (int(match.group(1)), match.group(2)) if match else (None, path)


def read_updates(folder: str | os.PathLike) -> tuple[dict, list[Update]]:
    """(adapter_config.json as a dict, the adapter's updates sorted by module then layer). Reads no pickle."""
    cfg, tensors = read_adapter(folder)
    raw = json.loads((Path(folder) / CONFIG_FILE).read_text())
    updates = []
    for key in sorted(tensors):
        for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                              (".lora_embedding_A", ".lora_embedding_B", True)):
            if not key.endswith(a_suffix):
                continue
            path = key.removesuffix(a_suffix)
            if path + b_suffix not in tensors:
                raise AdapterFileError(f"{Path(folder) / WEIGHTS_FILE}: {PREFIX + key} has no partner "
                                       f"{PREFIX + path + b_suffix}")
            layer, module = _split(path)
            updates.append(Update(path, layer, module, tensors[key].double(), tensors[path + b_suffix].double(),
                                  cfg.scale_of(path), embedding or bool(raw.get("fan_in_fan_out", False))))
    if not updates:
        raise AdapterFileError(f"{Path(folder) / WEIGHTS_FILE}: no lora_A / lora_B tensors to analyse")
    updates.sort(key=lambda u: (u.module, -1 if u.layer is None else u.layer, u.path))
    return {**raw, "scale": cfg.scale}, updates


def delta_svd(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ΔW = B @ A * scale without forming ΔW: (U (out, k), S (k,), V (in, k)), k = min(r, out, in).

    B = Q_B R_B and Aᵀ = Q_A R_A give ΔW = Q_B (R_B R_Aᵀ · scale) Q_Aᵀ, so only a small core matrix is decomposed:
    cheap for a 4096-wide layer, exact in float64.
    """
    q_b, r_b = torch.linalg.qr(B.double())  # (out, kb), (kb, r)
    q_a, r_a = torch.linalg.qr(A.double().T)  # (in, ka), (ka, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T * scale)  # (kb, kb), (k,), (ka, ka)
    k = s.numel()
    return q_b @ u[:, :k], s, q_a @ vh[:k].T  # (out, k), (k,), (in, k)


def energy_rank(sigma: torch.Tensor, share: float = ENERGY_SHARE) -> int:
    """The fewest singular values (largest first) whose Σσ² reaches `share` of the total; 0 for ΔW = 0."""
    energy = sigma.double().sort(descending=True).values ** 2
    if energy.sum() == 0:
        return 0
    cumulative = energy.cumsum(0) / energy.sum()
    return int((cumulative < share - 1e-12).sum()) + 1


def entropy_rank(sigma: torch.Tensor) -> float:
    """exp(H(p)) with p = σ / Σσ (Roy & Vetterli 2007): k for k equal singular values, 1 for one; 0 for ΔW = 0."""
    sigma = sigma.double()
    if sigma.sum() == 0:
        return 0.0
    p = sigma[sigma > 0] / sigma.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def spectra(updates: list[Update]) -> list[dict]:
    """Per module: ΔW's shape, singular values, Frobenius norm and both effective ranks."""
    rows = []
    for u in updates:
        _, s, _ = delta_svd(u.A, u.B, u.scale)
        rows.append({"path": u.path, "layer": u.layer, "module": u.module, "shape": [u.B.shape[0], u.A.shape[1]],
                     "r": u.A.shape[0], "sigma": s.tolist(), "fro": float(s.norm()),
                     "energy90_rank": energy_rank(s), "entropy_rank": entropy_rank(s)})
    return rows


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j) for i = 1..k1, j = 1..k2 (section 7.2): (k1, k2), values in [0, 1].

    U_i: the top-i right-singular vectors of A (r, in); k = min(r, in).
    """
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"the A matrices have different input sizes: {tuple(A1.shape)} and {tuple(A2.shape)}")
    u1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh.T  # (in, k1)
    u2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh.T  # (in, k2)
    overlap = (u1.T @ u2) ** 2  # (k1, k2)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return overlap.cumsum(0).cumsum(1) / torch.minimum(i, j)  # (k1, k2)


def _phi_summary(phi: torch.Tensor, in_features: int) -> dict:
    k1, k2 = phi.shape
    return {"phi_11": float(phi[0, 0]), "phi_1_all": float(phi[0, -1]), "phi_all": float(phi[-1, -1]),
            "random_all": max(k1, k2) / in_features}


def similarity(updates1: list[Update], updates2: list[Update]) -> dict:
    """φ between two adapters on every module both adapt, and its mean over layers per module type."""
    others = {u.path: u for u in updates2}
    modules, grouped = [], {}
    for u in updates1:
        if u.path not in others:
            continue
        phi = subspace_similarity(u.A, others[u.path].A)  # (k1, k2)
        d = u.A.shape[1]
        modules.append({"path": u.path, "layer": u.layer, "module": u.module, "in": d, "phi": phi.tolist(),
                        **_phi_summary(phi, d)})
        grouped.setdefault(u.module, []).append(phi)
    if not modules:
        raise ValueError(f"the two adapters share no module (first: {updates1[0].path}, other: {updates2[0].path})")
    ins = {m["module"]: m["in"] for m in modules}
    mean = {name: {"layers": len(phis), "phi": torch.stack(phis).mean(0).tolist(),
                   **_phi_summary(torch.stack(phis).mean(0), ins[name])} for name, phis in grouped.items()}
    paths1 = {u.path for u in updates1}
    return {"modules": modules, "mean": mean,
            "only_first": sorted(paths1 - set(others)), "only_other": sorted(set(others) - paths1)}


def projection_norms(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor,
                     generator: torch.Generator | None = None) -> dict:
    """Table 7's numbers for one weight W (out, in) and ΔW = U diag(S) Vᵀ (U (out, k), V (in, k)).

    proj_delta = ‖Uᵀ W V‖_F; proj_w = the same on W's own top-k singular pairs, which is √(Σ_{i≤k} σ_i(W)²);
    proj_random = on a random orthonormal k-dim pair; factor = ‖ΔW‖_F / proj_delta (None when that is 0).
    """
    W = W.double()
    out, d = W.shape
    k = S.numel()
    proj_delta = float((U.T @ W @ V).norm())  # (k, k)
    proj_w = float(torch.linalg.svdvals(W)[:k].norm())
    ru = torch.linalg.qr(torch.randn(out, k, generator=generator, dtype=torch.float64)).Q  # (out, k)
    rv = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64)).Q  # (in, k)
    delta_fro = float(S.norm())
    return {"r": k, "proj_delta": proj_delta, "proj_w": proj_w, "proj_random": float((ru.T @ W @ rv).norm()),
            "w_fro": float(W.norm()), "delta_fro": delta_fro, "factor": delta_fro / proj_delta if proj_delta else None}


def _base_weights(base: Mapping[str, torch.Tensor] | nn.Module) -> Mapping[str, torch.Tensor]:
    """A state dict of the frozen base; a model with an adapter merged in would give W0 + ΔW, so it is refused."""
    if not isinstance(base, nn.Module):
        return base
    merged = [path for path, layer in lora_layers(base) if layer.merged is not None]
    if merged:
        raise ValueError(f"{merged[0]} has an adapter merged into its weight (W0 + ΔW, not the base); "
                         "call lorafit.unmerge(model) first")
    return base.state_dict()


def _weight_of(weights: Mapping[str, torch.Tensor], u: Update, folder: str | os.PathLike) -> torch.Tensor:
    """The base weight of `u`'s module as (out, in), float64; errors name the key and the shapes."""
    keys = [f"{p}{u.path}.{w}" for p in ("", PREFIX) for w in ("weight", "base_layer.weight")]
    key = next((k for k in keys if k in weights), None)
    if key is None:
        raise ValueError(f"{Path(folder) / WEIGHTS_FILE}: module {u.path} is adapted, but the base weights have no "
                       f"{keys[0]} (is this the adapter's base model?)")
    W = weights[key].detach().to("cpu", torch.float64)
    W = W.T if u.transposed else W  # Conv1D / embedding store (in, out)
    expected = (u.B.shape[0], u.A.shape[1])
    if tuple(W.shape) != expected:
        raise ValueError(f"base weight {key} is {tuple(weights[key].shape)}{' (transposed)' if u.transposed else ''}"
                         f", the adapter's ΔW is {expected} (out, in); check fan_in_fan_out in "
                         f"{Path(folder) / CONFIG_FILE} or the base model")
    return W


def amplification(base_weights: Mapping[str, torch.Tensor] | nn.Module, adapter_folder: str | os.PathLike,
                  seed: int = 0) -> list[dict]:
    """Section 7.3 per adapted module: W projected on ΔW's, W's own and random top-r directions, norms, factor.

    `base_weights`: the base model's state dict (or the model itself, unmerged; LoRA keys are ignored), keys as in
    the model the adapter was trained on. The random directions are drawn from `seed`, module after module.
    """
    weights = _base_weights(base_weights)
    _, updates = read_updates(adapter_folder)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for u in updates:
        W = _weight_of(weights, u, adapter_folder)  # (out, in)
        U, S, V = delta_svd(u.A, u.B, u.scale)
        rows.append({"path": u.path, "layer": u.layer, "module": u.module,
                     "fused": u.module.split(".")[-1] in FUSED, **projection_norms(W, U, S, V, generator)})
    return rows


def _describe(path: str | os.PathLike, raw: dict, modules: int) -> dict:
    return {"path": str(path), "r": raw.get("r"), "alpha": raw.get("lora_alpha"), "scale": raw["scale"],
            "base_model": raw.get("base_model_name_or_path"), "modules": modules}


def analyze(adapter: str | os.PathLike, other: str | os.PathLike | None = None,
            base_weights: Mapping[str, torch.Tensor] | nn.Module | None = None, seed: int = 0) -> dict:
    """All of section 7 that the inputs allow: spectra always; φ against `other` (another rank, or the same rank
    from another seed) when given; amplification when `base_weights` (see `amplification`) are given."""
    raw, updates = read_updates(adapter)
    result = {"adapter": _describe(adapter, raw, len(updates)), "spectra": spectra(updates)}
    if other is not None:
        raw2, updates2 = read_updates(other)
        result["other"] = _describe(other, raw2, len(updates2))
        result["spectra_other"] = spectra(updates2)
        result["similarity"] = similarity(updates, updates2)
    if base_weights is not None:
        result["amplification"] = amplification(base_weights, adapter, seed)
    return result
