"""Quantized frozen bases for QLoRA: the blocks' Linear weights in NF4 or int8, or a GGUF file's own blocks.

    model, tok = load_model("smollm2-135m-instruct", quantize="nf4")   # or quantize_model(model, "nf4")
    inject(model, LoraConfig(r=8, targets=["q_proj", "v_proj"]))       # LoRA trains on top, in fp32

Only Linear layers inside the transformer blocks are quantized unless asked: norms always keep their dtype,
the input embedding (`embeddings=True`) and an untied output head (`head=True`) only when asked; a head tied to
the embedding shares its quantized table. Each quantized layer is a PackedLinear (lorafit/core/packed.py) or a
QuantEmbedding (lorafit/quant/embedding.py) over a packed weight of one of the formats here (bnb.py, gguf.py);
a LoRA layer wrapping a PackedLinear lets the weight compute its own product. `dequantize_model` turns them all
back into plain modules. Adapters do not depend on the base's storage: an adapter trained on an NF4 base loads
onto the fp32 base and the other way round.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch
from torch import nn

from ..core.anatomy import blocks_of
from ..core.packed import PackedLinear, PackedWeight, packed_linear
from ..core.surgery import lora_layers, replace_module
from .bnb import Int8Weight, NF4Weight
from .embedding import QuantEmbedding, input_embedding, swap_embedding
from .gguf import GGUFError, keep_gguf_blocks

QUANTIZE = ("none", "nf4", "int8", "gguf")
WEIGHT_TYPES = {"nf4": NF4Weight, "int8": Int8Weight}

# The names this package gave the packed-weight protocol before the core took it over.
QuantLinear, QuantWeight, dequant_linear = PackedLinear, PackedWeight, packed_linear

__all__ = ["QUANTIZE", "GGUFError", "QuantEmbedding", "QuantLinear", "QuantWeight", "dequant_linear",
           "dequantize_model", "is_quantized", "keep_gguf_blocks", "model_bytes", "quantize_model",
           "quantized_weights", "release_freed_memory"]


def quantize_model(model: nn.Module, method: str, gguf_file: str | Path | None = None, head: bool = False,
                   embeddings: bool = False) -> dict[str, str]:
    """Quantize the frozen Linear weights inside the model's blocks in place; returns {module name: format}.

    method "nf4" / "int8" quantizes the weights the model holds (bitsandbytes); "gguf" swaps in the blocks of
    `gguf_file`, the file the model was loaded from. head=True also quantizes an untied output head (nf4 /
    int8); embeddings=True also quantizes the input embedding table, and a head tied to it with it (for gguf:
    the file's own token_embd blocks). Call it before injecting adapters; nothing changes when it raises.
    """
    if method not in QUANTIZE or method == "none":
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE[1:])}, got {method!r}")
    if next(lora_layers(model), None) is not None:
        raise ValueError("quantize the base before injecting adapters (this model already has LoRA layers)")
    head_name, head_module = _output_head(model, method) if head else (None, None)  # checked before any change
    embedding = input_embedding(model) if embeddings else None
    if method == "gguf":
        if gguf_file is None:
            raise GGUFError("quantize: gguf keeps a GGUF file's blocks and needs a model loaded from a .gguf file")
        done = keep_gguf_blocks(model, gguf_file, embeddings=embeddings)
    else:
        done = _quantize_blocks(model, WEIGHT_TYPES[method])
        if embedding is not None:
            done.update(swap_embedding(model, *embedding, WEIGHT_TYPES[method](embedding[1].weight.data)))
    if head_module is not None:
        done[head_name] = _swap_linear(model, head_name, head_module, WEIGHT_TYPES[method])
    release_freed_memory()
    return done


def _quantize_blocks(model: nn.Module, weight_type: type[PackedWeight]) -> dict[str, str]:
    path, blocks = blocks_of(model)
    return {name: _swap_linear(model, name, module, weight_type)
            for name, module in list(blocks.named_modules(prefix=path)) if type(module) is nn.Linear}


def _swap_linear(model: nn.Module, name: str, linear: nn.Linear, weight_type: type[PackedWeight]) -> str:
    weight = weight_type(linear.weight.data)
    replace_module(model, name, PackedLinear(weight, linear.bias))
    return weight.format


def _output_head(model: nn.Module, method: str) -> tuple[str, nn.Linear]:
    """(name, module) of the output head quantize_model(head=True) may quantize; ValueError for a tied head."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is out), None)
    if type(out) is not nn.Linear or name is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output head to quantize")
    if method == "gguf":
        raise ValueError("quantize_head: gguf keeps the file's block weights only; use nf4 or int8 for the head")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None and embedding.weight is out.weight:
        raise ValueError(f"the output head {name} shares its weight with the input embedding (tied): quantize "
                         "the embeddings instead (quantize_embeddings), which quantizes the shared table once")
    return name, out


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Every PackedLinear / QuantEmbedding back to a plain nn.Linear / nn.Embedding holding dequant(W), in the
    dtype the weight had; modules that shared a quantized table share the dense one. Returns the model."""
    dense: dict[int, nn.Parameter] = {}  # id(PackedWeight) -> its dense table, so tied modules stay tied
    for name, module in list(model.named_modules()):
        if not isinstance(module, (PackedLinear, QuantEmbedding)):
            continue
        w = module.weight
        weight = dense.setdefault(id(w), nn.Parameter(w.dequantize(), requires_grad=False))
        if isinstance(module, PackedLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.bias = module.bias
        else:
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
        plain.weight = weight
        replace_module(model, name, plain)
    return model


def is_quantized(weight) -> bool:
    """True for a PackedWeight (what a PackedLinear or a LoRA layer over one holds as `weight`)."""
    return isinstance(weight, PackedWeight)


def quantized_weights(model: nn.Module) -> list[tuple[str, PackedWeight]]:
    """(module name, weight) of every quantized weight in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PackedWeight)]


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights in memory: parameters and buffers, quantized ones at their packed size."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:  # tied weights count once
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def release_freed_memory() -> None:
    """Hand memory freed by the dense weights back to the OS (glibc keeps small freed blocks otherwise).

    Without this the process keeps the dense weights' pages after quantizing and the memory saving does not show
    in its resident size. A no-op where the C library has no malloc_trim.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
