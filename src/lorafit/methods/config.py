"""MethodConfig: the `method:` section of a run config (which method, and its options)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ConfigDict

from ..core.config import ConfigError
from .registry import names


@dataclass
class MethodConfig:
    """Which parameters train: LoRA (the default) or one of the methods the talks weigh it against."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # an unknown key is an error, never silently ignored
    name: str = "lora"  # a registered method (lorafit.methods); the YAML may say just `method: full`
    top_blocks: int = 2  # freeze: train only the top K transformer blocks (plus final norm and a new head)
    bottleneck: int = 64  # adapter: Houlsby bottleneck size m (2·d·m + d + m parameters per adapter)
    virtual_tokens: int = 16  # prefix / prompt: how many trainable virtual tokens
    mezo_params: str = "lora"  # mezo: perturb the LoRA parameters ("lora") or every parameter ("all")
    mezo_eps: float = 1e-3  # mezo: perturbation scale ε of the two-point gradient estimate (Malladi et al.)
    shots: int = 4  # in-context: training examples shown in each prompt (no training)

    def __post_init__(self) -> None:
        if self.name not in names():
            raise ConfigError(f"method must be one of {', '.join(names())}, got {self.name!r}")
        if self.mezo_params not in ("lora", "all"):
            raise ConfigError(f"mezo_params must be 'lora' or 'all', got {self.mezo_params!r}")
        for key in ("top_blocks", "bottleneck", "virtual_tokens", "shots"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.mezo_eps > 0:
            raise ConfigError(f"mezo_eps must be > 0, got {self.mezo_eps}")
