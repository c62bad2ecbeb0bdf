"""The adapters a serving engine knows (name -> folder) and the ones held in memory, least recently used first.

An adapter in memory sits in one slot of the model's banks (lorafit.core.mixed); at most `max_adapters` do.
Asking for one that is not in memory loads it from its folder into a free slot, evicting the least recently
used adapter that no running request needs. Everything here runs on the engine thread.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..core import delete_adapter, load_adapter, read_adapter
from ..core.mixed import attach_banks, clear_slot, fill_slot
from ..methods import METHOD_CONFIG, is_method_folder


class AdapterError(ValueError):
    """An adapter folder the server cannot serve; the message names the folder and why."""


def check_servable(path: str | Path) -> None:
    """AdapterError unless `path` is a LoRA adapter folder whose rows can be mixed in one batch."""
    path = Path(path)
    if is_method_folder(path):
        raise AdapterError(f"{path}: a {METHOD_CONFIG} result of another fine-tuning method, not a LoRA adapter; "
                           "serve LoRA adapters, or merge a mergeable result (`lorafit merge`) and serve the "
                           "merged model")
    try:
        cfg, _ = read_adapter(path)
    except ValueError as err:
        raise AdapterError(str(err)) from None
    if cfg.modules_to_save or cfg.bias != "none":
        what = "modules_to_save" if cfg.modules_to_save else f"bias={cfg.bias!r}"
        raise AdapterError(f"{path}: the adapter also trains base weights ({what}); those cannot differ per row "
                           "of a batch. Merge it (`lorafit merge`) and serve the merged model")


class AdapterStore:
    def __init__(self, model: nn.Module, max_adapters: int, dtype: torch.dtype):
        if max_adapters < 1:
            raise ValueError(f"--max-adapters must be >= 1, got {max_adapters}")
        self.model, self.max_adapters = model, max_adapters
        self.routing = attach_banks(model, max_adapters + 1, dtype)
        self.paths: dict[str, Path] = {}  # every adapter the server knows
        self.resident: OrderedDict[str, int] = OrderedDict()  # in memory: name -> slot, least recent first
        self.loads = 0  # loads from disk, first loads and reloads after eviction

    def register(self, name: str, path: str | Path, load: bool = True, busy: set[str] | None = None) -> None:
        """Know adapter `name` at `path`; with `load`, load it now (a bad folder fails here, not at a request).

        `busy`: the adapters running requests use (`Engine.busy_adapters()`), which loading must not evict; when
        every slot holds one of them, the adapter loads later, when a request asks for it and a slot is free.
        """
        check_servable(path)
        self.paths[name] = Path(path)
        if load:
            try:
                self.slot(name, busy=busy or set())
            except Exception:
                del self.paths[name]
                raise

    def unregister(self, name: str, busy: set[str]) -> None:
        """Forget `name`; it leaves memory now, or when the last request using it ends (`release_unknown`)."""
        del self.paths[name]
        if name not in busy:
            self._evict(name)

    def release_unknown(self, busy: set[str]) -> None:
        for name in [n for n in self.resident if n not in self.paths and n not in busy]:
            self._evict(name)

    def slot(self, name: str | None, busy: set[str]) -> int | None:
        """The bank slot of adapter `name` (0: the base model), loading it if needed; None while every slot is
        held by an adapter that running requests need."""
        if name is None:
            return 0
        if name in self.resident:
            self.resident.move_to_end(name)
            return self.resident[name]
        if len(self.resident) >= self.max_adapters:
            victim = next((n for n in self.resident if n not in busy), None)
            if victim is None:
                return None
            self._evict(victim)
        free = min(set(range(1, self.max_adapters + 1)) - set(self.resident.values()))
        self._load(name, free)
        return free

    def _load(self, name: str, slot: int) -> None:
        try:
            load_adapter(self.model, self.paths[name], name=name)
        except ValueError as err:
            raise AdapterError(str(err)) from None
        try:
            fill_slot(self.model, slot, name)
        except (ValueError, KeyError) as err:
            delete_adapter(self.model, name)
            raise AdapterError(f"{self.paths[name]}: {err}") from None
        self.resident[name] = slot
        self.loads += 1

    def _evict(self, name: str) -> None:
        slot = self.resident.pop(name, None)
        if slot is not None:
            clear_slot(self.model, slot)
            delete_adapter(self.model, name)
