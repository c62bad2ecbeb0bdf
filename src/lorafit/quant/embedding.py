"""A frozen embedding table stored quantized: looked-up rows are dequantized, the rest stays packed.

A model whose output head shares the table with the input embedding (SmolLM2, GPT-2) keeps sharing it: the
head becomes a PackedLinear over the same PackedWeight, so the table is held once, quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.packed import PackedLinear, PackedWeight
from ..core.surgery import replace_module


class QuantEmbedding(nn.Module):
    """Drop-in for a frozen nn.Embedding: `weight` is a PackedWeight of shape (vocab, dim)."""

    def __init__(self, weight: PackedWeight, padding_idx: int | None = None):
        super().__init__()
        self.weight = weight
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)  # each distinct token dequantized once
        return self.weight.rows(unique)[inverse]  # (..., dim), in the table's original dtype

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


def input_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """(name, module) of the input embedding quantize_model(embeddings=True) quantizes; ValueError if none fits."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    if type(embedding) is not nn.Embedding or name is None:
        raise ValueError(f"{type(model).__name__} has no nn.Embedding input embedding to quantize")
    if embedding.max_norm is not None:
        raise ValueError(f"{name} renormalizes its rows (max_norm); a quantized table cannot: leave it unquantized")
    return name, embedding


def swap_embedding(model: nn.Module, name: str, embedding: nn.Embedding, weight: PackedWeight) -> dict:
    """Swap the embedding for a QuantEmbedding over `weight`, and a head tied to it for a PackedLinear sharing it."""

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    replace_module(model, name, QuantEmbedding(weight, embedding.padding_idx))
    done = {name: weight.format}
    if type(head) is nn.Linear and head.weight is embedding.weight:
        replace_module(model, head_name, PackedLinear(weight, head.bias))
        done[head_name] = f"{weight.format} (tied to {name})"
    return done
