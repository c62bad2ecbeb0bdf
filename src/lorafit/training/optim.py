"""AdamW over the trainable parameters (LoRA+ groups optional), and the learning rate as a pure function of the step.

LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", section 4): B's learning rate is
`ratio` times A's, since with A and B at one rate the update of B is too small as the width grows. Each param group
carries `lr_scale`, its learning rate over the schedule's: the schedule scales every group alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.lora import LowRankEmbedding
from ..core.surgery import trainable_parameters

__all__ = ["FUSED_DEVICES", "LORAPLUS_LR_EMBEDDING", "loraplus_groups", "lr_at", "make_optimizer", "set_lr",
           "trainable_parameters"]


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to `peak * min_ratio` at `total_steps`.

    A pure function of the step, so resuming needs only the step number (no scheduler object to save).
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


FUSED_DEVICES = ("cpu", "cuda")  # where PyTorch has a fused AdamW kernel
LORAPLUS_LR_EMBEDDING = 1e-6  # PEFT's peak lr for LoRA on embedding tables under LoRA+


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None,
                   loraplus_lr_embedding: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: the frozen base carries no optimizer state at all.

    Where PyTorch has a fused AdamW kernel (transformers' Trainer uses it by default), it updates every parameter
    in one pass: the same update as the per-tensor loop PyTorch runs by default on a CPU, and several times faster
    over a LoRA model's many small tensors. With `loraplus_lr_ratio` the parameters fall in LoRA+'s groups
    (`loraplus_groups`); without, in one group.
    """
    named = trainable_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameters: inject an adapter first")
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for _, p in named)
    groups = [{"params": [p for _, p in named], "lr_scale": 1.0}]
    if loraplus_lr_ratio is not None:
        groups = loraplus_groups(model, lr, weight_decay, loraplus_lr_ratio, loraplus_lr_embedding)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def loraplus_groups(model: nn.Module, lr: float, weight_decay: float, ratio: float,
                    lr_embedding: float | None = None) -> list[dict]:
    """The trainable parameters in LoRA+'s groups, as PEFT's `create_loraplus_optimizer` makes them.

    A (and any other matrix, e.g. a head trained in full): lr; LoRA on embedding tables (both factors): a peak lr
    of its own, `lr_embedding` (PEFT's 1e-6 when None); B and every 1-d parameter (biases, norm weights): lr x
    ratio, without weight decay for biases and nn.LayerNorm weights. Empty groups are left out.
    """
    owners = {id(p): (module, pname) for module in model.modules()
              for pname, p in module.named_parameters(recurse=False)}  # parameter -> (its module, its own name)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for _, param in trainable_parameters(model):
        module, pname = owners[id(param)]
        if isinstance(module, LowRankEmbedding):
            groups["embedding"].append(param)
        elif pname == "lora_B" or param.ndim == 1:
            decays = "bias" not in pname and not isinstance(module, nn.LayerNorm)
            groups["B" if decays else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    embedding = LORAPLUS_LR_EMBEDDING if lr_embedding is None else lr_embedding
    settings = {"A": (lr, weight_decay), "embedding": (embedding, weight_decay), "B": (lr * ratio, weight_decay),
                "B_no_decay": (lr * ratio, 0.0)}  # group -> (peak lr, weight decay)
    return [{"params": params, "lr": settings[key][0], "lr_scale": settings[key][0] / lr,
             "weight_decay": settings[key][1]} for key, params in groups.items() if params]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the schedule's learning rate `lr`: each group gets lr x its `lr_scale` (LoRA+'s B: x ratio)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
