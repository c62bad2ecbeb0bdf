"""Merging: fold ΔW into the base weight (W = W0 + BA) for zero added latency, and take it out again.

Nothing merges implicitly: these are the only functions that change a base weight, and each is idempotent.
A packed (quantized, QLoRA) base weight is dequantized by `merge` into a dense one first: W = dequant(Wq) + ΔW,
in the dtype the weight had before quantization; `unmerge` then leaves that dense, dequantized weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .init import changed_base, restore_base
from .lora import merged_weight
from .surgery import lora_layers, replace_module

__all__ = ["merge", "merged_weight", "unload", "unmerge"]


@torch.no_grad()
def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter `name` (default: the active one) into the base weights. A second call is a no-op."""
    name = name or getattr(model, "lora_active", None)
    if name is None:
        raise ValueError("the model has no active adapter to merge")
    for layer_name, layer in lora_layers(model):
        if name not in layer.lora or layer.merged == name:
            continue
        if layer.merged is not None:
            raise RuntimeError(f"{layer_name} already has adapter {layer.merged!r} merged; unmerge it first")
        layer.fold_adapter(name)  # W0 + ΔW through the adapter's variant; a packed base becomes dense
        layer.merged = name
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged ΔW back out of the base weights (exact up to rounding). No-op when nothing is merged."""
    for _, layer in lora_layers(model):
        if layer.merged is None:
            continue
        layer.fold_adapter(layer.merged, sign=-1.0)
        layer.merged = None
    return model


def unload(model: nn.Module, merge_first: bool = True) -> nn.Module:
    """Replace every LoRA layer by a plain base module (merging the active adapter first unless told not to).

    The result is an ordinary model of the original architecture: its state dict is the base state dict
    with merged values, ready for `save_pretrained` or any inference engine. A weight an unmerged adapter rewrote
    as a residual (init pissa / olora) gets W0 back.
    """
    if merge_first and getattr(model, "lora_active", None) is not None:
        merge(model)
    for layer_name, layer in list(lora_layers(model)):
        for name in layer.lora:
            if name != layer.merged and changed_base(layer, name):
                restore_base(layer, name)
        replace_module(model, layer_name, layer.to_base())
    model.lora_configs, model.lora_active, model.lora_originals = {}, None, {}
    return model
