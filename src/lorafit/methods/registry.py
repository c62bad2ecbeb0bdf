"""The Method protocol and its registry: each fine-tuning method is one `Method`, registered by its own file.

A method says how to set a model up for training (what it freezes, what it adds, what trains), whether its result
is a PEFT adapter folder or a folder of its own (lorafit.methods.folder), whether that result folds into the base
weights, and what it needs of the run (an optimizer of its own, a base that is not packed). Nothing else in
lorafit branches on a method's name: a new method is a new file that calls `register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import LoraConfig


class MethodError(ValueError):
    """A method that cannot apply to this model; the message says why and what to use instead."""


def _never(options: Any) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """One way to fine-tune. `options` below is the run's MethodConfig (lorafit.methods.config)."""

    name: str
    summary: str  # one line: what trains (shown in docs and errors)
    setup: Callable[[nn.Module, Any, LoraConfig], None]  # freeze the base, make trainable what the method trains
    add_modules: Callable[[nn.Module, Any], None] | None = None  # modules it adds, before training or a load
    remove_modules: Callable[[nn.Module], None] | None = None  # takes those off again (a failed load)
    uses_lora: Callable[[Any], bool] = _never  # trains LoRA adapters: its result is a PEFT adapter folder
    trains_base: Callable[[Any], bool] = _never  # trains base weights, so it cannot run on a packed base
    mergeable: bool = True  # its result folds into the base weights (added layers and inputs do not)
    trains: bool = True  # False for a baseline that scores the frozen model as it is (in-context)
    # Its own optimizer, made from (trainable parameters, lr, weight decay, seed, options); None: AdamW.
    optimizer: Callable[[list[nn.Parameter], float, float, int, Any], torch.optim.Optimizer] | None = None


METHODS: dict[str, Method] = {}  # name -> Method, in the order the method files registered them


def register(method: Method) -> Method:
    """Add `method` to the registry under its name; returns it."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method `name`; MethodError listing the registered ones."""
    if name not in METHODS:
        raise MethodError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def names() -> tuple[str, ...]:
    """The registered methods' names."""
    return tuple(METHODS)
