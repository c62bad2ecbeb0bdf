"""Keep a GGUF model's quantized blocks in memory as the file stores them; dequantize one layer at a time.

transformers (and so PEFT) dequantizes a whole GGUF model to full precision when it loads it. Here the model
is loaded that way once, then each block Linear is swapped for a PackedLinear holding the file's own blocks
(Q4_0, Q4_1 or Q8_0: 32 weights per block), re-laid out as separate scale and code tensors so that torch can
dequantize a whole matrix in a few vectorized operations. Block layouts (ggml's, little-endian):

    Q8_0: fp16 d, 32 x int8 q          w = d * q
    Q4_0: fp16 d, 16 bytes of nibbles  w = d * (q - 8)      q = low nibbles (weights 0-15), high (16-31)
    Q4_1: fp16 d, fp16 m, 16 bytes     w = d * q + m

Only Llama-family files are mapped (the tensor names below); transformers' own loader permutes the rows of
attn_q / attn_k back from llama.cpp's rotary layout, and so do we, row by row, on the blocks. The token
embedding (token_embd, which a tied output head shares) is kept too when asked; its blocks never cross a row,
so a lookup dequantizes only the rows it reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.packed import PackedLinear, PackedWeight
from ..core.surgery import replace_module
from .embedding import input_embedding, swap_embedding

BLOCK = 32  # weights per block in every supported type
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
LLAMA_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
DENSE_TYPES = ("F32", "F16", "BF16")  # stored unquantized in the file: the module stays dense
CHUNK_ROWS = 4096  # rows dequantized at a time: fp32 intermediates of 4096 x width x 4 bytes (9 MB at 576)


class GGUFError(ValueError):
    """A GGUF file whose blocks cannot be kept: unsupported architecture or block type, mismatched shapes."""


def split_blocks(raw: torch.Tensor, qtype: str) -> dict[str, torch.Tensor]:
    """The raw bytes of a (rows, blocks * block_bytes) uint8 tensor, as d (rows, blocks) fp16, m, and codes."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, BLOCK_BYTES[qtype])  # (rows, nb, bytes)
    parts = {"d": blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)}
    if qtype == "Q4_1":
        parts["m"] = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    parts["q"] = blocks[..., BLOCK_BYTES[qtype] - (BLOCK if qtype == "Q8_0" else BLOCK // 2):].contiguous()
    if qtype == "Q8_0":
        parts["q"] = parts["q"].view(torch.int8)
    return parts


def dequantize_blocks(parts: dict[str, torch.Tensor], qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """(rows, nb * 32) weights from split_blocks' parts; computed in fp32 (as ggml does), returned in `dtype`.

    Large tensors go CHUNK_ROWS rows at a time, so the fp32 intermediates stay small: a 49,152-row embedding
    table would otherwise need several 113 MB fp32 temporaries beside its 57 MB bf16 result.
    """
    rows = parts["q"].shape[0]
    if rows <= CHUNK_ROWS:
        return _dequantize_rows(parts, qtype, dtype)
    out = torch.empty(rows, parts["q"].shape[1] * BLOCK, dtype=dtype, device=parts["q"].device)
    for start in range(0, rows, CHUNK_ROWS):
        chunk = {key: value[start:start + CHUNK_ROWS] for key, value in parts.items()}
        out[start:start + CHUNK_ROWS] = _dequantize_rows(chunk, qtype, dtype)
    return out


def _dequantize_rows(parts: dict[str, torch.Tensor], qtype: str, dtype: torch.dtype) -> torch.Tensor:
    q = parts["q"]
    if qtype != "Q8_0":
        q = torch.cat([q & 0x0F, q >> 4], dim=-1)  # (rows, nb, 32): low nibbles are weights 0-15
    w = q.to(torch.float32)
    if qtype == "Q4_0":
        w = w - 8
    w = w * parts["d"].to(torch.float32).unsqueeze(-1)
    if qtype == "Q4_1":
        w = w + parts["m"].to(torch.float32).unsqueeze(-1)
    return w.reshape(q.shape[0], -1).to(dtype)


class GGUFWeight(PackedWeight):
    """A weight held as a GGUF file's blocks (split into scales and codes), dequantized on demand."""

    def __init__(self, raw: torch.Tensor, qtype: str, shape: torch.Size, dtype: torch.dtype):
        super().__init__(shape, dtype)
        if qtype not in BLOCK_BYTES:
            raise GGUFError(f"GGUF block type {qtype} is not supported (supported: {', '.join(BLOCK_BYTES)})")
        self.qtype = qtype
        self.format = f"gguf-{qtype}"
        for key, value in split_blocks(raw, qtype).items():
            self.register_buffer(key, value)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_blocks(self._parts(), self.qtype, dtype or self.dtype)  # (out, in)

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        parts = {key: value[index] for key, value in self._parts().items()}  # blocks never cross rows
        return dequantize_blocks(parts, self.qtype, dtype or self.dtype)  # (len(index), in)

    def _parts(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in ("d", "m", "q") if hasattr(self, key)}


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order transformers gives attn_q / attn_k: llama.cpp interleaves each head's rotary halves."""
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)


def _llama_module(tensor_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj; None for tensors that are not block Linears."""
    parts = tensor_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in LLAMA_NAMES:
        return None
    return f"model.layers.{parts[1]}.{LLAMA_NAMES[parts[2]]}"


def _raw_rows(tensor, model: nn.Module, module: str) -> torch.Tensor:
    """The tensor's bytes as (out, blocks * block_bytes) uint8, with attention rows in transformers' order."""
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True))  # (out, bytes): a private copy
    cfg = model.config
    if module.endswith("q_proj"):
        raw = raw[rotary_rows(raw.shape[0], cfg.num_attention_heads)]
    elif module.endswith("k_proj"):
        raw = raw[rotary_rows(raw.shape[0], getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)]
    return raw


def keep_gguf_blocks(model: nn.Module, path: str | Path, embeddings: bool = False) -> dict[str, str]:
    """Swap the block Linears of a Llama-family model loaded from GGUF `path` for ones holding the file's blocks;
    with embeddings=True the input embedding too (token_embd, and the output head when it is tied to it).

    Returns {module name: format}, e.g. "gguf-Q4_1", as quantize_model does. Tensors the file stores unquantized
    stay dense. Raises GGUFError (naming the tensor) for an architecture or block type that cannot be kept,
    before touching the model.
    """
    from gguf import GGUFReader  # only GGUF files need its reader


    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        raise GGUFError(f"{path}: keeping GGUF blocks supports Llama-family files; this one is {arch!r} "
                        "(use quantize: nf4, or none)")
    embedding = input_embedding(model) if embeddings else None
    plan = [item for tensor in reader.tensors if (item := _kept(path, tensor, model, embedding)) is not None]
    if embedding is not None and not any(module == embedding[0] for module, *_ in plan):
        raise GGUFError(f"{path}: token_embd.weight is not stored in Q4_0/Q4_1/Q8_0 blocks; nothing to keep for "
                        f"{embedding[0]} (use quantize: nf4 to quantize it, or leave quantize_embeddings off)")
    done = {}
    for module, tensor, qtype, dense in plan:
        rows = _raw_rows(tensor, model, module)
        weight = GGUFWeight(rows, qtype, dense.weight.shape, dense.weight.dtype)
        if embedding is not None and module == embedding[0]:
            done.update(swap_embedding(model, module, dense, weight))
        else:
            replace_module(model, module, PackedLinear(weight, dense.bias))
            done[module] = weight.format
    return done


def _kept(path, tensor, model: nn.Module, embedding: tuple[str, nn.Embedding] | None) -> tuple | None:
    """(module name, tensor, block type, dense module) for a tensor whose blocks are kept, None for one that is
    not; GGUFError for a block type we cannot keep or a shape that does not match the loaded model."""
    module = embedding[0] if embedding is not None and tensor.name == "token_embd.weight" else \
        _llama_module(tensor.name)
    qtype = tensor.tensor_type.name
    if module is None or qtype in DENSE_TYPES:
        return None
    if qtype not in BLOCK_BYTES:
        raise GGUFError(f"{path}: tensor {tensor.name} is {qtype}; kept blocks support "
                        f"{', '.join(BLOCK_BYTES)} (use quantize: nf4, or none)")
    dense = model.get_submodule(module)
    out_in = tuple(int(n) for n in reversed(tensor.shape))
    if not isinstance(dense, (nn.Linear, nn.Embedding)) or tuple(dense.weight.shape) != out_in:
        raise GGUFError(f"{path}: tensor {tensor.name} {out_in} does not match {module} of the loaded model")
    return module, tensor, qtype, dense
