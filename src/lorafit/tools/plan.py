"""`lorafit plan`: parameter counts, adapter file size and training memory from a model config alone.

The architecture is built on PyTorch's meta device (shapes, no storage: GPT-3 175B costs nothing and takes well
under a second), LoRA is injected with lorafit's own `inject`, and everything is counted from the modules. The
memory figures are an accounting, not a measurement: every byte-per-parameter and the activation formula are
listed in the result's `assumptions`, so a reader can check or redo them.

Sources: a built-in preset (architecture numbers only), a local config.json or a folder holding one, or a GGUF
file (its metadata header only; the tensors are never read). The markdown, JSON and plot are in `plan_report.py`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import nn

from ..core.adapter_io import PREFIX
from ..core.anatomy import AnatomyError
from ..core.config import LoraConfig
from ..core.lora import LowRankEmbedding
from ..core.surgery import TargetError, inject, lora_layers, module_kind
from ..models.load import check_gguf
from ..models.presets import ModelError
from .plan_devices import device_assumptions, device_notes, device_plan, largest_block

# Architecture presets: (model_type, transformers class, config kwargs). Numbers from the papers / model cards.
PRESETS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("gpt2", "GPT2LMHeadModel", dict(n_layer=12, n_embd=768, n_head=12)),
    "gpt2-medium": ("gpt2", "GPT2LMHeadModel", dict(n_layer=24, n_embd=1024, n_head=16)),
    "gpt2-large": ("gpt2", "GPT2LMHeadModel", dict(n_layer=36, n_embd=1280, n_head=20)),
    "gpt2-xl": ("gpt2", "GPT2LMHeadModel", dict(n_layer=48, n_embd=1600, n_head=25)),
    # GPT-3 175B (Brown et al. 2020, table 2.1) modelled as a GPT-2-shaped network: fused c_attn, tied embeddings.
    "gpt3-175b": ("gpt2", "GPT2LMHeadModel", dict(n_layer=96, n_embd=12288, n_head=96, n_positions=2048)),
    "smollm2-135m": ("llama", "LlamaForCausalLM", dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5)),
    "minilm-l6": ("bert", "BertModel", dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)),
    # Llama 2 (Touvron et al. 2023b, 7B) and LLaMA 65B (Touvron et al. 2023a, table 2): the QLoRA paper's models.
    "llama2-7b": ("llama", "LlamaForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000,
        max_position_embeddings=4096, tie_word_embeddings=False)),
    "llama-65b": ("llama", "LlamaForCausalLM", dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, intermediate_size=22016, vocab_size=32000,
        max_position_embeddings=2048, tie_word_embeddings=False)),
}  # fmt: skip
ALIASES = {"smollm2-135m-instruct": "smollm2-135m"}  # lorafit's weight presets of the same architectures

# GPT-2's c_attn holds W_q, W_k, W_v side by side: (d, 3d). A target "q", "k" or "v" plans a LoRA update on that
# d x d slice alone (as the LoRA paper adapts W_q and W_v of GPT-3), counted as an (r, d) A and a (d, r) B.
FUSED_SLICES = ("q", "k", "v")
DEFAULT_QV = (["q_proj", "v_proj"], ["query", "value"], ["q", "v"])  # the LoRA paper's W_q, W_v (section 7.1)
DTYPE_BYTES = {"fp32": (4, "F32"), "fp16": (2, "F16"), "bf16": (2, "BF16")}
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # QLoRA: 4-bit blocks of 64 weights; their 8-bit scales in blocks of 256
METHODS = {
    "full-fp32": "full fine-tuning, fp32",
    "full-mixed": "full fine-tuning, mixed precision",
    "lora": "LoRA, 16-bit base",
    "qlora": "QLoRA, 4-bit NF4 base",
}


class PlanError(ValueError):
    """A source, config or target that cannot be planned; the message names the file, key or module."""


def _gguf_config(path: Path):
    """The transformers config stored in a GGUF file's metadata header (the tensors are not read)."""
    from transformers import AutoConfig  # heavy: only a GGUF source needs its reader

    try:
        check_gguf(path)
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ModelError as err:
        raise PlanError(str(err)) from None
    except (OSError, ValueError, KeyError, IndexError, EOFError, struct.error) as err:
        raise PlanError(f"{path}: could not read the model config from this GGUF header ({err})") from None


def _json_config(path: Path):
    """A transformers config from a config.json, with errors that name the file and the key."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # heavy: seconds to import

    if not path.is_file():
        ggufs = sorted(path.parent.glob("*.gguf"))
        hint = f"; it holds a GGUF file: pass {ggufs[0]}" if ggufs else ""
        raise PlanError(f"{path}: not found (a model folder holds config.json){hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise PlanError(f"{path}: no 'model_type' key (e.g. \"llama\", \"gpt2\"); a transformers config.json has one")
    if data["model_type"] not in CONFIG_MAPPING:
        raise PlanError(f"{path}: model_type {data['model_type']!r} is not an architecture transformers knows")
    try:
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (TypeError, ValueError, KeyError) as err:
        raise PlanError(f"{path}: transformers rejects this config ({err})") from None


def load_config(source: str):
    """(transformers config, source label) for a preset name, a config.json, a folder holding one, or a .gguf."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # heavy: seconds to import

    name = ALIASES.get(source, source)
    if name in PRESETS:
        model_type, arch, kwargs = PRESETS[name]
        return CONFIG_MAPPING[model_type](architectures=[arch], **kwargs), f"preset {name}"
    path = Path(source).expanduser()
    if path.is_dir():
        return _json_config(path / "config.json"), str(path / "config.json")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf_config(path), str(path)
        return _json_config(path), str(path)
    raise PlanError(f"{source!r} is neither a preset nor an existing path; presets: {', '.join(PRESETS)} "
                    "(or pass a config.json, a model folder or a .gguf file)")


def build_meta(config) -> nn.Module:
    """The architecture on the meta device: every parameter has its shape, none has storage.

    The class is the config's `architectures[0]` when transformers has it, else the causal-LM class, else the
    bare encoder (AutoModel).
    """
    import transformers  # heavy: seconds to import

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            return transformers.AutoModel.from_config(config)


def _leaf_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and module_kind(m)}


def _fused_qkv(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """GPT-2-style fused attention inputs: a Conv1D named c_attn whose output is 3 x its input."""
    return [(n, m) for n, m in model.named_modules() if n.endswith("c_attn") and module_kind(m) == "conv1d"
            and m.weight.shape[1] == 3 * m.weight.shape[0]]


def _default_targets(model: nn.Module) -> list[str]:
    leaves = _leaf_names(model) | (set(FUSED_SLICES) if _fused_qkv(model) else set())
    for pair in DEFAULT_QV:
        if set(pair) <= leaves:
            return list(pair)
    raise PlanError(f"{type(model).__name__}: no query/value projections found to adapt by default; pass targets "
                    f"(modules LoRA can wrap: {', '.join(sorted(_leaf_names(model)))})")


def _quantizable(model: nn.Module) -> tuple[int, list[int]]:
    """(params, weight sizes) of the Linear/Conv1D weights QLoRA stores in 4 bits: all but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    sizes = [m.weight.numel() for _, m in model.named_modules() if module_kind(m) in ("linear", "conv1d")
             and m is not head]
    return sum(sizes), sizes


def nf4_bytes(numel: int) -> float:
    """Bytes of one weight in NF4 with double quantization (Dettmers et al. 2023, section 3).

    4 bits per weight; one absmax per block of 64 weights, itself quantized to 8 bits; one fp32 scale per block
    of 256 of those: 8/64 + 32/(64 * 256) = 0.127 bits of overhead per weight.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks * 1 + math.ceil(blocks / NF4_BLOCK2) * 4


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], dtype: str, metadata: dict | None = None) -> dict:
    """Size of a safetensors file: 8-byte length + JSON header (padded to 8 bytes with spaces) + tensor bytes.

    The header is written as the safetensors library writes it (compact JSON, keys sorted, `__metadata__` first),
    so the total equals the real file's size (tests check it against `save_adapter`).
    """
    size, tag = DTYPE_BYTES[dtype]
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key in sorted(shapes):
        n = math.prod(shapes[key]) * size
        header[key] = {"dtype": tag, "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    header_bytes = 8 + len(text.encode()) + (-len(text.encode())) % 8
    return {"dtype": dtype, "tensors": len(shapes), "tensor_bytes": offset, "header_bytes": header_bytes,
            "file_bytes": header_bytes + offset}


def _lora_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """PEFT's adapter keys and tensor shapes for the LoRA layers injected into `model` (what save_adapter writes)."""
    shapes = {}
    for path, layer in lora_layers(model):
        update = layer.lora["default"]
        if isinstance(update, LowRankEmbedding):
            shapes[f"{PREFIX}{path}.lora_embedding_A"] = tuple(update.lora_embedding_A.shape)
            shapes[f"{PREFIX}{path}.lora_embedding_B"] = tuple(update.lora_embedding_B.shape)
        else:
            shapes[f"{PREFIX}{path}.lora_A.weight"] = tuple(update.lora_A.shape)
            shapes[f"{PREFIX}{path}.lora_B.weight"] = tuple(update.lora_B.shape)
    return shapes


def _slice_shapes(fused: list[tuple[str, nn.Module]], slices: list[str], r: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the planned q/k/v slice updates of each fused c_attn: A (r, d), B (d, r)."""
    shapes = {}
    for path, module in fused:
        d_in, d_out = module.weight.shape[0], module.weight.shape[1] // 3  # Conv1D weight is (in, 3d)
        for s in slices:
            shapes[f"{PREFIX}{path}.{s}.lora_A.weight"] = (r, d_in)
            shapes[f"{PREFIX}{path}.{s}.lora_B.weight"] = (d_out, r)
    return shapes


def _inject_targets(model: nn.Module, targets: list[str] | None, r: int, alpha: float | None) -> tuple:
    """Inject LoRA for the real module targets (on meta); return (targets, fused c_attn modules, q/k/v slices)."""
    targets = list(targets) if targets else _default_targets(model)
    fused, leaves = _fused_qkv(model), _leaf_names(model)
    slices = [t for t in targets if t in FUSED_SLICES and t not in leaves and fused]
    real = [t for t in targets if t not in slices]
    if real:
        cfg = LoraConfig(r=r, targets="all-linear" if real == ["all-linear"] else real,
                         **({} if alpha is None else {"alpha": alpha}))
        try:
            with torch.device("meta"):
                inject(model, cfg)
        except TargetError as err:
            extra = "; q, k, v name the slices of the fused c_attn" if fused else ""
            raise PlanError(f"{err}{extra}") from None
    else:
        model.requires_grad_(False)
    return targets, (fused if slices else []), slices


def activation_bytes(config, batch_size: int, seq_len: int, checkpointing: bool, vocab_logits: bool,
                     label: str = "config") -> dict:
    """16-bit activation memory kept for the backward pass (Korthikanti et al. 2022, section 4.1).

    Per transformer layer, no recomputation: s*b*h*(34 + 5*a*s/h) bytes (11sbh + 5as^2b attention, 19sbh MLP,
    4sbh layer norms; written for GPT's 4h MLP with dropout, an approximation for other blocks). With full
    gradient checkpointing each layer keeps only its 16-bit input (2sbh) and one layer is recomputed at a time.
    The fp32 logits the loss needs (4*s*b*V) are added for a model with an LM head.
    """
    s, b = seq_len, batch_size
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
               if not isinstance(getattr(config, k, None), int)]
    if missing:
        raise PlanError(f"{label}: no integer {', '.join(missing)} in the config; the activation formula needs them")
    h, a, n_layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    per_layer = s * b * h * 34 + 5 * a * s * s * b
    layers = n_layers * 2 * s * b * h + per_layer if checkpointing else n_layers * per_layer
    logits = 4 * s * b * config.vocab_size if vocab_logits else 0
    return {"hidden": h, "heads": a, "layers": n_layers, "per_layer_bytes": per_layer, "layers_bytes": layers,
            "logits_bytes": logits, "bytes": layers + logits}


def memory_table(base: int, quant: list[int], lora: int, act16: int) -> dict[str, dict[str, float]]:
    """Bytes of weights, gradients, optimizer states and activations per training method (AdamW: 2 states)."""
    q_params = sum(quant)
    rows = {
        "full-fp32": (4 * base, 4 * base, 8 * base, 2 * act16),
        "full-mixed": (2 * base, 2 * base, 12 * base, act16),
        "lora": (2 * base + 4 * lora, 4 * lora, 8 * lora, act16),
        "qlora": (sum(nf4_bytes(n) for n in quant) + 2 * (base - q_params) + 4 * lora, 4 * lora, 8 * lora, act16),
    }
    return {k: {"weights": w, "grads": g, "optimizer": o, "activations": a, "total": w + g + o + a}
            for k, (w, g, o, a) in rows.items()}


def _assumptions(res: dict) -> list[str]:
    act, q = res["activations"], res["qlora"]
    ckpt = ("with full gradient checkpointing: each layer keeps its 2*s*b*h-byte input, one layer's activations "
            "are recomputed at a time" if act["checkpointing"] else "without recomputation (no checkpointing)")
    return [
        "Counts come from the architecture built on the meta device and lorafit.inject (all params include LoRA's, "
        "as PEFT's print_trainable_parameters does); tied weights count once.",
        "AdamW keeps 2 states (m, v) per trained parameter; GB = 1e9 bytes, MiB = 2**20 bytes.",
        "full fine-tuning, fp32: fp32 weights 4 + fp32 grads 4 + 2 fp32 Adam states 8 = 16 bytes/param; "
        "activations twice the 16-bit figure.",
        "full fine-tuning, mixed precision (ZeRO paper accounting): fp16/bf16 weights 2 + fp16/bf16 grads 2 + "
        "fp32 master copy 4 + 2 fp32 Adam states 8 = 16 bytes/param (master copy counted as optimizer state).",
        "LoRA: frozen base in fp16/bf16 (2 bytes/param, no grads, no optimizer states); the LoRA params in fp32 "
        "with fp32 grads and 2 fp32 Adam states (16 bytes/param).",
        f"QLoRA: the Linear weights of the blocks ({q['quantized_params']:,} params, not the embeddings or LM head) "
        f"in NF4, 4 bits + double-quantized block scales (absmax per {NF4_BLOCK} weights in 8 bits, an fp32 scale "
        f"per {NF4_BLOCK2} of those: 8/64 + 32/16384 = 0.127 bits/param): {q['bits_per_quantized_param']:.3f} "
        "bits/param; the rest (embeddings, norms, biases, head) in bf16; LoRA params as for LoRA.",
        f"Activations (16-bit, Korthikanti et al. 2022, section 4.1): s*b*h*(34 + 5*a*s/h) bytes per layer, "
        f"s={act['seq_len']}, b={act['batch_size']}, h={act['hidden']}, a={act['heads']}, {act['layers']} layers, "
        f"{ckpt}; plus fp32 logits 4*s*b*V for an LM head. Same for every method (LoRA still backpropagates "
        "through the frozen layers); LoRA's own (b, s, r) intermediates are left out. Not counted: temporary "
        "buffers, the CUDA context, allocator fragmentation.",
        f"Adapter file: safetensors, tensors in {res['adapter_file']['dtype']} + JSON header, PEFT's key names.",
    ] + (device_assumptions(res["devices"]) if "devices" in res else []) + res["notes"]


def _notes(source: str, res: dict) -> list[str]:
    """Comparisons with the figures the LoRA and QLoRA papers quote for these presets."""
    name, p, mem = ALIASES.get(source, source), res["params"]["base"], res["memory"]
    if res["fused_slices"]:
        notes = [f"Targets {', '.join(res['fused_slices'])} are d x d slices of the fused c_attn, counted as separate "
                 "(r, d) A and (d, r) B tensors (the LoRA paper's W_q/W_v); lorafit itself trains LoRA on the "
                 "whole c_attn, so these adapter keys are for planning only."]
    else:
        notes = []
    if name == "gpt3-175b":
        notes.append(f"LoRA paper (section 4.2): training VRAM 1.2 TB -> 350 GB; it does not give its accounting. "
                     f"1.2 TB / {p / 1e9:.1f}B params = {1.2e12 / p:.1f} bytes/param fits fp16 weights + 2 fp16 Adam "
                     f"states (6 bytes/param = {6 * p / 1e12:.2f} TB) + ~0.15 TB of activations and buffers, not "
                     f"the 16 bytes/param (fp32 master weights and states) used here: "
                     f"{mem['full-mixed']['total'] / 1e12:.2f} TB. 350 GB is the fp16 weights alone "
                     f"({2 * p / 1e9:.0f} GB): the saving is the optimizer states (and grads) the frozen weights no "
                     f"longer need; LoRA here: {mem['lora']['total'] / 1e9:.0f} GB with activations.")
    if name == "llama-65b":
        notes.append(f"QLoRA paper: LLaMA 65B fine-tuned on one 48 GB GPU (with paged optimizers and gradient "
                     f"checkpointing); planned here: {mem['qlora']['total'] / 1e9:.1f} GB.")
    return notes


def _per_device(config, model: nn.Module, planned: dict, quant: list[int], res: dict, n: int) -> dict:
    """The accounting on `n` devices (plan_devices): the one-device table for one device's rows of the global
    batch, and for the largest block alone (FSDP gathers its full weights), in each method's format."""
    a, p = res["activations"], res["params"]
    act = activation_bytes(config, math.ceil(a["batch_size"] / n), a["seq_len"], a["checkpointing"],
                           a["logits_bytes"] > 0, res["config"])
    try:
        block = largest_block(model, planned)
    except AnatomyError as err:
        raise PlanError(f"{res['config']}: {err}; the per-device accounting needs the model's blocks") from None
    mine = memory_table(p["base"], quant, p["trainable"], act["bytes"])
    gathered = memory_table(block["params"], block["quantized"], block["lora"], 0)
    return device_plan(n, a["batch_size"], act, block, res["memory"], mine, gathered)


def plan(source: str, r: int = 8, alpha: float | None = None, targets: list[str] | None = None, batch_size: int = 1,
         seq_len: int = 512, adapter_dtype: str = "fp32", checkpointing: bool = False, devices: int = 1) -> dict:
    """Parameters, adapter file size and training memory of LoRA on `source`, without loading any weights.

    `targets` as in LoraConfig (suffixes, or ["all-linear"]); None: the query and value projections, the LoRA
    paper's choice (section 7.1). On a GPT-2-style fused c_attn, "q", "k", "v" plan a slice each (see
    FUSED_SLICES). `adapter_dtype`: "fp32", "fp16" or "bf16". `devices` > 1 adds each device's share when that
    many processes train data-parallel (DDP and FSDP; `batch_size` is then the global batch).
    """
    if adapter_dtype not in DTYPE_BYTES:
        raise PlanError(f"adapter_dtype must be one of {', '.join(DTYPE_BYTES)}, got {adapter_dtype!r}")
    if batch_size < 1 or seq_len < 1 or devices < 1:
        raise PlanError(f"batch_size, seq_len and devices must be >= 1, got {batch_size}, {seq_len} and {devices}")
    config, label = load_config(source)
    model = build_meta(config)
    base = sum(p.numel() for p in model.parameters())
    q_params, quant = _quantizable(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets, fused, slices = _inject_targets(model, targets, r, alpha)
    planned = _slice_shapes(fused, slices, r)  # not injected: counted from shapes
    shapes = {**_lora_shapes(model), **planned}
    sliced = sum(math.prod(s) for s in planned.values())
    every = sum(p.numel() for p in model.parameters()) + sliced
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) + sliced
    act = activation_bytes(config, batch_size, seq_len, checkpointing, head is not None, label)
    res = {
        "source": source, "config": label, "model_class": type(model).__name__, "model_type": config.model_type,
        "lora": {"r": r, "alpha": LoraConfig(r=r).alpha if alpha is None else alpha, "targets": targets,
                 "adapted": len(list(lora_layers(model))) + len(fused) * len(slices)},
        "fused_slices": slices,
        "params": {"trainable": trainable, "all": every, "base": base, "trainable_pct": 100 * trainable / every,
                   "peft_line": f"trainable params: {trainable:,} || all params: {every:,} || "
                                f"trainable%: {100 * trainable / every:.4f}"},
        "adapter_file": safetensors_bytes(shapes, adapter_dtype),
        "base_file_fp16_bytes": 2 * base,
        "qlora": {"quantized_params": q_params, "bits_per_quantized_param":
                  8 * sum(nf4_bytes(n) for n in quant) / max(q_params, 1)},
        "activations": {"batch_size": batch_size, "seq_len": seq_len, "checkpointing": checkpointing, **act},
        "memory": memory_table(base, quant, trainable, act["bytes"]),
    }
    res["notes"] = _notes(source, res)
    if devices > 1:
        res["devices"] = _per_device(config, model, planned, quant, res, devices)
        res["notes"] += device_notes(res["devices"])
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        res["notes"].append(f"seq_len {seq_len} is beyond the model's max_position_embeddings {max_pos}.")
    res["assumptions"] = _assumptions(res)
    return res
