"""Where things are in a transformers-style model: its list of blocks, its output head, a classifier's new head.

Plain lookups over any nn.Module, shared by surgery ("all-linear" leaves the output head out), quantization
(which packs the blocks' Linear weights), the methods (which train the top blocks or a new head) and training
(which compiles each block).
"""

from __future__ import annotations

import re

from torch import nn

HEADS = ("classifier", "score")  # the new classification head of transformers' *ForSequenceClassification


class AnatomyError(ValueError):
    """A model that lacks a part lorafit looks for (a list of blocks); the message names the model."""


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the transformer blocks: the longest nn.ModuleList in the model (layers / h / layer)."""
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise AnatomyError(f"{type(model).__name__}: no list of transformer blocks found (no nn.ModuleList)")
    return max(lists, key=lambda item: len(item[1]))


def block_index(name: str) -> int | None:
    """The first integer path component (model.layers.3.self_attn.q_proj -> 3), or None."""
    match = re.search(r"\.(\d+)(\.|$)", "." + name)
    return int(match.group(1)) if match else None


def output_head(model: nn.Module) -> nn.Module | None:
    """The output projection of a transformers model (its lm head), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def head_of(model: nn.Module) -> str | None:
    """The name of a classifier's new (randomly initialised) head, which every method must train; else None."""
    return next((name for name in HEADS if isinstance(getattr(model, name, None), nn.Module)), None)
