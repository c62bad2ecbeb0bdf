"""Virtual tokens: prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021).

prompt  n trainable vectors P (n, H) go in front of the input embeddings: the model reads [P; E[ids]] and only P
        trains. Works for any model that accepts `inputs_embeds` (causal LMs, BERT-like classifiers).
prefix  n trainable keys and values go in front of every attention layer's own keys and values: each real token
        also attends to them. They are handed to the model as an already filled key/value cache (the mechanism that
        holds a prompt's keys during generation), so no attention layer is rewritten: any decoder whose forward
        takes `past_key_values` works, and positions line up by themselves (the real tokens start at position n,
        in training and in generation alike).

Both live in one child module, `model.lorafit_virtual`; the base state-dict keys do not change. Every place a
batch meets the model (training loss, evaluation, generation) passes it through `virtual_inputs` (by way of
`lorafit.methods.model_inputs`), a no-op for a model without virtual tokens.

Initialisation (init="vocab", the default): prompt vectors are copies of the embeddings of n random vocabulary
tokens, Lester et al.'s better-performing init (§3.2, "sampled vocab"); prefix keys/values are the ones the
model itself computes for n random vocabulary tokens, in the spirit of Li & Liang's init from real words (§7.2),
so training starts from a prefix the model could have seen. init="random": Gaussian noise at the scale of those
embeddings / keys / values. Li & Liang's MLP reparameterisation of the prefix is not used: the vectors train
directly, as in P-tuning v2.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..core.anatomy import head_of
from .registry import Method, MethodError, register
from .select import train_head

VIRTUAL = "lorafit_virtual"  # the child module's name on the top-level model (parameters: lorafit_virtual.*)
KINDS = ("prefix", "prompt")
INITS = ("vocab", "random")
IGNORE = -100  # label of a position that carries no loss (the virtual positions)


class VirtualTokens(nn.Module):
    """The trainable virtual tokens of one model: `prompt` (n, H), or per layer `keys.i` / `values.i`
    (kv_heads, n, head_dim), the layout of one sequence in a transformers cache."""

    def __init__(self, kind: str, n: int, prompt: torch.Tensor | None = None,
                 kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None, init_tokens: list[int] | None = None):
        super().__init__()
        self.kind, self.n = kind, n
        self.init_tokens = init_tokens  # the vocabulary tokens init="vocab" started from (None for random)
        if kind == "prompt":
            self.prompt = nn.Parameter(prompt.detach().float().clone())  # (n, H)
        else:
            self.keys = nn.ParameterList([nn.Parameter(k.detach().float().clone()) for k, _ in kv])
            self.values = nn.ParameterList([nn.Parameter(v.detach().float().clone()) for _, v in kv])

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n={self.n}"

    def cache(self, batch: int, dtype: torch.dtype, config):
        """A fresh DynamicCache holding the prefix for `batch` sequences (fresh each call: the model appends to it)."""
        from transformers import DynamicCache  # heavy (seconds to import): only this path needs it

        cache = DynamicCache(config=config)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            size = (batch, -1, -1, -1)
            cache.update(k.to(dtype)[None].expand(size), v.to(dtype)[None].expand(size), i)  # (B, kv, n, d)
        return cache


def virtual_tokens_of(model: nn.Module) -> VirtualTokens | None:
    """The model's virtual tokens, or None when it has none."""
    virtual = getattr(model, VIRTUAL, None)
    return virtual if isinstance(virtual, VirtualTokens) else None


def add_virtual_tokens(model: nn.Module, kind: str, n: int = 16, init: str = "vocab", seed: int = 0) -> VirtualTokens:
    """Register n virtual tokens of `kind` ("prompt" or "prefix") as `model.lorafit_virtual`; returns the module.

    The new parameters are fp32 and require grad; nothing else about the model changes (freezing the base is
    the caller's job). `seed` picks the init tokens / noise, so the same options rebuild the same module.
    """
    if kind not in KINDS or init not in INITS:
        raise MethodError(f"virtual tokens: kind must be one of {KINDS} and init one of {INITS}, "
                          f"got kind={kind!r}, init={init!r}")
    if not isinstance(n, int) or n < 1:
        raise MethodError(f"{kind}: the number of virtual tokens must be a positive integer, got {n!r}")
    if hasattr(model, VIRTUAL):
        raise MethodError(f"{type(model).__name__} already has virtual tokens ({VIRTUAL}); remove them first")
    _check_supported(model, kind)
    gen = torch.Generator().manual_seed(seed)
    embedding = model.get_input_embeddings().weight  # (V, H)
    tokens = torch.randint(0, embedding.shape[0], (n,), generator=gen)  # (n,)
    if kind == "prompt":
        prompt = embedding.detach()[tokens.to(embedding.device)].float().cpu()  # (n, H)
        if init == "random":
            prompt = torch.randn(prompt.shape, generator=gen) * embedding.detach().float().std()
        module = VirtualTokens(kind, n, prompt=prompt, init_tokens=tokens.tolist() if init == "vocab" else None)
    else:
        kv = _model_kv(model, tokens[None].to(embedding.device))
        if init == "random":
            kv = [(torch.randn(k.shape, generator=gen) * k.float().std(),
                   torch.randn(v.shape, generator=gen) * v.float().std()) for k, v in kv]
        module = VirtualTokens(kind, n, kv=kv, init_tokens=tokens.tolist() if init == "vocab" else None)
    model.add_module(VIRTUAL, module.to(embedding.device))
    return module


def remove_virtual_tokens(model: nn.Module) -> bool:
    """Take the virtual tokens off `model` (the model is then exactly as before); False when it had none."""
    if virtual_tokens_of(model) is None:
        return False
    delattr(model, VIRTUAL)
    return True


def _check_supported(model: nn.Module, kind: str) -> None:
    """Refuse, with the reason, a model the method cannot drive correctly."""
    name = f"{type(model).__name__} ({getattr(getattr(model, 'config', None), 'model_type', '?')})"
    params = inspect.signature(model.forward).parameters
    if kind == "prompt":
        if "inputs_embeds" not in params or not hasattr(model, "get_input_embeddings"):
            raise MethodError(f"prompt tuning needs a model whose forward takes inputs_embeds; {name} does not")
        if head_of(model) == "score":  # transformers' decoder classifiers pool the last non-padding token
            raise MethodError(f"prompt tuning: {name} classifies from the last non-padding token, which it finds "
                              "from input_ids and cannot find from inputs_embeds; use prefix, lora or adapter")
        return
    config = getattr(model, "config", None)
    if cache_argument(model) is None or getattr(config, "is_encoder_decoder", False):
        raise MethodError(f"prefix tuning needs a decoder-only model whose forward takes a key/value cache "
                          f"(cache or past_key_values); {name} does not; use prompt, lora or adapter")


def cache_argument(model: nn.Module) -> str | None:
    """The name the model's forward takes its key/value cache under: `cache` (transformers 5.24 on) or
    `past_key_values` (before); None when it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@torch.no_grad()
def _model_kv(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (kv_heads, n, head_dim): what the model caches for the tokens `ids` (1, n).

    Running the model gives the cache layout (heads, head size, number of layers) of any architecture for free.
    """
    from transformers import Cache  # heavy (seconds to import): only this path needs it

    was_training = model.training
    model.eval()  # no dropout in the init
    try:
        output = model(input_ids=ids, use_cache=True)
        cache = output.get("cache", output.get("past_key_values"))
    finally:
        model.train(was_training)
    layers = getattr(cache, "layers", None) if isinstance(cache, Cache) else None
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise MethodError(f"prefix tuning: {type(model).__name__} returned no key/value cache for every layer "
                          "(use_cache=True); use prompt, lora or adapter")
    return [(layer.keys[0], layer.values[0]) for layer in layers]


def _kv_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype of the keys the attention layers will compute: autocast's when it is on, else the base's.

    (Where autocast leaves some keys wider, e.g. Llama's RoPE in fp32 on an fp32 base, the cache's torch.cat
    promotes the narrower prefix; the reverse, a wider prefix before narrower keys, would fail in attention.)
    """
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def _checkpointing(model: nn.Module) -> bool:
    """True when transformers' activation (gradient) checkpointing is on (the newer name first; the old warns)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def virtual_inputs(model: nn.Module, batch: dict) -> tuple[dict, int]:
    """(model kwargs, drop) for `batch` (input_ids, attention_mask, optional labels / token_type_ids /
    position_ids): the virtual tokens put in; `drop` = the leading output positions that are virtual (n for
    prompt, 0 for prefix). Without virtual tokens: (batch, 0) unchanged.

    prompt: inputs_embeds = [P; E[ids]], the mask gets n ones in front, token labels n IGNOREs (so the last
    virtual position predicts the first real token, as in the model's own loss); class labels are unchanged.
    prefix: input_ids stay; the cache argument = a fresh cache holding the prefix; the mask gets n ones in front.
    """
    virtual = virtual_tokens_of(model)
    if virtual is None:
        return batch, 0
    ids = batch["input_ids"]  # (B, T)
    b, n = ids.shape[0], virtual.n
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    out = {key: value for key, value in batch.items() if key != "input_ids"}
    out["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], dim=1)  # (B, n + T)
    if "position_ids" in batch:  # the real tokens come after the n virtual positions
        out["position_ids"] = batch["position_ids"] + n
    if virtual.kind == "prefix":
        if model.training and _checkpointing(model):
            raise MethodError("prefix tuning cannot train with gradient checkpointing: transformers drops the "
                              "key/value cache, which holds the prefix, inside checkpointed layers; set "
                              "train.checkpointing: false")
        out["input_ids"] = ids
        out[cache_argument(model)] = virtual.cache(b, _kv_dtype(model, ids.device), model.config)
        return out, 0
    embeds = model.get_input_embeddings()(ids)  # (B, T, H)
    prompt = virtual.prompt.to(embeds.dtype)[None].expand(b, -1, -1)  # (B, n, H); grads reach the fp32 P
    out["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, H)
    labels = batch.get("labels")
    if labels is not None and labels.shape == ids.shape:  # token labels; class labels (B,) stay
        out["labels"] = torch.cat([labels.new_full((b, n), IGNORE), labels], dim=1)  # (B, n + T)
    if "token_type_ids" in batch:
        out["token_type_ids"] = torch.cat([batch["token_type_ids"].new_zeros(b, n), batch["token_type_ids"]], 1)
    if "position_ids" in batch:
        virtual_positions = torch.arange(n, device=ids.device).expand(b, n)  # (B, n)
        out["position_ids"] = torch.cat([virtual_positions, out["position_ids"]], dim=1)  # (B, n + T)
    return out, n


def _setup(model: nn.Module, options, lora) -> None:
    model.requires_grad_(False)
    _add(model, options)  # the virtual tokens train
    train_head(model)


def _add(model: nn.Module, options) -> None:
    add_virtual_tokens(model, options.name, n=options.virtual_tokens)


register(Method("prefix", "trainable keys/values prepended at every layer (Li & Liang 2021)", setup=_setup,
                add_modules=_add, remove_modules=remove_virtual_tokens, mergeable=False))
register(Method("prompt", "trainable input embeddings prepended to the sequence (Lester et al. 2021)", setup=_setup,
                add_modules=_add, remove_modules=remove_virtual_tokens, mergeable=False))
