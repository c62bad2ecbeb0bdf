"""A LoRA adapter as a GGUF LoRA adapter: the file llama.cpp applies on top of a base model at load time
(`llama-cli -m base.gguf --lora adapter.gguf`), in the layout llama.cpp's convert_lora_to_gguf.py writes.

Metadata: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and general.architecture (llama.cpp
refuses an adapter for another architecture). Per adapted weight `blk.N.attn_q.weight` it holds
`blk.N.attn_q.weight.lora_a`, numpy shape (r, in), and `.lora_b`, (out, r): PEFT's lora_A and lora_B, with the rows
of lora_b for attn_q / attn_k permuted into llama.cpp's rotary layout like the base weight they add to.

Scale: llama.cpp computes ΔW = B A * (alpha / r) * the user's --lora-scale, with one alpha per file and r from each
lora_a's shape. The file's alpha is the one most modules need (alpha for plain LoRA; alpha * sqrt(r) for rsLoRA, so
that alpha / r comes out as alpha / sqrt(r)); a module whose scale differs (another rank under rsLoRA, or a per-module
rank or alpha) gets the ratio folded into its lora_b, which gives the same ΔW.

Refused, because llama.cpp cannot apply them from an adapter file: modules_to_save (whole trained modules), trained
biases, LoRA on the embedding table, LoRA outside the transformer blocks, and DoRA (its magnitude vector rescales
the merged weight; export the merged model instead).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ..core.adapter_io import read_adapter
from ..core.config import LoraConfig
from ..core.files import atomic_write
from .gguf_export import (
    add_fields,
    check_gguf_target,
    check_llama,
    kv_heads,
    llama_name,
    llama_rows,
    tensor_type,
    write_gguf,
)
from .gguf_vocab import Field
from .presets import ModelError

LORA_TYPES = ("f32", "f16", "bf16")  # adapter tensors are small: kept in a float type


def _refuse_unappliable(cfg: LoraConfig, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """ModelError for what a GGUF LoRA adapter cannot carry (see the module doc), naming the folder and the key."""
    hint = "; export the merged model instead (lorafit export gguf without --lora-only)"
    if getattr(cfg, "use_dora", False) or cfg.variant != "lora":
        raise ModelError(f"{where}: a {getattr(cfg, 'variant', 'dora')} adapter (DoRA) rescales the merged weight, "
                         f"which llama.cpp's LoRA adapters cannot do{hint}")
    if cfg.modules_to_save:
        raise ModelError(f"{where}: modules_to_save={cfg.modules_to_save} trains whole modules; a llama.cpp LoRA "
                         f"adapter holds low-rank updates only{hint}")
    for key in sorted(tensors):
        if key.endswith((".lora_embedding_A", ".lora_embedding_B")):
            raise ModelError(f"{where}: {key} is LoRA on an embedding table, which llama.cpp's LoRA adapters "
                             f"do not apply{hint}")
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ModelError(f"{where}: {key} is a trained bias or module (bias={cfg.bias!r}); a llama.cpp LoRA "
                             f"adapter holds low-rank updates only{hint}")


def lora_updates(cfg: LoraConfig, tensors: dict[str, torch.Tensor], where: Path
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """({llama.cpp weight name: (lora_a (r, in), lora_b (out, r))}, the file's alpha) with any per-module scale
    difference folded into lora_b; rows are still in Hugging Face order."""
    _refuse_unappliable(cfg, tensors, where)
    updates, alphas = {}, {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        name = llama_name(module + ".weight")
        if name is None or not name.startswith("blk."):
            raise ModelError(f"{where}: LoRA on {module}, which is not a Linear inside a Llama block; llama.cpp "
                             "applies adapters to the blocks' attention and MLP weights")
        a, b = tensors[key], tensors[module + ".lora_B.weight"]  # (r, in), (out, r)
        updates[name] = (a, b)
        alphas[name] = cfg.scale_of(module) * a.shape[0]  # its own scale (rank/alpha patterns) as alpha / r
    if not updates:
        raise ModelError(f"{where}: holds no LoRA weights to export")
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    for name, (a, b) in updates.items():
        if alphas[name] != alpha:
            updates[name] = (a, b * (alphas[name] / alpha))  # the same ΔW under the file's alpha
    return updates, float(alpha)


def export_lora_gguf(adapter: str | Path, config, out: str | Path, file_type: str = "f32",
                     overwrite: bool = False) -> dict:
    """Write the LoRA adapter folder `adapter` as a GGUF LoRA adapter `out` for a base with transformers `config`.

    llama.cpp applies it with `--lora out` (llama-cpp-python: `Llama(base, lora_path=out)`) onto any GGUF file of
    the same base model, quantized or not. Returns {"path", "bytes", "alpha", "modules"}.
    """
    if file_type not in LORA_TYPES:
        raise ModelError(f"a GGUF LoRA adapter is written as {', '.join(LORA_TYPES)}, not {file_type!r}")
    out = check_gguf_target(out, overwrite)
    check_llama(config)
    where = Path(adapter)
    cfg, tensors = read_adapter(where)
    updates, alpha = lora_updates(cfg, tensors, where)

    def write(tmp: str) -> None:
        from gguf import GGUFValueType as T  # only GGUF export needs it
        from gguf import GGUFWriter  # ditto

        writer = GGUFWriter(tmp, "llama")
        add_fields(writer, [Field("general.type", "adapter", T.STRING), Field("general.name", where.name, T.STRING),
                            Field("adapter.type", "lora", T.STRING), Field("adapter.lora.alpha", alpha, T.FLOAT32)])
        for name, (a, b) in updates.items():
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config.num_attention_heads if name.endswith("attn_q.weight") else kv_heads(config)
                b = b[llama_rows(b.shape[0], heads)]  # (out, r): rows as the base weight's
            for suffix, tensor in (("lora_a", a), ("lora_b", b)):
                data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                encoded, qtype = _encoded(f"{name}.{suffix}", data, file_type)
                writer.add_tensor(f"{name}.{suffix}", encoded, raw_dtype=qtype)
        write_gguf(writer)

    atomic_write(out, write)
    return {"path": out, "bytes": out.stat().st_size, "alpha": alpha, "modules": len(updates)}


def _encoded(name: str, data, file_type: str) -> tuple:
    """(data, GGML type) of a float adapter tensor as the file stores it."""
    from gguf.quants import quantize  # only GGUF export needs it

    qtype = tensor_type(name, data.shape, file_type)
    return quantize(data, qtype), qtype
