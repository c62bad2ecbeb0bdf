"""Model surgery: find the modules a LoraConfig names, swap them for LoRA layers, freeze the rest.

Plain functions over any nn.Module. The model keeps its class and its state-dict keys; LoRA layers add
`<module>.lora.<adapter>.lora_A / lora_B`. The configs of the adapters a model carries live in
`model.lora_configs` (adapter name -> LoraConfig), the one in use in `model.lora_active`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch import nn

from .anatomy import block_index, output_head
from .config import LoraConfig
from .init import changed_base, from_base, init_from_base, original_weight, refusal, restore_base
from .lora import LoraEmbedding, LoraLayer, LoraLinear
from .packed import PackedLinear, PackedWeight


class TargetError(ValueError):
    """A LoraConfig that names no module of the model, or a module LoRA cannot wrap."""


def module_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (GPT-2's transposed Linear) or 'embedding' when LoRA can wrap `module`, else None."""
    if isinstance(module, (nn.Linear, PackedLinear)):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer of the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, skipping the insides of LoRA layers (their A/B holders are never targets)."""
    inside = []
    for name, module in model.named_modules():
        if name and any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoraLayer):
            inside.append(name)
        yield name, module


def name_matches(name: str, names: list[str]) -> bool:
    """PEFT's rule for a list: the module name equals an entry or ends with '.' + entry."""
    return any(name == n or name.endswith("." + n) for n in names)


def find_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Names of the modules `cfg.targets` selects, checked: each must be a Linear, Conv1D or Embedding."""
    head = output_head(model)  # "all-linear" leaves the output projection out, as PEFT does
    chosen = []
    for name, module in _base_modules(model):
        if not name:
            continue
        if cfg.targets == "all-linear":
            hit = module_kind(module) in ("linear", "conv1d") and module is not head
        elif isinstance(cfg.targets, str):
            hit = re.fullmatch(cfg.targets, name) is not None
        else:
            hit = name_matches(name, cfg.targets)
        if hit and cfg.layers is not None and block_index(name) not in cfg.layers:
            hit = False
        if not hit:
            continue
        if module_kind(module) is None and not isinstance(module, LoraLayer):
            packed = isinstance(getattr(module, "weight", None), PackedWeight)
            hint = "; its weight is packed (quantized): leave it unpacked to adapt it" if packed else ""
            raise TargetError(f"module {name!r} ({type(module).__name__}) matches targets {cfg.targets!r}, "
                              f"but LoRA can only wrap nn.Linear, transformers' Conv1D and nn.Embedding{hint}")
        chosen.append(name)
    if not chosen:
        candidates = sorted({n.split(".")[-1] for n, m in _base_modules(model) if module_kind(m) or
                             isinstance(m, LoraLayer)})
        layers = f" in layers {cfg.layers}" if cfg.layers is not None else ""
        raise TargetError(f"targets {cfg.targets!r} match no module of {type(model).__name__}{layers}; "
                          f"modules LoRA can wrap: {', '.join(candidates) or 'none'}")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _wrap(module: nn.Module) -> LoraLayer:
    if isinstance(module, LoraLayer):
        return module
    kind = module_kind(module)
    return LoraEmbedding(module) if kind == "embedding" else LoraLinear(module, fan_in_fan_out=kind == "conv1d")


def inject(model: nn.Module, cfg: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to the modules `cfg` targets, make it the active one, freeze everything else.

    In place; returns the model. The output is unchanged right after (one factor of ΔW = BA starts at zero; or,
    for init pissa / olora, the targeted base weights become the residual W0 - scale·B·A: lorafit.core.init).
    Trainable afterwards: this adapter's A and B, the biases `cfg.bias` names, and `cfg.modules_to_save`.
    """
    configs = getattr(model, "lora_configs", {})
    if name in configs:
        raise ValueError(f"the model already has an adapter named {name!r}; pick another name or delete it first")
    targets = find_targets(model, cfg)
    save = modules_to_save(model, cfg.modules_to_save)
    _check_base_inits(model, targets, cfg)
    for target in targets:
        module = model.get_submodule(target)
        layer = _wrap(module)
        layer.add_adapter(name, cfg.rank_of(target), cfg.scale_of(target), cfg.dropout, cfg.init, cfg.variant)
        if from_base(cfg.init):
            init_from_base(layer, name, cfg.init)
        layer.train(module.training)  # the new modules follow the mode of what they wrap: no dropout in eval()
        replace_module(model, target, layer)
    model.lora_configs = {**configs, name: cfg}
    _keep_originals(model, save)
    set_adapter(model, name)
    _freeze_all_but(model, name, cfg, save)
    return model


def _check_base_inits(model: nn.Module, targets: list[str], cfg: LoraConfig) -> None:
    """TargetError, before anything changes, when an adapter would share a layer with one that rewrote its base
    weight (the other's base would be the wrong one), or init pissa / olora cannot decompose a target."""
    init = cfg.init
    if from_base(init) and cfg.variant != "lora":
        raise TargetError(f"init {init} starts plain LoRA only, not the {cfg.variant} variant")
    for target in targets:
        module = model.get_submodule(target)
        held = list(module.lora) if isinstance(module, LoraLayer) else []
        changed = [other for other in held if changed_base(module, other)]
        if changed:
            raise TargetError(f"adapter {changed[0]!r} rewrote the base weight of {target!r} as a residual (init "
                              "pissa / olora): it must be that module's only adapter; delete it first")
        if not from_base(init):
            continue
        if held:
            raise TargetError(f"init {init} rewrites the base weight of {target!r}, which adapter {held[0]!r} also "
                              "uses: add it to a model without adapters on those modules")
        problem = refusal(module if isinstance(module, LoraLayer) else _wrap(module), target, init, cfg.r)
        if problem:
            raise TargetError(problem)


def _keep_originals(model: nn.Module, modules: list[nn.Module]) -> None:
    """Copy the base values of modules trained in full (modules_to_save), once: `disabled` puts them back.

    `model.lora_originals` maps a parameter's name to its base value; a plain attribute, not in the state dict.
    """
    originals = getattr(model, "lora_originals", {})
    chosen = {id(m) for m in modules}
    for path, module in model.named_modules():
        if id(module) in chosen:
            for pname, param in module.named_parameters(prefix=path):
                originals.setdefault(pname, param.detach().clone())
    model.lora_originals = originals


def modules_to_save(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules `names` select to train in full and save with the adapter; TargetError when names match none."""
    found = [m for n, m in _base_modules(model) if n and name_matches(n, names)]
    if names and not found:
        raise TargetError(f"modules_to_save {names!r} match no module of {type(model).__name__}")
    return found


def _freeze_all_but(model: nn.Module, name: str, cfg: LoraConfig, save: list[nn.Module]) -> None:
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        if name in layer.lora:
            layer.lora[name].requires_grad_(True)
            if cfg.bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
    if cfg.bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and ".lora." not in pname:
                param.requires_grad_(True)
    for module in save:
        module.requires_grad_(True)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one every LoRA layer adds (None: base behaviour everywhere)."""
    if name is not None and name not in getattr(model, "lora_configs", {}):
        raise KeyError(f"no adapter named {name!r}; the model has: {adapter_names(model)}")
    for _, layer in lora_layers(model):
        if layer.merged is not None and layer.merged != name:
            raise RuntimeError(f"adapter {layer.merged!r} is merged into the weights; call lorafit.unmerge first")
        layer.active = name if name in layer.lora else None
    model.lora_active = name


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters the model carries."""
    return list(getattr(model, "lora_configs", {}))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers left with no adapter become plain base modules again."""
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; the model has: {adapter_names(model)}")
    for layer_name, layer in list(lora_layers(model)):
        if layer.merged == name:
            raise RuntimeError(f"adapter {name!r} is merged into {layer_name}; call lorafit.unmerge first")
        if name in layer.lora:
            if changed_base(layer, name):
                restore_base(layer, name)  # W0 back: the layer's next adapter (or none) sees the original weight
            del layer.lora[name]
        if len(layer.lora) == 0:
            replace_module(model, layer_name, layer.to_base())
    model.lora_configs = {k: v for k, v in model.lora_configs.items() if k != name}
    if getattr(model, "lora_active", None) == name:
        set_adapter(model, next(iter(model.lora_configs), None))


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model behaves as the base model; the adapters are kept and come back after.

    Modules an adapter trains in full (modules_to_save, such as a classifier's head) hold their base values inside
    the block, as with PEFT's disable_adapter: a "base" score never uses a trained head. A weight the active adapter
    rewrote as a residual (init pissa / olora) holds W0 inside the block, where PEFT would compute with the residual.
    """
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer.merged for layer in layers if layer.merged is not None]
    if merged:
        raise RuntimeError(f"adapter {merged[0]!r} is merged into the weights; call lorafit.unmerge first")
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head is found under its own name too
    trained = {}
    for layer in layers:
        layer.disabled = True
    residuals = [(layer, layer.weight.data) for layer in layers if changed_base(layer, layer.active or "")]
    for layer, _ in residuals:
        layer.weight.data = original_weight(layer, layer.active)
    for key, original in getattr(model, "lora_originals", {}).items():
        trained[key], params[key].data = params[key].data, original.to(params[key].device, params[key].dtype)
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer, residual in residuals:
            layer.weight.data = residual
        for key, value in trained.items():
            params[key].data = value


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for everything that trains, in a stable order (the optimizer's and the checkpoint's)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainable_report(model: nn.Module) -> str:
    """'trainable params: N || all params: M || trainable%: P' (the line PEFT prints, for comparison).

    A quantized base weight counts as its logical (out x in) parameters, however it is stored.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.shape.numel() for m in model.modules() if isinstance(m, PackedWeight))
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
