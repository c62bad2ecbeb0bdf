"""AdamW over the trainable parameters, and the learning rate as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.surgery import trainable_parameters

__all__ = ["FUSED_DEVICES", "lr_at", "make_optimizer", "set_lr", "trainable_parameters"]


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


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: the frozen base carries no optimizer state at all.

    Where PyTorch has a fused AdamW kernel (transformers' Trainer uses it by default), it updates every parameter
    in one pass: the same update as the per-tensor loop PyTorch runs by default on a CPU, and several times faster
    over a LoRA model's many small tensors.
    """
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("the model has no trainable parameters: inject an adapter first")
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
