"""LoRA as a method: a low-rank ΔW = BA on the chosen Linear layers (lorafit's core), saved as PEFT adapter files."""

from __future__ import annotations

from ..core.surgery import inject
from .registry import Method, register


def _always(options) -> bool:
    return True


register(Method("lora", "low-rank ΔW = BA on chosen Linear layers (PEFT adapter files)",
                setup=lambda model, options, lora: inject(model, lora), uses_lora=_always))
