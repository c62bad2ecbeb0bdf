"""Writing a model as a GGUF file llama.cpp runs: a Llama-family model, with any adapter merged into it first.

The file holds what llama.cpp's own converter (convert_hf_to_gguf.py) writes for a LlamaForCausalLM: the `llama.*`
hyperparameters, the tokenizer (lorafit.models.gguf_vocab) and chat template, and the weights under llama.cpp's
tensor names. Two things differ from the Hugging Face layout:

- the rows of attn_q / attn_k are permuted into llama.cpp's rotary layout, where each head's two rotary halves
  interleave (transformers un-permutes them when it reads a GGUF file; lorafit.quant.gguf does the same);
- a head tied to the token embedding is not written: llama.cpp uses token_embd when output.weight is absent.

Weight types: norms and every 1-D tensor stay F32; 2-D weights take the chosen type. Q8_0 / Q4_0 need rows whose
length is a multiple of 32 (a block); other rows fall back to F16, as llama.cpp's converter does. With Q4_0 the
output head (the token embedding when tied) is Q8_0: llama-quantize keeps it at 6 bits for the same reason (it
is the one matrix whose error every logit sees), and gguf-py cannot write Q6_K.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.files import atomic_write
from ..core.merge import unload
from ..quant import dequantize_model
from ..quant.gguf import LLAMA_NAMES, rotary_rows
from .gguf_vocab import Field, built_tokenizer_fields, copied_tokenizer_fields
from .presets import ModelError

FILE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # --type: the type of the 2-D weights
BLOCK = 32  # weights per Q8_0 / Q4_0 block: rows must be a multiple of it
HF_TO_LLAMA = {hf: name for name, hf in LLAMA_NAMES.items()} | {"input_layernorm": "attn_norm",
                                                               "post_attention_layernorm": "ffn_norm"}
TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def check_file_type(file_type: str) -> None:
    """Refuse an unknown --type before anything is loaded."""
    if file_type not in FILE_TYPES:
        raise ModelError(f"unknown GGUF type {file_type!r}; use one of {', '.join(FILE_TYPES)}")


def check_gguf_target(out: str | Path, overwrite: bool = False) -> Path:
    """The output path, refused when it is a folder, does not end in .gguf, or exists without overwrite."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise ModelError(f"{out}: the output file must end in .gguf")
    if out.is_dir():
        raise ModelError(f"{out}: is a folder; pass a file path ending in .gguf")
    if out.exists() and not overwrite:
        raise ModelError(f"{out}: exists; pass --overwrite (overwrite=True in Python) to replace it")
    return out


def check_llama(config) -> None:
    """ModelError unless `config` is a Llama-family model llama.cpp's "llama" architecture runs as it is."""
    architectures = getattr(config, "architectures", None) or []
    arch = architectures[0] if architectures else getattr(config, "model_type", "unknown")
    if getattr(config, "model_type", None) != "llama":
        raise ModelError(f"GGUF export supports Llama-family models (LlamaForCausalLM, e.g. SmolLM2); this model is "
                         f"{arch} (model_type {getattr(config, 'model_type', None)!r})")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError(f"{arch}: attention_bias / mlp_bias are not supported by GGUF export")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ModelError(f"{arch}: hidden_act {config.hidden_act!r}; llama.cpp's llama architecture uses silu")
    rope_parameters(config)  # refuses a rope scaling it cannot write


def rope_parameters(config) -> tuple[float, str, float]:
    """(rope theta, scaling type, scaling factor) of a transformers 5 or 4 config; ModelError for one llama.cpp's
    llama architecture would need more for (llama3, yarn, dynamic scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ModelError(f"rope scaling {kind!r} is not supported by GGUF export (default and linear are)")
    return float(theta), kind, float(params.get("factor", 1.0))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def llama_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order of attn_q / attn_k in llama.cpp's rotary layout: out[i] = hf[order[i]].

    Within each head, transformers keeps the rotary halves apart (rows 0..d/2-1, then d/2..d-1); llama.cpp
    interleaves them (0, d/2, 1, d/2+1, ...): the inverse of the order lorafit.quant.gguf reads them back in.
    """
    return torch.argsort(rotary_rows(rows, heads))


def llama_name(key: str) -> str | None:
    """A state-dict key's llama.cpp tensor name: model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    if key in TOP_LEVEL:
        return TOP_LEVEL[key]
    parts = key.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        module = ".".join(parts[3:-1])
        if module in HF_TO_LLAMA:
            return f"blk.{parts[2]}.{HF_TO_LLAMA[module]}.weight"
    return None


def to_llama_layout(name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """`tensor` (out, ...) with attn_q / attn_k rows in llama.cpp's rotary order; any other tensor unchanged."""
    if name.endswith("attn_q.weight"):
        return tensor[llama_rows(tensor.shape[0], config.num_attention_heads)]
    if name.endswith("attn_k.weight"):
        return tensor[llama_rows(tensor.shape[0], kv_heads(config))]
    return tensor


def tensor_type(name: str, shape: tuple[int, ...], file_type: str):
    """The GGML type tensor `name` of numpy `shape` is stored in for --type `file_type` (see the module doc)."""
    from gguf import GGMLQuantizationType as Q  # only GGUF export needs it

    if len(shape) == 1 or name.endswith("norm.weight") or file_type == "f32":
        return Q.F32
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[file_type]
    head = name in ("output.weight", "token_embd.weight")  # token_embd is the head when output.weight is absent
    if wanted == Q.Q4_0 and head:
        wanted = Q.Q8_0
    if wanted in (Q.Q8_0, Q.Q4_0) and shape[-1] % BLOCK:
        return Q.F16
    return wanted


def encode(name: str, tensor: torch.Tensor, file_type: str) -> tuple[np.ndarray, object]:
    """(numpy data, GGML type) of a tensor as the file stores it: plain floats, or quantized bytes."""
    from gguf import GGMLQuantizationType as Q  # only GGUF export needs it
    from gguf.quants import quantize  # ditto

    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()  # (out, in) or (n,): numpy's order
    qtype = tensor_type(name, data.shape, file_type)
    return (data if qtype == Q.F32 else quantize(data, qtype)), qtype


def add_fields(writer, fields: list[Field]) -> None:
    """Write metadata entries; an empty array (no merges) is left out, as GGUF cannot store one."""
    for field in fields:
        if field.sub_type is None or len(field.value):
            writer.add_key_value(field.key, field.value, field.vtype, field.sub_type)


def add_llama_hparams(writer, config) -> None:
    """The `llama.*` hyperparameters llama.cpp reads for this model."""
    theta, scaling, factor = rope_parameters(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if scaling == "linear":
        from gguf import RopeScalingType  # only GGUF export needs it

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{llama.cpp name: tensor in llama.cpp's layout} of a plain (merged) Llama model; a tied head left out.

    ModelError naming the key for a parameter llama.cpp has no place for (a bias, an extra module).
    """
    state = model.state_dict()
    tied = "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == \
        state["model.embed_tokens.weight"].data_ptr()
    tensors = {}
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue
        name = llama_name(key)
        if name is None:
            raise ModelError(f"{type(model).__name__}: tensor {key} {tuple(tensor.shape)} has no place in llama.cpp's "
                             "llama layout; GGUF export cannot write it")
        tensors[name] = to_llama_layout(name, tensor, model.config)
    return tensors


def export_gguf(model: nn.Module, tokenizer, out: str | Path, file_type: str = "f32",
                tokenizer_gguf: str | Path | None = None, overwrite: bool = False, name: str | None = None) -> dict:
    """Write `model` (a Llama-family causal LM, with or without adapters) as GGUF file `out` that llama.cpp runs.

    The model is consumed: its active adapter is merged and the LoRA layers unloaded (lorafit.unload), packed
    (quantized) weights are dequantized, as `save_merged` does. The tokenizer metadata is copied from
    `tokenizer_gguf` (the .gguf file the model came from) when given, else built from the Hugging Face tokenizer.
    The file is written beside `out` and renamed into place. Returns {"path", "bytes", "types": {type: count}}.
    """
    check_file_type(file_type)
    out = check_gguf_target(out, overwrite)
    check_llama(model.config)
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ModelError(f"{type(model).__name__}: GGUF export writes causal language models (LlamaForCausalLM); this "
                         "model has no language-model head")
    vocab = copied_tokenizer_fields(tokenizer_gguf) if tokenizer_gguf else \
        built_tokenizer_fields(tokenizer, model.config.vocab_size)
    unload(model)
    dequantize_model(model)
    tensors = model_tensors(model)
    types: Counter = Counter()

    def write(tmp: str) -> None:
        from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType  # only GGUF export needs it

        writer = GGUFWriter(tmp, "llama")
        writer.add_type("model")
        writer.add_name(name or Path(str(getattr(model, "name_or_path", "") or "model")).stem)
        writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                              "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": LlamaFileType.MOSTLY_Q4_0}[file_type])
        writer.add_quantization_version(GGML_QUANT_VERSION)
        add_llama_hparams(writer, model.config)
        add_fields(writer, vocab)
        for tensor_name, tensor in tensors.items():
            data, qtype = encode(tensor_name, tensor, file_type)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            types[qtype.name] += 1
        write_gguf(writer)

    atomic_write(out, write)
    return {"path": out, "bytes": out.stat().st_size, "types": dict(types)}


def write_gguf(writer) -> None:
    """Header, metadata and tensors of a filled GGUFWriter, then close it."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()

