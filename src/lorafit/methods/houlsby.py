"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", section 2.1).

An adapter maps a sublayer's output h (..., d) to

    h + W_up · gelu(W_down · h + b_down) + b_up          W_down (m, d), W_up (d, m), bottleneck m ≪ d

and sits after each block's attention sublayer and after its feed-forward sublayer, before the residual add
(in BERT: after the output projection, before its dropout + LayerNorm; that is the paper's Figure 2). Each adapter
has 2·d·m + d + m parameters, two per block.

How it attaches without touching the base: the adapter is a child module named `houlsby` of the sublayer whose
output it transforms (`model.layers.3.mlp.houlsby.down.weight`), and a forward hook on that sublayer applies it.
No base module is wrapped or renamed, so every base state-dict key stays as it was and the adapter's keys are
extra: a base checkpoint still loads (strict=False only for the new keys). Unlike LoRA's ΔW = BA, an adapter can
never be folded into the base weights (the GELU sits between its two projections), so every forward pass pays
for two extra matrix products per adapter: the inference latency `lorafit bench latency` measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Method, MethodError, register
from .select import train_head

ADAPTER = "houlsby"  # the child-module name: parameters are `<sublayer>.houlsby.{down,up}.{weight,bias}`
DOWN_STD = 1e-2  # the paper's init: zero-mean Gaussian, std 1e-2, truncated at two standard deviations

# Default targets, tried in order; a set applies when each of its names is found in the model's blocks.
DEFAULT_TARGETS = {
    "llama-like": ["self_attn", "mlp"],  # Llama, SmolLM2, Mistral, Qwen2: outputs go straight to the residual add
    "gpt2": ["attn", "mlp"],  # GPT-2: the attention's c_proj (+ dropout) and the MLP's, before the residual add
    "bert": ["attention.output.dense", "output.dense"],  # BERT: the dense before dropout + LayerNorm
}


class HoulsbyAdapter(nn.Module):
    """One bottleneck adapter h -> h + up(gelu(down(h))), for hidden states of size `dim`."""

    def __init__(self, dim: int, bottleneck: int, generator: torch.Generator):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)  # W_down (m, d), b_down (m)
        self.up = nn.Linear(bottleneck, dim)  # W_up (d, m), b_up (d)
        with torch.no_grad():
            # Small down-projection, zero up-projection: the adapter starts as the identity, so training starts
            # exactly at the base model (the paper's near-identity init, made exact), and W_up still gets a
            # gradient at step 0 because gelu(W_down h) is non-zero (W_down gets one once W_up has moved).
            nn.init.trunc_normal_(self.down.weight, std=DOWN_STD, a=-2 * DOWN_STD, b=2 * DOWN_STD,
                                  generator=generator)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> h + up(gelu(down(h))) (..., d), in h's dtype.

        Under autocast h is left as it comes (autocast picks the matmul dtype: bf16 activations meet fp32
        adapter weights in bf16). Without it h is cast to the adapter's dtype and the update cast back.
        """
        if h.shape[-1] != self.down.in_features:
            raise MethodError(f"Houlsby adapter expects hidden states of size {self.down.in_features}, got shape "
                              f"{tuple(h.shape)}; give `targets` whose output is the residual stream")
        x = h if torch.is_autocast_enabled(h.device.type) else h.to(self.down.weight.dtype)
        z = F.gelu(self.down(x))  # (..., m)
        return h + self.up(z).to(h.dtype)  # (..., d); a zero W_up and b_up give back h bit for bit


def _apply_adapter(module: nn.Module, args: tuple, output):
    """Forward hook: pass the sublayer's hidden-state output through its adapter (tuple outputs: the first item)."""
    adapter = module._modules[ADAPTER]
    if isinstance(output, torch.Tensor):
        return adapter(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (adapter(output[0]), *output[1:])  # attention returns (hidden, attention weights)
    raise MethodError(f"{type(module).__name__} returned {type(output).__name__}; a Houlsby adapter needs a tensor "
                      "or a tuple whose first item is the hidden state")


def matches(name: str, target: str) -> bool:
    """True when module `name` is `target` inside a block: the name is the target, or ends with `.<index>.<target>`.

    Anchoring at the block index keeps BERT's `output.dense` (layer.3.output.dense) apart from
    `attention.output.dense` (layer.3.attention.output.dense), which a plain suffix match would confuse.
    """
    if name == target:
        return True
    if not name.endswith("." + target):
        return False
    return name[: -len(target) - 1].rpartition(".")[2].isdigit()


def _in_block_names(model: nn.Module) -> list[str]:
    """Module paths inside the first block (after the first index: `self_attn`, `mlp.down_proj`), for errors."""
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is not None and parts[index] == "0" and index + 1 < len(parts):
            names.append(".".join(parts[index + 1:]))
    return list(dict.fromkeys(names))


def houlsby_targets(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Paths of the sublayers that get an adapter: `targets` (paths inside a block, see `matches`), or the
    architecture's default (DEFAULT_TARGETS). An unknown architecture is an error listing candidate names."""
    names = [n for n, _ in model.named_modules() if n and f".{ADAPTER}." not in f".{n}."]
    if targets is not None:
        if isinstance(targets, str) or not targets:
            raise MethodError(f"Houlsby targets must be a non-empty list of module names, got {targets!r}")
        for target in targets:
            if not any(matches(n, target) for n in names):
                raise MethodError(f"Houlsby target {target!r} matches no module of {type(model).__name__}; "
                                  f"module names inside a block: {', '.join(_in_block_names(model)) or 'none'}")
        return [n for n in names if any(matches(n, t) for t in targets)]
    for chosen in DEFAULT_TARGETS.values():
        found = [[n for n in names if matches(n, t)] for t in chosen]
        if all(found) and len({len(f) for f in found}) == 1:  # every name, once per block
            return [n for n in names if any(matches(n, t) for t in chosen)]
    known = "; ".join(f"{arch}: {', '.join(t)}" for arch, t in DEFAULT_TARGETS.items())
    raise MethodError(f"{type(model).__name__}: no default Houlsby targets ({known}); pass `targets`, a list of "
                      "the attention and MLP sublayers' names inside a block (their outputs must be the residual "
                      f"stream). Module names inside a block: {', '.join(_in_block_names(model)) or 'none'}")


def _output_size(model: nn.Module, module: nn.Module) -> int:
    """d: the sublayer's output width (a Linear's or GPT-2 Conv1D's own, else the model's hidden size)."""
    for attr in ("out_features", "nf"):  # nn.Linear (and LoRA layers), transformers' Conv1D
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise MethodError(f"cannot tell the hidden size of {type(model).__name__} (no config.hidden_size); "
                          "target Linear layers whose output is the residual stream")
    return size


def add_houlsby(model: nn.Module, bottleneck: int = 64, targets: list[str] | None = None, seed: int = 0,
                dtype: torch.dtype | None = None) -> list[str]:
    """Add a Houlsby adapter after every target sublayer (default: attention and MLP of every block); in place.

    bottleneck: m, the adapter's inner width, the capacity/size trade-off (the paper tries 8, 64 and 256 on GLUE).
    seed: the down-projections' init (drawn on the CPU in module order, so the same on any device). dtype: the
    adapter's (default: the sublayer's weights'). The model's output is unchanged right after (W_up = 0). The
    adapters' parameters require grad; nothing else is frozen here. Everything is checked before the model is
    touched. Returns the paths of the sublayers that got an adapter.
    """
    if bottleneck < 1:
        raise MethodError(f"Houlsby bottleneck must be >= 1, got {bottleneck}")
    present = [n for n, m in model.named_modules() if isinstance(m, HoulsbyAdapter)]
    if present:
        raise MethodError(f"the model already has Houlsby adapters (e.g. {present[0]}); call remove_houlsby first")
    paths = houlsby_targets(model, targets)
    sizes = [_output_size(model, model.get_submodule(path)) for path in paths]
    for path in paths:
        if hasattr(model.get_submodule(path), ADAPTER):
            raise MethodError(f"module {path!r} already has an attribute {ADAPTER!r}; it cannot take an adapter")
    gen = torch.Generator().manual_seed(seed)
    fallback = next(model.parameters())
    for path, size in zip(paths, sizes):
        module = model.get_submodule(path)
        like = next(module.parameters(), fallback)  # device and default dtype follow the sublayer's weights
        adapter = HoulsbyAdapter(size, bottleneck, gen)
        module.add_module(ADAPTER, adapter.to(device=like.device, dtype=dtype or like.dtype))
        module.register_forward_hook(_apply_adapter)
    return paths


def remove_houlsby(model: nn.Module) -> None:
    """Remove every Houlsby adapter and its hook: the model is the base again (a no-op without adapters)."""
    for module in list(model.modules()):  # a list: the loop deletes children
        if not isinstance(module._modules.get(ADAPTER), HoulsbyAdapter):
            continue
        # By function rather than by handle: a handle would point at the original after copy.deepcopy(model).
        for key, hook in list(module._forward_hooks.items()):
            if hook is _apply_adapter:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        del module._modules[ADAPTER]


def houlsby_parameter_count(model: nn.Module) -> int:
    """Parameters in the model's Houlsby adapters (layers × targets × (2·d·m + d + m))."""
    return sum(p.numel() for m in model.modules() if isinstance(m, HoulsbyAdapter) for p in m.parameters())


def _setup(model: nn.Module, options, lora) -> None:
    model.requires_grad_(False)
    _add(model, options)  # the adapters' parameters train
    train_head(model)


def _add(model: nn.Module, options) -> None:
    add_houlsby(model, bottleneck=options.bottleneck)


register(Method("adapter", "Houlsby bottleneck adapters after attention and MLP (Houlsby et al. 2019)",
                setup=_setup, add_modules=_add, remove_modules=remove_houlsby, mergeable=False))
