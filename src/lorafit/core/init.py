"""Initialisations that start LoRA from the base weight itself: PiSSA and OLoRA.

PiSSA (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation", section 3): with the SVD
W0 = U S V^T of the (out, in) base weight, B = U_r sqrt(S_r / scale) and A = sqrt(S_r / scale) V_r^T, so that
scale·B·A is W0's top-r part and the trained factors hold its principal directions. `pissa_niter_N` takes the
top-r SVD from `torch.svd_lowrank` with N subspace iterations (Halko et al. 2009): much faster on a large weight, and
close to the exact one. OLoRA (Büyükakyüz 2024, section 3): with the QR decomposition W0 = QR, B = Q[:, :r] and
A = R[:r].

For the model's output to stay the base's at the start, the base weight becomes the residual
W_res = W0 - scale·B0·A0, in place: this is the one kind of adapter whose injection changes a base weight. The
initial factors (A0, B0) are kept beside the update (`initial_factors`, on the CPU) because the trained adapter is a
change to the residual, useless to anyone holding only W0; `lorafit.save_adapter` writes it as a plain LoRA adapter
for the original base instead (`converted`): ΔW = scale·(B·A - B0·A0) = scale·[B | -B0]·[A ; A0], rank 2r, alpha
doubled so that the scale stays the same (PEFT's `path_initial_model_for_weight_conversion`).

Deleting such an adapter (or unloading it unmerged) puts W0 = W_res + scale·B0·A0 back, and `lorafit.disabled`
computes with that W0, so "the base model" keeps meaning the original weights (within fp32 rounding).
"""

from __future__ import annotations

import math
import re

import torch

from .lora import LoraLinear, LowRank
from .packed import PackedWeight

FROM_BASE = ("pissa", "olora")  # inits that decompose the base weight (besides pissa_niter_N)
_NITER = re.compile(r"pissa_niter_(\d+)")
SKETCH_SEED = 0  # svd_lowrank's random sketch comes from this seed: the same base gives the same init, so a resumed
# run rebuilds the same residual


def from_base(init: str) -> bool:
    """True when `init` decomposes the base weight (and so changes it to a residual): pissa, pissa_niter_N, olora."""
    return init in FROM_BASE or _NITER.fullmatch(init) is not None


def niter(init: str) -> int | None:
    """N of "pissa_niter_N"; None for any other init."""
    match = _NITER.fullmatch(init)
    return int(match.group(1)) if match else None


def refusal(layer: LoraLinear, path: str, init: str, r: int) -> str | None:
    """Why adapter init `init` cannot decompose `layer`'s weight (None when it can): the reason and what to do."""
    if not isinstance(layer, LoraLinear):
        return f"module {path!r} is an embedding table; init {init} applies to Linear and Conv1D targets only"
    if isinstance(layer.weight, PackedWeight):
        return (f"module {path!r} holds a packed ({layer.weight.format}) weight, and init {init} rewrites the base "
                "weight as a residual: use a dense base (quantize: none) or init kaiming")
    if layer.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"module {path!r} has a {layer.weight.dtype} weight; init {init} needs float32, float16 or bfloat16"
    if r > min(layer.in_features, layer.out_features):
        return (f"module {path!r} is {layer.out_features}x{layer.in_features}: init {init} needs r <= "
                f"{min(layer.in_features, layer.out_features)}, got r={r}")
    return None


def _sketch_svd(weight: torch.Tensor, r: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank(weight, r, niter) with its random sketch drawn from SKETCH_SEED, the caller's RNG untouched."""
    cuda = weight.device.type == "cuda"
    index = weight.device.index if weight.device.index is not None else (torch.cuda.current_device() if cuda else 0)
    with torch.random.fork_rng(devices=[index] if cuda else []):
        (torch.cuda.default_generators[index] if cuda else torch.default_generator).manual_seed(SKETCH_SEED)
        return torch.svd_lowrank(weight, q=r, niter=iterations)  # U (out, r), S (r,), V (in, r)


@torch.no_grad()
def decompose(weight: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in fp32 from the (out, in) weight, such that scale·B·A is its PiSSA / OLoRA part."""
    work = weight.to(torch.float32)  # (out, in)
    if init == "olora":
        q, upper = torch.linalg.qr(work)  # (out, k), (k, in) with k = min(out, in)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(work, full_matrices=False)  # (out, k), (k,), (k, in)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = _sketch_svd(work, r, niter(init))  # (out, r), (r,), (in, r)
        vh = v.T
    root = (s / scale).sqrt()  # (r,): each factor takes half of the singular value, net of the scale
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()  # A (r, in), B (out, r)


def _dense(layer: LoraLinear) -> torch.Tensor:
    """The layer's weight in (out, in) layout, whatever its storage (GPT-2's Conv1D keeps (in, out))."""
    return layer.weight.T if layer.fan_in_fan_out else layer.weight


@torch.no_grad()
def init_from_base(layer: LoraLinear, name: str, init: str) -> None:
    """Set adapter `name`'s A and B from `layer`'s weight and turn the weight into the residual W0 - scale·B·A.

    The weight keeps its dtype and storage (the residual is computed in fp32 and rounded once); the initial
    factors are kept as `update.initial_factors` (fp32 copies on the CPU) for `converted` and `restore_base`.
    """
    update = layer.lora[name]
    if type(update) is not LowRank:
        raise ValueError(f"init {init} starts plain LoRA only, not the {type(update).__name__} variant")
    a, b = decompose(_dense(layer), update.lora_A.shape[0], update.scale, init)
    update.lora_A.copy_(a)
    update.lora_B.copy_(b)
    residual = _dense(layer).to(torch.float32) - update.scale * (b @ a)  # (out, in)
    layer.weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(layer.weight.dtype))
    update.initial_factors = (a.cpu(), b.cpu())


def original_weight(layer: LoraLinear, name: str) -> torch.Tensor:
    """W0 = W_res + scale·B0·A0 for the layer's adapter `name` (which changed the weight), in the weight's layout."""
    update = layer.lora[name]
    a0, b0 = (t.to(layer.weight.device) for t in update.initial_factors)
    delta = update.scale * (b0 @ a0)  # (out, in)
    return update.fold(layer.weight, delta.T if layer.fan_in_fan_out else delta)


@torch.no_grad()
def restore_base(layer: LoraLinear, name: str) -> None:
    """Put W0 back into `layer`'s weight, in place, before adapter `name` (which changed it) goes."""
    layer.weight.copy_(original_weight(layer, name))


def changed_base(layer, name: str) -> bool:
    """True when adapter `name` of `layer` was initialised from the base weight and changed it."""
    return name in layer.lora and getattr(layer.lora[name], "initial_factors", None) is not None


def converted(state: dict[str, torch.Tensor], initial: dict[str, tuple[torch.Tensor, torch.Tensor]],
              peft: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A PiSSA / OLoRA adapter's tensors and config as a plain LoRA adapter for the original base weights.

    `state` maps keys `<path>.lora_A.weight` / `.lora_B.weight` (with any prefix) to the trained factors,
    `initial` maps `<path>` (the same prefix) to (A0, B0). ΔW = scale·(B·A - B0·A0) = scale'·[B | -B0]·[A ; A0] with
    r' = 2r and alpha' = 2·alpha (rslora: alpha·sqrt 2), so scale' = scale. Other tensors (biases, modules_to_save)
    are full values, right for the original base as they are.
    """
    out = dict(state)
    for path, (a0, b0) in initial.items():
        a, b = state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]
        out[f"{path}.lora_A.weight"] = torch.cat([a, a0.to(a.dtype)], dim=0)  # (2r, in)
        out[f"{path}.lora_B.weight"] = torch.cat([b, -b0.to(b.dtype)], dim=1)  # (out, 2r)
    patterns = {key: peft[key] for key in ("rank_pattern", "alpha_pattern") if peft.get(key)}
    if patterns and peft.get("use_rslora"):  # alpha / sqrt(r) per module: no one alpha_pattern keeps every scale
        raise ValueError("an adapter initialised from the base with rslora and rank_pattern/alpha_pattern cannot be "
                         "converted for the original base (PEFT refuses it too); save it with convert_init=False")
    doubled = math.sqrt(2) if peft.get("use_rslora") else 2
    config = {**peft, "r": 2 * peft["r"], "lora_alpha": peft["lora_alpha"] * doubled, "init_lora_weights": True}
    config.update({key: {module: 2 * value for module, value in pattern.items()} for key, pattern in patterns.items()})
    return out, config
