"""Rows of one batch through different adapters: the base product runs once, each row adds its own B A x.

A LoRA layer's adapters are stacked into a `Bank`: slot 0 is "no adapter" (zeros), slot k holds one adapter's
A.T (in, r) and (scale * B).T (r, out), padded with zeros to the largest rank in the bank (zero rows and columns
add nothing, so adapters of different ranks and alphas share it exactly). A forward pass reads one slot index
per row from the model's `Routing` and computes, for rows i,

    y_i = W0 x_i + x_i @ A_slot(i).T @ (scale B)_slot(i).T

the base product once for the whole batch, the low-rank products per slot (see `Bank`).

    with lorafit.per_row(model, ["sql", None, "chat"]):   # adapters loaded the usual way, by name
        logits = model(input_ids).logits                   # row 1 is the base model

A serving engine keeps banks for the life of the model: `attach_banks`, then `fill_slot` / `clear_slot` as
adapters come and go, and `routing.rows` set before each forward. Banks are plain attributes, never part of the
state dict. They are for inference: no dropout, and no gradient reaches the adapters' parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .lora import LoraEmbedding, LoraLinear, LowRank


class Routing:
    """The slot index of each row of the next forward pass, shared by every bank of a model (None: banks off)."""

    def __init__(self) -> None:
        self._rows: torch.Tensor | None = None
        self.uniform: int | None = None  # the one slot every row uses, when they all use the same
        self._masks: dict[tuple, torch.Tensor] = {}

    @property
    def rows(self) -> torch.Tensor | None:
        return self._rows

    @rows.setter
    def rows(self, rows: torch.Tensor | None) -> None:
        self._rows, self._masks = rows, {}
        self.uniform = int(rows[0]) if rows is not None and len(rows) and bool((rows == rows[0]).all()) else None

    def mask(self, slots: int, r: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, 1, slots * r): ones over each row's own slot, zeros elsewhere (made once per forward)."""
        key = (slots, r, dtype)
        if key not in self._masks:
            own = torch.nn.functional.one_hot(self._rows, slots).to(dtype)  # (batch, slots)
            self._masks[key] = own.repeat_interleave(r, dim=1).unsqueeze(1)
        return self._masks[key]


class Bank:
    """One layer's adapters side by side: a (in, slots, r) and b (slots, r, out), slot 0 all zeros.

    A batch whose rows all use one slot takes that slot's two thin matrices (and slot 0 takes nothing). A mixed
    batch multiplies by every slot at once and keeps each row's own slot with a 0/1 mask: two plain matmuls of
    width slots * r, cheaper on a CPU than gathering a weight copy per row (lorafit bench serve measures it).
    """

    def __init__(self, layer: LoraLinear, slots: int, routing: Routing, dtype: torch.dtype):
        self.routing = routing
        device = layer.weight.device
        self.a = torch.zeros(layer.in_features, slots, 0, dtype=dtype, device=device)
        self.b = torch.zeros(slots, 0, layer.out_features, dtype=dtype, device=device)

    @property
    def rank(self) -> int:
        return self.a.shape[2]

    def grow(self, r: int) -> None:
        """Widen every slot to rank r (zero padding: the products do not change)."""
        if r > self.rank:
            pad = r - self.rank
            self.a = torch.cat([self.a, self.a.new_zeros(self.a.shape[0], self.a.shape[1], pad)], dim=2)
            self.b = torch.cat([self.b, self.b.new_zeros(self.b.shape[0], pad, self.b.shape[2])], dim=1)

    @torch.no_grad()
    def put(self, slot: int, update: LowRank) -> None:
        """Copy one adapter into `slot`: A.T and (scale * B).T, zero-padded to the bank's rank."""
        r = update.lora_A.shape[0]
        self.grow(r)
        self.clear(slot)
        self.a[:, slot, :r] = update.lora_A.T.to(self.a.dtype)
        self.b[slot, :r, :] = (update.lora_B * update.scale).T.to(self.b.dtype)

    def clear(self, slot: int) -> None:
        self.a[:, slot].zero_()
        self.b[slot].zero_()

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (batch, ..., in) -> each row's B A x * scale (batch, ..., out) in the bank's dtype; None when every
        row is on slot 0 (the base model)."""
        routing = self.routing
        if routing.rows.shape[0] != x.shape[0]:
            raise ValueError(f"per-row adapters: {routing.rows.shape[0]} names for a batch of {x.shape[0]} rows")
        if routing.uniform == 0 or self.rank == 0:
            return None
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.a.dtype)  # (batch, tokens, in)
        if routing.uniform is not None:
            out = flat @ self.a[:, routing.uniform] @ self.b[routing.uniform]
        else:
            slots, r = self.b.shape[0], self.rank
            h = flat @ self.a.view(-1, slots * r) * routing.mask(slots, r, self.a.dtype)  # (batch, tokens, slots*r)
            out = h @ self.b.view(slots * r, -1)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _linear_layers(model: nn.Module) -> Iterator[LoraLinear]:
    for module in model.modules():
        if isinstance(module, LoraLinear):
            yield module


def attach_banks(model: nn.Module, slots: int, dtype: torch.dtype) -> Routing:
    """Give every LoRA Linear layer of `model` an empty bank of `slots` slots (slot 0: no adapter); returns the
    routing they share. Layers injected later get theirs from `fill_slot`."""
    routing = Routing()
    model.lora_banks = (routing, slots, dtype)
    for layer in _linear_layers(model):
        layer.bank = Bank(layer, slots, routing, dtype)
    return routing


def detach_banks(model: nn.Module) -> None:
    """Remove every bank: the model is back to its usual one-active-adapter forward."""
    for layer in _linear_layers(model):
        layer.bank = None
    model.__dict__.pop("lora_banks", None)


def fill_slot(model: nn.Module, slot: int, name: str) -> None:
    """Copy adapter `name` (loaded the usual way) into `slot` of every bank; zeros where a layer lacks it."""
    routing, slots, dtype = model.lora_banks
    if not 0 < slot < slots:
        raise ValueError(f"slot {slot} out of range: slots 1..{slots - 1} hold adapters, 0 is the base")
    _check_mixable(model, name)
    for layer in _linear_layers(model):
        if layer.bank is None:  # a layer wrapped after the banks were attached
            layer.bank = Bank(layer, slots, routing, dtype)
        if name in layer.lora:
            layer.bank.put(slot, layer.lora[name])
        else:
            layer.bank.clear(slot)


def clear_slot(model: nn.Module, slot: int) -> None:
    """Empty `slot` in every bank (its rows then get the base output)."""
    for layer in _linear_layers(model):
        if layer.bank is not None:
            layer.bank.clear(slot)


def _check_mixable(model: nn.Module, name: str) -> None:
    """ValueError unless adapter `name` can be mixed per row: plain LoRA on Linear layers, not merged."""
    found = False
    for path, module in model.named_modules():
        if not isinstance(module, (LoraLinear, LoraEmbedding)) or name not in module.lora:
            continue
        found = True
        if isinstance(module, LoraEmbedding):
            raise ValueError(f"adapter {name!r} changes the embedding table {path}; only adapters on Linear "
                             "layers mix per row")
        if type(module.lora[name]) is not LowRank:
            raise ValueError(f"adapter {name!r} on {path} is a {type(module.lora[name]).__name__}; only plain "
                             "LoRA mixes per row (merge it with `lorafit merge` and serve the merged model)")
        if module.merged is not None:
            raise ValueError(f"adapter {module.merged!r} is merged into {path}; call lorafit.unmerge first")
    if not found:
        known = sorted({n for m in _linear_layers(model) for n in m.lora})
        raise KeyError(f"no adapter named {name!r} on this model (it has: {', '.join(known) or 'none'})")


@contextlib.contextmanager
def per_row(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Inside the block, row i of each batch goes through adapter names[i] (None: the base model alone).

    The adapters are the ones loaded onto `model` by name (`load_adapter(model, path, name=...)`); they may
    differ in rank, alpha and target modules. Output row i equals the model run on row i alone with that
    adapter active. For inference (see the module docstring).
    """
    if hasattr(model, "lora_banks"):
        raise RuntimeError("this model already has per-row adapter banks (a serving engine owns it)")
    distinct = sorted({n for n in names if n is not None})
    dtype = next((m.lora[n].lora_A.dtype for m in _linear_layers(model) for n in distinct if n in m.lora),
                 torch.float32)  # the adapters' own dtype, as their usual forward computes
    routing = attach_banks(model, len(distinct) + 1, dtype)
    try:
        for slot, name in enumerate(distinct, start=1):
            fill_slot(model, slot, name)
        slot_of = {name: slot for slot, name in enumerate(distinct, start=1)}
        device = next(model.parameters()).device
        routing.rows = torch.tensor([slot_of.get(n, 0) for n in names], device=device)
        yield
    finally:
        detach_banks(model)
