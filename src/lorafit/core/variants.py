"""LoRA variants: the one seam for updates other than plain ΔW = BA.

A LoRA layer holds one update module per adapter. Its class is the adapter's variant, picked by name from
`LoraConfig.variant`. A variant is built as `cls(in_features, out_features, r, scale, dropout, init)` and has

    add_to(y, x, layer) -> the layer's output y with this update added (plain LoRA: y + B A x * scale)
    fold(weight, delta, sign, transposed) -> the dense base weight with the update folded in (sign 1) or out (-1)
    delta_weight() -> ΔW, (out, in)
    bind(layer) -> called once the update sits in its layer (DoRA reads the base weight's row norms there)
    peft_tensors() -> {suffix in PEFT's files: tensor}, what adapter files hold for this update

Merging goes through `fold`, so a variant whose merged weight is not W0 + ΔW (DoRA rescales each output row to a
learned magnitude) changes merge, unmerge and unload by being registered. `lorafit.core.lora.LowRank` is plain
LoRA, registered as "lora"; `lorafit.core.dora.WeightDecomposed` is DoRA, registered as "dora". A new variant is a
new file that calls `register` (and is imported by lorafit.core's __init__).
"""

from __future__ import annotations

from torch import nn

VARIANTS: dict[str, type[nn.Module]] = {}  # name -> update class for Linear layers


def register(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make `cls` the update class of variant `name`; returns it (usable as a decorator's body)."""
    if name in VARIANTS and VARIANTS[name] is not cls:
        raise ValueError(f"LoRA variant {name!r} is registered already ({VARIANTS[name].__name__})")
    VARIANTS[name] = cls
    return cls


def variant(name: str) -> type[nn.Module]:
    """The update class of variant `name`; KeyError naming the registered ones."""
    if name not in VARIANTS:
        raise KeyError(f"no LoRA variant {name!r}; registered: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]
