"""Methods that train a subset of the model's own parameters: full fine-tuning, top-K blocks, biases (BitFit).

Each function first freezes everything, then turns `requires_grad` on for what the method trains; nothing is
added to the model, so the saved file is just those parameters under their own names.
"""

from __future__ import annotations

from torch import nn

from ..core.anatomy import blocks_of, head_of
from .registry import Method, MethodError, register

__all__ = ["MethodError", "blocks_of", "head_of", "train_all", "train_biases", "train_head", "train_top_blocks"]


def train_all(model: nn.Module) -> None:
    """Full fine-tuning: every parameter trains."""
    model.requires_grad_(True)


def train_head(model: nn.Module) -> None:
    """A classifier's new head trains under every method (it starts random); a no-op for language models."""
    head = head_of(model)
    if head is not None:
        getattr(model, head).requires_grad_(True)


def train_top_blocks(model: nn.Module, k: int) -> list[str]:
    """Partial freezing: train only the top `k` blocks, plus what sits after them (final norm, pooler, head).

    A tied output layer (SmolLM2's head is its input embedding) stays frozen: training it would train the
    49,152-row embedding table too, which is not "the top of the network". Returns the trained block paths.
    """
    path, blocks = blocks_of(model)
    if k > len(blocks):
        raise MethodError(f"freeze: top_blocks={k} but {type(model).__name__} has only {len(blocks)} blocks")
    model.requires_grad_(False)
    trained = [f"{path}.{i}" for i in range(len(blocks) - k, len(blocks))]
    for i in range(len(blocks) - k, len(blocks)):
        blocks[i].requires_grad_(True)
    for name, module in _after_blocks(model, path):
        module.requires_grad_(True)
        trained.append(name)
    _untie_guard(model)
    train_head(model)
    return trained


def _after_blocks(model: nn.Module, blocks_path: str) -> list[tuple[str, nn.Module]]:
    """Top-level norms that run after the blocks (model.norm, transformer.ln_f, bert.pooler)."""
    parent = blocks_path.rsplit(".", 2)[0] if blocks_path.count(".") >= 1 else ""
    owner = model.get_submodule(parent) if parent else model
    names = ("norm", "ln_f", "final_layer_norm", "pooler")
    return [(f"{parent}.{n}".lstrip("."), getattr(owner, n)) for n in names if isinstance(getattr(owner, n, None),
                                                                                         nn.Module)]


def _untie_guard(model: nn.Module) -> None:
    """Keep a tied input embedding / output layer frozen (see train_top_blocks)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight.requires_grad_(False)


def train_biases(model: nn.Module) -> int:
    """BitFit (Ben Zaken et al. 2022): train only the bias terms (and a classifier's head). Returns how many."""
    model.requires_grad_(False)
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    if not biases:
        raise MethodError(f"bitfit: {type(model).__name__} has no bias parameters (Llama-style models, such as "
                          "SmolLM2, use none); choose another method, e.g. lora or adapter")
    for p in biases:
        p.requires_grad_(True)
    train_head(model)
    return sum(p.numel() for p in biases)


def _trains_base(options) -> bool:
    return True


register(Method("full", "every parameter trains", setup=lambda model, options, lora: train_all(model),
                trains_base=_trains_base))
register(Method("freeze", "only the top K blocks (plus final norm and a classifier's head): partial freezing",
                setup=lambda model, options, lora: train_top_blocks(model, options.top_blocks),
                trains_base=_trains_base))
register(Method("bitfit", "only the biases (Ben Zaken et al. 2022)",
                setup=lambda model, options, lora: train_biases(model), trains_base=_trains_base))
